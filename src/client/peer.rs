//! An in-process WebRTC peer on webrtc-rs's sans-I/O core over real UDP: publishes one video
//! track (VP8 or H.264 shaped packets carrying a frame number and a send timestamp) or
//! receives one, recording what arrives. The load generator and the tests drive nodes with it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rtc::interceptor::{Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_H264, MIME_TYPE_VP8,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Why a client peer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("webrtc: {0}")]
    Rtc(#[from] Error),
    #[error("sdp: {0}")]
    Sdp(String),
}

/// The instant send timestamps in payloads count from (one per process).
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Locks a record; a panic elsewhere while holding it leaves the data usable for reading.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One received RTP packet, as the subscriber saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub payload_type: u8,
    pub frame: u32,
    pub keyframe: bool,
    /// Video orientation (CVO) byte, if the packet carried one under this peer's id.
    pub orientation: Option<u8>,
    pub at: Instant,
    /// Time from the publisher's send to this receive, when both ran in this process.
    pub latency: std::time::Duration,
}

/// Rotation the test publisher signals in every packet: 90 degrees.
pub const TEST_ORIENTATION: u8 = 0x01;
const CVO: &str = "urn:3gpp:video-orientation";

/// Counters and records a peer task shares with the test.
#[derive(Default)]
pub struct PeerState {
    pub connected: AtomicBool,
    pub plis_received: AtomicU64,
    pub packets_sent: AtomicU64,
    pub received: Mutex<Vec<Received>>,
    /// Remote addresses this peer received datagrams from.
    pub remote_addrs: Mutex<Vec<SocketAddr>>,
    pub stop: AtomicBool,
    /// When non-zero, every n-th incoming RTP datagram is dropped before the peer sees it
    /// (loss on the last hop, which the node must repair).
    pub drop_every_nth_rtp: AtomicU64,
    pub rtp_datagrams_dropped: AtomicU64,
    /// Encrypted bytes of the RTP datagrams dropped above, by sequence number, until the same
    /// sequence number arrives again.
    pub dropped_rtp: Mutex<std::collections::HashMap<u16, Vec<u8>>>,
    /// For each dropped datagram that arrived again (a retransmission): (original, resent),
    /// both as they came off the wire.
    pub resent_rtp: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Keyframe requests the subscriber should send now, one after another.
    pub send_plis: AtomicU64,
    /// Publisher: time between packets in µs (0: 20 ms), and payload size (0: 1000 bytes).
    pub packet_interval_us: AtomicU64,
    pub payload_bytes: AtomicU64,
}

impl PeerState {
    /// Sequence numbers of everything received so far, in arrival order.
    pub fn sequence_numbers(&self) -> Vec<u16> {
        lock(&self.received).iter().map(|r| r.seq).collect()
    }
}

/// The video codec a test peer sends or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestCodec {
    Vp8,
    H264,
}

impl TestCodec {
    /// A one-packet frame: codec header marking key or delta frame, the frame number at
    /// bytes 10..14, filler to 1000 bytes.
    fn payload(self, key: bool, frame: u32, size: usize) -> Vec<u8> {
        let mut p = vec![0u8; size.max(22)];
        match self {
            TestCodec::Vp8 => {
                p[0] = 0x10; // descriptor: S=1, PID=0
                p[1] = if key { 0x00 } else { 0x01 }; // P bit
            }
            TestCodec::H264 => p[0] = if key { 0x65 } else { 0x41 }, // IDR or non-IDR slice
        }
        p[10..14].copy_from_slice(&frame.to_be_bytes());
        p[14..22].copy_from_slice(&(epoch().elapsed().as_micros() as u64).to_be_bytes());
        p
    }

    fn is_key(self, p: &[u8]) -> bool {
        match self {
            TestCodec::Vp8 => p.get(1).is_some_and(|b| b & 1 == 0),
            TestCodec::H264 => p.first().is_some_and(|b| b & 0x1f == 5),
        }
    }
}

fn engine(codec: TestCodec, publish: bool) -> Result<(MediaEngine, RTCRtpCodec), Error> {
    let mut m = MediaEngine::default();
    // Publisher and subscriber number their extensions differently, so forwarding must map
    // ids rather than copy them.
    let extensions: &[&str] = if publish {
        &[CVO]
    } else {
        &["urn:ietf:params:rtp-hdrext:toffset", CVO]
    };
    for uri in extensions {
        m.register_header_extension(
            RTCRtpHeaderExtensionCapability { uri: (*uri).into() },
            RtpCodecKind::Video,
            None,
        )?;
    }
    let codec = match codec {
        TestCodec::Vp8 => RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
        TestCodec::H264 => RTCRtpCodec {
            mime_type: MIME_TYPE_H264.into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
                .into(),
            rtcp_feedback: vec![],
        },
    };
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: codec.clone(),
            payload_type: 100,
        },
        RtpCodecKind::Video,
    )?;
    Ok((m, codec))
}

