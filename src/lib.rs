//! Herald: the Django Channels channel layer as one durable Rust server.
//!
//! # Layout
//! - [`auth`]: access control: tokens, JWTs, permission patterns. No HTTP.
//! - [`config`]: settings from the compiled-in `config/default.toml`, a file and the environment.
//! - [`message`]: message validation and its msgpack and JSON forms.
//! - [`store`]: the sled database: key layout, records, format version, group commit, the
//!   power-safe sync, the damaged-log check, disk space. No HTTP.
//! - [`layer`]: the channel layer (channels, groups, capacity, expiry, waiting receivers). No HTTP.
//! - [`http`]: the warp routes (HTTP, SSE, WebSocket) and the one mapping of errors to status codes.
//! - [`server`]: binds, serves, sweeps, and shuts down on a signal.
//! - [`bench`]: `herald bench`, a load generator that uses only the public API.

pub mod auth;
/// `herald bench`: the load generator, a client of the public HTTP, SSE and WebSocket API.
pub mod bench;
pub mod config;
pub mod http;
pub mod layer;
pub mod message;
pub mod names;
pub mod server;
pub mod store;

pub use layer::ChannelLayer;
