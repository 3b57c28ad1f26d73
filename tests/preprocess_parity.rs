//! Image preprocessing against PIL (fixtures from `scripts/make_fixtures.py`): bicubic resize of
//! RGB / RGBA / grey images and bilinear mask resize + `> 0.5`. Tolerance: exact (0 levels); the
//! issue allows 1/255, the Pillow port reaches bit equality.

mod common;

use candle_core::Tensor;
use common::*;
use zsad::data::image::{decode, resize_bicubic, resize_mask, to_luma8, to_rgb8};

/// Max level difference and the share of pixels that differ at all.
fn compare(got: &[u8], want: &Tensor) -> (u8, f64) {
    let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(got.len(), want.len());
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    let off = got.iter().zip(&want).filter(|(a, b)| a != b).count() as f64 / got.len() as f64;
    (max, off)
}

#[test]
fn bicubic_resize_matches_pil_exactly() {
    let exp = load_expected("preprocess.expected.safetensors");
    for name in ["rgb_50x37", "rgba_61x45", "grey_50x37"] {
        let img =
            to_rgb8(&decode(&fixtures().join("preprocess").join(format!("{name}.png"))).unwrap());
        for s in [32u32, 24, 80] {
            let got = resize_bicubic(&img, s, s);
            let (max, off) = compare(got.as_raw(), &exp[&format!("{name}@{s}")]);
            assert_eq!(max, 0, "{name}@{s}: {:.1}% of values differ", off * 100.0);
        }
    }
}

#[test]
fn mask_resize_matches_pil() {
    let exp = load_expected("preprocess.expected.safetensors");
    let mask = to_luma8(&decode(&fixtures().join("preprocess/mask_50x37.png")).unwrap());
    for s in [32u32, 80] {
        let got: Vec<u8> = resize_mask(&mask, s, s).into_iter().map(u8::from).collect();
        let (max, off) = compare(&got, &exp[&format!("mask_50x37@{s}")]);
        assert_eq!(max, 0, "mask@{s}: {:.2}% of pixels differ", off * 100.0);
    }
}

/// A real 900x900 MVTec image, squashed to 224 as CLIP sees it.
#[test]
fn real_image_matches_pil() {
    let Some(shared) = shared() else {
        skip(
            "preprocess_parity::real_image_matches_pil",
            "../shared is absent",
        );
        return;
    };
    let exp = load_expected("preprocess.expected.safetensors");
    let Some(want) = exp.get("bottle_000@224") else {
        return;
    };
    let path = shared.join("data/mvtec_ad/bottle/test/broken_large/000.png");
    if !path.exists() {
        skip(
            "preprocess_parity::real_image_matches_pil",
            &format!("{} is absent", path.display()),
        );
        return;
    }
    let img = to_rgb8(&decode(&path).unwrap());
    let (max, off) = compare(resize_bicubic(&img, 224, 224).as_raw(), want);
    assert_eq!(
        max,
        0,
        "max difference {max} levels ({:.2}% differ)",
        off * 100.0
    );
    let mask = to_luma8(
        &decode(&shared.join("data/mvtec_ad/bottle/ground_truth/broken_large/000_mask.png"))
            .unwrap(),
    );
    let got: Vec<u8> = resize_mask(&mask, 224, 224)
        .into_iter()
        .map(u8::from)
        .collect();
    let (max, off) = compare(&got, &exp["bottle_000_mask@224"]);
    assert_eq!(max, 0, "{:.3}% of mask pixels differ", off * 100.0);
}
