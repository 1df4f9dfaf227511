//! The two servers, which never import each other: [`http`] (`/metrics` built by
//! [`metrics`] from a view of the table, `/healthz`, `/readyz`) and [`api`] (the local Unix
//! socket the `tcpstate` CLI talks to). Both reach running state only through
//! [`crate::engine::handle`].
pub mod api;
pub(crate) mod http;
pub(crate) mod metrics;
