//! The integration tests: one test crate, compiled once, one module per area, sharing the
//! helpers in `support` and the agent harness in `harness` (which `cargo xtask bench` uses too).
//!
//! Every test that loads the program or makes connections needs root and fails (never skips)
//! without it; each works in network namespaces or on ports of its own. Every agent sees the
//! sockets of every namespace, so the areas take turns (`support::require_root` returns the
//! test's hold on its area): tests of one area run side by side, areas one after another.
// `cargo xtask bench` compiles the harness too and uses parts the tests do not.
#[allow(dead_code)]
mod harness;
mod support;

mod api;
mod api_access;
mod capabilities;
mod deploy;
mod doctor;
mod ground_truth;
mod kernel;
mod layers;
mod linger;
mod operation;
