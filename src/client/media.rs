//! A WebRTC peer shaped like a verification call's participant, for the session benchmark: it
//! publishes Opus-shaped audio and VP8-shaped video (one encoding, or simulcast by RID) on one
//! peer connection, or receives audio and video on another, and keeps the figures the
//! benchmark reports (packets, loss by sequence gaps, one-way latency from a send timestamp
//! in every payload).
//!
//! Packets are not real codec output: they carry the codec's key/delta marker where the node
//! looks for one, a frame number and a send timestamp, and filler to the configured size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::interceptor::{Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8,
};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;

use super::peer::{epoch, ClientError};

const MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
const VIDEO_PT: u8 = 96;
const AUDIO_PT: u8 = 111;
/// How often the sender wakes to send what is due.
const PACE: Duration = Duration::from_millis(5);

/// One encoding a publisher sends: packets per second and payload bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    pub packets_per_s: f64,
    pub payload_bytes: usize,
}

/// What a participant peer sends or receives.
#[derive(Debug, Clone, Default)]
pub struct PeerMedia {
    pub audio: Option<Encoding>,
    /// Video encodings, lowest first; more than one is simulcast (RIDs `q`, `h`, `f`).
    pub video: Vec<Encoding>,
    /// List simulcast RIDs highest first in the offer, as Janus expects (janus.js does so);
    /// Meridian's SDK and browsers' usual order is lowest first.
    pub high_first: bool,
}

/// Figures a peer task shares with the benchmark.
#[derive(Default)]
pub struct MediaStats {
    pub connected: AtomicBool,
    pub stop: AtomicBool,
    pub packets_sent: AtomicU64,
    pub packets_received: AtomicU64,
    /// Packets missing from the received sequence of each stream (gaps never filled).
    pub packets_lost: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// One-way latencies in µs since the last [`MediaStats::take_latencies`].
    latencies: Mutex<Vec<u32>>,
}

impl MediaStats {
    /// The latencies recorded since the last call.
    pub fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.latencies.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Received sequence numbers of one stream, for loss.
struct SeqTrack {
    highest: u64,
    received: u64,
    first: u64,
}

impl SeqTrack {
    fn new(seq: u16) -> Self {
        Self {
            highest: u64::from(seq) + (1 << 16),
            received: 1,
            first: u64::from(seq) + (1 << 16),
        }
    }

    /// Counts one packet; returns how many more now count as lost.
    fn add(&mut self, seq: u16) -> u64 {
        let before = self.lost();
        let cycle = self.highest & !0xffff;
        let mut ext = cycle | u64::from(seq);
        // The nearest of the three candidates around the highest seen.
        if ext + (1 << 15) < self.highest {
            ext += 1 << 16;
        } else if ext > self.highest + (1 << 15) {
            ext -= 1 << 16;
        }
        self.received += 1;
        self.highest = self.highest.max(ext);
        self.lost().saturating_sub(before)
    }

    fn lost(&self) -> u64 {
        (self.highest - self.first + 1).saturating_sub(self.received)
    }
}

/// One stream the peer sends (an audio track or one video layer).
pub struct Outgoing {
    ssrc: u32,
    /// The video layer (0 lowest), written into every payload at byte 26.
    layer: u8,
    mid: Option<String>,
    mid_id: Option<u8>,
    rid_id: Option<u8>,
    pt: u8,
    rid: Option<&'static str>,
    enc: Encoding,
    video: bool,
    sender: RTCRtpSenderId,
    seq: u16,
    frame: u32,
    /// Packets owed (fractional), paced.
    credit: f64,
    keyframe: bool,
    /// Picture size a keyframe announces.
    size: (u16, u16),
}

/// A participant's publish or subscribe peer connection on its own UDP socket.
pub struct MediaPeer {
    pc: RTCPeerConnection,
    /// `None` for a peer driven without a socket ([`MediaPeer::unbound`]).
    socket: Option<tokio::net::UdpSocket>,
    local: SocketAddr,
    media: PeerMedia,
    /// The low bits of this peer's SSRCs (the top nibble tells the stream).
    base: u32,
    mid_id: Option<u8>,
    rid_id: Option<u8>,
}

fn media_engine() -> Result<MediaEngine, ClientError> {
    let mut m = MediaEngine::default();
    for uri in [MID, RID] {
        m.register_header_extension(
            RTCRtpHeaderExtensionCapability { uri: uri.into() },
            RtpCodecKind::Video,
            None,
        )?;
    }
    m.register_header_extension(
        RTCRtpHeaderExtensionCapability { uri: MID.into() },
        RtpCodecKind::Audio,
        None,
    )?;
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: vp8(),
            payload_type: VIDEO_PT,
        },
        RtpCodecKind::Video,
    )?;
    // Repairs and bandwidth probes arrive on RTX, as a browser negotiates it.
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_RTX.into(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: format!("apt={VIDEO_PT}"),
                rtcp_feedback: vec![],
            },
            payload_type: VIDEO_PT + 1,
        },
        RtpCodecKind::Video,
    )?;
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: opus(),
            payload_type: AUDIO_PT,
        },
        RtpCodecKind::Audio,
    )?;
    Ok(m)
}

