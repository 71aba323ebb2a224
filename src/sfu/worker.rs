//! The media worker's core: every peer connection, router, producer and consumer of the
//! sessions placed on one worker, without sockets or clocks.
//!
//! It is fed inputs with the time they happened (`handle_datagram`, `handle_tcp_frame`,
//! `handle_command`, `handle_pipe_datagram`, `handle_timeout`, `handle_tick`) and leaves its
//! outputs in queues the driver ([`super::driver`]) drains after each turn: UDP datagrams in
//! `batch`, ICE-TCP frames, pipe frames and mesh events. Participants hear from it through
//! their event queues and replies. So it can be run on a virtual clock in tests.
//!
//! Datagrams are matched to their peer connection by source address, bound only by an
//! authenticated STUN Binding request from that address.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use slab::Slab;
use tokio::sync::mpsc;

use super::engine::build_peer_connection;
use super::*;
use crate::media::cache::PacketCache;
use crate::media::demux::{binding_request_is_authentic, binding_request_local_ufrag};
use crate::media::extensions::{IncomingExtensions, OutgoingExtensions, FORWARDED};
use crate::media::keyframe::is_keyframe;
use crate::media::layers::{Decision, LayerSelector};
use crate::media::repair::{GapRepair, KeyframeThrottle};
use crate::media::rewrite::RtpRewriter;

/// What the worker needs from the node configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Address the media socket binds.
    pub listen: SocketAddr,
    /// Address put into candidates; its port is the bound port.
    pub announced_ip: IpAddr,
    pub limits: Limits,
    pub max_datagram_bytes: usize,
    /// Offer the UDP candidate.
    pub udp: bool,
    /// Also accept ICE-TCP on the same port number.
    pub tcp: bool,
    /// This worker's number on its node (0 ..). It tags the pipe stream numbers the worker
    /// allocates, so a node hands a resend request from a pipe to the worker that owns the
    /// stream without a table.
    pub index: u8,
    /// Where to tell the mesh about sessions and producers; `None` for a node on its own.
    pub mesh: Option<mpsc::UnboundedSender<WorkerEvent>>,
}

/// The bits of a pipe stream number a worker counts in; the byte above is its index.
const STREAM_COUNTER: u32 = 0x00ff_ffff;
/// A layer that sent nothing for this long is considered stopped.
const LAYER_IDLE: Duration = Duration::from_millis(1500);
/// Longest a join to a session new here waits for other nodes to replay the session.
const MESH_REPLAY_WAIT: Duration = Duration::from_millis(500);

/// Joins waiting for the mesh: participant, reply, answer-by.
type AwaitingMesh = Vec<(
    ParticipantId,
    oneshot::Sender<Result<Joined, JoinError>>,
    Instant,
)>;
const MAX_ADDRS_PER_CONN: usize = 8;

pub(super) struct Conn {
    pc: RTCPeerConnection,
    kind: TransportKind,
    participant: usize,
    ufrag: String,
    /// Local ICE password: the key of the MESSAGE-INTEGRITY that binds a new address.
    ice_pwd: String,
    addrs: Vec<SocketAddr>,
    tcp_peers: Vec<SocketAddr>,
    /// Local address the client sends to; replies leave from it so the client sees the
    /// candidate it chose.
    src_ip: Option<IpAddr>,
    deadline: Option<Instant>,
    connected: bool,
    dirty: bool,
    /// Publish side: incoming SSRC → (producer, layer); filled as streams open.
    ssrc_route: HashMap<u32, (usize, u8)>,
    /// Publish side: track id → producer.
    track_producer: HashMap<String, usize>,
    /// Subscribe side: consumer track id → consumer.
    track_consumer: HashMap<String, usize>,
}

pub(super) struct Participant {
    id: ParticipantId,
    session: SessionId,
    user: UserId,
    role: Role,
    events: EventSender,
    /// Where a dismissal for not reading events is counted.
    stats: Arc<WorkerStats>,
    /// Joined a session new here and waits for the mesh's replay of it: events are held
    /// back, since `joined` will describe the session as it is then.
    syncing: bool,
    publish: Option<usize>,
    subscribe: Option<usize>,
    producers: Vec<usize>,
    consumers: Vec<usize>,
}

impl Participant {
    fn info(&self) -> ParticipantInfo {
        ParticipantInfo {
            participant_id: self.id.clone(),
            user_id: self.user.clone(),
            role: self.role,
        }
    }
    fn send(&self, ev: SfuEvent) {
        // Until its `joined` is answered, what happens is part of that answer.
        if self.syncing {
            return;
        }
        if !self.events.send(ev) {
            self.stats.events_overflowed.fetch_add(1, Relaxed);
            tracing::info!(participant = %self.id, "dismissing a participant whose connection stopped reading events");
        }
    }
}

/// Payloads of the [`FORWARDED`] header extensions one packet carried, by index.
pub(super) type KeptExtensions = [Option<bytes::Bytes>; FORWARDED.len()];

/// A packet as it was forwarded: the header without the publisher's extensions, and the
/// forwarded extensions' payloads. A retransmission rebuilds exactly the bytes of the
/// original copy from it: the same sequence number with different bytes would reuse an
/// AES-GCM nonce under SRTP.
#[derive(Clone)]
pub(super) struct CachedPacket {
    pub(super) pkt: rtc::rtp::Packet,
    pub(super) kept: KeptExtensions,
}

/// Writes the kept extensions under one consumer's negotiated ids, in [`FORWARDED`] order,
/// so every copy of one packet to one consumer is built the same way.
fn set_forwarded_extensions(
    out: &mut rtc::rtp::Packet,
    kept: &KeptExtensions,
    ids: &OutgoingExtensions,
) {
    for (i, payload) in kept.iter().enumerate() {
        if let (Some(payload), Some(id)) = (payload, ids.id(i)) {
            let _ = out.header.set_extension(id, payload.clone());
        }
    }
}

/// Recent packets kept per video stream for retransmission (~2.5 s at 200 packets/s).
const PACKET_CACHE: usize = 512;

pub(super) struct LayerStat {
    pub(super) ssrc: Option<u32>,
    bytes: u64,
    pub(super) bitrate: Option<u64>,
    last_packet: Option<Instant>,
    keyframe_requests: KeyframeThrottle,
    /// One copy of recent packets for every consumer's NACKs; video only.
    pub(super) cache: Option<PacketCache<CachedPacket>>,
    /// Gaps in what arrives from a pipe, asked for again until repaired.
    pub(super) repair: GapRepair,
}

impl LayerStat {
    pub(super) fn new(kind: MediaKind) -> Self {
        Self {
            repair: GapRepair::new(crate::proto::pipe::MAX_NACK_SEQS),
            ssrc: None,
            bytes: 0,
            bitrate: None,
            last_packet: None,
            keyframe_requests: KeyframeThrottle::default(),
            cache: (kind == MediaKind::Video).then(|| PacketCache::new(PACKET_CACHE)),
        }
    }
}

/// Where a producer's media comes from.
pub(super) enum Origin {
    /// A participant on this node, through its publish peer connection.
    Local {
        participant: usize,
        conn: usize,
        receiver: RTCRtpReceiverId,
        mid: String,
    },
    /// Another node, through a pipe; `stream` numbers its media frames there.
    Pipe { pipe: PipeId, stream: u32 },
}

pub(super) struct Producer {
    pub(super) id: ProducerId,
    pub(super) session: SessionId,
    /// The publishing participant, wherever it is connected.
    pub(super) owner: ParticipantInfo,
    pub(super) origin: Origin,
    /// This node's number for the producer's media frames on pipes.
    pub(super) stream: u32,
    /// Remote nodes this producer is sent to, with the layers each one wants.
    pub(super) pipes_out: Vec<(PipeId, u32)>,
    /// For a pipe producer: the layers last asked of the origin.
    pub(super) layers_requested: u32,
    kind: MediaKind,
    codec: Option<Codec>,
    rtp_codec: RTCRtpCodec,
    rids: Vec<String>,
    pub(super) layers: Vec<LayerStat>,
    pub(super) paused: bool,
    pub(super) consumers: Vec<usize>,
    extensions: IncomingExtensions,
}

impl Producer {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: ProducerId,
        session: SessionId,
        owner: ParticipantInfo,
        origin: Origin,
        stream: u32,
        kind: MediaKind,
        codec: Option<Codec>,
        rtp_codec: RTCRtpCodec,
        rids: Vec<String>,
        layers: Vec<LayerStat>,
        paused: bool,
        extensions: IncomingExtensions,
    ) -> Self {
        Self {
            id,
            session,
            owner,
            origin,
            stream,
            pipes_out: Vec::new(),
            layers_requested: 0,
            kind,
            codec,
            rtp_codec,
            rids,
            layers,
            paused,
            consumers: Vec::new(),
            extensions,
        }
    }

    pub(super) fn kind(&self) -> MediaKind {
        self.kind
    }

    pub(super) fn rtp_codec(&self) -> &RTCRtpCodec {
        &self.rtp_codec
    }

    pub(super) fn rids(&self) -> &[String] {
        &self.rids
    }

    fn local_participant(&self) -> Option<usize> {
        match self.origin {
            Origin::Local { participant, .. } => Some(participant),
            Origin::Pipe { .. } => None,
        }
    }
}

