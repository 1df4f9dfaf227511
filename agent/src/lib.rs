//! tcpstate: every TCP state transition on a host, per service port, as Prometheus metrics.
//!
//! Data flows one way:
//!
//! ```text
//! ebpf (tracepoint) -> ring buffer -> reader -> decode -> table -> metrics -> http
//! ```
//!
//! - [`tracefs`] finds tracefs and reads the tracepoint's field offsets, handed to the program.
//! - [`bpf`] loads and attaches the program and owns its maps.
//! - [`reader`] drains the ring buffer without blocking and counts what it cannot deliver.
//! - [`decode`] turns ring records into [`decode::Transition`]s, pure and length-checked.
//! - [`table`] is the connection table and per-port aggregates, owned by one task, no I/O.
//! - [`sockdiag`] dumps every TCP socket of every namespace: seeding, repair, timewait.
//! - [`alerts`] finds connections lingering in CLOSE_WAIT or FIN_WAIT2, on a timer.
//! - [`metrics`] builds the Prometheus families from a table snapshot at scrape time.
//! - [`http`] serves them; [`apiserver`] answers the local API ([`api`]) that the CLI
//!   ([`client`]) uses; [`daemon`] wires it all and handles shutdown.
pub mod alerts;
pub mod api;
pub mod apiserver;
pub mod bpf;
pub mod btf;
pub mod cli;
pub mod client;
pub mod config;
pub mod configfile;
pub mod daemon;
pub mod decode;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod owner;
pub mod privileges;
pub mod reader;
pub mod sockdiag;
pub mod table;
pub mod tracefs;
