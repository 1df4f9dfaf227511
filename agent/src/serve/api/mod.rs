//! The local API: [`protocol`] (the JSON lines both ends speak; the CLI uses nothing else),
//! [`server`] (the Unix socket), and [`rows`] (the table task's answers as protocol rows).
mod doctor;
mod owners;
pub mod protocol;
pub(crate) mod rows;
pub(crate) mod server;
