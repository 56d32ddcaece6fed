//! The node's side of the admin API: what `petrel-admin-api` asks through `AdminBackend`.
//!
//! Sessions and subscriptions live on the node their client is connected to (or was, for a
//! stored session): a list asks every member (`rpc Admin`, in parallel, under a deadline)
//! and merges the answers in key order; one session is asked of the node the replica names
//! as its owner. Retained messages and routes are in every node's replica and answered here.
//!
//! - [`local`]: what this node answers about itself (also for other members).
//! - [`token`]: the tokens the admin listener accepts.

mod local;
pub mod token;

pub use local::AdminCalls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use petrel_admin_api::backend::Reply;
use petrel_admin_api::model::{
    ClusterInfo, KickOutcome, Listed, MemberInfo, NodeOutcome, PublishOutcome, PublishRequest,
    RetainedMessage, RouteInfo, SessionFilter, SessionInfo, SubscriptionFilter, SubscriptionInfo,
};
use petrel_admin_api::page::PageRequest;
use petrel_admin_api::{AdminBackend, AdminError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::cluster::Cluster;

/// How long another member has to answer an admin call.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Admin {
    pub broker: Arc<Broker>,
    pub cluster: Arc<Cluster>,
    pub ready: AtomicBool,
}

/// The arguments of a cluster-wide list, as sent to each member.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ListArgs<F> {
    filter: F,
    after: Option<String>,
    limit: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClientArgs {
    client_id: String,
    #[serde(default)]
    discard: bool,
}

impl Admin {
    pub fn new(broker: Arc<Broker>, cluster: Arc<Cluster>) -> Admin {
        Admin {
            broker,
            cluster,
            ready: AtomicBool::new(false),
        }
    }

    fn me(&self) -> u64 {
        self.cluster.node_id()
    }

    /// The other members to ask, with their gRPC addresses.
    fn peers(&self) -> Vec<(u64, String)> {
        let st = self.cluster.status();
        st.members
            .into_iter()
            .filter(|m| m.node_id != st.node_id && m.role != "removed" && !m.grpc_addr.is_empty())
            .map(|m| (m.node_id, m.grpc_addr))
            .collect()
    }

    fn member_addr(&self, node_id: u64) -> Option<String> {
        self.peers()
            .into_iter()
            .find(|(id, _)| *id == node_id)
            .map(|(_, a)| a)
    }

    /// Calls `op` on a member and decodes its answer.
    async fn ask<T, A>(&self, node_id: u64, addr: &str, op: &str, args: &A) -> Result<T, AdminError>
    where
        T: DeserializeOwned,
        A: Serialize,
    {
        let args = serde_json::to_vec(args).map_err(|e| AdminError::internal(e.to_string()))?;
        let reply = self
            .cluster
            .admin_call(addr, op, args, PEER_TIMEOUT)
            .await
            .map_err(|s| AdminError::unavailable(format!("node {node_id}: {}", s.message())))?;
        decode_reply(node_id, reply)
    }

