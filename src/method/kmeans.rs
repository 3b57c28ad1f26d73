//! Seeded k-means for AdaCLIP's hybrid semantic fusion (`KMeans(n_clusters=k, n_init="auto")`,
//! caoyunkang/AdaCLIP@e27ee32 `method/adaclip.py` l.239, l.263): sklearn's
//! algorithm (greedy k-means++ seeding with `2 + ln k` candidates per centre, then Lloyd with
//! `max_iter = 300` and `tol = 1e-4 · mean feature variance` on the squared centre shift).
//! sklearn's random stream (numpy's global RNG) cannot be reproduced, so the seed here gives
//! deterministic but different draws; HSF then averages the centres, which damps the effect.

/// Result of [`kmeans`]: `k x d` centres (row-major) and one label per point.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    pub centers: Vec<f32>,
    pub labels: Vec<usize>,
    pub k: usize,
    pub iterations: usize,
}

use crate::rng::SplitMix64 as Rng;

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

/// Index whose cumulative weight first exceeds `r · total` (`np.searchsorted` on the cumsum).
fn sample(weights: &[f64], rng: &mut Rng) -> usize {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return (rng.next_f64() * weights.len() as f64) as usize % weights.len();
    }
    let target = rng.next_f64() * total;
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if acc > target {
            return i;
        }
    }
    weights.len() - 1
}

/// Clusters `n` points of dimension `d` (row-major `data`) into `min(k, n)` clusters.
pub fn kmeans(data: &[f32], n: usize, d: usize, k: usize, seed: u64) -> KMeans {
    assert_eq!(data.len(), n * d, "data is not {n} x {d}");
    assert!(n > 0 && k > 0, "k-means needs points and clusters");
    let k = k.min(n);
    let row = |i: usize| &data[i * d..(i + 1) * d];
    let mut rng = Rng(seed);

    let centers = seed_centers(data, n, d, k, &mut rng);
    let mut c: Vec<f32> = centers.iter().flat_map(|&i| row(i).to_vec()).collect();

    // Lloyd iterations, to sklearn's tolerance: 1e-4 of the mean per-feature variance.
    let tol = 1e-4 * mean_variance(data, n, d);
    let assign = |c: &[f32]| -> Vec<usize> {
        (0..n)
            .map(|i| {
                (0..k)
                    .map(|j| (j, sq_dist(row(i), &c[j * d..(j + 1) * d])))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(j, _)| j)
                    .expect("k > 0")
            })
            .collect()
    };
    let mut labels = assign(&c);
    let mut iterations = 0;
    for it in 1..=300 {
        iterations = it;
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for (i, &l) in labels.iter().enumerate() {
            counts[l] += 1;
            for j in 0..d {
                sums[l * d + j] += data[i * d + j] as f64;
            }
        }
        let mut new = c.clone();
        for l in 0..k {
            if counts[l] == 0 {
                // sklearn relocates an empty cluster to the point farthest from its centre.
                let far = (0..n)
                    .max_by(|&a, &b| {
                        let da = sq_dist(row(a), &c[labels[a] * d..(labels[a] + 1) * d]);
                        let db = sq_dist(row(b), &c[labels[b] * d..(labels[b] + 1) * d]);
                        da.total_cmp(&db)
                    })
                    .expect("n > 0");
                new[l * d..(l + 1) * d].copy_from_slice(row(far));
            } else {
                for j in 0..d {
                    new[l * d + j] = (sums[l * d + j] / counts[l] as f64) as f32;
                }
            }
        }
        let shift: f64 = new
            .iter()
            .zip(&c)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        c = new;
        let next = assign(&c);
        let stable = next == labels;
        labels = next;
        if stable || shift <= tol {
            break;
        }
    }
    KMeans {
        centers: c,
        labels,
        k,
        iterations,
    }
}

/// Greedy k-means++ seeding (sklearn's `_kmeans_plusplus`): the first centre at random, each
/// next one the best of `2 + ln k` candidates drawn in proportion to the squared distance to
/// the nearest centre so far.
fn seed_centers(data: &[f32], n: usize, d: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
    let row = |i: usize| &data[i * d..(i + 1) * d];
    let trials = 2 + (k as f64).ln() as usize;
    let mut centers: Vec<usize> = vec![(rng.next_f64() * n as f64) as usize % n];
    let mut closest: Vec<f64> = (0..n).map(|i| sq_dist(row(i), row(centers[0]))).collect();
    while centers.len() < k {
        let mut best: Option<(f64, usize, Vec<f64>)> = None;
        for _ in 0..trials {
            let c = sample(&closest, rng);
            let dists: Vec<f64> = (0..n)
                .map(|i| closest[i].min(sq_dist(row(i), row(c))))
                .collect();
            let potential: f64 = dists.iter().sum();
            if best.as_ref().is_none_or(|(p, _, _)| potential < *p) {
                best = Some((potential, c, dists));
            }
        }
        let (_, c, dists) = best.expect("at least one trial");
        centers.push(c);
        closest = dists;
    }
    centers
}

/// The mean over features of each feature's variance.
fn mean_variance(data: &[f32], n: usize, d: usize) -> f64 {
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| data[i * d + j] as f64).sum::<f64>() / n as f64)
        .collect();
    (0..d)
        .map(|j| {
            (0..n)
                .map(|i| (data[i * d + j] as f64 - mean[j]).powi(2))
                .sum::<f64>()
                / n as f64
        })
        .sum::<f64>()
        / d as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three tight blobs far apart: every point lands with its blob, centres at the blob means.
    fn blobs() -> (Vec<f32>, Vec<usize>) {
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0]];
        let mut data = Vec::new();
        let mut truth = Vec::new();
        for i in 0..30 {
            let b = i % 3;
            let jitter = ((i * 37 % 11) as f32 - 5.0) * 0.05;
            data.extend([centres[b][0] + jitter, centres[b][1] - jitter]);
            truth.push(b);
        }
        (data, truth)
    }

    #[test]
    fn recovers_separated_blobs() {
        let (data, truth) = blobs();
        let r = kmeans(&data, 30, 2, 3, 111);
        for i in 0..30 {
            for j in 0..30 {
                assert_eq!(truth[i] == truth[j], r.labels[i] == r.labels[j], "{i} {j}");
            }
        }
        for l in 0..3 {
            let members: Vec<usize> = (0..30).filter(|&i| r.labels[i] == l).collect();
            let mx = members.iter().map(|&i| data[2 * i]).sum::<f32>() / members.len() as f32;
            assert!((r.centers[2 * l] - mx).abs() < 1e-5);
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (data, _) = blobs();
        assert_eq!(kmeans(&data, 30, 2, 5, 7), kmeans(&data, 30, 2, 5, 7));
    }

    #[test]
    fn more_clusters_than_points_and_duplicates() {
        let data = vec![1.0f32; 4 * 3];
        let r = kmeans(&data, 4, 3, 20, 0);
        assert_eq!(r.k, 4);
        assert!(r
            .centers
            .iter()
            .all(|v| v.is_finite() && (*v - 1.0).abs() < 1e-6));
    }
}
