//! Topic router: filter syntax, the subscription trie and the retained-message store.
//!
//! ```text
//!  PUBLISH a/b/c ──> SubscriptionTrie::collect ──> [Match{session, qos, ..}] ──> Session queues
//!          RouteTable::collect ──> [Target{node, ..}] ──> forwarded to peer nodes
//! ```

pub mod retained;
pub mod routes;
pub mod topic;
pub mod trie;

pub use retained::{RetainedLimits, RetainedStore, SharedRetained};
pub use routes::{NodeSet, RouteOp, RouteTable, Target};
pub use topic::{FilterError, ParsedFilter};
pub use trie::{AclStamp, Match, ShareKey, Subscriber, SubscriptionTrie};
