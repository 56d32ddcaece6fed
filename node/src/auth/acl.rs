//! Access control lists: which client may publish to and subscribe to which topics.
//!
//! # File format
//!
//! ```text
//! # A comment. Blank lines are ignored.
//! [client sensor-7]            # rules for the client with this client id
//! allow publish sensors/%c/#
//!
//! [user alice]                 # rules for clients that logged in as alice
//! deny  subscribe chat/admin/#
//! allow all chat/#
//!
//! [anonymous]                  # rules for clients that sent no username
//! allow subscribe public/#
//!
//! [all]                        # rules for every client
//! allow subscribe $SYS/#
//! allow all users/%u/#
//! ```
//!
//! - A block header is `[client ID]`, `[user NAME]`, `[anonymous]` or `[all]`. Names are
//!   matched exactly (case-sensitive) and cannot contain `]`. A header may be followed by a
//!   `#` comment. The same header may appear more than once; its rules are joined in file
//!   order.
//! - A rule is `EFFECT ACTION FILTER`: `EFFECT` is `allow` or `deny`, `ACTION` is `publish`,
//!   `subscribe` or `all` (both). `FILTER` is the rest of the line, an MQTT topic filter
//!   (`+` and `#` wildcards). A rule line cannot carry a comment, since `#` is a wildcard.
//! - In a filter, `%u` stands for the client's username and `%c` for its client id.
//!
//! # Evaluation
//!
//! For a client, the rules of its `[client ID]` blocks come first, then those of its
//! `[user NAME]` blocks, then `[anonymous]` (only for a client that sent no username), then
//! `[all]`; within a block, file order. The first rule whose action and filter match decides.
//! **If no rule matches, access is denied**: an empty ACL file denies everything.
//!
//! - Publishing to a topic is checked against `publish` and `all` rules.
//! - A subscription is checked against `subscribe` and `all` rules for every topic its filter
//!   can match: [`SubscribeDecision::Allow`] if all of them are allowed, `Deny` if none is, and
//!   `AllowFiltered` otherwise. The broker then checks each message it would deliver on such a
//!   subscription with [`Acl::check_receive`], which uses the same rules. `AllowFiltered` can
//!   also be returned where every topic ends up denied through a combination of rules.
//! - As in MQTT itself, a filter starting with `+` or `#` does not match topics starting with
//!   `$`: grant `$SYS/#` explicitly.
//!
//! # Substitutions never widen a rule
//!
//! A username or client id that is empty, contains `+`, `#` or `/`, or starts with `$` is not
//! substituted (nor is `%u` for a client without a username). Then an `allow` rule using it does
//! not apply to that client, and a `deny` rule using it applies to the whole subtree from the
//! level of its first substitution (`deny all users/%u/#` becomes `deny all users/#`; a
//! substitution in the first level denies every topic). So such a client can get less
//! access than the literal text would give, never more.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use super::{filter, AuthError};

const WHAT: &str = "acl file";

/// The client an access decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCtx<'a> {
    /// `None` when the client sent no username.
    pub username: Option<&'a str>,
    pub client_id: &'a str,
}

/// Outcome of checking a subscription filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeDecision {
    /// No topic the filter matches may be received.
    Deny,
    /// Every topic the filter matches may be received.
    Allow,
    /// Some topics may be received: check each delivered message with [`Acl::check_receive`].
    AllowFiltered,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    clients: HashMap<String, Vec<Rule>>,
    users: HashMap<String, Vec<Rule>>,
    anonymous: Vec<Rule>,
    all: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Publish,
    Subscribe,
    All,
}

#[derive(Debug, Clone)]
struct Rule {
    effect: Effect,
    action: Action,
    filter: String,
    /// What a `deny` rule covers when a substitution is unsafe; `None` when `filter` has no
    /// substitution.
    fallback: Option<Scope<'static>>,
}

/// The topics a rule covers for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope<'a> {
    /// Every topic, including `$` topics.
    Any,
    Filter(Cow<'a, str>),
}

enum Block {
    Client(String),
    User(String),
    Anonymous,
    All,
}

