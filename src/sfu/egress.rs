//! The send path towards subscribers: what leaves a subscribe connection as RTP.
//!
//! Once a subscribe connection is up, Meridian writes each forwarded copy, repair and probe
//! itself: the header (consumer's SSRC, numbers, payload type, header extensions under the
//! consumer's ids, the transport-wide number) and the payload go into a pooled buffer of the
//! send batch, are encrypted there (`media::srtp`) and leave with the turn's `sendmmsg`. No
//! allocation per copy. rtc keeps ICE, DTLS, SDP, RTCP in both directions and the receive side.
//!
//! What rtc's sender did on that path is done here too:
//! - **Transport-wide numbering and congestion control** ([`SendSide`]): every packet is
//!   numbered, its departure recorded in rtc-interceptor's `History`, and the subscriber's
//!   transport-cc feedback resolved against it into the same [`Estimator`] layer choice reads.
//!   (This runs on rtc's path too, so a connection that falls back keeps its estimate.)
//! - **Sender reports** for every stream sent here, about once a second, from the last packet's
//!   RTP timestamp and send time (as rtc's sender-report interceptor did) with packet and octet
//!   counts: browsers align audio and video with them.
//! - **RTX** (RFC 4588) for repairs and probes, and byte-identical copies where there is no RTX:
//!   the same packet index is never encrypted with different bytes (see `media::srtp`).
//!
//! A connection whose keys cannot be taken (an unexpected profile, rtc's key derivation
//! changed, or `rtc.srtp_in_place = false`) stays on rtc's `write_rtp`, counted in
//! `meridian_srtp_fallback_connections_total`. The key taken is checked against the first
//! SRTCP packet rtc itself protects on the connection; a mismatch moves the connection to rtc's
//! path (nothing encrypted under a wrong key could have reused a nonce of the right one).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use rtc::interceptor::{BandwidthEstimator, History};
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::shared::TransportProtocol;
use rtc::statistics::StatsSelector;

use super::bwe::{Estimator, SendEstimate};
use super::keys::ConnKey;
use super::producer::KeptExtensions;
use super::worker::Worker;
use crate::media::extensions::OutgoingExtensions;
use crate::media::srtp::{MasterKey, Profile, SrtpError, SrtpSender};
use crate::media::vp8::Vp8Edit;

/// How a subscribe connection's RTP leaves.
pub(super) enum SendPath {
    /// DTLS is not up yet: nothing is sent (rtc would drop it anyway).
    Pending,
    /// Written and encrypted here.
    InPlace(Box<InPlace>),
    /// Through rtc's sender (`write_rtp`).
    Rtc,
}

impl InPlace {
    pub(super) fn profile(&self) -> Profile {
        self.srtp.profile()
    }
}

impl SendPath {
    /// Sending in place with a key not yet checked against rtc's SRTCP.
    pub(super) fn awaits_key_check(&self) -> bool {
        matches!(self, SendPath::InPlace(p) if p.unconfirmed.is_some())
    }
}

pub(super) struct InPlace {
    srtp: SrtpSender,
    /// The key and profile, until the first SRTCP packet rtc protects has confirmed them.
    unconfirmed: Option<(MasterKey, Profile)>,
}

/// How often a sender report goes out per stream (rtc's sender-report interval).
pub(super) const SENDER_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Departures older than this that were never acknowledged are forgotten (rtc's horizon).
const HISTORY_HORIZON: Duration = Duration::from_secs(2);

/// Send-side congestion control of one subscribe connection, driven by the worker.
pub(super) struct SendSide {
    next: u16,
    history: History,
    estimator: Estimator,
}

impl SendSide {
    pub(super) fn new(now: Instant) -> (Self, Arc<SendEstimate>) {
        let (estimator, estimate) = Estimator::starting_at(now);
        (
            Self {
                next: 1,
                history: History::new(),
                estimator,
            },
            estimate,
        )
    }

    /// Numbers one packet about to leave and records its departure (`size`: RTP bytes).
    pub(super) fn number(&mut self, now: Instant, ssrc: u32, seq: u16, size: usize) -> u16 {
        let n = self.next;
        self.next = self.next.wrapping_add(1);
        self.history.add_outgoing(ssrc, seq, true, n, size, now);
        n
    }

    /// The subscriber's transport-cc feedback.
    pub(super) fn on_feedback(&mut self, now: Instant, feedback: &TransportLayerCc) {
        for ack in rtc::interceptor::convert_twcc(feedback) {
            self.history.on_twcc_feedback(now, ack);
        }
        let reports = self.history.take_reports();
        self.estimator.on_reports(now, &reports);
    }

    pub(super) fn on_tick(&mut self, now: Instant) {
        self.history
            .prune_before(now.checked_sub(HISTORY_HORIZON).unwrap_or(now));
        self.estimator.handle_timeout(now);
    }
}

/// What a consumer has sent, for its sender reports (what rtc's sender would have counted).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Sent {
    pub(super) packets: u32,
    pub(super) octets: u32,
    /// The newest sequence number sent (in order).
    newest: Option<u16>,
    /// RTP timestamp of the newest frame and when its first packet left: the pair a sender
    /// report extrapolates from (as rtc's sender-report interceptor keeps it).
    pub(super) last: Option<(u32, Instant)>,
}

