//! What this node answers about itself: its sessions and subscriptions, its replica's
//! retained messages, publishing here, draining here; and the same for other members
//! (`rpc Admin`, [`LocalAdmin`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use petrel_admin_api::model::{
    KickOutcome, NodeOutcome, PublishOutcome, PublishRequest, RetainedMessage, SessionFilter,
    SessionInfo, SubscriptionFilter, SubscriptionInfo,
};
use petrel_admin_api::page::{window, PageRequest};
use petrel_admin_api::AdminError;
use petrel_cluster_proto::pb;
use serde::Serialize;

use super::{unknown_session, Admin, ClientArgs, ListArgs};
use crate::codec::{MqttStr, QoS};
use crate::control::BoxFuture;
use crate::message::Message;
use crate::session::{Detail, Kick, Session, SessionView};

/// How long a publish or a retained delete waits for the cluster.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

impl Admin {
    /// This node's sessions, sorted by client id, after `page.after`, at most a page and
    /// one.
    pub(super) fn local_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Vec<SessionInfo> {
        let me = self.me();
        if filter.node.is_some_and(|n| n != me) {
            return Vec::new();
        }
        // Without a filter that needs a session's view, the page is the first ones by
        // client id: only those are sorted, not all of the node's.
        let first = (filter.connected.is_none() && filter.username.is_none())
            .then(|| page.limit.saturating_add(1));
        let prefix = filter.client_id_prefix.as_deref();
        let sessions = self.sorted_sessions(page.after.as_deref(), prefix, first);
        sessions
            .iter()
            .map(|s| info(me, &s.view(Detail::Counts)))
            .filter(|s| filter.admits(s))
            .take(page.limit.saturating_add(1))
            .collect()
    }

    /// This node's sessions whose client id is above `after` and starts with `prefix`,
    /// sorted by client id; only the `first` of them if given (a selection in linear
    /// time, then a sort of those: a page of a node with a million sessions does not sort
    /// the million).
    fn sorted_sessions(
        &self,
        after: Option<&str>,
        prefix: Option<&str>,
        first: Option<usize>,
    ) -> Vec<Arc<Session>> {
        let mut v: Vec<Arc<Session>> = self
            .broker
            .sessions
            .lock()
            .iter()
            .filter(|(id, _)| after.is_none_or(|a| &***id > a))
            .filter(|(id, _)| prefix.is_none_or(|p| id.starts_with(p)))
            .map(|(_, s)| s.clone())
            .collect();
        let by_id = |a: &Arc<Session>, b: &Arc<Session>| a.client_id().cmp(b.client_id());
        if let Some(n) = first.filter(|&n| n > 0 && n < v.len()) {
            v.select_nth_unstable_by(n - 1, by_id);
            v.truncate(n);
        }
        v.sort_unstable_by(by_id);
        v
    }

    pub(super) fn local_session(&self, client_id: &str) -> Option<SessionInfo> {
        let s = self.broker.sessions.get(client_id)?;
        Some(info(self.me(), &s.view(Detail::Subscriptions)))
    }

    /// Closes a session's connection here (v5: DISCONNECT 0x98) and, with `discard`, ends
    /// the session.
    pub(super) fn local_kick(
        &self,
        client_id: &str,
        discard: bool,
    ) -> Result<KickOutcome, AdminError> {
        let session = self
            .broker
            .sessions
            .get(client_id)
            .ok_or_else(|| unknown_session(client_id))?;
        let why = if discard {
            Kick::AdminDiscard
        } else {
            Kick::Admin
        };
        let disconnected = session.is_connected() && session.kick(why);
        let mut discarded = discard && disconnected;
        if discard && !disconnected && !session.is_connected() && !session.is_ended() {
            // Offline: ended as its expiry would end it.
            let epoch = session.epoch();
            let (state, _) = session.end();
            self.broker.end_session(&session, state);
            self.broker.control.ended(session.client_id(), epoch);
            discarded = true;
        }
        tracing::info!(%client_id, disconnected, discarded, "session kicked through the admin API");
        Ok(KickOutcome {
            client_id: client_id.to_owned(),
            node_id: self.me(),
            disconnected,
            discarded,
        })
    }

