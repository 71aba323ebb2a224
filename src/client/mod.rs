//! Client side of the protocol, for the load generator and the tests: WebRTC peers on the
//! sans-I/O core. Browsers use web/sdk/meridian.js instead.

pub mod media;
pub mod peer;
pub mod signal;
