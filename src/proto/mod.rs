//! Wire formats, the bottom of the crate: what crosses a network between nodes. They depend
//! only on the shared vocabulary (`ids`, `auth::Role`), so the planes that speak them (the
//! SFU's pipe transport, the mesh core) depend on them and not on each other.

pub mod admin;
pub mod pipe;
