//! Storage errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open rocksdb at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error(
        "data directory {path} has format version {found}, this build of petrel reads version {expected}; \
         use a matching petrel version or move the directory away"
    )]
    FormatVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("data directory {path} is not a petrel data directory (it holds files but no petrel database)")]
    NotPetrel { path: PathBuf },
    #[error("create data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rocksdb {action}")]
    Rocks {
        action: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    #[error("the store's writer has stopped after an earlier write error")]
    WriterFailed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