/// A test WebRTC peer: one UDP socket, one sans-I/O peer connection.
pub struct RtcPeer {
    pub pc: RTCPeerConnection,
    pub socket: tokio::net::UdpSocket,
    pub local: SocketAddr,
    pub publish_ssrc: Option<u32>,
    pub codec: TestCodec,
    /// This peer's id for the video-orientation extension, from its own offer.
    pub cvo_id: Option<u8>,
}

impl RtcPeer {
    async fn new(publish: bool, codec: TestCodec) -> Result<RtcPeer, ClientError> {
        Self::build(publish, codec, true, LOOPBACK, None).await
    }

    /// `consent`: how often the peer sends ICE consent checks once connected (rtc's default
    /// when `None`).
    async fn build(
        publish: bool,
        codec: TestCodec,
        with_transceiver: bool,
        ip: std::net::IpAddr,
        consent: Option<Duration>,
    ) -> Result<RtcPeer, ClientError> {
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        let test_codec = codec;
        let (mut media, codec) = engine(codec, publish)?;
        let registry = Registry::new().with(
            Slot::from(14_000),
            crate::sfu::engine::DeliverFeedback::default(),
        );
        let registry = register_default_interceptors(registry, &mut media)?;
        let mut settings = SettingEngineBuilder::new();
        if let Some(every) = consent {
            // Checks this far apart, and patience to match on this side.
            settings = settings.with_ice_timeouts(
                Some(Duration::from_secs(60)),
                Some(Duration::from_secs(60)),
                Some(every),
            );
        }
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings.build())
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .build(Instant::now())?;
        let mut publish_ssrc = None;
        if publish {
            let ssrc = 0x1234_5678;
            publish_ssrc = Some(ssrc);
            let track = MediaStreamTrack::new(
                "cam".into(),
                "cam-video".into(),
                "camera".into(),
                RtpCodecKind::Video,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec,
                    ..Default::default()
                }],
            );
            super::media::add_sender(&mut pc, track)?;
        } else if with_transceiver {
            pc.add_transceiver_from_kind(
                RtpCodecKind::Video,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    ..Default::default()
                }),
            )?;
        }
        pc.add_local_candidate(RTCIceCandidateInit {
            candidate: format!(
                "candidate:1 1 udp 2130706431 {} {} typ host",
                local.ip(),
                local.port()
            ),
            ..Default::default()
        })?;
        Ok(RtcPeer {
            pc,
            socket,
            local,
            publish_ssrc,
            codec: test_codec,
            cvo_id: None,
        })
    }

    pub async fn publisher() -> Result<RtcPeer, ClientError> {
        Self::new(true, TestCodec::Vp8).await
    }

    pub async fn subscriber() -> Result<RtcPeer, ClientError> {
        Self::new(false, TestCodec::Vp8).await
    }

    /// A receiving peer that answers the other side's offer (as Janus's VideoRoom offers to
    /// its subscribers) instead of offering.
    pub async fn answerer(codec: TestCodec) -> Result<RtcPeer, ClientError> {
        Self::build(false, codec, false, LOOPBACK, None).await
    }

    /// Like [`RtcPeer::answerer`] / [`RtcPeer::publisher_with`], with the socket on `ip`.
    pub async fn on(
        ip: std::net::IpAddr,
        publish: bool,
        codec: TestCodec,
    ) -> Result<RtcPeer, ClientError> {
        Self::build(publish, codec, publish, ip, None).await
    }

    /// Applies a remote offer and returns the local answer's SDP.
    pub fn answer_offer(&mut self, sdp: &str) -> Result<String, ClientError> {
        super::answer_offer(&mut self.pc, sdp)
    }

    pub async fn publisher_with(codec: TestCodec) -> Result<RtcPeer, ClientError> {
        Self::new(true, codec).await
    }

    pub async fn subscriber_with(codec: TestCodec) -> Result<RtcPeer, ClientError> {
        Self::new(false, codec).await
    }

    /// A subscriber that sends ICE consent checks only every `every` (RFC 7675 allows
    /// pacing them; aiortc checks every 4-6 s, Firefox every few seconds).
    pub async fn paced_subscriber(
        codec: TestCodec,
        every: Duration,
    ) -> Result<RtcPeer, ClientError> {
        Self::build(false, codec, true, LOOPBACK, Some(every)).await
    }

    /// Creates and applies the local offer; returns its SDP.
    pub fn offer(&mut self) -> Result<String, ClientError> {
        let sdp = super::make_offer(&mut self.pc)?;
        self.cvo_id = super::media::extmap_id(&sdp, CVO);
        Ok(sdp)
    }

    /// Applies the node's answer.
    pub fn answer(&mut self, sdp: &str) -> Result<(), ClientError> {
        super::apply_answer(&mut self.pc, sdp)
    }

    /// Runs the peer until `state.stop`: answers the network, sends ~50 VP8 packets/s when
    /// publishing (a keyframe first and after every PLI), records packets when subscribing.
    pub fn spawn(mut self, state: Arc<PeerState>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut frame: u32 = 0;
            let mut want_keyframe = true;
            let mut seq: u16 = 1000;
            let interval = match state.packet_interval_us.load(Ordering::Relaxed) {
                0 => Duration::from_millis(20),
                us => Duration::from_micros(us),
            };
            let mut media = tokio::time::interval(interval);
            media.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut rtp_datagrams = 0u64;
            let sender = self.pc.get_senders().next();
            while !state.stop.load(Ordering::Relaxed) {
                super::flush_and_track(&mut self.pc, &self.socket, &state.connected).await;
                while let Some(msg) = self.pc.poll_read() {
                    match msg.message {
                        RTCMessage::RtpPacket(_, p) => {
                            let pl = &p.payload;
                            let frame = pl
                                .get(10..14)
                                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                                .unwrap_or(u32::MAX);
                            lock(&state.received).push(Received {
                                ssrc: p.header.ssrc,
                                seq: p.header.sequence_number,
                                ts: p.header.timestamp,
                                payload_type: p.header.payload_type,
                                frame,
                                keyframe: self.codec.is_key(pl),
                                latency: pl
                                    .get(14..22)
                                    .map(|b| {
                                        let sent =
                                            u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
                                        let now = epoch().elapsed().as_micros() as u64;
                                        std::time::Duration::from_micros(now.saturating_sub(sent))
                                    })
                                    .unwrap_or_default(),
                                orientation: self
                                    .cvo_id
                                    .and_then(|id| p.header.get_extension(id))
                                    .and_then(|b| b.first().copied()),
                                at: Instant::now(),
                            });
                        }
                        RTCMessage::RtcpPacket(_, pkts) => {
                            for p in pkts {
                                if p.as_any().is::<PictureLossIndication>() {
                                    state.plis_received.fetch_add(1, Ordering::Relaxed);
                                    want_keyframe = true;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let plis = state.send_plis.swap(0, Ordering::Relaxed);
                if plis > 0 {
                    let ssrc = lock(&state.received).first().map(|r| r.ssrc);
                    let receiver = self.pc.get_receivers().next();
                    if let (Some(ssrc), Some(rid)) = (ssrc, receiver) {
                        if let Some(mut r) = self.pc.rtp_receiver(rid) {
                            for _ in 0..plis {
                                let pli = PictureLossIndication {
                                    sender_ssrc: 1,
                                    media_ssrc: ssrc,
                                };
                                let _ = r.write_rtcp(Instant::now(), vec![Box::new(pli)]);
                            }
                        }
                    }
                    continue;
                }
                let deadline = super::next_wakeup(&mut self.pc);
                tokio::select! {
                    r = self.socket.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { break };
                        // RTP, not RTCP (RFC 5761: RTCP packet types 200-206 in byte 1).
                        let is_rtp = n > 1 && (128..=191).contains(&buf[0]) && !(200..=206).contains(&buf[1]);
                        let nth = state.drop_every_nth_rtp.load(Ordering::Relaxed);
                        if is_rtp && nth > 0 {
                            // The SRTP header is in clear: the sequence number is readable.
                            let seq = u16::from_be_bytes([buf[2], buf[3]]);
                            if let Some(original) = lock(&state.dropped_rtp).remove(&seq) {
                                lock(&state.resent_rtp).push((original, buf[..n].to_vec()));
                            }
                            rtp_datagrams += 1;
                            if rtp_datagrams % nth == 0 {
                                state.rtp_datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                                let mut dropped = lock(&state.dropped_rtp);
                                if dropped.len() >= 4096 {
                                    dropped.clear(); // never repaired; keep the record bounded
                                }
                                dropped.insert(seq, buf[..n].to_vec());
                                continue;
                            }
                        }
                        {
                            let mut addrs = lock(&state.remote_addrs);
                            if !addrs.contains(&from) { addrs.push(from); }
                        }
                        super::feed_udp(&mut self.pc, self.local, from, &buf[..n]);
                    }
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        let _ = self.pc.handle_timeout(Instant::now());
                    }
                    _ = media.tick(), if sender.is_some() && state.connected.load(Ordering::Relaxed) => {
                        let Some(sid) = sender else { continue };
                        let key = std::mem::take(&mut want_keyframe);
                        let size = state.payload_bytes.load(Ordering::Relaxed) as usize;
                        let payload = self.codec.payload(key, frame, if size == 0 { 1000 } else { size });
                        let mut pkt = rtc::rtp::Packet {
                            header: rtc::rtp::header::Header {
                                version: 2,
                                marker: true,
                                payload_type: 100,
                                sequence_number: seq,
                                timestamp: frame.wrapping_mul(1800),
                                ssrc: self.publish_ssrc.unwrap_or(1),
                                ..Default::default()
                            },
                            payload: payload.into(),
                        };
                        if let Some(id) = self.cvo_id {
                            let _ = pkt.header.set_extension(id, vec![TEST_ORIENTATION].into());
                        }
                        if let Some(mut s) = self.pc.rtp_sender(sid) {
                            if s.write_rtp(Instant::now(), pkt).is_ok() {
                                state.packets_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        seq = seq.wrapping_add(1);
                        frame += 1;
                    }
                }
            }
            let _ = self.pc.close();
        })
    }
}
