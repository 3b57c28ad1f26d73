//! Anomaly-map post-processing against scipy / torch (fixtures from `scripts/make_fixtures.py`):
//! `gaussian_filter` (reflect, truncate 4) and bilinear `F.interpolate` in both corner
//! conventions. Tolerance 1e-6.

mod common;

use common::*;
use zsad::method::maps::{gaussian_filter, upsample_bilinear};

#[test]
fn gaussian_filter_matches_scipy() {
    let exp = load_expected("maps.expected.safetensors");
    for (map, h, w, sigma, key) in [
        ("map_50x40", 50, 40, 4.0, "gauss_50x40_s4.0"),
        ("map_50x40", 50, 40, 1.5, "gauss_50x40_s1.5"),
        ("map_3x5", 3, 5, 4.0, "gauss_3x5_s4.0"),
    ] {
        let src = exp[map].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = gaussian_filter(&src, h, w, sigma);
        let want = exp[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-6, "{key}: max abs error {err}");
    }
}

#[test]
fn bilinear_upsampling_matches_torch() {
    let exp = load_expected("maps.expected.safetensors");
    for ac in [true, false] {
        let got = upsample_bilinear(&exp["grid_2x5x6"], 13, 17, ac).unwrap();
        assert_close(
            &format!("align_corners={ac}"),
            &got,
            &exp[&format!("up_13x17_ac{}", ac as u8)],
            1e-6,
        );
    }
}
