//! The password file: one `username:PHC-string` per line.
//!
//! ```text
//! # comments and blank lines are kept when the file is rewritten
//! alice:$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>
//! ```
//!
//! Only argon2id hashes in PHC format are accepted; each hash carries its own parameters, so
//! entries hashed with other costs keep working. New entries use argon2's defaults
//! (m=19456 KiB, t=2, p=1). A username is everything before the first `:`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use super::AuthError;

const WHAT: &str = "password file";

/// A parsed password file. Verifying is CPU-bound (tens of milliseconds): call it from
/// `spawn_blocking`, not on an async worker.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    lines: Vec<Line>,
    /// Username to index in `lines`.
    index: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
enum Line {
    /// A comment or a blank line, kept verbatim.
    Other(String),
    User {
        name: String,
        phc: String,
    },
}

impl PasswordFile {
    /// Reads and parses the password file at `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = fs::read_to_string(path).map_err(|source| AuthError::Read {
            what: WHAT,
            path: path.to_path_buf(),
            source,
        })?;
        PasswordFile::parse(&text).map_err(|e| e.at_path(path))
    }

    /// Parses password-file text. A malformed line is an error naming its number.
    pub fn parse(text: &str) -> Result<PasswordFile, AuthError> {
        let mut file = PasswordFile::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim_end();
            if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
                file.lines.push(Line::Other(line.to_string()));
                continue;
            }
            let parse_error = |reason: String| AuthError::Parse {
                what: WHAT,
                path: None,
                line: n + 1,
                reason,
            };
            let (name, phc) = line
                .split_once(':')
                .ok_or_else(|| parse_error("expected `username:hash`".to_string()))?;
            validate_username(name).map_err(|e| parse_error(e.to_string()))?;
            check_phc(phc).map_err(parse_error)?;
            if file.index.contains_key(name) {
                return Err(parse_error(format!("user {name:?} appears twice")));
            }
            file.index.insert(name.to_string(), file.lines.len());
            file.lines.push(Line::User {
                name: name.to_string(),
                phc: phc.to_string(),
            });
        }
        Ok(file)
    }

    /// Whether `password` is the password of `username`. An unknown user costs about as much
    /// time as a known one, so the answer's timing does not tell which users exist.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        match self.index.get(username).map(|&i| &self.lines[i]) {
            Some(Line::User { phc, .. }) => verify_phc(phc, password),
            _ => {
                // Same work as a real check; the result is ignored.
                let _ = verify_phc(dummy_phc(), password);
                false
            }
        }
    }

    /// Adds `username` or changes its password.
    pub fn set(&mut self, username: &str, password: &[u8]) -> Result<(), AuthError> {
        self.set_with(username, password, &Argon2::default())
    }

    /// Removes `username`; false if it was not there.
    pub fn remove(&mut self, username: &str) -> bool {
        let Some(i) = self.index.remove(username) else {
            return false;
        };
        self.lines.remove(i);
        for pos in self.index.values_mut() {
            if *pos > i {
                *pos -= 1;
            }
        }
        true
    }

    /// Whether `username` has an entry.
    pub fn contains(&self, username: &str) -> bool {
        self.index.contains_key(username)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Writes the file atomically (a temporary file in the same directory, then a rename), with
    /// mode 0600 on Unix.
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        let write_error = |source| AuthError::Write {
            what: WHAT,
            path: path.to_path_buf(),
            source,
        };
        let tmp = tmp_path(path);
        let result =
            write_new(&tmp, self.to_text().as_bytes()).and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(write_error(e));
        }
        sync_parent(path).map_err(write_error)
    }

    fn set_with(
        &mut self,
        username: &str,
        password: &[u8],
        argon: &Argon2<'_>,
    ) -> Result<(), AuthError> {
        validate_username(username)?;
        let salt = SaltString::generate(&mut OsRng);
        let phc = argon
            .hash_password(password, &salt)
            .map_err(AuthError::Hash)?
            .to_string();
        match self.index.get(username) {
            Some(&i) => {
                self.lines[i] = Line::User {
                    name: username.to_string(),
                    phc,
                }
            }
            None => {
                self.index.insert(username.to_string(), self.lines.len());
                self.lines.push(Line::User {
                    name: username.to_string(),
                    phc,
                });
            }
        }
        Ok(())
    }

    fn to_text(&self) -> String {
        let mut text = String::new();
        for line in &self.lines {
            match line {
                Line::Other(other) => text.push_str(other),
                Line::User { name, phc } => {
                    text.push_str(name);
                    text.push(':');
                    text.push_str(phc);
                }
            }
            text.push('\n');
        }
        text
    }
}

