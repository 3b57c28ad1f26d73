//! The library's [`Choice`] enums as clap values: names and `--help` lines come from the
//! library, so a flag, a config file and a record spell every choice the same way.

use clap::builder::PossibleValue;
use clap::ValueEnum;

use crate::choice::Choice;

macro_rules! clap_values {
    ($($ty:ty),+ $(,)?) => {
        $(
            impl ValueEnum for $ty {
                fn value_variants<'a>() -> &'a [Self] {
                    <$ty as Choice>::ALL
                }

                fn to_possible_value(&self) -> Option<PossibleValue> {
                    Some(PossibleValue::new(self.name()).help(self.help()))
                }
            }
        )+
    };
}

clap_values!(
    crate::method::Preset,
    crate::method::import::CheckpointFormat,
    crate::train::ImageLoss,
    crate::train::DiceGroups,
    crate::data::records::RecordFormat,
    crate::data::outputs::MapFormat,
    crate::data::heatmap::HeatmapKind,
    crate::data::heatmap::HeatmapScale,
    crate::eval::SingleLabel,
    crate::eval::metrics::ProGrid,
    crate::jobs::prelude::ComputeDevice,
    crate::jobs::prelude::ModelDtype,
    crate::jobs::prelude::GemmPrecision,
    crate::jobs::prelude::JointChoice,
    crate::jobs::evaluate::Resolution,
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name parses back to its value through clap, and the serde spelling (configs,
    /// records) is the flag's.
    #[test]
    fn names_round_trip_through_clap_and_serde() {
        fn check<T: Choice + ValueEnum + std::fmt::Debug>() {
            for &v in T::ALL {
                assert_eq!(T::from_str(v.name(), false).ok(), Some(v), "{v:?}");
                assert!(!v.help().is_empty(), "{v:?} has no help line");
            }
        }
        fn serde_names<T: Choice + serde::Serialize>() {
            for &v in T::ALL {
                assert_eq!(serde_json::to_value(v).unwrap(), v.name());
            }
        }
        check::<crate::method::Preset>();
        check::<crate::method::import::CheckpointFormat>();
        check::<crate::train::ImageLoss>();
        check::<crate::train::DiceGroups>();
        check::<crate::data::records::RecordFormat>();
        check::<crate::data::outputs::MapFormat>();
        check::<crate::data::heatmap::HeatmapKind>();
        check::<crate::data::heatmap::HeatmapScale>();
        check::<crate::eval::SingleLabel>();
        check::<crate::eval::metrics::ProGrid>();
        check::<crate::jobs::prelude::ComputeDevice>();
        check::<crate::jobs::prelude::JointChoice>();
        check::<crate::jobs::evaluate::Resolution>();
        serde_names::<crate::method::Preset>();
        serde_names::<crate::train::ImageLoss>();
        serde_names::<crate::train::DiceGroups>();
        assert_eq!(crate::method::Preset::ZeroShot.name(), "zero-shot");
        assert_eq!(
            crate::train::ImageLoss::CrossEntropy.name(),
            "cross-entropy"
        );
    }
}