impl Acl {
    /// Reads and parses the ACL file at `path`.
    pub fn load(path: &Path) -> Result<Acl, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            what: WHAT,
            path: path.to_path_buf(),
            source,
        })?;
        Acl::parse(&text).map_err(|e| e.at_path(path))
    }

    /// Parses ACL text; errors name the line.
    pub fn parse(text: &str) -> Result<Acl, AuthError> {
        let mut acl = Acl::default();
        let mut block = None;
        for (n, raw) in text.lines().enumerate() {
            let error = |reason: String| AuthError::Parse {
                what: WHAT,
                path: None,
                line: n + 1,
                reason,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('[') {
                block = Some(parse_header(line).map_err(error)?);
                continue;
            }
            let rule = parse_rule(line).map_err(error)?;
            let rules = match &block {
                None => return Err(error("rule before the first block header".to_string())),
                Some(Block::Client(id)) => acl.clients.entry(id.clone()).or_default(),
                Some(Block::User(name)) => acl.users.entry(name.clone()).or_default(),
                Some(Block::Anonymous) => &mut acl.anonymous,
                Some(Block::All) => &mut acl.all,
            };
            rules.push(rule);
        }
        Ok(acl)
    }

    /// Whether the client may publish to the topic name `topic`.
    pub fn check_publish(&self, ctx: &ClientCtx<'_>, topic: &str) -> bool {
        self.first_match(ctx, Action::Publish, topic) == Some(Effect::Allow)
    }

    /// Whether the client may receive a message published to `topic`.
    pub fn check_receive(&self, ctx: &ClientCtx<'_>, topic: &str) -> bool {
        self.first_match(ctx, Action::Subscribe, topic) == Some(Effect::Allow)
    }

    /// Whether the client may subscribe to the (valid, not shared) topic filter `filter`.
    pub fn check_subscribe(&self, ctx: &ClientCtx<'_>, filter: &str) -> SubscribeDecision {
        // Sound because the earliest rule matching any topic is never "dead": a rule is dead
        // only when an earlier rule already matches every topic it shares with `filter`.
        let mut earlier: Vec<String> = Vec::new();
        let (mut live_allow, mut live_deny) = (false, false);
        for rule in self.rules(ctx, Action::Subscribe) {
            let Some(scope) = rule.scope(ctx) else {
                continue;
            };
            let shared = match &scope {
                Scope::Any => filter.to_string(),
                Scope::Filter(f) => match filter::intersection(f, filter) {
                    Some(shared) => shared,
                    None => continue,
                },
            };
            if filter::covers(&shared, filter) {
                return match (rule.effect, live_deny, live_allow) {
                    (Effect::Allow, false, _) => SubscribeDecision::Allow,
                    (Effect::Deny, _, false) => SubscribeDecision::Deny,
                    _ => SubscribeDecision::AllowFiltered,
                };
            }
            if !earlier.iter().any(|e| filter::covers(e, &shared)) {
                match rule.effect {
                    Effect::Allow => live_allow = true,
                    Effect::Deny => live_deny = true,
                }
            }
            earlier.push(shared);
        }
        if live_allow {
            SubscribeDecision::AllowFiltered
        } else {
            SubscribeDecision::Deny
        }
    }

    fn first_match(&self, ctx: &ClientCtx<'_>, action: Action, topic: &str) -> Option<Effect> {
        self.rules(ctx, action)
            .find(|rule| match rule.scope(ctx) {
                Some(Scope::Any) => true,
                Some(Scope::Filter(f)) => filter::matches(&f, topic),
                None => false,
            })
            .map(|rule| rule.effect)
    }

    /// The rules that apply to `ctx` for `action`, in evaluation order.
    fn rules<'s>(
        &'s self,
        ctx: &ClientCtx<'_>,
        action: Action,
    ) -> impl Iterator<Item = &'s Rule> + 's {
        let client = self
            .clients
            .get(ctx.client_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let user = ctx
            .username
            .and_then(|u| self.users.get(u))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let anonymous = if ctx.username.is_none() {
            self.anonymous.as_slice()
        } else {
            &[]
        };
        client
            .iter()
            .chain(user)
            .chain(anonymous)
            .chain(&self.all)
            .filter(move |rule| rule.action == action || rule.action == Action::All)
    }
}