/// Checks that a username can be stored in the file and read back unchanged.
pub(crate) fn validate_username(name: &str) -> Result<(), AuthError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.contains(':') {
        "must not contain ':'"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else if name.trim_start().starts_with('#') {
        "must not start with '#'"
    } else if name.trim() != name {
        "must not start or end with whitespace"
    } else {
        return Ok(());
    };
    Err(AuthError::InvalidUsername {
        username: name.to_string(),
        reason,
    })
}

/// Checks that `phc` is a complete argon2id PHC string whose parameters argon2 accepts.
fn check_phc(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("invalid PHC string: {e}"))?;
    if hash.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "unsupported hash algorithm {:?}, expected argon2id",
            hash.algorithm.as_str()
        ));
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("PHC string lacks salt or hash".to_string());
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
    Ok(())
}

thread_local! {
    /// argon2 working memory (19 MiB at the default cost), kept by each thread that checks
    /// passwords. Allocated afresh for every check, as `verify_password` does, the memory
    /// of freed checks stays in glibc's per-thread arena: about ten checks' worth (~200 MiB)
    /// per thread, measured. Reused, a thread holds one.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// `verify_password` of argon2 with this thread's reused working memory.
fn verify_phc(phc: &str, password: &[u8]) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(version), Ok(params)) = (
        Algorithm::try_from(hash.algorithm),
        hash.version.map(Version::try_from).transpose(),
        Params::try_from(&hash),
    ) else {
        return false;
    };
    let mut salt_buf = [0u8; Salt::MAX_LENGTH];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let needed = params.block_count();
    let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
    let computed = BLOCKS.with(|blocks| {
        let mut blocks = blocks.borrow_mut();
        if blocks.len() < needed {
            *blocks = vec![Block::default(); needed];
        }
        Output::init_with(expected.len(), |out| {
            argon2
                .hash_password_into_with_memory(password, salt, out, &mut blocks[..needed])
                .map_err(Into::into)
        })
    });
    // `Output` compares in constant time.
    computed.is_ok_and(|c| c == expected)
}