impl Sent {
    pub(super) fn on_packet(&mut self, now: Instant, seq: u16, timestamp: u32, payload: usize) {
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(payload as u32);
        // A late packet (a publisher's retransmission forwarded) must not move the mapping
        // back; later packets of the same frame must not move it on.
        let in_order = self
            .newest
            .is_none_or(|n| (1..0x8000).contains(&seq.wrapping_sub(n)));
        if in_order {
            self.newest = Some(seq);
            if self.last.is_none_or(|(ts, _)| ts != timestamp) {
                self.last = Some((timestamp, now));
            }
        }
    }

    /// RTP time now, extrapolated from the newest packet at `clock_rate`.
    fn rtp_time(&self, now: Instant, clock_rate: u32) -> Option<u32> {
        let (ts, at) = self.last?;
        let elapsed = now.saturating_duration_since(at).as_secs_f64();
        Some(ts.wrapping_add((elapsed * f64::from(clock_rate)) as u32))
    }
}

/// An RTX stream: its SSRC, payload type and next sequence number.
#[derive(Debug, Clone, Copy)]
pub(super) struct RtxStream {
    pub(super) ssrc: u32,
    pub(super) payload_type: u8,
    pub(super) next_seq: u16,
}

/// One RTP packet as it is to be written for a consumer.
pub(super) struct OutgoingCopy<'a> {
    pub(super) marker: bool,
    pub(super) payload_type: u8,
    pub(super) seq: u16,
    pub(super) timestamp: u32,
    pub(super) ssrc: u32,
    pub(super) kept: &'a KeptExtensions,
    pub(super) ids: OutgoingExtensions,
    /// Transport-wide number and the extension id it goes under.
    pub(super) twcc: Option<(u8, u16)>,
    /// RTX: the original sequence number, written in front of the payload (RFC 4588 §4).
    pub(super) osn: Option<u16>,
    pub(super) payload: &'a [u8],
    /// VP8 picture numbering of this consumer, written over the payload's.
    pub(super) vp8: Option<Vp8Edit>,
}

/// Writes `c` as a plain RTP packet into `buf` (RFC 3550 header, RFC 8285 one-byte extension
/// block). Extensions whose id or length a one-byte header cannot carry are left out.
pub(super) fn write_packet(buf: &mut BytesMut, c: &OutgoingCopy<'_>) {
    let one_byte = |id: u8, len: usize| (1..=14).contains(&id) && (1..=16).contains(&len);
    let mut ext_len = 0;
    for (i, payload) in c.kept.iter().enumerate() {
        if let (Some(p), Some(id)) = (payload, c.ids.id(i)) {
            if one_byte(id, p.len()) {
                ext_len += 1 + p.len();
            }
        }
    }
    if c.twcc.is_some_and(|(id, _)| one_byte(id, 2)) {
        ext_len += 3;
    }
    let words = ext_len.div_ceil(4);
    buf.put_u8(0x80 | if words > 0 { 0x10 } else { 0 });
    buf.put_u8(c.payload_type | if c.marker { 0x80 } else { 0 });
    buf.put_u16(c.seq);
    buf.put_u32(c.timestamp);
    buf.put_u32(c.ssrc);
    if words > 0 {
        buf.put_u16(0xBEDE);
        buf.put_u16(words as u16);
        let start = buf.len();
        for (i, payload) in c.kept.iter().enumerate() {
            if let (Some(p), Some(id)) = (payload, c.ids.id(i)) {
                if one_byte(id, p.len()) {
                    buf.put_u8(id << 4 | (p.len() - 1) as u8);
                    buf.put_slice(p);
                }
            }
        }
        if let Some((id, n)) = c.twcc.filter(|&(id, _)| one_byte(id, 2)) {
            buf.put_u8(id << 4 | 1);
            buf.put_u16(n);
        }
        buf.put_bytes(0, start + words * 4 - buf.len());
    }
    if let Some(osn) = c.osn {
        buf.put_u16(osn);
    }
    let at = buf.len();
    buf.put_slice(c.payload);
    if let Some(edit) = &c.vp8 {
        edit.apply(&mut buf[at..]);
    }
}

