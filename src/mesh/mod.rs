//! The mesh plane: QUIC pipe transports between nodes, and the control protocol that makes a
//! session span nodes. Pipes relay producers with the same ProducerId on both sides.

pub mod tls;
pub mod wire;
