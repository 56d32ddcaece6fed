//! Bearer tokens for the admin API: each has a role, read-only or read-write, and is
//! compared in constant time.
//!
//! A token file holds one token per line, `<role> <token>`, role `read-only` (or `ro`) or
//! `read-write` (or `rw`); blank lines and lines starting with `#` are skipped.

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::AdminError;

/// The shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// GET and HEAD only.
    ReadOnly,
    /// Everything.
    ReadWrite,
}

/// The tokens a node accepts.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(Box<[u8]>, Role)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("Tokens")
            .field("count", &self.entries.len())
            .finish()
    }
}

impl Tokens {
    /// No token: every protected route answers 401.
    pub fn none() -> Tokens {
        Tokens::default()
    }

    /// Adds a token; refuses one that is too short or holds whitespace.
    pub fn add(&mut self, token: &str, role: Role) -> Result<(), String> {
        check_token(token)?;
        self.entries.push((token.as_bytes().into(), role));
        Ok(())
    }

    /// Parses a token file (see the module documentation).
    pub fn parse_file(text: &str) -> Result<Tokens, String> {
        let mut tokens = Tokens::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (role, token) = (parts.next(), parts.next());
            let role = match role {
                Some("read-only" | "ro") => Role::ReadOnly,
                Some("read-write" | "rw") => Role::ReadWrite,
                Some(other) => {
                    return Err(format!(
                        "line {}: role {other:?} is not read-only or read-write",
                        n + 1
                    ))
                }
                None => unreachable!("a non-empty trimmed line has a first word"),
            };
            let Some(token) = token else {
                return Err(format!("line {}: no token after the role", n + 1));
            };
            if parts.next().is_some() {
                return Err(format!("line {}: more than a role and a token", n + 1));
            }
            tokens
                .add(token, role)
                .map_err(|e| format!("line {}: {e}", n + 1))?;
        }
        Ok(tokens)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of `presented`, if it is one of the tokens. Every token is compared, each in
    /// time that depends only on the lengths, so the answer's timing tells nothing about
    /// which bytes matched.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let mut found = None;
        for (token, role) in &self.entries {
            if constant_time_eq(token, presented) && found.is_none() {
                found = Some(*role);
            }
        }
        found
    }
}

/// Whether a token is acceptable.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "an admin token needs at least {MIN_TOKEN_LEN} characters"
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an admin token cannot hold whitespace or control characters".to_owned());
    }
    Ok(())
}

/// Equal bytes, in time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// Which routes need a token.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    pub tokens: Tokens,
    /// `/metrics` needs a token too.
    pub protect_metrics: bool,
    /// `/healthz`, `/readyz` (and their aliases) need a token too.
    pub protect_health: bool,
}

impl AuthPolicy {
    /// Every route needs `token`, read-write (for tests and simple setups).
    pub fn single(token: &str) -> Result<AuthPolicy, String> {
        let mut tokens = Tokens::none();
        tokens.add(token, Role::ReadWrite)?;
        Ok(AuthPolicy {
            tokens,
            protect_metrics: false,
            protect_health: false,
        })
    }
}

/// The middleware in front of protected routes: 401 without a known token, 403 when a
/// read-only token asks for a change.
pub async fn require_token(
    State(tokens): State<std::sync::Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let Some(presented) = presented else {
        return AdminError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a bearer token is required (Authorization: Bearer <token>)",
        )
        .into_response();
    };
    match tokens.role_of(presented.as_bytes()) {
        None => AdminError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not valid",
        )
        .into_response(),
        Some(Role::ReadOnly) if !matches!(*req.method(), Method::GET | Method::HEAD) => {
            AdminError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                "this token is read-only",
            )
            .into_response()
        }
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_parse_and_refuse_what_is_wrong() {
        let t = Tokens::parse_file(
            "# ops\nread-only aaaaaaaaaaaaaaaaaaaa\n\nrw bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        assert_eq!(t.role_of(b"aaaaaaaaaaaaaaaaaaaa"), Some(Role::ReadOnly));
        assert_eq!(t.role_of(b"bbbbbbbbbbbbbbbbbbbb"), Some(Role::ReadWrite));
        assert_eq!(t.role_of(b"bbbbbbbbbbbbbbbbbbb"), None);
        assert_eq!(t.role_of(b""), None);
        for (bad, why) in [
            ("admin cccccccccccccccccccc", "role"),
            ("rw", "no token"),
            ("rw short", "at least"),
            ("rw cccccccccccccccccccc extra", "more than"),
        ] {
            let e = Tokens::parse_file(bad).unwrap_err();
            assert!(e.contains(why) && e.contains("line 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn equality_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