/// The SRTP profile a connection negotiated, from rtc's transport statistics.
fn profile_of(
    pc: &mut rtc::peer_connection::RTCPeerConnection,
    now: Instant,
) -> Result<Profile, SrtpError> {
    let stats = pc.get_stats(now, StatsSelector::None);
    let name = stats
        .transport()
        .map(|t| t.srtp_cipher.clone())
        .unwrap_or_default();
    Profile::from_stats_name(&name).ok_or(SrtpError::UnsupportedProfile(name))
}

/// Whether a datagram rtc sends is SRTCP (RFC 5761 demultiplexing: RTCP packet types 192-223).
pub(super) fn is_rtcp(d: &[u8]) -> bool {
    d.len() >= 8 && d[0] >> 6 == 2 && (192..=223).contains(&d[1])
}

impl Worker {
    /// A subscribe connection came up: from now on its copies are encrypted here if its keys
    /// can be taken, else they go through rtc's sender.
    pub(super) fn start_send_path(&mut self, now: Instant, ck: ConnKey) {
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        if !matches!(conn.send_path, SendPath::Pending) {
            return;
        }
        let taken = match &conn.capture {
            None => Err(None),
            Some(capture) => profile_of(&mut conn.pc, now)
                .and_then(|profile| {
                    let key = capture.outbound()?;
                    let srtp = SrtpSender::new(profile, &key, capture.inner())?;
                    Ok(InPlace {
                        srtp,
                        unconfirmed: Some((key, profile)),
                    })
                })
                .map_err(Some),
        };
        match taken {
            Ok(in_place) => {
                tracing::debug!(profile = ?in_place.profile(), "copies encrypted in place");
                conn.send_path = SendPath::InPlace(Box::new(in_place));
                self.stats.srtp_in_place_connections.fetch_add(1, Relaxed);
                // An empty receiver report through rtc: its SRTCP confirms the key taken.
                let sender = conn
                    .track_consumer
                    .values()
                    .find_map(|&cid| self.consumers.get(cid).map(|c| c.sender));
                if let Some(mut s) = sender.and_then(|s| conn.pc.rtp_sender(s)) {
                    let rr = ReceiverReport {
                        ssrc: 1,
                        ..Default::default()
                    };
                    let _ = crate::alloc::in_rtc(|| s.write_rtcp(now, vec![Box::new(rr)]));
                }
                self.mark_dirty(ck);
            }
            Err(why) => {
                conn.send_path = SendPath::Rtc;
                self.stats.srtp_fallback_connections.fetch_add(1, Relaxed);
                if let Some(why) = why {
                    tracing::warn!(error = %why, "copies to this subscriber go through rtc's sender");
                }
            }
        }
    }

    /// Checks the key taken for a connection against an SRTCP packet rtc protected with the
    /// real one; on a mismatch the connection moves to rtc's sender.
    pub(super) fn confirm_key(&mut self, ck: ConnKey, datagram: &[u8]) {
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        let SendPath::InPlace(in_place) = &mut conn.send_path else {
            return;
        };
        if in_place.unconfirmed.is_none() || !is_rtcp(datagram) {
            return;
        }
        let Some((key, profile)) = in_place.unconfirmed.take() else {
            return;
        };
        let Some(capture) = &conn.capture else {
            return;
        };
        let rtc_profile = match profile {
            Profile::AeadAes128Gcm => {
                rtc::srtp::protection_profile::ProtectionProfile::AeadAes128Gcm
            }
            Profile::Aes128CmHmacSha1_80 => {
                rtc::srtp::protection_profile::ProtectionProfile::Aes128CmHmacSha1_80
            }
        };
        let ok = rtc::srtp::context::Context::new(
            &key.key,
            &key.salt_block[..profile.salt_len()],
            rtc_profile,
            None,
            None,
            capture.inner(),
        )
        .and_then(|mut ctx| ctx.decrypt_rtcp(datagram))
        .is_ok();
        if !ok {
            conn.send_path = SendPath::Rtc;
            self.stats.srtp_key_mismatch.fetch_add(1, Relaxed);
            self.stats.srtp_fallback_connections.fetch_add(1, Relaxed);
            tracing::error!(
                "the SRTP key taken from rtc does not decrypt rtc's own SRTCP: this rtc version \
                 derives keys differently; copies go through rtc's sender from now on"
            );
        }
    }

