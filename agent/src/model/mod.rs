//! The pure model: what a transition and a dumped socket are, the connection table and its
//! per-port aggregates, the linger detector, and the queries the servers make. No tokio, aya,
//! netlink, logging or file system here: every function is a computation on values, unit-tested
//! without privileges (a test in `tests/layers.rs` keeps it so).
pub(crate) mod diagnose;
pub(crate) mod ending;
pub mod event;
pub mod linger;
pub(crate) mod query;
pub(crate) mod state;
pub mod table;
pub(crate) mod teardown;
