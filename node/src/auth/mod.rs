//! Authentication and authorisation: who may connect, and what they may publish and receive.
//!
//! - [`PasswordFile`]: `username:argon2id-PHC` lines; [`passwd_cmd`] is `petrel passwd`.
//! - [`Acl`]: allow/deny rules per client id, username, anonymous clients and everyone; the
//!   file format is described in [`acl`].
//! - [`Reloadable`]: a file-backed value, re-read when the file changes.
//! - [`FailureTracker`]: slows down repeated failed logins from one address.
//! - [`PasswordChecks`]: how many password hashes run at once, and how many wait.
//! - [`AuthGate`]: what the broker asks: may this client connect, publish, subscribe, receive.

pub mod acl;
mod checks;
mod error;
mod failure;
mod filter;
mod gate;
pub mod passwd_cmd;
mod password;
pub mod reload;

pub use acl::{Acl, ClientCtx, SubscribeDecision};
pub use checks::{PasswordChecks, PASSWORD_CHECKS};
pub use error::AuthError;
pub use failure::{FailureTracker, SlowdownPolicy};
pub use gate::AuthGate;
pub use passwd_cmd::PasswdArgs;
pub use password::PasswordFile;
pub use reload::Reloadable;
