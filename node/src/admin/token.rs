//! Which admin tokens a node accepts: `admin.token`, `admin.token_file`, or, with neither,
//! one the node makes at first start and keeps in `<data_dir>/admin-token` (mode 600), so a
//! zero-config node is never an open door and `petrel ctl` on the same machine finds it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use petrel_admin_api::{AuthPolicy, Role, Tokens};

use crate::config::Config;

/// The file a generated token lives in, under the data directory.
pub const TOKEN_FILE: &str = "admin-token";

/// Where the generated token is (or would be) for this configuration.
pub fn generated_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// The tokens and the open routes of the admin listener.
pub fn policy(cfg: &Config) -> Result<AuthPolicy, String> {
    let admin = &cfg.admin;
    let mut tokens = Tokens::none();
    if !admin.token_file.as_os_str().is_empty() {
        let path = &admin.token_file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("read admin token file {}: {e}", path.display()))?;
        tokens = Tokens::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if tokens.is_empty() {
            return Err(format!(
                "admin token file {} holds no token",
                path.display()
            ));
        }
    }
    if !admin.token.is_empty() {
        tokens
            .add(&admin.token, Role::ReadWrite)
            .map_err(|e| format!("admin.token: {e}"))?;
    }
    if tokens.is_empty() {
        let path = generated_path(&cfg.storage.data_dir);
        let token = generated(&path)?;
        tokens
            .add(&token, Role::ReadWrite)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(AuthPolicy {
        tokens,
        protect_metrics: admin.protect_metrics,
        protect_health: admin.protect_health,
    })
}

/// The token in `path`, made (32 random bytes, hex) if the file does not exist yet.
fn generated(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => return Ok(t.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("read admin token {}: {e}", path.display())),
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|e| format!("read /dev/urandom for an admin token: {e}"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("create admin token {}: {e}", path.display()))?;
    writeln!(f, "{token}")
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write admin token {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "made an admin API token (petrel ctl on this machine reads it)");
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_zero_config_node_makes_a_private_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = dir.path().join("data");
        let p1 = policy(&cfg).unwrap();
        let path = generated_path(&cfg.storage.data_dir);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let token = std::fs::read_to_string(&path).unwrap();
        assert_eq!(token.trim().len(), 64);
        assert_eq!(
            p1.tokens.role_of(token.trim().as_bytes()),
            Some(Role::ReadWrite)
        );
        let p2 = policy(&cfg).unwrap();
        assert_eq!(
            p2.tokens.role_of(token.trim().as_bytes()),
            Some(Role::ReadWrite),
            "kept"
        );
    }

    #[test]
    fn configured_tokens_replace_the_generated_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = dir.path().to_path_buf();
        cfg.admin.token = "0123456789abcdef0123".into();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "read-only ro-token-0123456789\n").unwrap();
        cfg.admin.token_file = file;
        let p = policy(&cfg).unwrap();
        assert_eq!(
            p.tokens.role_of(b"0123456789abcdef0123"),
            Some(Role::ReadWrite)
        );
        assert_eq!(
            p.tokens.role_of(b"ro-token-0123456789"),
            Some(Role::ReadOnly)
        );
        assert!(!generated_path(dir.path()).exists());
    }
}