/// A hash with the default parameters, checked against for unknown users.
fn dummy_phc() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(b"petrel-unknown-user", &salt)
            .expect("argon2 hashes with its default parameters")
            .to_string()
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Creates `path` afresh (mode 0600), writes `bytes` and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashing with argon2's minimum costs keeps the tests fast; verification reads the
    /// parameters from the hash.
    fn cheap() -> Argon2<'static> {
        let params = argon2::Params::new(8, 1, 1, None).expect("valid params");
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
    }

    fn with_users(users: &[(&str, &str)]) -> PasswordFile {
        let mut file = PasswordFile::default();
        for (name, password) in users {
            file.set_with(name, password.as_bytes(), &cheap())
                .expect("set");
        }
        file
    }

    #[test]
    fn set_verify_remove() {
        let mut file = with_users(&[("alice", "secret"), ("bob", "hunter2")]);
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"hunter2"));
        assert!(file.verify("bob", b"hunter2"));
        assert!(!file.verify("carol", b"secret"));
        file.set_with("alice", b"new", &cheap()).expect("change");
        assert!(file.verify("alice", b"new"));
        assert!(!file.verify("alice", b"secret"));
        assert_eq!(file.len(), 2);
        assert!(file.remove("alice"));
        assert!(!file.remove("alice"));
        assert!(!file.verify("alice", b"new"));
        assert!(file.verify("bob", b"hunter2"), "index fixed after removal");
        assert_eq!(file.len(), 1);
    }

    #[test]
    fn default_parameters_are_argon2id_v19() {
        let mut file = PasswordFile::default();
        file.set("alice", b"pw").expect("set");
        let text = file.to_text();
        assert!(
            text.starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$"),
            "{text}"
        );
        assert!(file.verify("alice", b"pw"));
    }

    #[test]
    fn parse_round_trip_keeps_comments() {
        let file = with_users(&[("alice", "a"), ("bob", "b")]);
        let text = format!("# users\n\n{}", file.to_text());
        let parsed = PasswordFile::parse(&text).expect("parse");
        assert_eq!(parsed.to_text(), text);
        assert!(parsed.verify("bob", b"b"));
        let crlf = text.replace('\n', "\r\n");
        assert!(PasswordFile::parse(&crlf)
            .expect("crlf")
            .verify("alice", b"a"));
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let good = with_users(&[("alice", "a")]).to_text();
        let phc = good
            .trim_end()
            .split_once(':')
            .expect("entry")
            .1
            .to_string();
        let table = [
            ("alice", "expected `username:hash`"),
            (":x", "must not be empty"),
            ("alice:not-a-phc", "invalid PHC string"),
            (
                "alice:$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "unsupported hash algorithm",
            ),
            ("alice:$argon2id$v=19$m=19456,t=2,p=1", "lacks salt or hash"),
        ];
        for (line, want) in table {
            let text = format!("# header\n\n{line}\n");
            let err = PasswordFile::parse(&text).expect_err(line).to_string();
            assert!(
                err.starts_with("parse password file line 3: "),
                "{line}: {err}"
            );
            assert!(err.contains(want), "{line}: {err}");
        }
        let argon2i = format!("alice:{}", phc.replacen("argon2id", "argon2i", 1));
        let err = PasswordFile::parse(&argon2i)
            .expect_err("argon2i")
            .to_string();
        assert!(
            err.contains("unsupported hash algorithm \"argon2i\""),
            "{err}"
        );
        let twice = format!("alice:{phc}\nalice:{phc}\n");
        let err = PasswordFile::parse(&twice)
            .expect_err("duplicate")
            .to_string();
        assert!(err.contains("line 2") && err.contains("twice"), "{err}");
    }

    #[test]
    fn usernames_are_checked() {
        let mut file = PasswordFile::default();
        for bad in ["", "a:b", "#x", "a\nb", " a", "a "] {
            let err = file.set_with(bad, b"pw", &cheap()).expect_err(bad);
            assert!(
                matches!(err, AuthError::InvalidUsername { .. }),
                "{bad}: {err}"
            );
        }
        file.set_with("a b", b"pw", &cheap())
            .expect("inner space is fine");
        file.set_with("ünïcode", b"pw", &cheap())
            .expect("unicode is fine");
    }

    #[test]
    fn save_is_atomic_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        let file = with_users(&[("alice", "a")]);
        file.save(&path).expect("save");
        file.save(&path).expect("save over an existing file");
        let loaded = PasswordFile::load(&path).expect("load");
        assert!(loaded.verify("alice", b"a"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("passwd")]);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing");
        let err = PasswordFile::load(&path).expect_err("missing");
        assert!(err.to_string().starts_with("read password file "), "{err}");
        fs::write(&path, "nonsense\n").expect("write");
        let err = PasswordFile::load(&path)
            .expect_err("malformed")
            .to_string();
        assert_eq!(
            err,
            format!(
                "parse password file {} line 1: expected `username:hash`",
                path.display()
            )
        );
    }
}
