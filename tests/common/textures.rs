//! The synthetic texture dataset of the end-to-end tests: striped textures of several classes
//! with pasted defects of known masks.

use std::path::Path;

/// The library's splitmix64, with a bounded draw.
struct Rng(zsad::rng::SplitMix64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n
    }
}

/// `n` images of class `c` (64x64) with masks beside them (`<stem>_mask.png`): grey stripes
/// whose orientation and period depend on the class; half the images have 1-2 square defects
/// of a saturated colour (what transfers across classes).
pub fn make_class(root: &Path, c: u32, n: usize, seed: u64) {
    let dir = root.join(format!("class{c}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng(zsad::rng::SplitMix64(seed ^ (c as u64 * 7919)));
    let angle = c as f64 * 0.7;
    let period = 6.0 + 2.5 * c as f64;
    let base = [128u32, 128, 128];
    for i in 0..n {
        let mut img = image::RgbImage::new(64, 64);
        let mut mask = image::GrayImage::new(64, 64);
        for (x, y, p) in img.enumerate_pixels_mut() {
            let t = (x as f64 * angle.cos() + y as f64 * angle.sin()) / period;
            let v = 40.0 * (2.0 * std::f64::consts::PI * t).sin();
            let noise = rng.below(17) as f64 - 8.0;
            p.0 = std::array::from_fn(|k| (base[k] as f64 + v + noise).clamp(0.0, 255.0) as u8);
        }
        if i % 2 == 1 {
            for _ in 0..1 + rng.below(2) {
                let s = 8 + rng.below(9) as u32;
                let (x0, y0) = (
                    rng.below((64 - s) as u64) as u32,
                    rng.below((64 - s) as u64) as u32,
                );
                let colour = if rng.below(2) == 0 {
                    [230, 40, 30]
                } else {
                    [30, 60, 220]
                };
                for y in y0..y0 + s {
                    for x in x0..x0 + s {
                        img.put_pixel(x, y, image::Rgb(colour));
                        mask.put_pixel(x, y, image::Luma([255]));
                    }
                }
            }
        }
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
        mask.save(dir.join(format!("{i:03}_mask.png"))).unwrap();
    }
}