    /// Asks every member for a list (this node answers itself) and merges the answers in
    /// key order, one page long (plus one).
    async fn list_everywhere<T, F>(
        &self,
        op: &'static str,
        args: ListArgs<F>,
        local: Vec<T>,
        key: impl Fn(&T) -> String,
    ) -> Listed<T>
    where
        T: DeserializeOwned + Send + 'static,
        F: Serialize + Clone,
    {
        let peers = self.peers();
        let asks = peers.iter().map(|(id, addr)| {
            let args = &args;
            async move { (*id, self.ask::<Vec<T>, _>(*id, addr, op, args).await) }
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut items = local;
        let mut unreachable = Vec::new();
        for (id, answer) in answers {
            match answer {
                Ok(mut more) => items.append(&mut more),
                Err(e) => {
                    tracing::debug!(node_id = id, error = %e, "admin list: a member did not answer");
                    unreachable.push(id);
                }
            }
        }
        items.sort_by_cached_key(|t| key(t));
        // The same key from two nodes (a session moving): keep the first.
        items.dedup_by(|a, b| key(a) == key(b));
        items.truncate(args.limit.saturating_add(1));
        Listed {
            items,
            unreachable_nodes: unreachable,
        }
    }

    /// Runs `op` for a client id on the node that holds its session: the owner the replica
    /// names, else this node, else whichever member has it (a clean session's claim may
    /// not be in the replica).
    async fn on_holder<T>(
        &self,
        op: &str,
        args: ClientArgs,
        here: impl Fn(&Admin) -> Result<T, AdminError>,
    ) -> Result<T, AdminError>
    where
        T: DeserializeOwned,
    {
        let me = self.me();
        let peers = self.peers();
        let owner = self
            .cluster
            .owner_node(&args.client_id)
            .filter(|o| *o != me);
        if let Some((id, addr)) = owner.and_then(|o| peers.iter().find(|(id, _)| *id == o)) {
            match self.ask(*id, addr, op, &args).await {
                Err(e) if e.code == "unknown_session" => {}
                other => return other,
            }
        }
        match here(self) {
            Err(e) if e.code == "unknown_session" => {}
            other => return other,
        }
        let asks = peers
            .iter()
            .filter(|(id, _)| Some(*id) != owner)
            .map(|(id, addr)| self.ask::<T, _>(*id, addr, op, &args));
        let mut unreachable = None;
        for answer in futures_util::future::join_all(asks).await {
            match answer {
                Ok(t) => return Ok(t),
                Err(e) if e.code == "unknown_session" => {}
                Err(e) => unreachable = Some(e),
            }
        }
        Err(unreachable.unwrap_or_else(|| unknown_session(&args.client_id)))
    }

    async fn find_session(&self, client_id: &str) -> Result<SessionInfo, AdminError> {
        let args = ClientArgs {
            client_id: client_id.to_owned(),
            discard: false,
        };
        self.on_holder("session", args, |a| {
            a.local_session(client_id)
                .ok_or_else(|| unknown_session(client_id))
        })
        .await
    }
}

fn unknown_session(client_id: &str) -> AdminError {
    AdminError::not_found(
        "unknown_session",
        format!("no session with client id {client_id:?}"),
    )
}

fn decode_reply<T: DeserializeOwned>(
    node_id: u64,
    reply: petrel_cluster_proto::pb::AdminReply,
) -> Result<T, AdminError> {
    if reply.http_status == 200 {
        return serde_json::from_slice(&reply.body_json)
            .map_err(|e| AdminError::internal(format!("node {node_id} answered {e}")));
    }
    let status = axum_status(reply.http_status);
    let code = local::static_code(&reply.code);
    Err(AdminError::new(status, code, reply.message))
}

fn axum_status(code: u32) -> petrel_admin_api::error::StatusCode {
    u16::try_from(code)
        .ok()
        .and_then(|c| petrel_admin_api::error::StatusCode::from_u16(c).ok())
        .unwrap_or(petrel_admin_api::error::StatusCode::BAD_GATEWAY)
}

impl AdminBackend for Admin {
    fn registry(&self) -> &prometheus::Registry {
        &self.broker.metrics.registry
    }

    /// Ready while the node is in a cluster with a leader and has applied what that leader
    /// committed, and is not draining; not ready once a store write has failed, from that
    /// instant (before the node's reaction to it has run).
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.broker.draining.load(Ordering::Acquire)
            && !self.broker.store.committed_now().failed
            && self.cluster.is_caught_up()
    }

    fn before_scrape(&self) {
        crate::metrics::refresh(&self.broker, &self.cluster, self.is_ready());
    }

    fn sessions(&self, filter: SessionFilter, page: PageRequest) -> Reply<'_, Listed<SessionInfo>> {
        Box::pin(async move {
            let local = self.local_sessions(&filter, &page);
            let args = ListArgs {
                filter,
                after: page.after,
                limit: page.limit,
            };
            Ok(self
                .list_everywhere("sessions", args, local, |s| s.client_id.clone())
                .await)
        })
    }

