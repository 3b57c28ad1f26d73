//! The library's named choices (methods, file formats, loss variants, metric conventions): each
//! knows its user-facing name and a one-line description, so the command line, configs and
//! records can offer and print them without the library depending on a flag parser (the CLI
//! turns a [`Choice`] into a clap value in `cli::values`).

/// A closed set of named alternatives.
pub trait Choice: Copy + PartialEq + Sized + 'static {
    /// Every alternative, in the order help texts list them.
    const ALL: &'static [Self];

    /// The name users type and records store (kebab-case).
    fn name(self) -> &'static str;

    /// One line for `--help`.
    fn help(self) -> &'static str;

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.name() == name)
    }
}

/// Declares a fieldless enum whose variants each carry a doc comment (their `--help` line) and a
/// name, and implements [`Choice`] for it:
///
/// ```ignore
/// choice_enum! {
///     /// Record file format.
///     #[derive(Debug, Clone, Copy, PartialEq, Eq)]
///     pub enum RecordFormat {
///         /// `scores.jsonl`: one JSON object per line
///         Jsonl = "jsonl",
///     }
/// }
/// ```
macro_rules! choice_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $enum:ident {
            $( $(#[doc = $doc:literal])+ $variant:ident = $name:literal, )+
        }
    ) => {
        $(#[$meta])*
        $vis enum $enum {
            $( $(#[doc = $doc])+ $variant, )+
        }

        impl $crate::choice::Choice for $enum {
            const ALL: &'static [Self] = &[$(Self::$variant),+];

            fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }

            fn help(self) -> &'static str {
                match self {
                    $(Self::$variant => concat!($($doc),+).trim(),)+
                }
            }
        }
    };
}
pub(crate) use choice_enum;

#[cfg(test)]
mod tests {
    use super::Choice;

    choice_enum! {
        /// A test choice.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Fruit {
            /// a red one
            Apple = "apple",
            /// a long one,
            /// on two lines
            Banana = "banana",
        }
    }

    #[test]
    fn names_help_and_lookup() {
        assert_eq!(Fruit::ALL, [Fruit::Apple, Fruit::Banana]);
        assert_eq!(Fruit::Banana.name(), "banana");
        assert_eq!(Fruit::Apple.help(), "a red one");
        assert_eq!(Fruit::Banana.help(), "a long one, on two lines");
        assert_eq!(Fruit::from_name("apple"), Some(Fruit::Apple));
        assert_eq!(Fruit::from_name("Apple"), None);
    }
}
