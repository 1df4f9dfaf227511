//! The tokio tasks that own running state, and the handle through which the servers reach it.
//!
//! - [`table_task`]: the one task that owns the table and the linger detector; it applies
//!   batches from the ring reader in order, runs the detector on a timer, applies sock_diag
//!   dumps, and answers [`handle::Request`]s.
//! - [`reconcile_task`]: dumps every namespace with sock_diag on an interval, sooner after a
//!   kernel loss, and sends the dump to the table task.
//! - [`alert_log`]: logs lingering connections with their owners (a /proc scan off the
//!   table task).
//! - [`stats`]: the event rate and the kernel's loss counters.
//! - [`ebpf_log`]: keeps the program's aya-log records flowing into `tracing`.
pub(crate) mod alert_log;
pub(crate) mod ebpf_log;
pub(crate) mod handle;
pub(crate) mod reconcile_task;
pub(crate) mod stats;
pub(crate) mod table_task;
