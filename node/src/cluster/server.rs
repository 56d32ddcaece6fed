//! The gRPC listener's services: `Raft` (openraft's RPCs from the leader and candidates)
//! and `Cluster` (forwarded proposals, joins, removals and status, from members and
//! `petrel cluster`), and the data plane's `Forward` (publishes from other members).

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, TransferLeaderError};
use petrel_cluster_proto::pb;
use petrel_cluster_proto::pb::cluster_server::{Cluster as ClusterService, ClusterServer};
use petrel_cluster_proto::pb::forward_server::{Forward as ForwardService, ForwardServer};
use petrel_cluster_proto::pb::raft_server::{Raft as RaftService, RaftServer};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::network::MAX_MESSAGE;
use super::raft::{self, Batch, Snapshot, SnapshotMeta};
use super::Cluster;

/// Serves both services on `listener` until `cancel`.
pub async fn serve(
    cluster: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) {
    let raft = RaftServer::new(RaftSvc(cluster.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let forward = ForwardServer::new(ForwardSvc(cluster.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let members = ClusterServer::new(ClusterSvc(cluster))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    // The builder's `tcp_nodelay` applies only to sockets it accepts itself: these come from
    // our listener, so each gets it here. Without it a small answer (an append's ack, a
    // proposal's outcome) waits for the peer's delayed ACK: 40 ms stalls on loopback.
    let incoming = TcpListenerStream::new(listener).map(|s| {
        s.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    });
    let r = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(raft)
        .add_service(members)
        .add_service(forward)
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

fn invalid(e: std::io::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft stopped: {e}"))
}

struct ForwardSvc(Arc<Cluster>);

#[tonic::async_trait]
impl ForwardService for ForwardSvc {
    type StreamStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ForwardAck, Status>>;

    /// A peer's forwarded publishes: delivered here, acknowledged cumulatively.
    async fn stream(
        &self,
        req: Request<Streaming<pb::ForwardBatch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        if !self.0.is_caught_up() {
            // Its sessions may be stale copies of sessions other nodes took meanwhile: the
            // sender keeps the messages until this node knows.
            return Err(Status::unavailable("catching up with the cluster"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(self.0.forward.clone().receive(req.into_inner(), tx));
        let mut response = Response::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        // What this node reads of a forwarded message (see `wire.rs`).
        response
            .metadata_mut()
            .insert(super::wire::STREAM_LEVEL, self.0.me.wire_level.into());
        Ok(response)
    }
}

struct RaftSvc(Arc<Cluster>);

#[tonic::async_trait]
impl RaftService for RaftSvc {
    async fn vote(&self, req: Request<pb::VoteRequest>) -> Result<Response<pb::VoteReply>, Status> {
        let req = req.into_inner();
        let mut rpc = openraft::raft::VoteRequest::new(
            raft::vote(req.vote).map_err(invalid)?,
            raft::opt_log_id(req.last_log_id),
        );
        rpc.leadership_transfer = req.leadership_transfer;
        let r = match req.pre_vote {
            true => self.0.raft.pre_vote(rpc).await,
            false => self.0.raft.vote(rpc).await,
        }
        .map_err(fatal)?;
        Ok(Response::new(pb::VoteReply {
            vote: Some(raft::vote_pb(&r.vote)),
            vote_granted: r.vote_granted,
            last_log_id: r.last_log_id.as_ref().map(raft::log_id_pb),
        }))
    }

    async fn append(
        &self,
        req: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        let req = req.into_inner();
        let entries = req
            .entries
            .into_iter()
            .map(raft::entry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let rpc = AppendEntriesRequest {
            vote: raft::vote(req.vote).map_err(invalid)?,
            prev_log_id: raft::opt_log_id(req.prev_log_id),
            entries,
            leader_commit: raft::opt_log_id(req.leader_commit),
        };
        let r = self.0.raft.append_entries(rpc).await.map_err(fatal)?;
        if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
            self.0.heard_from_leader();
        }
        use pb::append_reply::Result as R;
        let result = match r {
            AppendEntriesResponse::Success => R::Success(pb::Blank {}),
            AppendEntriesResponse::PartialSuccess(Some(id)) => R::Partial(raft::log_id_pb(&id)),
            AppendEntriesResponse::PartialSuccess(None) => R::Success(pb::Blank {}),
            AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(raft::vote_pb(&v)),
        };
        Ok(Response::new(pb::AppendReply {
            result: Some(result),
        }))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let Some(pb::snapshot_chunk::Payload::Meta(meta)) = first.payload else {
            return Err(Status::invalid_argument(
                "a snapshot stream starts with its meta",
            ));
        };
        let vote = raft::vote(meta.vote).map_err(invalid)?;
        let meta = SnapshotMeta {
            last_log_id: raft::opt_log_id(meta.last_log_id),
            last_membership: raft::stored_membership(meta.last_membership).map_err(invalid)?,
        };
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk?.payload {
                Some(pb::snapshot_chunk::Payload::Data(d)) => data.extend_from_slice(&d),
                _ => return Err(Status::invalid_argument("a snapshot has one meta")),
            }
        }
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        let r = self
            .0
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(fatal)?;
        Ok(Response::new(pb::SnapshotReply {
            vote: Some(raft::vote_pb(&r.vote)),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        let req = req.into_inner();
        let rpc = openraft::raft::TransferLeaderRequest::new(
            raft::vote(req.from_leader).map_err(invalid)?,
            req.to_node_id,
            raft::opt_log_id(req.last_log_id),
        );
        let r = self
            .0
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(fatal)?;
        use pb::transfer_leader_reply::Result as R;
        let result = match r {
            Ok(()) => R::Ok(pb::Blank {}),
            Err(TransferLeaderError::VoteChanged { expected, actual }) => {
                R::VoteChanged(pb::VoteChanged {
                    expected: Some(raft::vote_pb(&expected)),
                    actual: Some(raft::vote_pb(&actual)),
                })
            }
            Err(TransferLeaderError::LogNotFlushed { expected, actual }) => {
                R::LogNotFlushed(pb::LogNotFlushed {
                    expected: expected.as_ref().map(raft::log_id_pb),
                    actual: actual.as_ref().map(raft::log_id_pb),
                })
            }
        };
        Ok(Response::new(pb::TransferLeaderReply {
            result: Some(result),
        }))
    }
}

struct ClusterSvc(Arc<Cluster>);

impl ClusterSvc {
    fn is_leader(&self) -> bool {
        self.0.leader() == Some(self.0.me.node_id)
    }

    /// A client to the leader, for a request this node cannot serve.
    fn leader(
        &self,
    ) -> Result<pb::cluster_client::ClusterClient<tonic::transport::Channel>, Status> {
        let addr = self
            .0
            .leader_addr()
            .ok_or_else(|| Status::unavailable("no leader"))?;
        self.0
            .client(&addr)
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterSvc {
    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        if !self.is_leader() {
            return Err(Status::unavailable("not the leader"));
        }
        let batch = req.into_inner().batch.unwrap_or_default();
        let r = self
            .0
            .raft
            .client_write(Batch(batch))
            .await
            .map_err(Cluster::write_status)?;
        Ok(Response::new(pb::ProposeReply {
            outcome: Some(r.data),
            index: r.log_id.index,
        }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        if !self.is_leader() {
            return self.leader()?.join(req.into_inner()).await;
        }
        let req = req.into_inner();
        let voter = self.0.admit(&req).await.map_err(Status::unavailable)?;
        tracing::info!(node_id = req.node_id, addr = %req.grpc_addr, voter, "node joined");
        Ok(Response::new(pb::JoinReply { voter }))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveReply>, Status> {
        if !self.is_leader() {
            return self.leader()?.remove(req.into_inner()).await;
        }
        let id = req.into_inner().node_id;
        self.0
            .remove(id)
            .await
            .map_err(Status::failed_precondition)?;
        tracing::info!(node_id = id, "node removed from the cluster");
        Ok(Response::new(pb::RemoveReply {}))
    }

    async fn admin(
        &self,
        req: Request<pb::AdminRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let Some(admin) = self.0.admin.get().cloned() else {
            return Err(Status::unavailable("the admin API is not up yet"));
        };
        let req = req.into_inner();
        Ok(Response::new(
            admin.call(req.op, req.args_json.to_vec()).await,
        ))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(self.0.status()))
    }

    type AppliedStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<pb::AppliedIndex, Status>> + Send + 'static>>;

    /// This node's applied index now and after every change, until the node stops.
    async fn applied(
        &self,
        _req: Request<pb::AppliedRequest>,
    ) -> Result<Response<Self::AppliedStream>, Status> {
        let rx = self.0.sm.applied();
        let stop = self.0.stop.clone();
        let s =
            futures_util::stream::unfold((rx, stop, true), |(mut rx, stop, first)| async move {
                if !first {
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        r = rx.changed() => r.ok()?,
                    }
                }
                let index = *rx.borrow_and_update();
                Some((Ok(pb::AppliedIndex { index }), (rx, stop, false)))
            });
        Ok(Response::new(Box::pin(s)))
    }

    async fn handover(
        &self,
        req: Request<pb::HandoverRequest>,
    ) -> Result<Response<pb::HandoverReply>, Status> {
        let session = self.0.serve_handover(req.into_inner()).await?;
        Ok(Response::new(pb::HandoverReply { session }))
    }

    async fn handover_done(
        &self,
        req: Request<pb::HandoverDoneRequest>,
    ) -> Result<Response<pb::HandoverDoneReply>, Status> {
        let req = req.into_inner();
        self.0.handover_done(&req.client_id, req.from_epoch);
        Ok(Response::new(pb::HandoverDoneReply {}))
    }

    async fn push_session(
        &self,
        req: Request<pb::SessionHandover>,
    ) -> Result<Response<pb::PushSessionReply>, Status> {
        let taken = self.0.take_pushed(req.into_inner())?;
        Ok(Response::new(pb::PushSessionReply { taken }))
    }
}
