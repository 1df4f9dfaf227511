//! tcpstate: every TCP state transition on a host, per service port, as Prometheus metrics,
//! lingering `CLOSE_WAIT`/`FIN_WAIT_2` connections as alerts, and a local API for the CLI.
//!
//! Data flows one way, through four layers (folders), each using only those before it:
//!
//! ```text
//!  kernel                     engine                               serve
//!  ──────                     ──────                               ─────
//!  eBPF program (tracepoint)
//!    └─ ring buffer ─> ring reader ─> batches ─> table task ─┬─ View ──> metrics ─> HTTP /metrics
//!                      (decode)                   (model:    ├─ Conns ─> API server ─> tcpstate CLI
//!  sock_diag dumps ─> reconcile task ─ dump ────> table,     └─ every transition ─> API `watch`
//!   (every namespace,  (on an interval, sooner     linger
//!    seed + repair)     after a kernel loss)       detector) ─ crossings ─> alert log (owners
//!                                                                             from /proc)
//! ```
//!
//! - [`model`] is pure: transitions and dumped sockets ([`model::event`]), the connection
//!   table and per-port aggregates ([`model::table`]), the linger detector
//!   ([`model::linger`]) and the queries the servers make ([`model::query`]).
//! - [`kernel`] is the only code that touches the kernel: privileges, tracefs, BTF, the
//!   program (aya), the ring buffer, sock_diag (netlink) and /proc.
//! - [`engine`] runs the tokio tasks that own running state; the servers reach them only
//!   through [`engine::handle`].
//! - [`serve`] has the two servers, which never import each other: HTTP with the Prometheus
//!   exposition, and the Unix API.
//! - [`agent`] wires the layers, starts and stops them. [`config`] holds the validated settings
//!   (flags and file); [`cli`] is the client side, speaking only the API protocol. [`args`] is
//!   the command line of the binary, [`clock`] the kernel's clock.
pub mod agent;
pub mod args;
pub mod cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod kernel;
mod memory;
pub mod model;
pub mod serve;
#[doc(hidden)]
pub mod testing;
