//! The error type of authentication and authorisation.

use std::path::{Path, PathBuf};

/// What went wrong loading, saving or using a password or ACL file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("read {what} {}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {what} {}", .path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {what}{} line {line}: {reason}", in_path(.path))]
    Parse {
        what: &'static str,
        /// `None` when parsing text that did not come from a file.
        path: Option<PathBuf>,
        line: usize,
        reason: String,
    },
    #[error("check username {username:?}: {reason}")]
    InvalidUsername {
        username: String,
        reason: &'static str,
    },
    #[error("hash password")]
    Hash(#[source] argon2::password_hash::Error),
    #[error("remove user {username:?} from {}: no such user", .path.display())]
    UnknownUser { username: String, path: PathBuf },
    #[error("read password from the terminal")]
    Prompt(#[source] std::io::Error),
    #[error("read password: {0}")]
    BadPassword(&'static str),
}

impl AuthError {
    /// Adds the file a parse error came from.
    pub(crate) fn at_path(self, file: &Path) -> Self {
        match self {
            AuthError::Parse {
                what,
                path: None,
                line,
                reason,
            } => AuthError::Parse {
                what,
                path: Some(file.to_path_buf()),
                line,
                reason,
            },
            other => other,
        }
    }
}

fn in_path(path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => format!(" {}", path.display()),
        None => String::new(),
    }
}

/// Formats an error with its chain of sources, `outer: inner: ...`, for log lines.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_action() {
        let e = AuthError::Parse {
            what: "acl file",
            path: None,
            line: 3,
            reason: "bad".into(),
        };
        assert_eq!(e.to_string(), "parse acl file line 3: bad");
        let e = e.at_path(Path::new("/etc/petrel/acl"));
        assert_eq!(e.to_string(), "parse acl file /etc/petrel/acl line 3: bad");
        let e = AuthError::Read {
            what: "password file",
            path: "/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(chain(&e), "read password file /x: gone");
    }
}
