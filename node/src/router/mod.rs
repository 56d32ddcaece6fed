//! Topic router: filter syntax, the subscription trie and the retained-message store.
//!
//! ```text
//!  PUBLISH a/b/c ──> SubscriptionTrie::collect ──> [Match{session, qos, ..}] ──> Session queues
//!                         (local subscribers)          (later: + route table -> peer nodes)
//! ```

pub mod retained;
pub mod topic;
pub mod trie;

pub use retained::{RetainedLimits, RetainedStore, SharedRetained};
pub use topic::{FilterError, ParsedFilter};
pub use trie::{AclStamp, Match, Subscriber, SubscriptionTrie};