    pub(super) fn local_subscriptions(
        &self,
        filter: &SubscriptionFilter,
        page: &PageRequest,
    ) -> Vec<SubscriptionInfo> {
        let me = self.me();
        if filter.node.is_some_and(|n| n != me) {
            return Vec::new();
        }
        // Keys are `client_id \0 filter`: sessions from the cursor's client id on.
        let from = page
            .after
            .as_deref()
            .map(|a| a.split('\0').next().unwrap_or(""));
        let mut sessions: Vec<Arc<Session>> = match &filter.client_id {
            Some(c) => self.broker.sessions.get(c).into_iter().collect(),
            None => {
                let mut v = self.sorted_sessions(None, None, None);
                v.retain(|s| from.is_none_or(|f| &**s.client_id() >= f));
                v
            }
        };
        sessions.sort_unstable_by(|a, b| a.client_id().cmp(b.client_id()));
        let mut out = Vec::new();
        for s in sessions {
            let view = s.view(Detail::Subscriptions);
            for sub in view.subscriptions.iter().flat_map(|s| s.iter()) {
                if filter.filter.as_deref().is_some_and(|f| f != sub.filter) {
                    continue;
                }
                let key = format!("{}\0{}", view.client_id, sub.filter);
                if page.after.as_deref().is_some_and(|a| key.as_str() <= a) {
                    continue;
                }
                out.push(subscription(me, &view.client_id, sub));
                if out.len() > page.limit {
                    return out;
                }
            }
        }
        out
    }

    pub(super) fn local_retained(
        &self,
        filter: &str,
        page: &PageRequest,
    ) -> Result<Vec<RetainedMessage>, AdminError> {
        let levels = self.broker.cfg.limits.max_topic_levels;
        crate::router::topic::validate_filter(filter, levels).map_err(|e| {
            AdminError::bad_request("bad_request", format!("filter {filter:?}: {e}"))
        })?;
        let mut found = self.broker.retained_matching(filter, Instant::now());
        found.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
        let page = window(found, page, |m| &m.topic);
        Ok(page.iter().map(|m| retained(m)).collect())
    }

    pub(super) fn local_retained_one(&self, topic: &str) -> Result<RetainedMessage, AdminError> {
        check_topic(topic)?;
        self.broker
            .retained_matching(topic, Instant::now())
            .into_iter()
            .find(|m| &*m.topic == topic)
            .map(|m| retained(&m))
            .ok_or_else(|| unknown_retained(topic))
    }

    /// Deletes a retained message cluster-wide, and answers once every live member has.
    pub(super) async fn clear_retained(&self, topic: &str) -> Result<(), AdminError> {
        self.local_retained_one(topic)?;
        let mark = self.broker.control.retain(topic, None);
        self.settle(mark).await
    }