pub(super) struct Consumer {
    id: ConsumerId,
    producer: usize,
    participant: usize,
    conn: usize,
    sender: RTCRtpSenderId,
    ssrc: u32,
    payload_type: u8,
    extensions: OutgoingExtensions,
    rewriter: RtpRewriter,
    selector: LayerSelector,
    paused: bool,
    track_id: String,
}

pub(super) struct Worker {
    pub(super) cfg: WorkerConfig,
    /// Part of a mesh: a session new here waits for the other nodes' replay of it.
    pub(super) meshed: bool,
    pub(super) announced: SocketAddr,
    pub(super) stats: Arc<WorkerStats>,
    pub(super) conns: Slab<Conn>,
    pub(super) by_addr: HashMap<SocketAddr, usize>,
    pub(super) awaiting_mesh: HashMap<SessionId, AwaitingMesh>,
    pub(super) unauthenticated: UnauthenticatedLimiter,
    /// Open ICE-TCP connections, and which peer connection they serve once known.
    pub(super) tcp_open: HashSet<SocketAddr>,
    pub(super) by_tcp_addr: HashMap<SocketAddr, usize>,
    pub(super) by_ufrag: HashMap<String, usize>,
    pub(super) timers: BinaryHeap<Reverse<(Instant, usize)>>,
    pub(super) participants: Slab<Participant>,
    pub(super) participant_ids: HashMap<ParticipantId, usize>,
    /// Participants of each session hosted here.
    pub(super) routers: HashMap<SessionId, Vec<usize>>,
    /// Producers of each session, local and piped in.
    pub(super) session_producers: HashMap<SessionId, Vec<usize>>,
    /// Participants of each session connected to other nodes, by the pipe that told us.
    pub(super) remote_participants: HashMap<SessionId, Vec<(PipeId, ParticipantInfo)>>,
    pub(super) next_stream: u32,
    pub(super) pipes: HashMap<PipeId, super::pipes::PipeState>,
    /// (pipe, origin stream) → pipe producer.
    pub(super) pipe_streams: HashMap<(PipeId, u32), usize>,
    /// This node's stream number → local producer, for resend requests from pipes.
    pub(super) local_streams: HashMap<u32, usize>,
    pub(super) producers: Slab<Producer>,
    pub(super) producer_ids: HashMap<ProducerId, usize>,
    pub(super) consumers: Slab<Consumer>,
    pub(super) consumer_ids: HashMap<ConsumerId, usize>,
    pub(super) dirty: Vec<usize>,
    /// UDP datagrams produced this turn, sent together by the driver.
    pub(super) batch: super::batch::SendBatch,
    /// ICE-TCP frames produced this turn, and connections to cut.
    pub(super) tcp_frames: Vec<(SocketAddr, bytes::Bytes)>,
    pub(super) tcp_cut: Vec<SocketAddr>,
    /// Pipe datagrams (media frames, resend requests) produced this turn.
    pub(super) pipe_out: Vec<(PipeId, bytes::Bytes)>,
    /// What the mesh is to be told, in order.
    pub(super) mesh_out: Vec<MeshEvent>,
    /// Buffer pipe media frames are cut from.
    pub(super) pipe_arena: BytesMut,
    pub(super) rtp_scratch: Vec<(String, rtc::rtp::Packet)>,
    pub(super) rtcp_scratch: Vec<(String, Vec<Box<dyn rtc::rtcp::Packet>>)>,
    pub(super) event_scratch: Vec<RTCPeerConnectionEvent>,
    pub(super) ticks: u64,
}

fn sdp_error(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.chars().take(300).collect()
}

/// Simulcast RIDs of one m-line, in the order of its `a=simulcast:send` attribute.
fn simulcast_rids(sdp: &str, mid: &str) -> Vec<String> {
    let mut in_section = false;
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            in_section = false;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            in_section = m == mid;
        } else if in_section {
            if let Some(list) = line.strip_prefix("a=simulcast:send ") {
                let first = list.split(' ').next().unwrap_or("");
                return first
                    .split(';')
                    .map(|alt| alt.split(',').next().unwrap_or("").trim_start_matches('~'))
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
        }
    }
    Vec::new()
}

/// The mids of an offer's media sections that send (`sendonly`, `sendrecv` or no direction),
/// leaving out rejected ones (port 0) and data channels.
fn sending_mids(sdp: &str) -> Vec<String> {
    let mut out = Vec::new();
    for section in sdp.split("\nm=").skip(1) {
        let mut lines = section.lines();
        let media = lines.next().unwrap_or("");
        let mut fields = media.split_whitespace();
        let (kind, port) = (fields.next(), fields.next());
        if !matches!(kind, Some("audio" | "video")) || port == Some("0") {
            continue;
        }
        let mut mid = None;
        let mut sends = true;
        for l in lines.map(str::trim_end) {
            if let Some(m) = l.strip_prefix("a=mid:") {
                mid = Some(m.to_owned());
            }
            if matches!(l, "a=recvonly" | "a=inactive") {
                sends = false;
            }
        }
        if let (true, Some(mid)) = (sends, mid) {
            out.push(mid);
        }
    }
    out
}

fn sdp_attribute(sdp: &str, prefix: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix(prefix))
        .map(str::to_owned)
}

/// Binding requests from addresses not yet bound, checked per source address and second:
/// more than this from one address are dropped unchecked, so a flood of forged requests
/// costs bounded HMAC work and cannot crowd out a real client's checks from its own address.
const UNAUTHENTICATED_PER_SOURCE: u32 = 200;
/// Source addresses tracked per second; past this, new ones wait for the next second.
const UNAUTHENTICATED_SOURCES: usize = 4096;

/// Rate limit for STUN from sources not bound to any connection (sans-I/O: time passed in).
pub(super) struct UnauthenticatedLimiter {
    window: Option<Instant>,
    counts: HashMap<IpAddr, u32>,
}

impl UnauthenticatedLimiter {
    fn new() -> Self {
        Self {
            window: None,
            counts: HashMap::new(),
        }
    }

    fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.counts.clear();
        }
        if self.counts.len() >= UNAUTHENTICATED_SOURCES && !self.counts.contains_key(&ip) {
            return false;
        }
        let n = self.counts.entry(ip).or_default();
        *n += 1;
        *n <= UNAUTHENTICATED_PER_SOURCE
    }
}

impl Worker {
    /// A core announcing `announced` in its candidates, counting into `stats`.
    pub(super) fn new(cfg: WorkerConfig, announced: SocketAddr, stats: Arc<WorkerStats>) -> Self {
        Self {
            meshed: cfg.mesh.is_some(),
            cfg,
            announced,
            stats,
            conns: Slab::new(),
            by_addr: HashMap::new(),
            awaiting_mesh: HashMap::new(),
            unauthenticated: UnauthenticatedLimiter::new(),
            tcp_open: HashSet::new(),
            by_tcp_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            timers: BinaryHeap::new(),
            participants: Slab::new(),
            participant_ids: HashMap::new(),
            routers: HashMap::new(),
            session_producers: HashMap::new(),
            remote_participants: HashMap::new(),
            next_stream: 1,
            pipes: HashMap::new(),
            pipe_streams: HashMap::new(),
            local_streams: HashMap::new(),
            producers: Slab::new(),
            producer_ids: HashMap::new(),
            consumers: Slab::new(),
            consumer_ids: HashMap::new(),
            dirty: Vec::new(),
            batch: Default::default(),
            tcp_frames: Vec::new(),
            tcp_cut: Vec::new(),
            pipe_out: Vec::new(),
            mesh_out: Vec::new(),
            pipe_arena: BytesMut::new(),
            rtp_scratch: Vec::new(),
            rtcp_scratch: Vec::new(),
            event_scratch: Vec::new(),
            ticks: 0,
        }
    }

    // ---- network input -------------------------------------------------------------------