impl Rule {
    /// The topics this rule covers for `ctx`; `None` if it does not apply to `ctx`.
    fn scope(&self, ctx: &ClientCtx<'_>) -> Option<Scope<'_>> {
        let Some(fallback) = &self.fallback else {
            return Some(Scope::Filter(Cow::Borrowed(&self.filter)));
        };
        match (substitute(&self.filter, ctx), self.effect) {
            (Some(filter), _) => Some(Scope::Filter(Cow::Owned(filter))),
            (None, Effect::Allow) => None,
            (None, Effect::Deny) => Some(fallback.clone()),
        }
    }
}

fn parse_header(line: &str) -> Result<Block, String> {
    let close = line.find(']').ok_or("block header lacks ']'")?;
    let after = line[close + 1..].trim_start();
    if !after.is_empty() && !after.starts_with('#') {
        return Err(format!("unexpected text {after:?} after block header"));
    }
    let inner = line[1..close].trim();
    let (kind, name) = match inner.split_once(char::is_whitespace) {
        Some((kind, name)) => (kind, Some(name.trim())),
        None => (inner, None),
    };
    match (kind, name) {
        ("client", Some(name)) => Ok(Block::Client(name.to_string())),
        ("user", Some(name)) => Ok(Block::User(name.to_string())),
        ("client" | "user", None) => Err(format!("block [{kind}] needs a name: [{kind} NAME]")),
        ("anonymous", None) => Ok(Block::Anonymous),
        ("all", None) => Ok(Block::All),
        ("anonymous" | "all", Some(_)) => Err(format!("block [{kind}] takes no name")),
        _ => Err(format!(
            "unknown block {kind:?}, expected client, user, anonymous or all"
        )),
    }
}

fn parse_rule(line: &str) -> Result<Rule, String> {
    let (effect, rest) = split_word(line);
    let effect = match effect {
        "allow" => Effect::Allow,
        "deny" => Effect::Deny,
        other => return Err(format!("expected allow or deny, found {other:?}")),
    };
    let (action, filter) = split_word(rest);
    let action = match action {
        "publish" => Action::Publish,
        "subscribe" => Action::Subscribe,
        "all" => Action::All,
        "" => return Err("missing action: publish, subscribe or all".to_string()),
        other => {
            return Err(format!(
                "unknown action {other:?}, expected publish, subscribe or all"
            ))
        }
    };
    if filter.is_empty() {
        return Err("missing topic filter".to_string());
    }
    filter::check(filter).map_err(|e| format!("invalid topic filter {filter:?}: {e}"))?;
    Ok(Rule {
        effect,
        action,
        filter: filter.to_string(),
        fallback: fallback(filter),
    })
}

/// Splits off the first whitespace-separated word; the rest is trimmed.
fn split_word(text: &str) -> (&str, &str) {
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

/// For a filter with substitutions: everything from the level of the first one down.
fn fallback(filter: &str) -> Option<Scope<'static>> {
    let first = filter
        .split('/')
        .position(|level| level.contains("%u") || level.contains("%c"))?;
    if first == 0 {
        return Some(Scope::Any);
    }
    let prefix: Vec<&str> = filter.split('/').take(first).collect();
    Some(Scope::Filter(Cow::Owned(format!("{}/#", prefix.join("/")))))
}

/// `filter` with `%u` and `%c` replaced; `None` if a value is missing or unsafe.
fn substitute(filter: &str, ctx: &ClientCtx<'_>) -> Option<String> {
    let mut out = String::with_capacity(filter.len() + 16);
    let mut rest = filter;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("%u") {
            out.push_str(safe(ctx.username?)?);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("%c") {
            out.push_str(safe(ctx.client_id)?);
            rest = after;
        } else {
            out.push('%');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Some(out)
}

fn safe(value: &str) -> Option<&str> {
    let unsafe_value =
        value.is_empty() || value.contains(['+', '#', '/']) || value.starts_with('$');
    (!unsafe_value).then_some(value)
}

#[cfg(test)]
#[path = "acl_test.rs"]
mod tests;
