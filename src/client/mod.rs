//! Client side of the protocol, for the load generator and the tests: WebRTC peers on the
//! sans-I/O core. Browsers use web/sdk/meridian.js instead.

pub mod media;
pub mod peer;
pub mod signal;

use std::time::Instant;

use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::RTCPeerConnection;

use peer::ClientError;

/// Creates and applies a local offer; returns its SDP.
pub(crate) fn make_offer(pc: &mut RTCPeerConnection) -> Result<String, ClientError> {
    let offer = pc.create_offer(None)?;
    pc.set_local_description(Instant::now(), offer)?;
    local_sdp(pc, "offering")
}

/// Applies the far end's answer.
pub(crate) fn apply_answer(pc: &mut RTCPeerConnection, sdp: &str) -> Result<(), ClientError> {
    pc.set_remote_description(
        Instant::now(),
        RTCSessionDescription::answer(sdp.to_owned())?,
    )?;
    Ok(())
}

/// Applies the far end's offer and returns the local answer's SDP.
pub(crate) fn answer_offer(pc: &mut RTCPeerConnection, sdp: &str) -> Result<String, ClientError> {
    pc.set_remote_description(
        Instant::now(),
        RTCSessionDescription::offer(sdp.to_owned())?,
    )?;
    let answer = pc.create_answer(None)?;
    pc.set_local_description(Instant::now(), answer)?;
    local_sdp(pc, "answering")
}

fn local_sdp(pc: &RTCPeerConnection, after: &str) -> Result<String, ClientError> {
    Ok(pc
        .local_description()
        .ok_or_else(|| ClientError::Sdp(format!("no local description after {after}")))?
        .sdp)
}
