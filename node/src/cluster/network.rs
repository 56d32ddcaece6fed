//! Raft's outgoing RPCs over tonic: one lazily connected channel per peer.
//!
//! Snapshots go as a client stream: the meta, then the data in chunks of
//! [`SNAPSHOT_CHUNK`] bytes, so neither side holds a message larger than a chunk on the
//! wire and gRPC's message size limit never bites.

use std::future::Future;
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderError,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use petrel_cluster_proto::pb;
use petrel_cluster_proto::pb::raft_client::RaftClient;
use tonic::transport::{Channel, Endpoint};

use super::raft::{self, RaftNode, Snapshot, TypeConfig, Vote};

/// Bytes of snapshot data per stream message.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest gRPC message accepted or sent between members (an append of big retained
/// messages); snapshots are chunked below it.
pub const MAX_MESSAGE: usize = 64 << 20;

/// A channel to `addr` that connects on first use and reconnects after failures.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

pub struct Network;

pub struct Peer {
    target: u64,
    client: Option<RaftClient<Channel>>,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &RaftNode) -> Peer {
        let client = channel(&node.grpc_addr).ok().map(|c| {
            RaftClient::new(c)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE)
        });
        Peer {
            target,
            client,
            addr: node.grpc_addr.clone(),
        }
    }
}

fn status_error(target: u64, s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        // No connection: back off before the next try.
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
            RPCError::Unreachable(Unreachable::from_string(format!("node {target}: {s}")))
        }
        _ => RPCError::Network(NetworkError::from_string(format!("node {target}: {s}"))),
    }
}

fn decode_error(target: u64, e: std::io::Error) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(format!(
        "node {target} answered what this node cannot read: {e}"
    )))
}

impl Peer {
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        self.client.clone().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::from_string(format!(
                "node {}: bad address {:?}",
                self.target, self.addr
            )))
        })
    }

    async fn send_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
        pre_vote: bool,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = pb::VoteRequest {
            vote: Some(raft::vote_pb(&rpc.vote)),
            last_log_id: rpc.last_log_id.as_ref().map(raft::log_id_pb),
            leadership_transfer: rpc.leadership_transfer,
            pre_vote,
        };
        let reply = self
            .client()?
            .vote(Self::request(req, &option))
            .await
            .map_err(|s| status_error(self.target, s))?
            .into_inner();
        let vote = raft::vote(reply.vote).map_err(|e| decode_error(self.target, e))?;
        Ok(VoteResponse::new(
            vote,
            raft::opt_log_id(reply.last_log_id),
            reply.vote_granted,
        ))
    }

    fn request<T>(msg: T, option: &RPCOption) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(option.soft_ttl());
        r
    }
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = pb::AppendRequest {
            vote: Some(raft::vote_pb(&rpc.vote)),
            prev_log_id: rpc.prev_log_id.as_ref().map(raft::log_id_pb),
            entries: rpc.entries.iter().map(raft::entry_pb).collect(),
            leader_commit: rpc.leader_commit.as_ref().map(raft::log_id_pb),
        };
        let reply = self
            .client()?
            .append(Self::request(req, &option))
            .await
            .map_err(|s| status_error(self.target, s))?
            .into_inner();
        use pb::append_reply::Result as R;
        Ok(match reply.result {
            Some(R::Success(_)) => AppendEntriesResponse::Success,
            Some(R::Partial(id)) => AppendEntriesResponse::PartialSuccess(Some(raft::log_id(id))),
            Some(R::Conflict(_)) => AppendEntriesResponse::Conflict,
            Some(R::HigherVote(v)) => AppendEntriesResponse::HigherVote(
                raft::vote(Some(v)).map_err(|e| decode_error(self.target, e))?,
            ),
            None => {
                return Err(decode_error(
                    self.target,
                    std::io::Error::other("empty append reply"),
                ))
            }
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send_vote(rpc, option, false).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send_vote(rpc, option, true).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let meta = pb::SnapshotChunk {
            payload: Some(pb::snapshot_chunk::Payload::Meta(pb::SnapshotMeta {
                vote: Some(raft::vote_pb(&vote)),
                last_log_id: snapshot.meta.last_log_id.as_ref().map(raft::log_id_pb),
                last_membership: Some(raft::stored_membership_pb(&snapshot.meta.last_membership)),
            })),
        };
        let data = bytes::Bytes::from(snapshot.snapshot);
        let chunks: Vec<pb::SnapshotChunk> = std::iter::once(meta)
            .chain(
                (0..data.len())
                    .step_by(SNAPSHOT_CHUNK)
                    .map(|at| pb::SnapshotChunk {
                        payload: Some(pb::snapshot_chunk::Payload::Data(
                            data.slice(at..data.len().min(at + SNAPSHOT_CHUNK)),
                        )),
                    }),
            )
            .collect();
        let mut client = match self.client() {
            Ok(c) => c,
            Err(RPCError::Unreachable(u)) => return Err(StreamingError::Unreachable(u)),
            Err(e) => return Err(StreamingError::Network(NetworkError::new(&e))),
        };
        let _ = option;
        let send = client.install_snapshot(tokio_stream::iter(chunks));
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = send => r,
        };
        let reply = reply
            .map_err(|s| match status_error(self.target, s) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                e => StreamingError::Network(NetworkError::new(&e)),
            })?
            .into_inner();
        let vote =
            raft::vote(reply.vote).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        Ok(SnapshotResponse::new(vote))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let msg = pb::TransferLeaderRequest {
            from_leader: Some(raft::vote_pb(req.from_leader())),
            to_node_id: *req.to_node_id(),
            last_log_id: req.last_log_id().map(raft::log_id_pb),
        };
        let reply = self
            .client()?
            .transfer_leader(Self::request(msg, &option))
            .await
            .map_err(|s| status_error(self.target, s))?
            .into_inner();
        use pb::transfer_leader_reply::Result as R;
        let target = self.target;
        let dec = |e| decode_error(target, e);
        Ok(match reply.result {
            Some(R::Ok(_)) | None => Ok(()),
            Some(R::VoteChanged(v)) => Err(TransferLeaderError::VoteChanged {
                expected: raft::vote(v.expected).map_err(dec)?,
                actual: raft::vote(v.actual).map_err(dec)?,
            }),
            Some(R::LogNotFlushed(l)) => Err(TransferLeaderError::LogNotFlushed {
                expected: raft::opt_log_id(l.expected),
                actual: raft::opt_log_id(l.actual),
            }),
        })
    }
}
