//! Errors of the data pipeline: each names the file, line or record it is about and, where one
//! exists, a hint for the fix.

use std::path::PathBuf;

use crate::bad::BadRecord;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: {message}\n  hint: {hint}")]
    Config { file: PathBuf, message: String, hint: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a LLaVA JSON list or JSONL file: {message}\n  hint: the file must be a JSON array of records or one record per line (.jsonl)")]
    RecordFile { file: PathBuf, message: String },
    #[error("tokenizer {path}: {message}\n  hint: {hint}")]
    Tokenizer { path: PathBuf, message: String, hint: String },
    /// A bad record met while `on_bad_record = "error"`.
    #[error("{0}\n  hint: set on_bad_record = \"skip\" in [data] to skip and count such records")]
    BadRecord(Box<BadRecord>),
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("index {index} is out of range: the dataset has {len} records")]
    IndexOutOfRange { index: usize, len: usize },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
