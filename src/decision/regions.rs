//! The defect mask of a map above a pixel threshold and its connected regions (8-connected,
//! as `skimage.measure.label` with full connectivity and `regionprops`' `area`, `bbox` and
//! `intensity_max`), largest first.

use crate::data::records::{BBox, Region};
use crate::eval::metrics::label_regions;

/// The mask of a row-major `height x width` map (`map >= threshold`, the convention of an
/// image score against its threshold) with regions smaller than `min_area` pixels removed,
/// and the regions that remain: by area (largest first), then peak (highest first), then in
/// raster order of their first pixel.
pub fn defect_regions(
    map: &[f32],
    width: usize,
    height: usize,
    threshold: f32,
    min_area: u64,
) -> (Vec<bool>, Vec<Region>) {
    assert_eq!(
        map.len(),
        width * height,
        "map does not match {width}x{height}"
    );
    let mut mask: Vec<bool> = map.iter().map(|&v| v >= threshold).collect();
    let (labels, n) = label_regions(&mask, height, width);
    struct Acc {
        area: u64,
        x0: usize,
        y0: usize,
        x1: usize,
        y1: usize,
        peak: f32,
    }
    let mut acc: Vec<Acc> = (0..n)
        .map(|_| Acc {
            area: 0,
            x0: usize::MAX,
            y0: usize::MAX,
            x1: 0,
            y1: 0,
            peak: f32::NEG_INFINITY,
        })
        .collect();
    for (i, &l) in labels.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let a = &mut acc[l as usize - 1];
        let (y, x) = (i / width, i % width);
        a.area += 1;
        a.x0 = a.x0.min(x);
        a.y0 = a.y0.min(y);
        a.x1 = a.x1.max(x);
        a.y1 = a.y1.max(y);
        a.peak = a.peak.max(map[i]);
    }
    let keep: Vec<bool> = acc.iter().map(|a| a.area >= min_area).collect();
    if keep.iter().any(|k| !k) {
        for (m, &l) in mask.iter_mut().zip(&labels) {
            if l != 0 && !keep[l as usize - 1] {
                *m = false;
            }
        }
    }
    let mut regions: Vec<Region> = acc
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(a, _)| Region {
            area: a.area,
            bbox: BBox {
                x: a.x0 as u32,
                y: a.y0 as u32,
                width: (a.x1 - a.x0 + 1) as u32,
                height: (a.y1 - a.y0 + 1) as u32,
            },
            peak: a.peak,
        })
        .collect();
    // A stable sort keeps raster order among equal areas and peaks.
    regions.sort_by(|a, b| b.area.cmp(&a.area).then(b.peak.total_cmp(&a.peak)));
    (mask, regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 5 x 4 map, threshold 0.5:
    /// ```text
    /// .9 .9 .  .  .
    /// .  .  .  .  .6
    /// .  .  .  .7 .
    /// .8 .  .  .  .
    /// ```
    /// Regions: {(0,0), (1,0)} area 2; {(4,1), (3,2)} diagonal, area 2, peak 0.7;
    /// {(0,3)} area 1.
    #[test]
    fn regions_by_hand() {
        let mut map = vec![0.1f32; 20];
        let set = |m: &mut Vec<f32>, x: usize, y: usize, v: f32| m[y * 5 + x] = v;
        set(&mut map, 0, 0, 0.9);
        set(&mut map, 1, 0, 0.9);
        set(&mut map, 4, 1, 0.6);
        set(&mut map, 3, 2, 0.7);
        set(&mut map, 0, 3, 0.8);
        let (mask, r) = defect_regions(&map, 5, 4, 0.5, 1);
        assert_eq!(mask.iter().filter(|&&b| b).count(), 5);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].area, r[0].peak), (2, 0.9));
        assert_eq!(
            r[0].bbox,
            BBox {
                x: 0,
                y: 0,
                width: 2,
                height: 1
            }
        );
        assert_eq!((r[1].area, r[1].peak), (2, 0.7));
        assert_eq!(
            r[1].bbox,
            BBox {
                x: 3,
                y: 1,
                width: 2,
                height: 2
            }
        );
        assert_eq!((r[2].area, r[2].peak), (1, 0.8));
        // --min-region-area 2 drops the speck from the regions and the mask.
        let (mask, r) = defect_regions(&map, 5, 4, 0.5, 2);
        assert_eq!(r.len(), 2);
        assert!(!mask[3 * 5]);
        assert_eq!(mask.iter().filter(|&&b| b).count(), 4);
        // The threshold is inclusive; above everything there is nothing.
        assert_eq!(defect_regions(&map, 5, 4, 0.9, 1).1.len(), 1);
        assert!(defect_regions(&map, 5, 4, 0.95, 1).1.is_empty());
    }
}
