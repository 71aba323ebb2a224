//! Meridian: an edge-distributed WebRTC SFU for compliance video.
//!
//! Planes, one folder each: [`media`] (packet primitives), [`sfu`] (sessions, producers,
//! consumers on one node), [`signaling`] (the HTTP/WebSocket edge), plus [`auth`] and
//! [`config`] shared by all.

pub mod admission;
pub mod alloc;
pub mod auth;
pub mod bench;
pub mod cidr;
pub mod client;
pub mod config;
pub mod ids;
pub mod logging;
pub mod media;
pub mod mesh;
pub mod netem;
pub mod node;
pub mod procfs;
pub mod sfu;
pub mod signaling;
