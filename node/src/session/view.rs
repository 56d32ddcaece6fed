//! What the admin API sees of a session: who is connected and how, its subscriptions and
//! its counts. A snapshot, taken under the session's lock, never the live state.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::codec::SubscriptionOptions;

/// How the current (or last) connection of a session came in; set at CONNECT.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    /// `mqtt`, `mqtts`, `ws`, `wss`.
    pub listener: &'static str,
    pub tls: bool,
    /// Protocol level: 3, 4 or 5.
    pub protocol: u8,
    pub keep_alive_secs: u16,
    pub clean_start: bool,
    pub username: Option<String>,
    pub connected_at_ms: u64,
}

/// One subscription as the admin API shows it.
#[derive(Debug, Clone)]
pub struct SubView {
    /// As subscribed, with any `$share/<group>/` prefix.
    pub filter: String,
    pub options: SubscriptionOptions,
}

/// How much of a session [`crate::session::Session::view`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// The counts only (lists, metrics): nothing is copied per subscription.
    Counts,
    /// The counts and the subscriptions.
    Subscriptions,
}

/// A session at one instant.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub client_id: Arc<str>,
    pub connected: bool,
    pub persistent: bool,
    /// Seconds; `u32::MAX`: never.
    pub expiry_secs: u32,
    pub client: Option<Arc<ClientInfo>>,
    pub queued_messages: usize,
    pub queued_bytes: usize,
    pub inflight_messages: usize,
    pub inflight_bytes: usize,
    pub subscription_count: usize,
    /// Sorted by filter; `None` unless asked for ([`Detail::Subscriptions`]).
    pub subscriptions: Option<Arc<[SubView]>>,
}

/// The subscriptions of a state, sorted by filter, for [`SessionView`].
pub fn sub_views<'a, I>(subs: I) -> Arc<[SubView]>
where
    I: IntoIterator<Item = (&'a str, SubscriptionOptions)>,
{
    let mut v: Vec<SubView> = subs
        .into_iter()
        .map(|(f, options)| SubView {
            filter: f.to_owned(),
            options,
        })
        .collect();
    v.sort_by(|a, b| a.filter.cmp(&b.filter));
    v.into()
}
