//! Herald: the Django Channels channel layer as one durable Rust server.
//!
//! # Layout
//! - [`auth`]: access control: tokens, JWTs, permission patterns. No HTTP.
//! - [`config`]: settings from the compiled-in `config/default.toml`, a file and the environment.
//! - [`names`]: the channel and group name rules, below both the layer and the store.
//! - [`message`]: message validation and its msgpack and JSON forms.
//! - [`store`]: the sled database behind typed writes and one typed recovery read: key
//!   layout, records, format version, group commit, the power-safe sync, the
//!   damaged-log check, disk space, dumps. The only module that knows sled. No HTTP.
//! - [`layer`]: the channel layer (channels, groups, capacity, expiry, waiting receivers),
//!   one file per concern. No HTTP, no keys.
//! - [`http`]: the warp routes (HTTP, SSE, WebSocket) and the one mapping of errors to status codes.
//! - [`server`]: binds, serves, sweeps, and shuts down on a signal.
//! - `metrics`: the Prometheus metrics every layer records into.
//!
//! The load generator, `herald-bench`, is a crate of its own in `benches/load/`.

pub mod auth;
pub mod config;
pub mod http;
pub mod layer;
pub mod message;
mod metrics;
pub mod names;
pub mod server;
pub mod store;
#[cfg(test)]
mod testing;

pub use layer::ChannelLayer;