    /// One UDP datagram from `src`, received on local address `dst_ip`.
    pub(super) fn handle_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst_ip: Option<IpAddr>,
        d: &[u8],
    ) {
        self.stats.datagrams_in.fetch_add(1, Relaxed);
        if d.len() > self.cfg.max_datagram_bytes {
            self.stats.datagrams_oversized.fetch_add(1, Relaxed);
            return;
        }
        let Some(ck) = self.route(now, src, dst_ip, d) else {
            self.stats.datagrams_unroutable.fetch_add(1, Relaxed);
            return;
        };
        self.feed(now, ck, src, TransportProtocol::UDP, BytesMut::from(d));
    }

    /// An ICE-TCP connection from `peer` was accepted.
    pub(super) fn handle_tcp_opened(&mut self, peer: SocketAddr) {
        self.tcp_open.insert(peer);
        self.stats.tcp_connections.fetch_add(1, Relaxed);
    }

    /// An ICE-TCP connection ended.
    pub(super) fn handle_tcp_closed(&mut self, peer: SocketAddr) {
        if !self.tcp_open.remove(&peer) {
            return;
        }
        if let Some(ck) = self.by_tcp_addr.remove(&peer) {
            if let Some(c) = self.conns.get_mut(ck) {
                c.tcp_peers.retain(|p| *p != peer);
            }
        }
        self.stats.tcp_connections.fetch_sub(1, Relaxed);
    }

    /// Cuts an ICE-TCP connection (the driver drops its writer, which closes it).
    fn cut_tcp(&mut self, peer: SocketAddr) {
        self.handle_tcp_closed(peer);
        self.tcp_cut.push(peer);
    }

    /// One RFC 4571 frame from an ICE-TCP connection.
    pub(super) fn handle_tcp_frame(&mut self, now: Instant, peer: SocketAddr, data: BytesMut) {
        if !self.tcp_open.contains(&peer) {
            return; // cut already; frames in flight
        }
        self.stats.tcp_frames_in.fetch_add(1, Relaxed);
        let ck = match self.by_tcp_addr.get(&peer) {
            Some(&ck) => Some(ck),
            None => self
                .authenticate(now, peer, &data)
                .filter(|&ck| self.conns[ck].tcp_peers.len() < MAX_ADDRS_PER_CONN),
        };
        let Some(ck) = ck else {
            // A connection that does not open with an authenticated Binding request for a
            // known connection is cut.
            self.stats.datagrams_unroutable.fetch_add(1, Relaxed);
            self.cut_tcp(peer);
            return;
        };
        if self.by_tcp_addr.insert(peer, ck).is_none() {
            self.conns[ck].tcp_peers.push(peer);
        }
        self.feed(now, ck, peer, TransportProtocol::TCP, data);
    }

    /// Hands one packet from the network to its peer connection.
    fn feed(
        &mut self,
        now: Instant,
        ck: usize,
        src: SocketAddr,
        transport_protocol: TransportProtocol,
        message: BytesMut,
    ) {
        let local_addr = self.announced;
        let conn = &mut self.conns[ck];
        let res = crate::alloc::in_rtc(|| {
            conn.pc.handle_read(TaggedBytesMut {
                now,
                transport: TransportContext {
                    local_addr,
                    peer_addr: src,
                    ecn: None,
                    transport_protocol,
                },
                message,
            })
        });
        if res.is_err() {
            // A malformed datagram from a known peer: counted (not logged: this is the
            // per-packet path), never fatal.
            self.stats.datagrams_unroutable.fetch_add(1, Relaxed);
        }
        self.process_conn(now, ck);
    }

    fn route(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst_ip: Option<IpAddr>,
        d: &[u8],
    ) -> Option<usize> {
        if let Some(&ck) = self.by_addr.get(&src) {
            return Some(ck);
        }
        let ck = self.authenticate(now, src, d)?;
        let conn = &mut self.conns[ck];
        if conn.addrs.len() >= MAX_ADDRS_PER_CONN {
            // Only the client can bind addresses, so the oldest one is the stalest.
            let old = conn.addrs.remove(0);
            self.by_addr.remove(&old);
        }
        conn.addrs.push(src);
        if conn.src_ip.is_none() {
            conn.src_ip = dst_ip;
        }
        self.by_addr.insert(src, ck);
        Some(ck)
    }

    /// The connection a STUN Binding request from an unbound address belongs to, if it is
    /// signed with that connection's ICE password. The username alone travels in clear, so
    /// binding on it would let anyone who saw it take the connection's address slots.
    fn authenticate(&mut self, now: Instant, src: SocketAddr, d: &[u8]) -> Option<usize> {
        let ck = *self.by_ufrag.get(binding_request_local_ufrag(d)?)?;
        if !self.unauthenticated.allow(now, src.ip()) {
            self.stats.stun_rate_limited.fetch_add(1, Relaxed);
            return None;
        }
        if !binding_request_is_authentic(d, self.conns[ck].ice_pwd.as_bytes()) {
            self.stats.stun_unauthenticated.fetch_add(1, Relaxed);
            return None;
        }
        Some(ck)
    }

    /// Drains everything a connection has to say: datagrams out, events, media, timers.
    fn process_conn(&mut self, now: Instant, ck: usize) {
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        conn.dirty = false;
        let src_ip = conn.src_ip;
        while let Some(msg) = crate::alloc::in_rtc(|| conn.pc.poll_write()) {
            if msg.transport.transport_protocol == TransportProtocol::TCP {
                if self.tcp_open.contains(&msg.transport.peer_addr) {
                    self.tcp_frames
                        .push((msg.transport.peer_addr, msg.message.freeze()));
                } else {
                    self.stats.send_errors.fetch_add(1, Relaxed);
                }
                continue;
            }
            // Sent together with everything else this turn produces (see `send_batch`).
            self.batch
                .push(msg.transport.peer_addr, src_ip, msg.message);
        }
        while let Some(ev) = crate::alloc::in_rtc(|| conn.pc.poll_event()) {
            self.event_scratch.push(ev);
        }
        while let Some(msg) = crate::alloc::in_rtc(|| conn.pc.poll_read()) {
            match msg.message {
                RTCMessage::RtpPacket(track, pkt) => self.rtp_scratch.push((track, pkt)),
                RTCMessage::RtcpPacket(track, pkts) => self.rtcp_scratch.push((track, pkts)),
                _ => {}
            }
        }
        self.schedule(ck);

        let mut events = std::mem::take(&mut self.event_scratch);
        for ev in events.drain(..) {
            self.on_pc_event(now, ck, ev);
        }
        self.event_scratch = events;

        let mut rtp = std::mem::take(&mut self.rtp_scratch);
        for (track, pkt) in rtp.drain(..) {
            self.on_rtp(now, ck, &track, pkt);
        }
        self.rtp_scratch = rtp;

        let mut rtcp = std::mem::take(&mut self.rtcp_scratch);
        for (track, pkts) in rtcp.drain(..) {
            self.on_subscriber_rtcp(now, ck, &track, &pkts);
        }
        self.rtcp_scratch = rtcp;
    }

    fn schedule(&mut self, ck: usize) {
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        let next = crate::alloc::in_rtc(|| conn.pc.poll_timeout());
        if next != conn.deadline {
            conn.deadline = next;
            if let Some(t) = next {
                self.timers.push(Reverse((t, ck)));
            }
        }
    }

    /// When `handle_timeout` is next due, if anything waits.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Runs the peer connection timers due by `now`.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((t, ck))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(ck) else {
                continue;
            };
            if conn.deadline != Some(t) {
                continue; // superseded
            }
            conn.deadline = None;
            if let Err(e) = crate::alloc::in_rtc(|| conn.pc.handle_timeout(now)) {
                tracing::debug!(error = %e, "peer connection timeout handling failed");
            }
            self.process_conn(now, ck);
            // A deadline that does not move forward would spin; push it a little.
            if let Some(conn) = self.conns.get_mut(ck) {
                if conn.deadline.is_some_and(|d| d <= now) {
                    let d = now + Duration::from_millis(1);
                    conn.deadline = Some(d);
                    self.timers.push(Reverse((d, ck)));
                }
            }
        }
    }

    fn mark_dirty(&mut self, ck: usize) {
        if let Some(c) = self.conns.get_mut(ck) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(ck);
            }
        }
    }

    /// Drains every connection that has something to send; call at the end of each turn.
    pub(super) fn flush(&mut self, now: Instant) {
        while let Some(ck) = self.dirty.pop() {
            self.process_conn(now, ck);
        }
    }

    // ---- peer connection events ----------------------------------------------------------

    fn on_pc_event(&mut self, now: Instant, ck: usize, ev: RTCPeerConnectionEvent) {
        match ev {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                let Some(conn) = self.conns.get_mut(ck) else {
                    return;
                };
                let was_connected = conn.connected;
                // Media keeps flowing while the client's consent is fresh (RFC 7675): ICE
                // calls a pair disconnected after 10 s without a check and fails it at 30 s,
                // and only failure or close stops forwarding. Clients that check every 5-7 s
                // (Firefox, aiortc, RFC 7675 pacing) are never cut off between checks.
                conn.connected = matches!(
                    state,
                    RTCPeerConnectionState::Connected | RTCPeerConnectionState::Disconnected
                );
                let (pk, kind) = (conn.participant, conn.kind);
                tracing::debug!(?kind, %state, "peer connection state");
                if let Some(p) = self.participants.get(pk) {
                    p.send(SfuEvent::TransportState {
                        transport: kind,
                        state: state.to_string(),
                    });
                }
                if !was_connected
                    && conn_connected(&self.conns, ck)
                    && kind == TransportKind::Subscribe
                {
                    // Consumers waiting on this transport need a keyframe now.
                    let consumers: Vec<usize> = self.participants[pk].consumers.clone();
                    for c in consumers {
                        self.request_keyframe_for_consumer(now, c);
                    }
                }
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                let Some(conn) = self.conns.get_mut(ck) else {
                    return;
                };
                if conn.kind != TransportKind::Publish {
                    return;
                }
                let Some(pk) = self
                    .producers
                    .iter()
                    .find(|(_, p)| {
                        matches!(p.origin, Origin::Local { conn, receiver, .. }
                            if conn == ck && receiver == init.receiver_id)
                    })
                    .map(|(k, _)| k)
                else {
                    return;
                };
                let producer = &mut self.producers[pk];
                let layer = match &init.rid {
                    Some(rid) => producer.rids.iter().position(|r| r == rid).unwrap_or(0),
                    None => 0,
                };
                if let Some(l) = producer.layers.get_mut(layer) {
                    l.ssrc = Some(init.ssrc);
                }
                conn.track_producer.insert(init.track_id.clone(), pk);
                conn.ssrc_route.insert(init.ssrc, (pk, layer as u8));
            }
            _ => {}
        }
    }

    // ---- forwarding ----------------------------------------------------------------------

    fn resolve_ssrc(&mut self, ck: usize, track: &str, ssrc: u32) -> Option<(usize, u8)> {
        let conn = self.conns.get_mut(ck)?;
        if let Some(r) = conn.ssrc_route.get(&ssrc) {
            return Some(*r);
        }
        let pk = *conn.track_producer.get(track)?;
        let producer = self.producers.get_mut(pk)?;
        let Origin::Local { receiver, .. } = producer.origin else {
            return None;
        };
        let rid = conn
            .pc
            .rtp_receiver(receiver)
            .and_then(|r| r.track().rid(ssrc).cloned());
        let layer = rid
            .and_then(|rid| producer.rids.iter().position(|r| *r == rid))
            .unwrap_or(0);
        if let Some(l) = producer.layers.get_mut(layer) {
            l.ssrc = Some(ssrc);
        }
        conn.ssrc_route.insert(ssrc, (pk, layer as u8));
        Some((pk, layer as u8))
    }

    fn on_rtp(&mut self, now: Instant, ck: usize, track: &str, pkt: rtc::rtp::Packet) {
        self.stats.rtp_in.fetch_add(1, Relaxed);
        let Some((pk, layer)) = self.resolve_ssrc(ck, track, pkt.header.ssrc) else {
            return;
        };
        self.forward(now, pk, layer, pkt);
    }

    /// Hands one packet of one producer layer to its consumers here and to the remote nodes
    /// that want it. The same path serves local producers and producers piped in.
    pub(super) fn forward(
        &mut self,
        now: Instant,
        pk: usize,
        layer: u8,
        mut pkt: rtc::rtp::Packet,
    ) {
        let ssrc = pkt.header.ssrc;
        let Worker {
            producers,
            consumers,
            conns,
            participants,
            stats,
            dirty,
            pipes,
            pipe_arena,
            pipe_out,
            ..
        } = self;
        let producer = &mut producers[pk];
        // Extension ids were negotiated with the publisher, not with each subscriber: keep
        // the payloads of the forwarded ones and write them under each consumer's id below;
        // drop the rest (the subscriber's own interceptors add what its connection needs).
        let mut kept: KeptExtensions = Default::default();
        if pkt.header.extension {
            for e in &pkt.header.extensions {
                if let Some(i) = producer.extensions.index(e.id) {
                    kept[i] = Some(e.payload.clone());
                }
            }
        }
        pkt.header.extension = false;
        pkt.header.extensions.clear();
        pkt.header.extension_profile = 0;
        let (seq, ts) = (pkt.header.sequence_number, pkt.header.timestamp);
        if let Some(l) = producer.layers.get_mut(layer as usize) {
            l.bytes += pkt.payload.len() as u64;
            l.last_packet = Some(now);
            if let Some(cache) = &mut l.cache {
                // Header vectors are empty and payloads are reference-counted: no copy.
                cache.insert(
                    seq,
                    CachedPacket {
                        pkt: pkt.clone(),
                        kept: kept.clone(),
                    },
                );
            }
        }
        if producer.paused {
            return;
        }
        // One copy per remote node that wants this layer, whatever its number of consumers.
        for &(pipe, wanted) in &producer.pipes_out {
            if wanted & (1 << layer) == 0 {
                continue;
            }
            if pipes.contains_key(&pipe) {
                let frame =
                    super::pipes::media_frame(pipe_arena, producer.stream, layer, &pkt, &kept);
                pipe_out.push((pipe, frame));
            }
        }
        if producer.consumers.is_empty() {
            return;
        }
        let keyframe = producer.codec.is_some_and(|c| is_keyframe(c, &pkt.payload));
        for &cid in &producer.consumers {
            let c = &mut consumers[cid];
            let conn = &mut conns[c.conn];
            if c.paused || !conn.connected {
                continue;
            }
            let before = c.selector.current();
            if c.selector.on_packet(layer, keyframe) == Decision::Drop {
                stats.rtp_dropped_layer.fetch_add(1, Relaxed);
                continue;
            }
            let Some((out_seq, out_ts)) = c.rewriter.rewrite(now, ssrc, seq, ts) else {
                continue;
            };
            // Only a simulcast consumer has layers to report.
            if before != c.selector.current() && producer.layers.len() > 1 {
                if let Some(p) = participants.get(c.participant) {
                    p.send(SfuEvent::ConsumerLayerChanged {
                        consumer_id: c.id.clone(),
                        layer,
                    });
                }
            }
            let mut out = pkt.clone();
            out.header.ssrc = c.ssrc;
            out.header.sequence_number = out_seq;
            out.header.timestamp = out_ts;
            out.header.payload_type = c.payload_type;
            set_forwarded_extensions(&mut out, &kept, &c.extensions);
            if let Some(mut sender) = conn.pc.rtp_sender(c.sender) {
                if crate::alloc::in_rtc(|| sender.write_rtp(now, out)).is_ok() {
                    stats.rtp_forwarded.fetch_add(1, Relaxed);
                }
            }
            if !conn.dirty {
                conn.dirty = true;
                dirty.push(c.conn);
            }
        }
    }

    fn on_subscriber_rtcp(
        &mut self,
        now: Instant,
        ck: usize,
        track: &str,
        pkts: &[Box<dyn rtc::rtcp::Packet>],
    ) {
        let Some(conn) = self.conns.get(ck) else {
            return;
        };
        if conn.kind != TransportKind::Subscribe {
            return;
        }
        let Some(&cid) = conn.track_consumer.get(track) else {
            return;
        };
        for p in pkts {
            let any = p.as_any();
            if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                self.request_keyframe_for_consumer(now, cid);
            } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
                for pair in &nack.nacks {
                    for out_seq in *pair {
                        self.retransmit(now, cid, out_seq);
                    }
                }
            } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
                if let Some(c) = self.consumers.get_mut(cid) {
                    c.selector.set_bandwidth(Some(remb.bitrate as u64));
                }
            }
        }
    }

    /// Resends one packet a consumer reported lost, from its producer's cache.
    fn retransmit(&mut self, now: Instant, cid: usize, out_seq: u16) {
        let Some(c) = self.consumers.get_mut(cid) else {
            return;
        };
        let cached = c.rewriter.input_of(out_seq).and_then(|(ssrc, seq)| {
            let p = self.producers.get(c.producer)?;
            let layer = p.layers.iter().find(|l| l.ssrc == Some(ssrc))?;
            layer.cache.as_ref()?.get(seq).cloned()
        });
        let Some(CachedPacket { mut pkt, kept }) = cached else {
            self.stats.nack_unserved.fetch_add(1, Relaxed);
            return;
        };
        let (ssrc, seq, ts) = (
            pkt.header.ssrc,
            pkt.header.sequence_number,
            pkt.header.timestamp,
        );
        let Some((out_seq, out_ts)) = c.rewriter.rewrite(now, ssrc, seq, ts) else {
            return;
        };
        pkt.header.ssrc = c.ssrc;
        pkt.header.sequence_number = out_seq;
        pkt.header.timestamp = out_ts;
        pkt.header.payload_type = c.payload_type;
        set_forwarded_extensions(&mut pkt, &kept, &c.extensions);
        let ck = c.conn;
        if let Some(mut sender) = self
            .conns
            .get_mut(ck)
            .and_then(|conn| conn.pc.rtp_sender(c.sender))
        {
            if crate::alloc::in_rtc(|| sender.write_rtp(now, pkt)).is_ok() {
                self.stats.rtp_retransmitted.fetch_add(1, Relaxed);
            }
        }
        self.mark_dirty(ck);
    }

    pub(super) fn request_keyframe_for_consumer(&mut self, now: Instant, cid: usize) {
        let Some(c) = self.consumers.get(cid) else {
            return;
        };
        let (pk, layer) = (c.producer, c.selector.target());
        self.request_keyframe(now, pk, layer);
    }

    /// Sends a PLI for one layer of a producer, at most once per interval.
    pub(super) fn request_keyframe(&mut self, now: Instant, pk: usize, layer: u8) {
        let Some(p) = self.producers.get_mut(pk) else {
            return;
        };
        if p.kind != MediaKind::Video {
            return;
        }
        let Some(l) = p.layers.get_mut(layer as usize) else {
            return;
        };
        let (ck, receiver) = match p.origin {
            Origin::Local { conn, receiver, .. } => (conn, receiver),
            Origin::Pipe { pipe, .. } => {
                // Aggregated here (one request per interval whatever the number of consumers
                // asking), throttled again at the origin.
                if !l.keyframe_requests.allow(now) {
                    return;
                }
                let producer = p.id.clone();
                self.stats.keyframe_requests.fetch_add(1, Relaxed);
                self.mesh_event(MeshEvent::KeyframeRequest {
                    pipe,
                    producer,
                    layer,
                });
                return;
            }
        };
        let Some(ssrc) = l.ssrc else { return };
        if !l.keyframe_requests.allow(now) {
            return;
        }
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        if let Some(mut r) = conn.pc.rtp_receiver(receiver) {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: ssrc,
            };
            if crate::alloc::in_rtc(|| r.write_rtcp(now, vec![Box::new(pli)])).is_ok() {
                self.stats.keyframe_requests.fetch_add(1, Relaxed);
            }
        }
        self.mark_dirty(ck);
    }

    /// The periodic turn (every 100 ms): late joins, layer bitrates and choices, keyframe
    /// requests, pipe repair and layer requests.
    pub(super) fn handle_tick(&mut self, now: Instant) {
        self.ticks += 1;
        // Joins whose mesh replay is late are answered with what is known by now.
        let late: Vec<SessionId> = self
            .awaiting_mesh
            .iter()
            .filter(|(_, w)| w.iter().any(|(_, _, deadline)| *deadline <= now))
            .map(|(s, _)| s.clone())
            .collect();
        for session in late {
            let waiting = self.awaiting_mesh.remove(&session).unwrap_or_default();
            for (id, reply, deadline) in waiting {
                if deadline <= now {
                    self.answer_join(&id, reply);
                } else {
                    self.awaiting_mesh
                        .entry(session.clone())
                        .or_default()
                        .push((id, reply, deadline));
                }
            }
        }
        let measure = self.ticks % 10 == 0;
        let mut wants: Vec<usize> = Vec::new();
        let mut bitrates: Vec<Option<u64>> = Vec::new();
        for (_, p) in self.producers.iter_mut() {
            // A piped-in producer's layer bitrates come from its origin.
            if measure && matches!(p.origin, Origin::Local { .. }) {
                for l in p.layers.iter_mut() {
                    let idle = l
                        .last_packet
                        .is_none_or(|t| now.duration_since(t) > LAYER_IDLE);
                    l.bitrate = if idle { None } else { Some(l.bytes * 8) };
                    l.bytes = 0;
                }
            }
            bitrates.clear();
            bitrates.extend(
                p.layers
                    .iter()
                    .map(|l| l.bitrate.or(l.last_packet.map(|_| 1))),
            );
            for &cid in &p.consumers {
                let c = &mut self.consumers[cid];
                if p.layers.len() > 1 {
                    c.selector.update_target(now, &bitrates);
                }
                if c.selector.wants_keyframe() && !c.paused {
                    wants.push(cid);
                }
            }
        }
        for cid in wants {
            if self
                .consumers
                .get(cid)
                .is_some_and(|c| conn_connected(&self.conns, c.conn))
            {
                self.request_keyframe_for_consumer(now, cid);
            }
        }
        self.pipe_tick(now, measure);
    }

    // ---- commands ------------------------------------------------------------------------

    /// One request from signaling or the mesh (pipe up and down come through the driver).
    pub(super) fn handle_command(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::Join {
                session,
                user,
                role,
                events,
                reply,
            } => {
                match self.join(session.clone(), user, role, events) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    // A session new here: the mesh is asked what it knows, and the answer
                    // waits for that, so `joined` shows the session as the mesh knows it.
                    Ok(pk) if self.participants[pk].syncing => {
                        let id = self.participants[pk].id.clone();
                        self.awaiting_mesh.entry(session).or_default().push((
                            id,
                            reply,
                            now + MESH_REPLAY_WAIT,
                        ));
                    }
                    Ok(pk) => {
                        let _ = reply.send(Ok(self.joined(pk)));
                    }
                }
            }
            Command::SessionReplayed { session } => {
                for (id, reply, _) in self.awaiting_mesh.remove(&session).unwrap_or_default() {
                    self.answer_join(&id, reply);
                }
            }
            Command::Publish {
                participant,
                offer,
                reply,
            } => {
                let _ = reply.send(self.publish(now, &participant, offer));
            }
            Command::Subscribe {
                participant,
                producer,
                offer,
                max_layer,
                reply,
            } => {
                let _ = reply.send(self.subscribe(now, &participant, &producer, offer, max_layer));
            }
            Command::SetConsumerLayer {
                participant,
                consumer,
                max_layer,
                reply,
            } => {
                let r = self.own_consumer(&participant, &consumer).map(|cid| {
                    let c = &mut self.consumers[cid];
                    c.selector.set_max_layer(max_layer);
                });
                let _ = reply.send(r);
            }
            Command::SetConsumerPaused {
                participant,
                consumer,
                paused,
                reply,
            } => {
                let r = self.own_consumer(&participant, &consumer).map(|cid| {
                    let c = &mut self.consumers[cid];
                    c.paused = paused;
                    if !paused {
                        // Resume on a keyframe, like a fresh subscription, with no gap in
                        // the numbering for the receiver to ask retransmission for.
                        c.selector = LayerSelector::new(c.selector.max_layer());
                        c.rewriter.resync();
                    }
                });
                let _ = reply.send(r);
            }
            Command::SetProducerPaused {
                participant,
                producer,
                paused,
                reply,
            } => {
                let r = self
                    .own_producer(&participant, &producer)
                    .map(|pk| self.set_producer_paused(pk, paused));
                let _ = reply.send(r);
            }
            Command::CloseProducer {
                participant,
                producer,
                reply,
            } => {
                let r = self
                    .own_producer(&participant, &producer)
                    .map(|pk| self.close_producer(pk));
                let _ = reply.send(r);
            }
            Command::CloseConsumer {
                participant,
                consumer,
                reply,
            } => {
                let r = self
                    .own_consumer(&participant, &consumer)
                    .map(|cid| self.close_consumer(cid, false));
                let _ = reply.send(r);
            }
            Command::AddCandidate {
                participant,
                transport,
                candidate,
                sdp_mid,
                reply,
            } => {
                let _ = reply.send(self.add_candidate(&participant, transport, candidate, sdp_mid));
            }
            Command::Leave { participant } => self.leave(&participant),
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
            Command::PipeUp { pipe, link } => self.pipe_up(pipe, link.node, link.counters),
            Command::PipeDown { pipe } => self.pipe_down(pipe),
            Command::RemoteProducer { pipe, announcement } => {
                self.remote_producer(pipe, announcement)
            }
            Command::RemoteParticipantJoined {
                pipe,
                session,
                participant,
            } => self.remote_participant_joined(pipe, session, participant),
            Command::RemoteParticipantLeft {
                session,
                participant,
            } => self.remote_participant_left(&session, &participant),
            Command::RemoteProducerClosed { pipe, producer } => {
                self.remote_producer_closed(pipe, &producer)
            }
            Command::RemoteProducerPaused {
                pipe,
                producer,
                paused,
            } => self.remote_producer_paused(pipe, &producer, paused),
            Command::RemoteLayerBitrates {
                pipe,
                producer,
                bitrates,
            } => self.remote_layer_bitrates(pipe, &producer, &bitrates),
            Command::PipeConsume {
                pipe,
                producer,
                layers,
            } => self.pipe_consume(now, pipe, &producer, layers),
            Command::PipeKeyframe { producer, layer } => self.pipe_keyframe(now, &producer, layer),
            Command::PipeSessionEnded { pipe, session } => self.pipe_session_ended(pipe, &session),
        }
    }

    /// Pauses or resumes a producer; consumers resume on a keyframe without a numbering gap.
    pub(super) fn set_producer_paused(&mut self, pk: usize, paused: bool) {
        let p = &mut self.producers[pk];
        if p.paused == paused {
            return;
        }
        p.paused = paused;
        let id = p.id.clone();
        if !paused {
            for &cid in &p.consumers {
                let c = &mut self.consumers[cid];
                c.selector = LayerSelector::new(c.selector.max_layer());
                c.rewriter.resync();
            }
        }
        let (session, role) = (p.session.clone(), p.owner.role);
        let except = p.local_participant();
        if except.is_some() {
            self.mesh_event(MeshEvent::ProducerPaused {
                session: session.clone(),
                producer: id.clone(),
                paused,
            });
        }
        let ev = if paused {
            SfuEvent::ProducerPaused(id)
        } else {
            SfuEvent::ProducerResumed(id)
        };
        self.notify_session(&session, role, except, ev);
    }

    fn own_producer(
        &self,
        participant: &ParticipantId,
        id: &ProducerId,
    ) -> Result<usize, ControlError> {
        let pk = *self
            .participant_ids
            .get(participant)
            .ok_or(ControlError::UnknownParticipant)?;
        self.producer_ids
            .get(id)
            .copied()
            .filter(|&k| self.producers[k].local_participant() == Some(pk))
            .ok_or_else(|| ControlError::UnknownProducer(id.to_string()))
    }

    fn own_consumer(
        &self,
        participant: &ParticipantId,
        id: &ConsumerId,
    ) -> Result<usize, ControlError> {
        let pk = *self
            .participant_ids
            .get(participant)
            .ok_or(ControlError::UnknownParticipant)?;
        self.consumer_ids
            .get(id)
            .copied()
            .filter(|&k| self.consumers[k].participant == pk)
            .ok_or_else(|| ControlError::UnknownConsumer(id.to_string()))
    }

    fn join(
        &mut self,
        session: SessionId,
        user: UserId,
        role: Role,
        events: EventSender,
    ) -> Result<usize, JoinError> {
        // One live connection per user and session: the newest replaces the older, so a
        // user who reconnects is never locked out by their own stale seat.
        let stale: Vec<ParticipantId> = self
            .routers
            .get(&session)
            .into_iter()
            .flatten()
            .map(|&o| &self.participants[o])
            .filter(|o| o.user == user)
            .map(|o| o.id.clone())
            .collect();
        for old in stale {
            if let Some(&ok) = self.participant_ids.get(&old) {
                self.participants[ok].events.dismiss(Dismissal::Replaced);
            }
            self.stats.participants_replaced.fetch_add(1, Relaxed);
            tracing::info!(participant = %old, "replaced by a newer connection of the same user");
            self.leave(&old);
        }
        let limits = &self.cfg.limits;
        match self.routers.get(&session) {
            None if self.routers.len() >= limits.max_sessions => {
                return Err(JoinError::TooManySessions)
            }
            Some(members) if members.len() >= limits.max_participants_per_session => {
                return Err(JoinError::SessionFull(limits.max_participants_per_session))
            }
            _ => {}
        }
        let id = ParticipantId::random();
        // A session new here, on a node in a mesh (or one still waiting for it): the
        // participant's view waits for the mesh's replay.
        let syncing = self.meshed
            && (!self.routers.contains_key(&session) || self.awaiting_mesh.contains_key(&session));
        let pk = self.participants.insert(Participant {
            id: id.clone(),
            session: session.clone(),
            user,
            role,
            events,
            stats: self.stats.clone(),
            syncing,
            publish: None,
            subscribe: None,
            producers: Vec::new(),
            consumers: Vec::new(),
        });
        self.participant_ids.insert(id.clone(), pk);
        if !self.routers.contains_key(&session) {
            // Other nodes announce this session's producers from now on.
            self.mesh_event(MeshEvent::SessionActive(session.clone()));
        }
        let members = self.routers.entry(session.clone()).or_default();
        let others: Vec<usize> = members.clone();
        members.push(pk);
        let me = self.participants[pk].info();
        for &o in &others {
            let other = &self.participants[o];
            if other.role.may_see(role) {
                other.send(SfuEvent::ParticipantJoined(me.clone()));
            }
        }
        self.mesh_event(MeshEvent::ParticipantJoined {
            session: session.clone(),
            participant: me,
        });
        self.update_gauges();
        tracing::info!(participant = %id, ?role, "participant joined");
        Ok(pk)
    }

    /// The session as participant `pk` may see it now: the others here and on other nodes,
    /// and the producers its role may see.
    fn joined(&self, pk: usize) -> Joined {
        let me = &self.participants[pk];
        let role = me.role;
        // Participants are shown by the same rule as their media: users see agents only.
        let mut participants: Vec<ParticipantInfo> = self
            .routers
            .get(&me.session)
            .into_iter()
            .flatten()
            .filter(|&&o| o != pk)
            .map(|&o| &self.participants[o])
            .filter(|o| role.may_see(o.role))
            .map(|o| o.info())
            .collect();
        participants.extend(
            self.remote_participants
                .get(&me.session)
                .into_iter()
                .flatten()
                .filter(|(_, p)| role.may_see(p.role))
                .map(|(_, p)| p.clone()),
        );
        let producers = self
            .session_producers
            .get(&me.session)
            .into_iter()
            .flatten()
            .filter(|&&prk| role.may_see(self.producers[prk].owner.role))
            .map(|&prk| self.producer_info(prk))
            .collect();
        Joined {
            participant_id: me.id.clone(),
            participants,
            producers,
        }
    }

    /// Answers a join that waited for the mesh, and lets events flow to it from now on.
    fn answer_join(
        &mut self,
        id: &ParticipantId,
        reply: oneshot::Sender<Result<Joined, JoinError>>,
    ) {
        let Some(&pk) = self.participant_ids.get(id) else {
            return; // it left while waiting
        };
        let p = &mut self.participants[pk];
        p.syncing = false;
        let _ = reply.send(Ok(self.joined(pk)));
    }

    pub(super) fn hosts_session(&self, session: &SessionId) -> bool {
        self.routers.contains_key(session)
    }

    /// A new pipe stream number: this worker's index in the top byte, a counter below.
    pub(super) fn allocate_stream(&mut self) -> u32 {
        let s = self.next_stream;
        self.next_stream = (self.next_stream + 1) & STREAM_COUNTER;
        if self.next_stream == 0 {
            self.next_stream = 1;
        }
        (u32::from(self.cfg.index) << 24) | s
    }

    /// Registers a new producer with its session; returns its key.
    pub(super) fn insert_producer(&mut self, producer: Producer) -> usize {
        let (id, session) = (producer.id.clone(), producer.session.clone());
        let local_stream =
            matches!(producer.origin, Origin::Local { .. }).then_some(producer.stream);
        let pk = self.producers.insert(producer);
        if let Some(stream) = local_stream {
            self.local_streams.insert(stream, pk);
        }
        self.producer_ids.insert(id, pk);
        self.session_producers.entry(session).or_default().push(pk);
        self.update_gauges();
        pk
    }

    pub(super) fn producer_info(&self, pk: usize) -> ProducerInfo {
        let p = &self.producers[pk];
        ProducerInfo {
            producer_id: p.id.clone(),
            participant_id: p.owner.participant_id.clone(),
            user_id: p.owner.user_id.clone(),
            role: p.owner.role,
            kind: p.kind,
            codec: p.codec,
            layers: p.rids.clone(),
            paused: p.paused,
        }
    }

    /// Tells every member of `session` here allowed to see `who` that it joined or left.
    pub(super) fn notify_presence(&self, session: &SessionId, who: &ParticipantInfo, joined: bool) {
        if let Some(members) = self.routers.get(session) {
            for &o in members {
                let p = &self.participants[o];
                if p.role.may_see(who.role) {
                    p.send(if joined {
                        SfuEvent::ParticipantJoined(who.clone())
                    } else {
                        SfuEvent::ParticipantLeft(who.clone())
                    });
                }
            }
        }
    }

    /// Sends an event about media published with `role` to every member of `session` here
    /// allowed to see it, except the publisher itself.
    pub(super) fn notify_session(
        &self,
        session: &SessionId,
        role: Role,
        except: Option<usize>,
        ev: SfuEvent,
    ) {
        if let Some(members) = self.routers.get(session) {
            for &o in members {
                if Some(o) != except && self.participants[o].role.may_see(role) {
                    self.participants[o].send(ev.clone());
                }
            }
        }
    }

    fn new_conn(&mut self, now: Instant, pk: usize, kind: TransportKind) -> Result<usize, String> {
        let pc = build_peer_connection(kind, self.announced, self.cfg.udp, self.cfg.tcp, now)
            .map_err(sdp_error)?;
        let ck = self.conns.insert(Conn {
            pc,
            kind,
            participant: pk,
            ufrag: String::new(),
            ice_pwd: String::new(),
            addrs: Vec::new(),
            tcp_peers: Vec::new(),
            src_ip: None,
            deadline: None,
            connected: false,
            dirty: false,
            ssrc_route: HashMap::new(),
            track_producer: HashMap::new(),
            track_consumer: HashMap::new(),
        });
        let p = &mut self.participants[pk];
        match kind {
            TransportKind::Publish => p.publish = Some(ck),
            TransportKind::Subscribe => p.subscribe = Some(ck),
        }
        self.update_gauges();
        Ok(ck)
    }

    /// Applies an offer and returns the answer; registers the ICE ufrag on first use.
    fn negotiate(&mut self, now: Instant, ck: usize, offer: String) -> Result<String, String> {
        let conn = &mut self.conns[ck];
        let desc = RTCSessionDescription::offer(offer).map_err(sdp_error)?;
        conn.pc
            .set_remote_description(now, desc)
            .map_err(sdp_error)?;
        let answer = conn.pc.create_answer(None).map_err(sdp_error)?;
        conn.pc
            .set_local_description(now, answer)
            .map_err(sdp_error)?;
        let sdp = conn
            .pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| "no local description after answering".to_string())?;
        // The local credentials are set by the first answer and change on an ICE restart
        // (which a browser also does when its BUNDLE transport changes): STUN is routed by
        // the current ones.
        let ufrag = sdp_attribute(&sdp, "a=ice-ufrag:").ok_or("answer carries no ICE ufrag")?;
        if ufrag != conn.ufrag {
            conn.ice_pwd =
                sdp_attribute(&sdp, "a=ice-pwd:").ok_or("answer carries no ICE password")?;
            let old = std::mem::replace(&mut conn.ufrag, ufrag.clone());
            self.by_ufrag.remove(&old);
            self.by_ufrag.insert(ufrag, ck);
        }
        self.mark_dirty(ck);
        Ok(sdp)
    }

    fn publish(
        &mut self,
        now: Instant,
        participant: &ParticipantId,
        offer: String,
    ) -> Result<Published, PublishError> {
        let pk = *self
            .participant_ids
            .get(participant)
            .ok_or(PublishError::UnknownParticipant)?;
        if !self.participants[pk].role.may_publish() {
            return Err(PublishError::NotAllowed);
        }
        let max = self.cfg.limits.max_producers_per_participant;
        let fresh = self.participants[pk].publish.is_none();
        let ck = match self.participants[pk].publish {
            Some(ck) => ck,
            None => self
                .new_conn(now, pk, TransportKind::Publish)
                .map_err(PublishError::BadSdp)?,
        };
        // Limits are checked before the offer is applied: a refused offer must leave the peer
        // connection as it was, in step with the client's rolled-back one.
        let known: Vec<&str> = self
            .producers
            .iter()
            .filter_map(|(_, p)| match &p.origin {
                Origin::Local { conn, mid, .. } if *conn == ck => Some(mid.as_str()),
                _ => None,
            })
            .collect();
        let new = sending_mids(&offer)
            .into_iter()
            .filter(|m| !known.contains(&m.as_str()))
            .count();
        if self.participants[pk].producers.len() + new > max {
            if fresh {
                self.close_conn(ck);
            }
            return Err(PublishError::TooManyProducers(max));
        }
        let remote_sdp = offer.clone();
        let answer = match self.negotiate(now, ck, offer) {
            Ok(a) => a,
            Err(e) => {
                if fresh {
                    self.close_conn(ck);
                }
                return Err(PublishError::BadSdp(e));
            }
        };
        // Every receiving m-line is a producer; new ones are created and announced.
        let mut result = Vec::new();
        let conn = &mut self.conns[ck];
        let transceivers: Vec<_> = conn.pc.get_transceivers().collect();
        let mut pending: Vec<Producer> = Vec::new();
        for tid in transceivers {
            let Some(t) = conn.pc.rtp_transceiver(tid) else {
                continue;
            };
            let (Some(mid), Some(receiver)) = (t.mid().clone(), t.receiver()) else {
                continue;
            };
            if let Some((pk2, _)) = self
                .producers
                .iter()
                .find(|(_, p)| {
                    matches!(&p.origin, Origin::Local { conn, mid: m, .. } if *conn == ck && *m == mid)
                })
            {
                result.push((mid, pk2));
                continue;
            }
            let Some(mut r) = conn.pc.rtp_receiver(receiver) else {
                continue;
            };
            let kind = match r.track().kind() {
                RtpCodecKind::Audio => MediaKind::Audio,
                _ => MediaKind::Video,
            };
            let params = &r.get_parameters().rtp_parameters;
            let extensions = IncomingExtensions::new(
                params
                    .header_extensions
                    .iter()
                    .map(|e| (e.uri.as_str(), e.id)),
            );
            let Some(rtp_codec) = params.codecs.first().map(|c| c.rtp_codec.clone()) else {
                continue; // rejected m-line
            };
            if self.participants[pk].producers.len() + pending.len() >= max {
                return Err(PublishError::TooManyProducers(max));
            }
            let rids = simulcast_rids(&remote_sdp, &mid);
            let layers = (0..rids.len().max(1))
                .map(|_| LayerStat::new(kind))
                .collect();
            let owner = self.participants[pk].info();
            let session = self.participants[pk].session.clone();
            pending.push(Producer::new(
                ProducerId::random(),
                session,
                owner,
                Origin::Local {
                    participant: pk,
                    conn: ck,
                    receiver,
                    mid: mid.clone(),
                },
                0,
                kind,
                Codec::from_mime(&rtp_codec.mime_type),
                rtp_codec,
                rids,
                layers,
                false,
                extensions,
            ));
        }
        for mut producer in pending {
            producer.stream = self.allocate_stream();
            let mid = match &producer.origin {
                Origin::Local { mid, .. } => mid.clone(),
                Origin::Pipe { .. } => String::new(),
            };
            let prk = self.insert_producer(producer);
            result.push((mid, prk));
            self.participants[pk].producers.push(prk);
            let info = self.producer_info(prk);
            tracing::info!(producer = %info.producer_id, kind = ?info.kind, layers = info.layers.len(), "producer created");
            let session = self.participants[pk].session.clone();
            self.notify_session(&session, info.role, Some(pk), SfuEvent::ProducerAdded(info));
            self.mesh_event(MeshEvent::ProducerOpened(self.announcement(prk)));
        }
        self.update_gauges();
        Ok(Published {
            answer,
            producers: result
                .into_iter()
                .map(|(mid, prk)| (mid, self.producer_info(prk)))
                .collect(),
        })
    }

    fn subscribe(
        &mut self,
        now: Instant,
        participant: &ParticipantId,
        producer: &ProducerId,
        offer: String,
        max_layer: Option<u8>,
    ) -> Result<Subscribed, SubscribeError> {
        let pk = *self
            .participant_ids
            .get(participant)
            .ok_or(SubscribeError::UnknownParticipant)?;
        let prk = *self
            .producer_ids
            .get(producer)
            .ok_or_else(|| SubscribeError::UnknownProducer(producer.to_string()))?;
        let me = &self.participants[pk];
        let (owner, layers, kind, rtp_codec) = {
            let p = &self.producers[prk];
            (p.owner.clone(), p.layers.len(), p.kind, p.rtp_codec.clone())
        };
        if self.producers[prk].session != me.session {
            return Err(SubscribeError::UnknownProducer(producer.to_string()));
        }
        if owner.participant_id == me.id || !me.role.may_see(owner.role) {
            return Err(SubscribeError::NotAllowed);
        }
        let max = self.cfg.limits.max_consumers_per_participant;
        if me.consumers.len() >= max {
            return Err(SubscribeError::TooManyConsumers(max));
        }
        let fresh = me.subscribe.is_none();
        let ck = match me.subscribe {
            Some(ck) => ck,
            None => self
                .new_conn(now, pk, TransportKind::Subscribe)
                .map_err(SubscribeError::BadSdp)?,
        };
        let id = ConsumerId::random();
        let ssrc = loop {
            let s = rand::random::<u32>();
            if s != 0 {
                break s;
            }
        };
        let owner_id = owner.participant_id.to_string();
        let track = MediaStreamTrack::new(
            owner_id,
            id.to_string(),
            producer.to_string(),
            match kind {
                MediaKind::Audio => RtpCodecKind::Audio,
                MediaKind::Video => RtpCodecKind::Video,
            },
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: rtp_codec.clone(),
                ..Default::default()
            }],
        );
        let conn = &mut self.conns[ck];
        let sender = conn
            .pc
            .add_track(track)
            .map_err(|e| SubscribeError::BadSdp(sdp_error(e)))?;
        let fail = |w: &mut Self, e: SubscribeError| {
            if let Some(c) = w.conns.get_mut(ck) {
                let _ = c.pc.remove_track(sender);
            }
            if fresh {
                w.close_conn(ck);
            }
            Err(e)
        };
        let answer = match self.negotiate(now, ck, offer) {
            Ok(a) => a,
            Err(e) => return fail(self, SubscribeError::BadSdp(e)),
        };
        let conn = &mut self.conns[ck];
        let transceivers: Vec<_> = conn.pc.get_transceivers().collect();
        let mid = transceivers.into_iter().find_map(|tid| {
            let t = conn.pc.rtp_transceiver(tid)?;
            if t.sender() == Some(sender) {
                t.mid().clone()
            } else {
                None
            }
        });
        let Some(mid) = mid else {
            return fail(self, SubscribeError::NoMatchingMLine);
        };
        let negotiated = conn.pc.rtp_sender(sender).map(|mut s| {
            let params = &s.get_parameters().rtp_parameters;
            let codecs = &params.codecs;
            let payload_type = codecs
                .iter()
                .find(|c| {
                    c.rtp_codec
                        .mime_type
                        .eq_ignore_ascii_case(&rtp_codec.mime_type)
                        && c.rtp_codec.sdp_fmtp_line == rtp_codec.sdp_fmtp_line
                })
                .or_else(|| {
                    codecs.iter().find(|c| {
                        c.rtp_codec
                            .mime_type
                            .eq_ignore_ascii_case(&rtp_codec.mime_type)
                    })
                })
                .map(|c| c.payload_type);
            let extensions = OutgoingExtensions::new(
                params
                    .header_extensions
                    .iter()
                    .map(|e| (e.uri.as_str(), e.id)),
            );
            (payload_type, extensions)
        });
        let (payload_type, extensions) = match negotiated {
            Some((pt, ext)) => (pt, ext),
            None => (None, OutgoingExtensions::default()),
        };
        let Some(payload_type) = payload_type else {
            return fail(
                self,
                SubscribeError::BadSdp(format!(
                    "the subscriber does not accept {}",
                    rtp_codec.mime_type
                )),
            );
        };
        conn.track_consumer.insert(id.to_string(), 0);
        let top = (layers.max(1) - 1) as u8;
        let consumer = Consumer {
            id: id.clone(),
            producer: prk,
            participant: pk,
            conn: ck,
            sender,
            ssrc,
            payload_type,
            extensions,
            rewriter: RtpRewriter::new(rtp_codec.clock_rate),
            selector: LayerSelector::new(max_layer.unwrap_or(top).min(top)),
            paused: false,
            track_id: id.to_string(),
        };
        let cid = self.consumers.insert(consumer);
        self.conns[ck].track_consumer.insert(id.to_string(), cid);
        self.consumer_ids.insert(id.clone(), cid);
        self.producers[prk].consumers.push(cid);
        self.participants[pk].consumers.push(cid);
        self.update_gauges();
        tracing::info!(consumer = %id, producer = %producer, "consumer created");
        Ok(Subscribed {
            answer,
            consumer_id: id,
            producer_id: producer.clone(),
            mid,
        })
    }

    fn add_candidate(
        &mut self,
        participant: &ParticipantId,
        transport: TransportKind,
        candidate: String,
        sdp_mid: Option<String>,
    ) -> Result<(), ControlError> {
        let pk = *self
            .participant_ids
            .get(participant)
            .ok_or(ControlError::UnknownParticipant)?;
        let p = &self.participants[pk];
        let ck = match transport {
            TransportKind::Publish => p.publish,
            TransportKind::Subscribe => p.subscribe,
        }
        .ok_or(ControlError::NoTransport(transport))?;
        // The value of RTCIceCandidate.candidate (`candidate:...`); an SDP line's `a=` is
        // tolerated.
        let candidate = candidate
            .strip_prefix("a=")
            .map(str::to_owned)
            .unwrap_or(candidate);
        if candidate.is_empty() {
            return Ok(()); // end of candidates
        }
        self.conns[ck]
            .pc
            .add_remote_candidate(RTCIceCandidateInit {
                candidate,
                sdp_mid,
                ..Default::default()
            })
            .map_err(|e| ControlError::BadCandidate(sdp_error(e)))
    }

    // ---- teardown ------------------------------------------------------------------------

    fn close_consumer(&mut self, cid: usize, producer_gone: bool) {
        if !self.consumers.contains(cid) {
            return;
        }
        let c = self.consumers.remove(cid);
        self.consumer_ids.remove(&c.id);
        if let Some(p) = self.producers.get_mut(c.producer) {
            p.consumers.retain(|&x| x != cid);
        }
        if let Some(p) = self.participants.get_mut(c.participant) {
            p.consumers.retain(|&x| x != cid);
            if producer_gone {
                p.send(SfuEvent::ConsumerClosed(c.id.clone()));
            }
        }
        if let Some(conn) = self.conns.get_mut(c.conn) {
            conn.track_consumer.remove(&c.track_id);
            // The m-line goes inactive but keeps its sender: rtc gives a transceiver without
            // a sender to the next track added, and the next subscription must be answered
            // on the m-line the client offered for it, not on this one, which the client has
            // given up. Stopping it instead would reject the m-line, and when it is the
            // BUNDLE tag the browser moves the whole connection to a new transport.
            let ids: Vec<_> = conn.pc.get_transceivers().collect();
            let transceiver = ids.into_iter().find(|&t| {
                conn.pc
                    .rtp_transceiver(t)
                    .is_some_and(|t| t.sender() == Some(c.sender))
            });
            if let Some(mut t) = transceiver.and_then(|t| conn.pc.rtp_transceiver(t)) {
                t.set_direction(RTCRtpTransceiverDirection::Inactive);
            }
        }
        self.mark_dirty(c.conn);
        self.update_gauges();
    }

    pub(super) fn close_producer(&mut self, prk: usize) {
        if !self.producers.contains(prk) {
            return;
        }
        let consumers = self.producers[prk].consumers.clone();
        for cid in consumers {
            self.close_consumer(cid, true);
        }
        let p = self.producers.remove(prk);
        self.producer_ids.remove(&p.id);
        if let Some(list) = self.session_producers.get_mut(&p.session) {
            list.retain(|&x| x != prk);
            if list.is_empty() {
                self.session_producers.remove(&p.session);
            }
        }
        let mut except = None;
        match &p.origin {
            Origin::Local {
                participant, conn, ..
            } => {
                if let Some(conn) = self.conns.get_mut(*conn) {
                    conn.ssrc_route.retain(|_, (k, _)| *k != prk);
                    conn.track_producer.retain(|_, k| *k != prk);
                }
                if let Some(owner) = self.participants.get_mut(*participant) {
                    owner.producers.retain(|&x| x != prk);
                }
                except = Some(*participant);
                self.local_streams.remove(&p.stream);
                self.mesh_event(MeshEvent::ProducerClosed {
                    session: p.session.clone(),
                    producer: p.id.clone(),
                });
            }
            Origin::Pipe { pipe, stream } => {
                self.pipe_streams.remove(&(*pipe, *stream));
                if p.layers_requested != 0 && self.pipes.contains_key(pipe) {
                    self.mesh_event(MeshEvent::StopConsume {
                        pipe: *pipe,
                        producer: p.id.clone(),
                    });
                }
            }
        }
        self.notify_session(
            &p.session,
            p.owner.role,
            except,
            SfuEvent::ProducerClosed(p.id.clone()),
        );
        tracing::info!(producer = %p.id, "producer closed");
        self.update_gauges();
    }

    fn close_conn(&mut self, ck: usize) {
        if !self.conns.contains(ck) {
            return;
        }
        let mut conn = self.conns.remove(ck);
        let _ = conn.pc.close();
        while let Some(msg) = crate::alloc::in_rtc(|| conn.pc.poll_write()) {
            self.batch
                .push(msg.transport.peer_addr, conn.src_ip, msg.message);
        }
        for a in &conn.addrs {
            self.by_addr.remove(a);
        }
        for p in &conn.tcp_peers {
            self.by_tcp_addr.remove(p);
            // Dropping the sender ends the connection's task.
            self.cut_tcp(*p);
        }
        if !conn.ufrag.is_empty() {
            self.by_ufrag.remove(&conn.ufrag);
        }
        if let Some(p) = self.participants.get_mut(conn.participant) {
            match conn.kind {
                TransportKind::Publish if p.publish == Some(ck) => p.publish = None,
                TransportKind::Subscribe if p.subscribe == Some(ck) => p.subscribe = None,
                _ => {}
            }
        }
        self.update_gauges();
    }

    fn leave(&mut self, participant: &ParticipantId) {
        let Some(pk) = self.participant_ids.remove(participant) else {
            return;
        };
        let producers = self.participants[pk].producers.clone();
        for prk in producers {
            self.close_producer(prk);
        }
        let consumers = self.participants[pk].consumers.clone();
        for cid in consumers {
            self.close_consumer(cid, false);
        }
        let p = &self.participants[pk];
        let conns: Vec<usize> = p.publish.into_iter().chain(p.subscribe).collect();
        for ck in conns {
            self.close_conn(ck);
        }
        let p = self.participants.remove(pk);
        self.mesh_event(MeshEvent::ParticipantLeft {
            session: p.session.clone(),
            participant: p.info(),
        });
        if let Some(members) = self.routers.get_mut(&p.session) {
            members.retain(|&x| x != pk);
            let empty = members.is_empty();
            self.notify_presence(&p.session, &p.info(), false);
            if empty {
                self.routers.remove(&p.session);
                // Producers piped in for this session have no audience left here.
                let piped: Vec<usize> = self
                    .session_producers
                    .get(&p.session)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                for prk in piped {
                    self.close_producer(prk);
                }
                self.remote_participants.remove(&p.session);
                self.mesh_event(MeshEvent::SessionInactive(p.session.clone()));
            }
        }
        tracing::info!(participant = %p.id, "participant left");
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let s = &self.stats;
        s.sessions.store(self.routers.len() as u64, Relaxed);
        s.participants
            .store(self.participants.len() as u64, Relaxed);
        s.producers.store(self.producers.len() as u64, Relaxed);
        s.consumers.store(self.consumers.len() as u64, Relaxed);
        s.peer_connections.store(self.conns.len() as u64, Relaxed);
    }
}

impl Consumer {
    pub(super) fn is_paused(&self) -> bool {
        self.paused
    }
    pub(super) fn target_layer(&self) -> u8 {
        self.selector.target()
    }
    pub(super) fn current_layer(&self) -> Option<u8> {
        self.selector.current()
    }
}

fn conn_connected(conns: &Slab<Conn>, ck: usize) -> bool {
    conns.get(ck).is_some_and(|c| c.connected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_sections_of_an_offer_are_found_by_mid() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=recvonly\r\n\
                   m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:4\r\n";
        assert_eq!(sending_mids(sdp), ["0", "1"]);
    }

    #[test]
    fn simulcast_rids_are_read_in_order_for_the_right_mid() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=rid:l send\r\n\
                   a=simulcast:send l;m;~h\r\n";
        assert_eq!(simulcast_rids(sdp, "1"), vec!["l", "m", "h"]);
        assert!(simulcast_rids(sdp, "0").is_empty());
    }
}
