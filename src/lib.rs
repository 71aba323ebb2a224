//! Meridian: an edge-distributed WebRTC SFU for compliance video.
//!
//! Planes, one folder each: [`media`] (packet primitives), [`sfu`] (sessions, producers,
//! consumers on one node), [`mesh`] (pipes, membership, discovery, routing data),
//! [`signaling`] (the HTTP/WebSocket edge); below them [`ids`], [`auth`] and [`proto`] (wire
//! formats), which depend on nothing else; above them [`config`] and [`node`], which compose
//! the planes (each plane owns its settings type; `config` converts). `client` and `bench`
//! are the load generator.

pub mod admin;
pub mod admission;
pub mod alloc;
pub mod auth;
#[cfg(feature = "loadgen")]
pub mod bench;
pub mod cidr;
#[cfg(feature = "loadgen")]
pub mod client;
pub mod compliance;
pub mod config;
pub mod ctl;
pub mod health;
pub mod ids;
pub mod logging;
pub mod media;
pub mod mesh;
pub mod metrics;
pub mod netem;
pub mod node;
pub mod procfs;
pub mod proto;
pub mod sfu;
pub mod signaling;