    /// Waits until every live member applied what was proposed up to `mark`.
    async fn settle(&self, mark: u64) -> Result<(), AdminError> {
        if mark == 0 || self.broker.control.settled_now() >= mark {
            return Ok(());
        }
        let mut settled = self.broker.control.settled();
        let reached = tokio::time::timeout(SETTLE_TIMEOUT, async {
            settled.wait_for(|s| *s >= mark).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => Err(AdminError::no_quorum(
                "the cluster did not confirm the change in time",
            )),
        }
    }

    /// Publishes as a client on this node would; answers once stored copies are durable
    /// and a retained message is on every live member.
    pub(super) async fn publish_here(
        &self,
        req: PublishRequest,
        payload: Vec<u8>,
    ) -> Result<PublishOutcome, AdminError> {
        check_topic(&req.topic)?;
        if req.topic.starts_with('$') {
            return Err(AdminError::bad_request(
                "bad_request",
                "topics starting with $ are the broker's",
            ));
        }
        let topic = MqttStr::new(&req.topic)
            .map_err(|_| AdminError::bad_request("bad_request", "topic is not valid MQTT UTF-8"))?;
        let mut msg = Message::broker(topic, Bytes::from(payload), req.retain);
        msg.qos = QoS::from_u8(req.qos)
            .ok_or_else(|| AdminError::bad_request("bad_request", "qos must be 0, 1 or 2"))?;
        if req.retain && !msg.payload.is_empty() {
            if let Some(limit) = self.broker.retained_over_limit_of(&msg.topic, &msg.payload) {
                return Err(AdminError::bad_request(
                    "bad_request",
                    format!("retained limit {limit} reached"),
                ));
            }
        }
        let routed = self.broker.publish(Arc::new(msg), &mut Vec::new(), None);
        if routed.unstorable {
            return Err(AdminError::bad_request(
                "bad_request",
                "the message is larger than a stored copy may be",
            ));
        }
        if let Some(t) = routed.ticket {
            self.broker
                .store
                .wait(t)
                .await
                .map_err(|e| AdminError::unavailable(format!("store: {e}")))?;
        }
        self.settle(routed.mark).await?;
        Ok(PublishOutcome {
            receivers: routed.delivered as u64,
        })
    }

    /// Drains this node: not ready, CONNECTs sent away, Raft leadership handed on, the
    /// connected clients told to go (v5: DISCONNECT 0x8B) at `admin.drain_rate_per_sec`.
    /// The node stays a member and keeps its data.
    pub(super) async fn drain_here(&self) -> Result<NodeOutcome, AdminError> {
        let me = self.me();
        let first = !self.broker.draining.swap(true, Ordering::AcqRel);
        if first {
            tracing::info!("draining through the admin API");
            match self.cluster.propose_drain(me, true).await {
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "drain not recorded in the cluster state"),
            }
            if let Some(to) = self.cluster.hand_leadership_away().await {
                tracing::info!(to, "leadership handed away for the drain");
            }
            let broker = self.broker.clone();
            let rate = self.broker.cfg.admin.drain_rate_per_sec;
            tokio::spawn(async move {
                // The rate alone decides here: no deadline but the operator's.
                let within = Duration::from_secs(24 * 3600);
                let told = crate::node::evict(&broker, rate, within, Kick::Shutdown).await;
                tracing::info!(
                    connections = told,
                    "drain: every connected client told to go"
                );
            });
        }
        Ok(NodeOutcome {
            node_id: me,
            state: "draining".to_owned(),
        })
    }
}

fn check_topic(topic: &str) -> Result<(), AdminError> {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) || topic.len() > 65_535 {
        return Err(AdminError::bad_request(
            "bad_request",
            "topic must be 1 to 65535 bytes without wildcards or NUL",
        ));
    }
    Ok(())
}

fn unknown_retained(topic: &str) -> AdminError {
    AdminError::not_found(
        "unknown_retained",
        format!("no retained message on {topic:?}"),
    )
}

fn retained(m: &Message) -> RetainedMessage {
    RetainedMessage {
        topic: m.topic.to_string(),
        qos: m.qos as u8,
        payload_bytes: m.payload.len() as u64,
        payload: std::str::from_utf8(&m.payload).ok().map(str::to_owned),
        payload_base64: base64::engine::general_purpose::STANDARD.encode(&m.payload),
    }
}

fn subscription(node_id: u64, client_id: &str, sub: &crate::session::SubView) -> SubscriptionInfo {
    let group = sub
        .filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(g, _)| g.to_owned());
    SubscriptionInfo {
        client_id: client_id.to_owned(),
        filter: sub.filter.clone(),
        qos: sub.options.qos as u8,
        node_id,
        share_group: group,
        no_local: sub.options.no_local,
        retain_as_published: sub.options.retain_as_published,
        retain_handling: sub.options.retain_handling as u8,
    }
}

