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
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use tokio::sync::mpsc;

use super::bwe::ProbeOutcome;
use super::keys::{Arena, ConnKey, ConsumerKey, ParticipantKey, ProducerKey};
use super::*;
use super::{consumer::*, producer::*, router::*, transport::*};
use crate::media::layers::{LayerSelector, UP_HEADROOM};

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
    /// Run send-side congestion control (transport-cc + GCC, `sfu::bwe`) on subscribe
    /// connections and choose simulcast layers by its estimate (`rtc.send_side_bwe`); off,
    /// layer choice follows the subscriber's REMB.
    pub send_side_bwe: bool,
    /// Encrypt forwarded copies in place (`sfu::egress`, `rtc.srtp_in_place`); off, every copy
    /// goes through rtc's `write_rtp`.
    pub srtp_in_place: bool,
    /// The node's media writer, when it records sessions: producers of recorded sessions
    /// copy their packets to it.
    pub recording: Option<crate::compliance::media::MediaSink>,
}

/// The bits of a pipe stream number a worker counts in; the byte above is its index.
const STREAM_COUNTER: u32 = 0x00ff_ffff;

/// How long a packet lost on a publisher's uplink may stay unrepaired before the layer's
/// decoders are given a keyframe instead (its retransmission normally comes within a few round
/// trips; past this the publisher has given up or lost it again).
pub(super) const UNREPAIRED_LOSS_KEYFRAME: Duration = Duration::from_millis(500);

/// What an audio consumer is assumed to need of its connection's estimate (Opus with headers).
const AUDIO_ALLOWANCE: u64 = 64_000;
/// How long a subscribe connection's layers follow the estimator's starting point while
/// neither transport-cc feedback nor a transport-cc stream has been seen.
const NO_FEEDBACK_GRACE: Duration = Duration::from_secs(3);
/// Loss towards a subscriber (estimator's average) above which its consumers keep a layer
/// only while the estimate covers all of it.
const LOSSY: f64 = 0.05;
/// Probes copy one of this many newest packets of a consumer, in turn.
const PROBE_DEPTH: u16 = 16;
/// A layer that sent nothing for this long is considered stopped.
pub(super) const LAYER_IDLE: Duration = Duration::from_millis(1500);

pub(super) struct Worker {
    pub(super) cfg: WorkerConfig,
    /// Part of a mesh: a session new here waits for the other nodes' replay of it.
    pub(super) meshed: bool,
    pub(super) announced: SocketAddr,
    pub(super) stats: Arc<WorkerStats>,
    pub(super) conns: Arena<ConnKey, Conn>,
    pub(super) by_addr: HashMap<SocketAddr, ConnKey>,
    pub(super) awaiting_mesh: HashMap<SessionId, AwaitingMesh>,
    pub(super) unauthenticated: UnauthenticatedLimiter,
    /// Open ICE-TCP connections, and which peer connection they serve once known.
    pub(super) tcp_open: HashSet<SocketAddr>,
    pub(super) by_tcp_addr: HashMap<SocketAddr, ConnKey>,
    pub(super) by_ufrag: HashMap<String, ConnKey>,
    pub(super) timers: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    pub(super) participants: Arena<ParticipantKey, Participant>,
    pub(super) participant_ids: HashMap<ParticipantId, ParticipantKey>,
    /// Participants of each session hosted here.
    pub(super) routers: HashMap<SessionId, Vec<ParticipantKey>>,
    /// Producers of each session, local and piped in.
    pub(super) session_producers: HashMap<SessionId, Vec<ProducerKey>>,
    /// Participants of each session connected to other nodes, by the pipe that told us.
    pub(super) remote_participants: HashMap<SessionId, Vec<(PipeId, ParticipantInfo)>>,
    pub(super) next_stream: u32,
    pub(super) pipes: HashMap<PipeId, super::pipes::PipeState>,
    /// (pipe, origin stream) → pipe producer.
    pub(super) pipe_streams: HashMap<(PipeId, u32), ProducerKey>,
    /// This node's stream number → local producer, for resend requests from pipes.
    pub(super) local_streams: HashMap<u32, ProducerKey>,
    pub(super) producers: Arena<ProducerKey, Producer>,
    pub(super) producer_ids: HashMap<ProducerId, ProducerKey>,
    pub(super) consumers: Arena<ConsumerKey, Consumer>,
    pub(super) consumer_ids: HashMap<ConsumerId, ConsumerKey>,
    pub(super) dirty: Vec<ConnKey>,
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
    /// Subscribe connections sending a probe cluster (see `send_probes`).
    pub(super) probing: Vec<ConnKey>,
    pub(super) ticks: u64,
    /// Sessions recorded on this node: their producers are tapped.
    pub(super) recorded: HashSet<SessionId>,
    /// Sessions held here for their recording only (participants on other nodes).
    pub(super) record_seats: HashSet<SessionId>,
    /// Wall-clock time beside the monotonic one, for the NTP times of RTCP (round trips).
    pub(super) wall_clock: rtc::shared::time::SystemInstant,
}