    fn session(&self, client_id: String) -> Reply<'_, SessionInfo> {
        Box::pin(async move { self.find_session(&client_id).await })
    }

    fn kick(&self, client_id: String, discard: bool) -> Reply<'_, KickOutcome> {
        Box::pin(async move {
            let args = ClientArgs {
                client_id: client_id.clone(),
                discard,
            };
            self.on_holder("kick", args, |a| a.local_kick(&client_id, discard))
                .await
        })
    }

    fn subscriptions(
        &self,
        filter: SubscriptionFilter,
        page: PageRequest,
    ) -> Reply<'_, Listed<SubscriptionInfo>> {
        Box::pin(async move {
            let local = self.local_subscriptions(&filter, &page);
            let args = ListArgs {
                filter,
                after: page.after,
                limit: page.limit,
            };
            let key = petrel_admin_api::handlers::subscription_key;
            Ok(self
                .list_everywhere("subscriptions", args, local, key)
                .await)
        })
    }

    fn retained(&self, filter: String, page: PageRequest) -> Reply<'_, Vec<RetainedMessage>> {
        Box::pin(async move { self.local_retained(&filter, &page) })
    }

    fn retained_one(&self, topic: String) -> Reply<'_, RetainedMessage> {
        Box::pin(async move { self.local_retained_one(&topic) })
    }

    fn delete_retained(&self, topic: String) -> Reply<'_, ()> {
        Box::pin(async move { self.clear_retained(&topic).await })
    }

    fn publish(&self, req: PublishRequest, payload: Vec<u8>) -> Reply<'_, PublishOutcome> {
        Box::pin(async move { self.publish_here(req, payload).await })
    }

    fn routes(&self, page: PageRequest) -> Reply<'_, Vec<RouteInfo>> {
        Box::pin(async move {
            let members: std::collections::BTreeSet<u64> = self
                .cluster
                .status()
                .members
                .iter()
                .filter(|m| m.role != "removed")
                .map(|m| m.node_id)
                .collect();
            let mut routes: Vec<(String, RouteInfo)> = self
                .cluster
                .route_entries()
                .into_iter()
                .map(|(group, filter, node_id)| {
                    let share_group = (!group.is_empty()).then_some(group);
                    let key = petrel_admin_api::handlers::route_key(
                        &filter,
                        share_group.as_deref(),
                        node_id,
                    );
                    let info = RouteInfo {
                        filter,
                        share_group,
                        node_id,
                        unknown_node: !members.contains(&node_id),
                    };
                    (key, info)
                })
                .collect();
            routes.sort_by(|a, b| a.0.cmp(&b.0));
            let window = petrel_admin_api::page::window(routes, &page, |(k, _)| k.as_str());
            Ok(window.into_iter().map(|(_, r)| r).collect())
        })
    }

    fn cluster(&self) -> Reply<'_, ClusterInfo> {
        Box::pin(async move {
            let st = self.cluster.status();
            let members = st
                .members
                .iter()
                .map(|m| MemberInfo {
                    node_id: m.node_id,
                    role: m.role.clone(),
                    grpc_addr: m.grpc_addr.clone(),
                    mqtt_addr: m.mqtt_addr.clone(),
                    version: m.version.clone(),
                    reachable: m.node_id == st.node_id
                        || self.cluster.forwarder().stream_up(m.node_id),
                    draining: m.draining,
                    matched_index: m.matched_index,
                    lag: (m.matched_index > 0 || st.role == "leader")
                        .then(|| st.last_log_index.saturating_sub(m.matched_index)),
                    routes: m.routes,
                })
                .collect();
            Ok(ClusterInfo {
                node_id: st.node_id,
                leader_id: st.leader_id,
                term: st.term,
                role: st.role,
                last_log_index: st.last_log_index,
                committed_index: st.committed_index,
                applied_index: st.applied_index,
                routes_unknown_node: st.routes_unknown_node,
                members,
            })
        })
    }

    fn remove_node(&self, node_id: u64) -> Reply<'_, NodeOutcome> {
        Box::pin(async move {
            if node_id == self.me() {
                return Err(AdminError::conflict(
                    "a node does not remove itself: ask another member",
                ));
            }
            if self.member_addr(node_id).is_none() {
                return Err(unknown_node(node_id));
            }
            self.cluster
                .remove_via_leader(node_id)
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                        AdminError::no_quorum(s.message().to_owned())
                    }
                    _ => AdminError::conflict(s.message().to_owned()),
                })?;
            tracing::info!(node_id, "node removed through the admin API");
            Ok(NodeOutcome {
                node_id,
                state: "removed".to_owned(),
            })
        })
    }

    fn drain_node(&self, node_id: u64) -> Reply<'_, NodeOutcome> {
        Box::pin(async move {
            if node_id == self.me() {
                return self.drain_here().await;
            }
            let Some(addr) = self.member_addr(node_id) else {
                return Err(unknown_node(node_id));
            };
            self.ask(node_id, &addr, "drain", &()).await
        })
    }
}

fn unknown_node(node_id: u64) -> AdminError {
    AdminError::not_found("unknown_node", format!("node {node_id} is not a member"))
}
