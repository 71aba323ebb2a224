//! Repairs and probes towards subscribers on the RTX stream (RFC 4588).
//!
//! Retransmissions are served from each producer's packet cache and written through the
//! consumer's ordinary sender, so rtc accepts them (it only takes packets on a track's primary
//! SSRC). [`RtxSender`] sits at the wire end of the chain and turns every packet that carries
//! [`REPAIR_MARK`] (put there by [`mark`]) into an RTX packet: the RTX SSRC and payload type
//! negotiated for the stream, the RTX stream's own sequence number, and the original sequence
//! number in front of the payload. The mark rides in the packet because rtc runs the chain
//! only when the connection is flushed, not inside `write_rtp`: a flag set around the call
//! would be gone by then.
//!
//! Why not simply resend on the primary SSRC: once transport-wide congestion control numbers
//! every packet, a resent copy differs from the original in that one extension, and SRTP would
//! then encrypt two different packets under the same key and packet index (under AES-GCM that
//! gives away the authentication key). On the RTX stream every packet has a fresh index.
//! The RTX stream is also what bandwidth probes are sent on: a copy of a recently sent packet
//! that the subscriber discards, but whose arrival it reports.
//!
//! Position: wire-side of `CongestionControl`, so the congestion controller has already recorded
//! the packet (under the transport-wide number the TWCC sender gave it) when it is rewritten.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::sdp::extmap::TRANSPORT_CC_URI;
use rtc::shared::error::Error;

/// Where [`RtxSender`] sits: closer to the wire than `Slot::CongestionControl` (1 000).
pub const RTX_SLOT: usize = 500;

/// What the worker and one connection's [`RtxSender`] share.
#[derive(Debug, Default)]
pub struct Repairs {
    /// A stream with an RTX pairing has been bound: repairs and probes can go on RTX.
    rtx: AtomicBool,
    /// A stream numbered transport-wide has been bound: a repair must not reuse its primary
    /// sequence number.
    twcc: AtomicBool,
}

/// The contributing-source entry that marks a packet for the RTX stream: no mixer is in play
/// on a forwarded copy, and [`RtxSender`] removes it before the packet leaves.
pub const REPAIR_MARK: u32 = 0x4D52_5458;

/// Marks a packet about to be written as a repair or probe (see the module docs).
pub fn mark(pkt: &mut rtc::rtp::Packet) {
    pkt.header.csrc = vec![REPAIR_MARK];
}

impl Repairs {
    /// Whether the subscriber negotiated RTX.
    pub fn rtx(&self) -> bool {
        self.rtx.load(Relaxed)
    }

    /// Whether the subscriber negotiated transport-wide sequence numbers (transport-cc).
    pub fn twcc(&self) -> bool {
        self.twcc.load(Relaxed)
    }

    /// Whether a repair may be sent at all: on RTX, or on the primary SSRC when nothing renumbers
    /// packets on the way out (so the copy is byte-identical to the original).
    pub fn can_repair(&self) -> bool {
        self.rtx() || !self.twcc.load(Relaxed)
    }
}

struct RtxStream {
    ssrc: u32,
    payload_type: u8,
    next_seq: u16,
}

/// The interceptor that rewrites marked packets to RTX (see the module docs).
pub struct RtxSender {
    shared: Arc<Repairs>,
    stats: Arc<super::WorkerStats>,
    streams: HashMap<u32, RtxStream>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl RtxSender {
    /// A converter counting what it must drop in `stats`.
    pub fn new(stats: Arc<super::WorkerStats>) -> (Self, Arc<Repairs>) {
        let shared = Arc::new(Repairs::default());
        (
            Self {
                shared: shared.clone(),
                stats,
                streams: HashMap::new(),
                read: VecDeque::new(),
                write: VecDeque::new(),
            },
            shared,
        )
    }
}

/// RFC 4588 §4: the original sequence number, then the original payload.
fn rtx_payload(osn: u16, payload: &[u8]) -> bytes::Bytes {
    let mut b = BytesMut::with_capacity(2 + payload.len());
    b.put_u16(osn);
    b.put_slice(payload);
    b.freeze()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtxSender {
    super::engine::queued_interceptor!();

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        self.read.push_back(msg);
        Ok(())
    }
    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), Error> {
        if let Packet::Rtp(p) = &mut msg.message.packet {
            if p.header.csrc.len() == 1 && p.header.csrc[0] == REPAIR_MARK {
                p.header.csrc.clear();
                match self.streams.get_mut(&p.header.ssrc) {
                    Some(rtx) => {
                        p.payload = rtx_payload(p.header.sequence_number, &p.payload);
                        p.header.ssrc = rtx.ssrc;
                        p.header.payload_type = rtx.payload_type;
                        p.header.sequence_number = rtx.next_seq;
                        rtx.next_seq = rtx.next_seq.wrapping_add(1);
                    }
                    // A stream without RTX on a connection numbered transport-wide: the copy
                    // would reuse the original's SRTP index with different bytes. Never sent.
                    None if self.shared.twcc.load(Relaxed) => {
                        self.stats.rtx_unsafe_dropped.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                    None => {}
                }
            }
        }
        self.write.push_back(msg);
        Ok(())
    }
}

impl Interceptor for RtxSender {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        if info
            .rtp_header_extensions
            .iter()
            .any(|e| e.uri == TRANSPORT_CC_URI)
        {
            self.shared.twcc.store(true, Relaxed);
        }
        if let (Some(ssrc), Some(payload_type)) = (info.ssrc_rtx, info.payload_type_rtx) {
            self.streams.insert(
                info.ssrc,
                RtxStream {
                    ssrc,
                    payload_type,
                    next_seq: rand::random(),
                },
            );
            self.shared.rtx.store(true, Relaxed);
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.streams.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rtx_payload_starts_with_the_original_sequence_number() {
        let p = rtx_payload(0xBEEF, &[1, 2, 3]);
        assert_eq!(&p[..], &[0xBE, 0xEF, 1, 2, 3]);
    }
}