impl Worker {
    /// A core announcing `announced` in its candidates, counting into `stats`.
    pub(super) fn new(cfg: WorkerConfig, announced: SocketAddr, stats: Arc<WorkerStats>) -> Self {
        Self {
            meshed: cfg.mesh.is_some(),
            cfg,
            announced,
            stats,
            conns: Arena::default(),
            by_addr: HashMap::new(),
            awaiting_mesh: HashMap::new(),
            unauthenticated: UnauthenticatedLimiter::new(),
            tcp_open: HashSet::new(),
            by_tcp_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            timers: BinaryHeap::new(),
            participants: Arena::default(),
            participant_ids: HashMap::new(),
            routers: HashMap::new(),
            session_producers: HashMap::new(),
            remote_participants: HashMap::new(),
            next_stream: 1,
            pipes: HashMap::new(),
            pipe_streams: HashMap::new(),
            local_streams: HashMap::new(),
            producers: Arena::default(),
            producer_ids: HashMap::new(),
            consumers: Arena::default(),
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
            probing: Vec::new(),
            ticks: 0,
            recorded: HashSet::new(),
            record_seats: HashSet::new(),
            wall_clock: rtc::shared::time::SystemInstant::now(Instant::now()),
        }
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
        self.tick_send_paths(now);
        self.share_send_estimates(now);
        let mut wants: Vec<ConsumerKey> = Vec::new();
        let mut bitrates: Vec<Option<u64>> = Vec::new();
        let mut tap_keyframes: Vec<(ProducerKey, u8)> = Vec::new();
        let mut unrepaired: Vec<(ProducerKey, u8)> = Vec::new();
        for (pk, p) in self.producers.iter_mut() {
            // Loss on a publisher's uplink that its retransmissions never filled leaves every
            // decoder of the layer stuck until it gets a keyframe (browsers wait ~3 s before
            // asking): ask on their behalf, as mediasoup's NACK generator does.
            if matches!(p.origin, Origin::Local { .. }) {
                for (i, l) in p.layers.iter_mut().enumerate() {
                    if l.repair.overdue(now, UNREPAIRED_LOSS_KEYFRAME) {
                        l.repair.forget();
                        let layer = i as u8;
                        let watched = p.tap.is_some()
                            || p.pipes_out.iter().any(|&(_, w)| w & (1 << layer) != 0)
                            || p.consumers
                                .iter()
                                .any(|&cid| self.consumers[cid].selector.current() == Some(layer));
                        if watched {
                            unrepaired.push((pk, layer));
                        }
                    }
                }
            }
            // A piped-in producer's layer bitrates come from its origin.
            if measure && matches!(p.origin, Origin::Local { .. }) {
                let clock_rate = p.rtp_codec.clock_rate;
                for l in p.layers.iter_mut() {
                    if let Some(q) = l.reception.interval(clock_rate) {
                        self.stats.loss_upstream.observe(q.loss);
                        self.stats.jitter_upstream.observe(q.jitter);
                    }
                    let idle = l
                        .last_packet
                        .is_none_or(|t| now.duration_since(t) > LAYER_IDLE);
                    l.bitrate = if idle { None } else { Some(l.bytes * 8) };
                    l.bytes = 0;
                }
            }
            bitrates.clear();
            // A layer with packets but no measured rate yet stands at 1 bit/s ("flowing");
            // one silent for longer than LAYER_IDLE is not flowing, whatever it sent once
            // (a consumer or a recording targeting it would wait for it forever).
            bitrates.extend(p.layers.iter().map(|l| {
                l.bitrate.or_else(|| {
                    l.last_packet
                        .filter(|&t| now.duration_since(t) <= LAYER_IDLE)
                        .map(|_| 1)
                })
            }));
            if let Some(tap) = &mut p.tap {
                if p.layers.len() > 1 {
                    tap.selector.update_target(now, &bitrates);
                }
                if tap.wants_keyframe() {
                    tap_keyframes.push((pk, tap.selector.target()));
                }
            }
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
        for (pk, layer) in tap_keyframes {
            self.request_keyframe(now, pk, layer);
        }
        for (pk, layer) in unrepaired {
            self.stats
                .keyframe_requests_unrepaired_loss
                .fetch_add(1, Relaxed);
            self.request_keyframe(now, pk, layer);
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

    /// One request from signaling or the mesh (pipe up and down come through the driver).
    pub(super) fn handle_command(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::Join {
                session,
                user,
                role,
                recorded,
                events,
                reply,
            } => {
                match self.join(session.clone(), user, role, recorded, events) {
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
            Command::RecordSeat { session, on } => self.record_seat(session, on),
            Command::Record { session } => {
                if self.cfg.recording.is_some() && self.routers.contains_key(&session) {
                    self.record_session(&session);
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
            Command::Renegotiate {
                participant,
                transport,
                offer,
                reply,
            } => {
                let _ = reply.send(self.renegotiate(now, &participant, transport, offer));
            }
            Command::Leave { participant } => self.leave(&participant),
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
            Command::Describe { session, reply } => {
                let _ = reply.send(self.describe(&session));
            }
            // The driver's (a sans-I/O core never sleeps).
            Command::Stall(_) => {}
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
            Command::RemoteSenderReport {
                pipe,
                producer,
                layer,
                ntp,
                rtp,
            } => self.remote_sender_report(pipe, &producer, layer, ntp, rtp),
            Command::PipeSessionEnded { pipe, session } => self.pipe_session_ended(pipe, &session),
        }
    }

    /// Hands each subscribe connection's send-side estimate to its video consumers: what the
    /// audio consumers need comes off the top, the rest is shared equally.
    fn share_send_estimates(&mut self, now: Instant) {
        let Worker {
            conns,
            consumers,
            producers,
            probing,
            stats,
            ..
        } = self;
        for (ck, conn) in conns.iter_mut() {
            let Some(est) = conn.estimate.as_ref() else {
                continue;
            };
            let can_probe = conn.repairs.as_ref().is_some_and(|r| r.rtx());
            est.set_probing(can_probe);
            // Until the first feedback, the estimator's starting point: layer choice is ours
            // from the first packet, not REMB's optimism. A subscriber that did not negotiate
            // transport-cc never sends feedback: after a grace its REMB takes over.
            let twcc = conn.repairs.as_ref().is_some_and(|r| r.twcc());
            let target = match est.target() {
                Some(t) => t,
                None if twcc || now < conn.created + NO_FEEDBACK_GRACE => {
                    super::bwe::INITIAL_BITRATE as u64
                }
                None => continue,
            };
            // What the chosen layers carry, and what the best layers each consumer may have
            // would carry with headroom: the gap is what a probe must confirm.
            let (mut audio, mut video, mut sending, mut wanted) = (0u64, 0u64, 0u64, 0u64);
            for &cid in conn.track_consumer.values() {
                let Some(c) = consumers.get(cid).filter(|c| !c.paused) else {
                    continue;
                };
                let Some(p) = producers.get(c.producer) else {
                    continue;
                };
                match p.kind() {
                    MediaKind::Audio => {
                        audio += 1;
                        sending += AUDIO_ALLOWANCE;
                        wanted += AUDIO_ALLOWANCE;
                    }
                    MediaKind::Video => {
                        video += 1;
                        let rate = |l: usize| p.layers.get(l).and_then(|l| l.bitrate);
                        let current = c.selector.current().map(usize::from);
                        let now_rate = current.and_then(rate).unwrap_or(0);
                        // The next layer up that is flowing, within the consumer's maximum: one
                        // step at a time, so a probe overshoots a bottleneck by one layer's
                        // worth at most. Nothing is probed before the first layer flows.
                        let max = usize::from(c.selector.max_layer());
                        let next = current.and_then(|l| (l + 1..=max).find(|&l| rate(l).is_some()));
                        sending += now_rate;
                        wanted += match next {
                            Some(n) => (rate(n).unwrap_or(0) as f64 * UP_HEADROOM) as u64,
                            None => now_rate,
                        };
                    }
                }
            }
            let share_of = |bps: u64| bps.saturating_sub(audio * AUDIO_ALLOWANCE) / video.max(1);
            let share = share_of(target);
            let lossy = est.loss() > LOSSY;
            let up = can_probe.then(|| share_of(conn.prober.confirmed(now)));
            for &cid in conn.track_consumer.values() {
                if let Some(c) = consumers.get_mut(cid) {
                    c.selector.set_send_side_bandwidth(share, lossy, up);
                }
            }
            if can_probe && video > 0 {
                let before = (conn.prober.clusters, conn.prober.finished);
                conn.prober.consider(now, est, sending, wanted);
                if conn.prober.clusters != before.0 {
                    stats.probe_clusters.fetch_add(1, Relaxed);
                }
                if conn.prober.finished != before.1 {
                    match conn.prober.last_outcome {
                        ProbeOutcome::Confirmed => &stats.probes_confirmed,
                        ProbeOutcome::Unsaturated => &stats.probes_unsaturated,
                        _ => &stats.probes_refused,
                    }
                    .fetch_add(1, Relaxed);
                }
                if conn.prober.is_sending() && !probing.contains(&ck) {
                    probing.push(ck);
                }
            }
        }
    }

    /// When the next probe packet is due on any connection.
    pub(super) fn next_probe(&self) -> Option<Instant> {
        self.probing
            .iter()
            .filter_map(|&ck| self.conns.get(ck)?.prober.next_send())
            .min()
    }

    /// Sends the probe packets due by `now`: RTX copies of the newest packets of the
    /// connection's video consumers, in turn.
    pub(super) fn send_probes(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.probing.len() {
            let ck = self.probing[i];
            // A late wake-up catches up, within reason.
            for _ in 0..16 {
                let Some(conn) = self.conns.get(ck) else {
                    break;
                };
                if conn.prober.next_send().is_none_or(|t| t > now) {
                    break;
                }
                match self.send_probe_packet(now, ck) {
                    Some(bytes) => {
                        self.stats.probe_packets.fetch_add(1, Relaxed);
                        self.conns[ck].prober.on_sent(now, bytes);
                    }
                    None => {
                        let conn = &mut self.conns[ck];
                        if let Some(est) = conn.estimate.clone() {
                            conn.prober.abandon(now, &est);
                        }
                        break;
                    }
                }
            }
            if self
                .conns
                .get(ck)
                .is_some_and(|c| c.prober.next_send().is_some())
            {
                i += 1;
            } else {
                self.probing.swap_remove(i);
            }
        }
    }

    fn send_probe_packet(&mut self, now: Instant, ck: ConnKey) -> Option<usize> {
        let conn = self.conns.get(ck)?;
        let videos = conn.track_consumer.values().filter(|&&cid| {
            self.consumers.get(cid).is_some_and(|c| {
                !c.paused
                    && c.selector.current().is_some()
                    && self
                        .producers
                        .get(c.producer)
                        .is_some_and(|p| p.kind() == MediaKind::Video)
            })
        });
        let n = videos.clone().count();
        if n == 0 {
            return None;
        }
        let turn = self.stats.probe_packets.load(Relaxed) as usize % n;
        let cid = *videos.clone().nth(turn)?;
        // Several tries: a copy may have aged out of the cache or predate a layer switch.
        for _ in 0..4 {
            let c = self.consumers.get_mut(cid)?;
            let last = c.rewriter.last_seq()?;
            let back = c.probe_cursor % PROBE_DEPTH;
            c.probe_cursor = c.probe_cursor.wrapping_add(1);
            match self.resend(now, cid, last.wrapping_sub(back), true) {
                Resent::Sent(bytes) => return Some(bytes),
                Resent::NotCached => continue,
                Resent::NoSafeRepair | Resent::Gone => return None,
            }
        }
        None
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
}
