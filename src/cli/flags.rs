//! Value parsers for numeric flags: clap refuses an out-of-range value before any work, with a
//! message naming the flag (clap adds it) and the valid range. NaN and infinities are refused
//! everywhere: they parse as `f64` and would otherwise reach the optimiser.

fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err("must be a finite number (not NaN or infinity)".into())
    }
}

/// A finite number > 0 (learning rates).
pub fn positive(s: &str) -> Result<f64, String> {
    match finite(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err("must be a finite number > 0, e.g. 0.001".into()),
    }
}

/// A finite number >= 0 (weight decay).
pub fn non_negative(s: &str) -> Result<f64, String> {
    match finite(s)? {
        v if v >= 0.0 => Ok(v),
        _ => Err("must be a finite number >= 0 (0 turns it off)".into()),
    }
}

/// A probability or weight in [0, 1].
pub fn unit_interval(s: &str) -> Result<f64, String> {
    match finite(s)? {
        v if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("must be a number from 0 to 1".into()),
    }
}

/// An integer in `lo..=hi`.
pub fn count_in(
    lo: usize,
    hi: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<usize>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("must be an integer from {lo} to {hi}")),
    }
}

/// An integer >= `lo`.
pub fn at_least(
    lo: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<usize>() {
        Ok(v) if v >= lo => Ok(v),
        _ => Err(format!("must be an integer >= {lo}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_non_finite_values() {
        assert_eq!(positive("0.001"), Ok(0.001));
        for bad in ["0", "-1", "nan", "NaN", "inf", "-inf", "x", ""] {
            assert!(positive(bad).is_err(), "{bad}");
        }
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(non_negative("-0.1").is_err());
        assert!(non_negative("nan").is_err());
        assert_eq!(unit_interval("1"), Ok(1.0));
        assert!(unit_interval("1.01").is_err());
        assert!(unit_interval("NaN").is_err());
        let epochs = count_in(1, 10);
        assert_eq!(epochs("3"), Ok(3));
        assert_eq!(
            epochs("0"),
            Err("must be an integer from 1 to 10".to_string())
        );
        assert!(epochs("11").is_err() && epochs("-1").is_err() && epochs("2.5").is_err());
        assert_eq!(at_least(1)("0"), Err("must be an integer >= 1".to_string()));
        assert_eq!(at_least(1)("7"), Ok(7));
    }
}
