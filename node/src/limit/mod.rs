//! Limits: which connections get in, how fast a client may publish, how long a topic may be.

mod admission;
mod bucket;
pub mod files;
mod topic;

pub use admission::{Admission, Admit, Permits, Refusal, REFUSAL_TIMEOUT};
pub use bucket::TokenBucket;
pub use topic::topic_over_limit;