fn info(node_id: u64, v: &SessionView) -> SessionInfo {
    let c = v.client.as_deref();
    SessionInfo {
        client_id: v.client_id.to_string(),
        node_id,
        connected: v.connected,
        persistent: v.persistent,
        expiry_secs: (v.expiry_secs != u32::MAX).then_some(v.expiry_secs),
        username: c.and_then(|c| c.username.clone()),
        peer: c.map(|c| c.peer.to_string()),
        protocol_version: c.map(|c| c.protocol),
        connected_at_ms: c.map(|c| c.connected_at_ms),
        keep_alive_secs: c.map(|c| c.keep_alive_secs),
        clean_start: c.map(|c| c.clean_start),
        tls: c.map(|c| c.tls),
        listener: c.map(|c| c.listener.to_owned()),
        queued_messages: v.queued_messages as u64,
        queued_bytes: v.queued_bytes as u64,
        inflight_messages: v.inflight_messages as u64,
        inflight_bytes: v.inflight_bytes as u64,
        subscription_count: v.subscription_count as u64,
        subscriptions: v.subscriptions.as_ref().map(|subs| {
            subs.iter()
                .map(|s| subscription(node_id, &v.client_id, s))
                .collect()
        }),
    }
}

/// The `'static` code of an error another member sent (codes are this API's own).
pub(super) fn static_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "bad_request",
        "bad_cursor",
        "bad_json",
        "unauthorized",
        "forbidden",
        "not_found",
        "unknown_session",
        "unknown_node",
        "unknown_retained",
        "method_not_allowed",
        "conflict",
        "no_quorum",
        "unavailable",
        "internal",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("internal")
}

/// The node's admin API as other members call it.
pub struct AdminCalls(pub Arc<Admin>);

impl crate::cluster::LocalAdmin for AdminCalls {
    fn call(&self, op: String, args: Vec<u8>) -> BoxFuture<'static, pb::AdminReply> {
        let admin = self.0.clone();
        Box::pin(async move {
            let r = match op.as_str() {
                "sessions" => parse::<ListArgs<SessionFilter>>(&args).and_then(|a| {
                    let page = PageRequest {
                        after: a.after,
                        limit: a.limit.min(petrel_admin_api::page::MAX_LIMIT),
                    };
                    json(&admin.local_sessions(&a.filter, &page))
                }),
                "subscriptions" => parse::<ListArgs<SubscriptionFilter>>(&args).and_then(|a| {
                    let page = PageRequest {
                        after: a.after,
                        limit: a.limit.min(petrel_admin_api::page::MAX_LIMIT),
                    };
                    json(&admin.local_subscriptions(&a.filter, &page))
                }),
                "session" => parse::<ClientArgs>(&args).and_then(|a| {
                    let s = admin
                        .local_session(&a.client_id)
                        .ok_or_else(|| unknown_session(&a.client_id))?;
                    json(&s)
                }),
                "kick" => parse::<ClientArgs>(&args)
                    .and_then(|a| admin.local_kick(&a.client_id, a.discard))
                    .and_then(|k| json(&k)),
                "drain" => match admin.drain_here().await {
                    Ok(o) => json(&o),
                    Err(e) => Err(e),
                },
                other => Err(AdminError::new(
                    petrel_admin_api::error::StatusCode::NOT_IMPLEMENTED,
                    "internal",
                    format!("admin call {other:?} is not known to this node"),
                )),
            };
            match r {
                Ok(body) => pb::AdminReply {
                    http_status: 200,
                    body_json: body.into(),
                    ..Default::default()
                },
                Err(e) => pb::AdminReply {
                    http_status: u32::from(e.status.as_u16()),
                    body_json: Default::default(),
                    code: e.code.to_owned(),
                    message: e.message,
                },
            }
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(args: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(args).map_err(|e| AdminError::bad_request("bad_json", e.to_string()))
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, AdminError> {
    serde_json::to_vec(v).map_err(|e| AdminError::internal(e.to_string()))
}
