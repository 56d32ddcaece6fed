//! The broker's use of authentication and authorisation: one [`AuthGate`] per node.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::checks::Busy;
use super::{
    Acl, AuthError, ClientCtx, FailureTracker, PasswordChecks, PasswordFile, Reloadable,
    SlowdownPolicy, SubscribeDecision,
};
use crate::codec::ReasonCode;
use crate::config::AuthConfig;

pub struct AuthGate {
    allow_anonymous: bool,
    passwords: Option<Arc<Reloadable<PasswordFile>>>,
    acl: Option<Arc<Reloadable<Acl>>>,
    failures: FailureTracker,
    checks: PasswordChecks,
    reload_every: Duration,
}

impl AuthGate {
    /// Loads the configured files; a file that is set but unreadable or invalid is an error.
    pub fn from_config(cfg: &AuthConfig) -> Result<AuthGate, AuthError> {
        let passwords = (!cfg.password_file.as_os_str().is_empty())
            .then(|| Reloadable::load(&cfg.password_file, PasswordFile::load))
            .transpose()?
            .map(Arc::new);
        let acl = (!cfg.acl_file.as_os_str().is_empty())
            .then(|| Reloadable::load(&cfg.acl_file, Acl::load))
            .transpose()?
            .map(Arc::new);
        Ok(AuthGate {
            allow_anonymous: cfg.allow_anonymous,
            passwords,
            acl,
            failures: FailureTracker::new(SlowdownPolicy::default()),
            checks: PasswordChecks::unobserved(),
            reload_every: Duration::from_secs(cfg.reload_interval_secs.max(1)),
        })
    }

    /// Bounds the password checks with `checks` (the default bounds are not observed).
    pub fn with_checks(mut self, checks: PasswordChecks) -> AuthGate {
        self.checks = checks;
        self
    }

    /// An open gate: anonymous clients allowed, no ACL.
    pub fn open() -> AuthGate {
        AuthGate::from_config(&AuthConfig::default()).expect("no files to load")
    }

    /// Starts the file watchers.
    pub fn watch(&self, tracker: &TaskTracker, cancel: &CancellationToken) {
        if let Some(p) = &self.passwords {
            tracker.spawn(p.clone().watch(self.reload_every, cancel.clone()));
        }
        if let Some(a) = &self.acl {
            tracker.spawn(a.clone().watch(self.reload_every, cancel.clone()));
        }
    }

    /// Decides a CONNECT's credentials. Repeated failures from one address are answered
    /// ever more slowly; the password hash runs off the async workers, a bounded number at
    /// a time (see [`PasswordChecks`]): past the bound, 0x97 Quota exceeded at once.
    pub async fn authenticate(
        &self,
        ip: IpAddr,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), ReasonCode> {
        let delay = self.failures.delay_for(ip, Instant::now());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let verdict = match (username, &self.passwords) {
            (None, _) if self.allow_anonymous => Ok(()),
            (None, _) => Err(ReasonCode::NOT_AUTHORIZED),
            (Some(_), None) => Ok(()),
            (Some(user), Some(file)) => {
                let (file, user, pass) = (
                    file.current(),
                    user.to_owned(),
                    password.unwrap_or_default().to_vec(),
                );
                match self.checks.run(move || file.verify(&user, &pass)).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD),
                    // Busy is not a failed login: it does not slow the address down.
                    Err(Busy) => return Err(ReasonCode::QUOTA_EXCEEDED),
                }
            }
        };
        match verdict {
            Ok(()) => self.failures.record_success(ip),
            Err(_) => self.failures.record_failure(ip, Instant::now()),
        }
        verdict
    }

    pub fn may_publish(&self, ctx: &ClientCtx<'_>, topic: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.current().check_publish(ctx, topic))
    }

    pub fn may_subscribe(&self, ctx: &ClientCtx<'_>, filter: &str) -> SubscribeDecision {
        self.acl.as_ref().map_or(SubscribeDecision::Allow, |a| {
            a.current().check_subscribe(ctx, filter)
        })
    }

    /// Changes whenever a reloaded ACL takes effect: a subscription decided under another
    /// generation checks each message at delivery (see `router::Subscriber::acl_gen`).
    pub fn acl_generation(&self) -> u64 {
        self.acl.as_ref().map_or(0, |a| a.generation())
    }

    pub fn may_receive(&self, ctx: &ClientCtx<'_>, topic: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.current().check_receive(ctx, topic))
    }
}
