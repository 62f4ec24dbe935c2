//! Errors of the generator: each names the folder or file it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("synthetic dataset options: {message}\n  hint: see fila_synth::SynthOptions")]
    Options { message: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {message}")]
    Encode { path: PathBuf, message: String },
    #[error("synthetic tokenizer: {message}\n  hint: a bug in fila_synth::tokenizer")]
    Tokenizer { message: String },
}

impl SynthError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SynthError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = SynthError> = std::result::Result<T, E>;