fn vp8() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.into(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.into(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

const RIDS: [&str; 3] = ["q", "h", "f"];

fn audio_ssrc(base: u32) -> u32 {
    base | 0x1000_0000
}

/// Video layer `i`'s SSRC (lowest layer 0).
fn video_ssrc(base: u32, layer: usize) -> u32 {
    base | ((0x2 + layer as u32) << 28)
}
/// Picture sizes of the layers, lowest first; a single encoding is the largest.
const SIZES: [(u16, u16); 3] = [(320, 180), (640, 360), (1280, 720)];

impl MediaPeer {
    /// A peer bound on `ip` that sends `media` (nothing for a peer that only receives: it
    /// gets receivers from [`MediaPeer::add_receiver`] or from a remote offer, as Janus's).
    pub async fn new(ip: std::net::IpAddr, media: PeerMedia) -> Result<MediaPeer, ClientError> {
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        let mut peer = Self::unbound(local, media)?;
        peer.socket = Some(socket);
        Ok(peer)
    }

    /// A peer whose datagrams the caller carries (sans-I/O, for tests on a virtual clock):
    /// `local` is the address it announces and is addressed at.
    pub fn unbound(local: SocketAddr, media: PeerMedia) -> Result<MediaPeer, ClientError> {
        Self::unbound_offering(local, media, Vec::new())
    }

    /// [`MediaPeer::unbound`] offering only the SRTP `profiles` given (empty: rtc's defaults),
    /// so a test can choose the profile the node ends up encrypting with.
    pub fn unbound_offering(
        local: SocketAddr,
        media: PeerMedia,
        profiles: Vec<rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile>,
    ) -> Result<MediaPeer, ClientError> {
        let socket = None;
        let media_base: u32 = rand::random::<u32>() & 0x0fff_ffff;
        let mut engine = media_engine()?;
        // Keyframe requests reach the application only through this interceptor; sender
        // reports through the other (the tests read what the SFU reports).
        let registry = Registry::new()
            .with(
                Slot::from(14_000),
                crate::sfu::engine::DeliverFeedback::default(),
            )
            .with(
                Slot::from(14_001),
                crate::sfu::engine::DeliverSenderReports::default(),
            );
        let registry = register_default_interceptors(registry, &mut engine)?;
        let mut builder = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(engine)
            .with_interceptor_registry(registry);
        if !profiles.is_empty() {
            builder = builder.with_setting_engine(
                rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder::new()
                    .with_srtp_protection_profiles(profiles)
                    .build(),
            );
        }
        let mut pc = builder.build(Instant::now())?;
        let base = media_base;
        if let Some(_audio) = media.audio {
            let track = MediaStreamTrack::new(
                "mic".into(),
                "mic-audio".into(),
                "microphone".into(),
                RtpCodecKind::Audio,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(audio_ssrc(base)),
                        ..Default::default()
                    },
                    codec: opus(),
                    ..Default::default()
                }],
            );
            add_sender(&mut pc, track)?;
        }
        if !media.video.is_empty() {
            let simulcast = media.video.len() > 1;
            let mut order: Vec<usize> = (0..media.video.len()).collect();
            if media.high_first {
                order.reverse();
            }
            let encodings = order
                .into_iter()
                .map(|i| RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        rid: if simulcast {
                            RIDS[i].to_owned()
                        } else {
                            String::new()
                        },
                        ssrc: Some(video_ssrc(base, i)),
                        ..Default::default()
                    },
                    codec: vp8(),
                    ..Default::default()
                })
                .collect();
            let track = MediaStreamTrack::new(
                "cam".into(),
                "cam-video".into(),
                "camera".into(),
                RtpCodecKind::Video,
                encodings,
            );
            add_sender(&mut pc, track)?;
        }
        pc.add_local_candidate(RTCIceCandidateInit {
            candidate: format!(
                "candidate:1 1 udp 2130706431 {} {} typ host",
                local.ip(),
                local.port()
            ),
            ..Default::default()
        })?;
        Ok(MediaPeer {
            pc,
            socket,
            local,
            media,
            base: media_base,
            mid_id: None,
            rid_id: None,
        })
    }

    /// Adds a recvonly transceiver, for one more consumer on the next offer (as the SDK adds
    /// one per subscription).
    pub fn add_receiver(&mut self, video: bool) -> Result<(), ClientError> {
        let kind = if video {
            RtpCodecKind::Video
        } else {
            RtpCodecKind::Audio
        };
        self.pc.add_transceiver_from_kind(
            kind,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                ..Default::default()
            }),
        )?;
        Ok(())
    }

    /// Creates and applies a local offer; returns its SDP.
    pub fn offer(&mut self) -> Result<String, ClientError> {
        let sdp = super::make_offer(&mut self.pc)?;
        self.mid_id = extmap_id(&sdp, MID);
        self.rid_id = extmap_id(&sdp, RID);
        Ok(sdp)
    }

    /// Applies the far end's answer.
    pub fn answer(&mut self, sdp: &str) -> Result<(), ClientError> {
        super::apply_answer(&mut self.pc, sdp)
    }

    /// Applies the far end's offer and returns the answer (a subscriber of Janus).
    pub fn answer_offer(&mut self, sdp: &str) -> Result<String, ClientError> {
        super::answer_offer(&mut self.pc, sdp)
    }

    /// The peer connection, for a caller that drives it ([`MediaPeer::unbound`]).
    pub fn pc(&mut self) -> &mut RTCPeerConnection {
        &mut self.pc
    }

    /// The streams this peer sends, audio first, then video layers lowest first; valid once
    /// the offer is made.
    pub fn outgoing(&mut self) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let senders: Vec<RTCRtpSenderId> = self.pc.get_senders().collect();
        let mut senders = senders.into_iter();
        if let Some(enc) = self.media.audio {
            if let Some(sender) = senders.next() {
                {
                    out.push(Outgoing {
                        ssrc: audio_ssrc(self.base),
                        layer: 0,
                        mid: None,
                        mid_id: None,
                        rid_id: None,
                        pt: AUDIO_PT,
                        rid: None,
                        enc,
                        video: false,
                        sender,
                        seq: 1,
                        frame: 0,
                        credit: 0.0,
                        keyframe: false,
                        size: (0, 0),
                    });
                }
            }
        }
        if !self.media.video.is_empty() {
            if let Some(sender) = senders.next() {
                let simulcast = self.media.video.len() > 1;
                let mid = sender_mid(&self.pc, sender);
                for (i, &enc) in self.media.video.iter().enumerate() {
                    out.push(Outgoing {
                        ssrc: video_ssrc(self.base, i),
                        layer: i as u8,
                        mid: mid.clone(),
                        mid_id: self.mid_id,
                        rid_id: self.rid_id,
                        pt: VIDEO_PT,
                        rid: simulcast.then_some(RIDS[i]),
                        enc,
                        video: true,
                        sender,
                        seq: 1,
                        frame: 0,
                        credit: 0.0,
                        keyframe: true,
                        size: SIZES[SIZES.len() - self.media.video.len() + i],
                    });
                }
            }
        }
        out
    }

    /// Runs until `stats.stop`: answers the network, sends what `media` says (a keyframe
    /// first and after every PLI or FIR for the stream), records what arrives.
    pub fn spawn(mut self, stats: Arc<MediaStats>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let Some(socket) = self.socket.take() else {
                return;
            };
            let mut outgoing = self.outgoing();
            let mut streams: HashMap<u32, SeqTrack> = HashMap::new();
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = Instant::now();
            while !stats.stop.load(Ordering::Relaxed) {
                super::flush_and_track(&mut self.pc, &socket, &stats.connected).await;
                while let Some(msg) = self.pc.poll_read() {
                    match msg.message {
                        RTCMessage::RtpPacket(_, p) => {
                            stats.packets_received.fetch_add(1, Ordering::Relaxed);
                            let lost = match streams.get_mut(&p.header.ssrc) {
                                Some(t) => t.add(p.header.sequence_number),
                                None => {
                                    streams.insert(
                                        p.header.ssrc,
                                        SeqTrack::new(p.header.sequence_number),
                                    );
                                    0
                                }
                            };
                            if lost > 0 {
                                stats.packets_lost.fetch_add(lost, Ordering::Relaxed);
                            }
                            if let Some(b) = p.payload.get(14..22) {
                                let sent = u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
                                let now = epoch().elapsed().as_micros() as u64;
                                let us = now.saturating_sub(sent).min(u64::from(u32::MAX));
                                let mut l =
                                    stats.latencies.lock().unwrap_or_else(|e| e.into_inner());
                                if l.len() < 1 << 20 {
                                    l.push(us as u32);
                                }
                            }
                        }
                        RTCMessage::RtcpPacket(_, pkts) => {
                            for p in pkts {
                                let media_ssrc = if let Some(pli) =
                                    p.as_any().downcast_ref::<PictureLossIndication>()
                                {
                                    Some(pli.media_ssrc)
                                } else {
                                    p.as_any()
                                        .downcast_ref::<FullIntraRequest>()
                                        .map(|fir| fir.media_ssrc)
                                };
                                if let Some(ssrc) = media_ssrc {
                                    stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                                    // A request naming none of our streams (a FIR names the
                                    // sender in its entries) goes to every video stream.
                                    let known = outgoing.iter().any(|o| o.ssrc == ssrc);
                                    for o in outgoing.iter_mut().filter(|o| o.video) {
                                        if o.ssrc == ssrc || !known {
                                            o.keyframe = true;
                                        }
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let deadline = super::next_wakeup(&mut self.pc);
                tokio::select! {
                    r = socket.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { break };
                        super::feed_udp(&mut self.pc, self.local, from, &buf[..n]);
                    }
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        let _ = self.pc.handle_timeout(Instant::now());
                    }
                    _ = pace.tick(), if !outgoing.is_empty() && stats.connected.load(Ordering::Relaxed) => {
                        let now = Instant::now();
                        let dt = now.duration_since(last).as_secs_f64().min(0.1);
                        last = now;
                        for o in outgoing.iter_mut() {
                            o.credit += o.enc.packets_per_s * dt;
                            while o.credit >= 1.0 {
                                o.credit -= 1.0;
                                if o.send(&mut self.pc, now) {
                                    stats.packets_sent.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
            }
            let _ = self.pc.close();
        })
    }
}

impl Outgoing {
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The next packet is a keyframe (as after a PLI).
    pub fn request_keyframe(&mut self) {
        self.keyframe = true;
    }

    /// Writes the stream's next packet on `pc`; false when rtc refused it.
    pub fn send(&mut self, pc: &mut RTCPeerConnection, now: Instant) -> bool {
        let pkt = self.next_packet();
        pc.rtp_sender(self.sender)
            .is_some_and(|mut s| s.write_rtp(now, pkt).is_ok())
    }

    fn next_packet(&mut self) -> rtc::rtp::Packet {
        let (mid, mid_id, rid_id) = (self.mid.as_deref(), self.mid_id, self.rid_id);
        let mut payload = vec![0u8; self.enc.payload_bytes.max(27)];
        if self.video {
            // VP8 payload descriptor (S=1, PID 0), then the frame header: show_frame and the P
            // bit (0 for a keyframe); a keyframe goes on with the start code and its size, as
            // SFUs that parse further (Janus) expect.
            payload[0] = 0x10;
            if std::mem::take(&mut self.keyframe) {
                payload[1] = 0x10;
                payload[4..7].copy_from_slice(&[0x9d, 0x01, 0x2a]);
                payload[7..9].copy_from_slice(&self.size.0.to_le_bytes());
                payload[9..11].copy_from_slice(&self.size.1.to_le_bytes());
            } else {
                payload[1] = 0x11;
            }
        } else {
            payload[0] = 0xfc; // an Opus TOC byte: CELT FB 20 ms
        }
        payload[14..22].copy_from_slice(&(epoch().elapsed().as_micros() as u64).to_be_bytes());
        payload[22..26].copy_from_slice(&self.frame.to_be_bytes());
        payload[26] = self.layer;
        let step = if self.video { 3000 } else { 960 };
        let mut pkt = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker: true,
                payload_type: self.pt,
                sequence_number: self.seq,
                timestamp: self.frame.wrapping_mul(step),
                ssrc: self.ssrc,
                ..Default::default()
            },
            payload: payload.into(),
        };
        // A simulcast layer names its m-line and RID (the node has no SSRCs for them in the
        // SDP); other streams are known by SSRC.
        if let (Some(id), Some(mid), Some(_)) = (mid_id, mid, self.rid) {
            let _ = pkt
                .header
                .set_extension(id, bytes::Bytes::copy_from_slice(mid.as_bytes()));
        }
        if let (Some(id), Some(rid)) = (rid_id, self.rid) {
            let _ = pkt
                .header
                .set_extension(id, bytes::Bytes::from_static(rid.as_bytes()));
        }
        self.seq = self.seq.wrapping_add(1);
        self.frame = self.frame.wrapping_add(1);
        pkt
    }
}

/// Adds a send-only transceiver for `track`.
pub(super) fn add_sender(
    pc: &mut RTCPeerConnection,
    track: MediaStreamTrack,
) -> Result<(), ClientError> {
    pc.add_transceiver_from_track(
        track,
        Some(RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Sendonly,
            ..Default::default()
        }),
    )?;
    Ok(())
}

fn sender_mid(pc: &RTCPeerConnection, sender: RTCRtpSenderId) -> Option<String> {
    let sdp = pc.local_description()?.sdp;
    // Senders are numbered in m-line order; the n-th sending m-line is the n-th sender.
    let index = pc.get_senders().position(|s| s == sender)?;
    sdp.split("\nm=")
        .skip(1)
        .filter(|section| {
            !section
                .lines()
                .any(|l| matches!(l.trim_end(), "a=recvonly" | "a=inactive"))
        })
        .nth(index)?
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
        .map(str::to_owned)
}

/// The id an SDP's `a=extmap` gives header extension `uri`.
pub(crate) fn extmap_id(sdp: &str, uri: &str) -> Option<u8> {
    sdp.lines().find_map(|l| {
        let rest = l.trim_end().strip_prefix("a=extmap:")?;
        let (id, u) = rest.split_once(' ')?;
        let id = id.split('/').next()?;
        (u.trim() == uri).then(|| id.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_count_as_loss_across_the_sequence_wrap() {
        let mut t = SeqTrack::new(65530);
        let mut lost = 0;
        for s in [65531u16, 65533, 65535, 0, 1, 4] {
            lost += t.add(s);
        }
        // Missing: 65532, 65534, 2, 3.
        assert_eq!(lost, 4);
        assert_eq!(t.lost(), 4);
        // A late packet fills a gap (counted as received; the running figure drops).
        t.add(2);
        assert_eq!(t.lost(), 3);
    }
}
