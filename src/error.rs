//! Typed errors of the library. The binary wraps them with `anyhow` context and prints the chain.

use std::path::PathBuf;

/// Errors raised by the library. Each variant names the file, tensor or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch inside a forward pass, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The model files could not be found, read, or do not describe a CLIP model.
    #[error("{0}")]
    Model(String),

    /// A weight is missing or has the wrong shape.
    #[error("weights {file}: {message}")]
    Weights { file: String, message: String },

    /// An image could not be decoded or is unusable.
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An adapter file or detector configuration is unusable: unknown format, a setting outside
    /// what the backbone allows, a tensor missing or of the wrong shape.
    #[error("{0}")]
    Adapter(String),

    /// A dataset folder or manifest cannot be read as a labelled dataset (layout, masks, labels).
    #[error("{0}")]
    Dataset(String),

    /// An output could not be written or read back (PNG encoding, `.npy` headers, records).
    #[error("{0}")]
    Output(String),

    /// Training cannot go on: a non-finite loss, a checkpoint that does not match the run.
    #[error("{0}")]
    Training(String),

    /// The device cannot run the work: no CUDA in this build, no GPU or driver, a GPU out of
    /// memory. The message says what to change.
    #[error("{0}")]
    Device(String),

    /// A setting or flag value is out of range (batch size 0, NaN threshold, ...). The message names
    /// the flag and what it accepts.
    #[error("{0}")]
    Usage(String),

    /// Library API misuse by a caller: an argument that does not fit the model (layer out of
    /// range, prompt width ...). User input is checked before it gets here.
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `bail!`-style shorthand for [`Error::InvalidArgument`].
macro_rules! invalid {
    ($($arg:tt)*) => {
        $crate::error::Error::InvalidArgument(format!($($arg)*))
    };
}
pub(crate) use invalid;
