//! Client side of the protocol, for the load generator and the tests: WebRTC peers on the
//! sans-I/O core. Browsers use web/sdk/meridian.js instead.

pub mod media;
pub mod peer;
pub mod signal;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::RTCPeerConnection;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

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

/// Hands one UDP datagram from `from`, received on `local`, to a client peer connection.
pub(crate) fn feed_udp(
    pc: &mut RTCPeerConnection,
    local: SocketAddr,
    from: SocketAddr,
    data: &[u8],
) {
    let _ = pc.handle_read(TaggedBytesMut {
        now: Instant::now(),
        transport: TransportContext {
            local_addr: local,
            peer_addr: from,
            ecn: None,
            transport_protocol: TransportProtocol::UDP,
        },
        message: BytesMut::from(data),
    });
}

/// When a client peer's loop should wake at the latest: its own next timer, or 50 ms.
pub(crate) fn next_wakeup(pc: &mut RTCPeerConnection) -> Instant {
    let cap = Instant::now() + Duration::from_millis(50);
    pc.poll_timeout().map_or(cap, |t| t.min(cap))
}

/// Sends what a client peer has queued on `socket` and records whether it is connected.
pub(crate) async fn flush_and_track(
    pc: &mut RTCPeerConnection,
    socket: &tokio::net::UdpSocket,
    connected: &std::sync::atomic::AtomicBool,
) {
    use rtc::peer_connection::event::RTCPeerConnectionEvent;
    use rtc::peer_connection::state::RTCPeerConnectionState;
    while let Some(msg) = pc.poll_write() {
        let _ = socket.send_to(&msg.message, msg.transport.peer_addr).await;
    }
    while let Some(ev) = pc.poll_event() {
        if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
            connected.store(
                s == RTCPeerConnectionState::Connected,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}
