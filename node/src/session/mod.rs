//! Sessions: what outlives a connection.
//!
//! - [`Session`]: the shared half (message queue, connection link), reachable from the
//!   router so publishers can enqueue without knowing whether the client is online.
//! - [`SessionState`]: the owned half (subscriptions, in-flight window, inbound QoS 2 ids),
//!   held by the connection task while connected and parked in the `Session` otherwise.
//! - [`SessionView`]: a snapshot of one session for the admin API.
//! - [`SessionStats`]: connected sessions and queued messages over all sessions, as counters.
//! - [`SessionRegistry`]: client id -> session. The CONNECT claim goes through here; in the
//!   cluster it becomes a Raft command.

mod queue;
mod registry;
#[allow(clippy::module_inception)]
mod session;
mod state;
mod stats;
mod view;

pub use queue::{Delivery, DropReason, Enqueued, QueueLimits, SubIds};
pub use registry::{ClaimGuard, Epoch, SessionRegistry};
pub use session::{Kick, Session, SessionId};
pub use state::{Inflight, SessionState, Stage, StoredSubscription};
pub use stats::SessionStats;
pub use view::{sub_views, ClientInfo, Detail, SessionView, SubView};