    /// Sender reports for the streams a connection sends in place, when due.
    pub(super) fn send_sender_reports(&mut self, now: Instant, ck: ConnKey) {
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        if !matches!(conn.send_path, SendPath::InPlace(_))
            || conn.next_report.is_some_and(|t| t > now)
        {
            return;
        }
        conn.next_report = Some(now + SENDER_REPORT_INTERVAL);
        let ntp = self.wall_clock.ntp(now);
        for &cid in conn.track_consumer.values() {
            let Some(c) = self.consumers.get(cid) else {
                continue;
            };
            let Some(rtp_time) = c.sent.rtp_time(now, c.clock_rate) else {
                continue;
            };
            let sr = SenderReport {
                ssrc: c.ssrc,
                ntp_time: ntp,
                rtp_time,
                packet_count: c.sent.packets,
                octet_count: c.sent.octets,
                ..Default::default()
            };
            if let Some(mut s) = conn.pc.rtp_sender(c.sender) {
                if crate::alloc::in_rtc(|| s.write_rtcp(now, vec![Box::new(sr)])).is_ok() {
                    self.stats.sender_reports.fetch_add(1, Relaxed);
                }
            }
        }
        self.mark_dirty(ck);
    }

    /// The subscriber's transport-cc feedback on connection `ck`.
    pub(super) fn on_transport_feedback(
        &mut self,
        now: Instant,
        ck: ConnKey,
        fb: &TransportLayerCc,
    ) {
        if let Some(side) = self.conns.get_mut(ck).and_then(|c| c.send_side.as_mut()) {
            side.on_feedback(now, fb);
        }
    }

    /// The periodic turn of every subscribe connection's send path: sender reports when due,
    /// the estimator's timers and the departure history's pruning.
    pub(super) fn tick_send_paths(&mut self, now: Instant) {
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.send_side.is_some() || matches!(c.send_path, SendPath::InPlace(_)))
            .map(|(k, _)| k)
            .collect();
        for ck in keys {
            if let Some(side) = self.conns.get_mut(ck).and_then(|c| c.send_side.as_mut()) {
                side.on_tick(now);
            }
            self.send_sender_reports(now, ck);
        }
    }
}

/// Numbers a copy about to go through rtc's sender (a connection on rtc's path), so its
/// estimate keeps working: the extension is set on the packet, the departure recorded.
pub(super) fn number_for_rtc(
    now: Instant,
    conn: &mut super::transport::Conn,
    twcc_id: Option<u8>,
    pkt: &mut rtc::rtp::Packet,
) {
    let (Some(side), Some(id)) = (conn.send_side.as_mut(), twcc_id) else {
        return;
    };
    let size = 12 + pkt.payload.len();
    let n = side.number(now, pkt.header.ssrc, pkt.header.sequence_number, size);
    let _ = pkt
        .header
        .set_extension(id, bytes::Bytes::copy_from_slice(&n.to_be_bytes()));
}

/// Writes one copy for consumer `c` on a connection sending in place: numbered (unless
/// `copy.twcc` already carries the number of the original it repeats), encrypted, queued for
/// the turn's send. Returns the RTP size, or `None` when it cannot be sent (the connection
/// has no destination yet, or is not sending in place).
#[allow(clippy::too_many_arguments)]
pub(super) fn send_in_place(
    now: Instant,
    c: &mut super::consumer::Consumer,
    conn: &mut super::transport::Conn,
    batch: &mut super::batch::SendBatch,
    tcp_frames: &mut Vec<(SocketAddr, bytes::Bytes)>,
    tcp_open: &std::collections::HashSet<SocketAddr>,
    stats: &super::WorkerStats,
    mut copy: OutgoingCopy<'_>,
) -> Option<usize> {
    let (dest, protocol) = conn.dest?;
    let SendPath::InPlace(in_place) = &mut conn.send_path else {
        return None;
    };
    if copy.twcc.is_none() {
        if let (Some(side), Some(id)) = (&mut conn.send_side, c.twcc_id) {
            let size = 12 + copy.payload.len();
            copy.twcc = Some((id, side.number(now, copy.ssrc, copy.seq, size)));
        }
    }
    let mut buf = batch.buffer();
    write_packet(&mut buf, &copy);
    let size = buf.len();
    if in_place.srtp.protect(&mut buf).is_err() {
        return None;
    }
    if copy.osn.is_none() {
        c.remember_twcc(copy.seq, copy.twcc.map(|(_, n)| n));
    }
    match protocol {
        TransportProtocol::UDP => batch.push(dest, conn.src_ip, buf),
        _ => {
            if !tcp_open.contains(&dest) {
                stats.send_errors.fetch_add(1, Relaxed);
                return None;
            }
            // ICE-TCP frames leave through the connection's writer task: a copy of the bytes.
            tcp_frames.push((dest, buf.freeze()));
        }
    }
    Some(size)
}
