//! The worker core's side of pipes (its pipe transports): producers piped in from other
//! nodes, local producers piped out, media frames, keyframe requests and loss repair across
//! the pipe. The mesh (control stream, connection lifecycle) drives this through commands;
//! the frames it produces leave in `Worker::pipe_out`, which the driver hands to the QUIC
//! connection, so this code never touches a socket or reads a clock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use rtc::shared::marshal::Unmarshal;

use super::keys::ProducerKey;
use super::producer::{LayerStat, Origin, Producer};
use super::worker::Worker;
use super::{MediaKind, MeshEvent, PipeId, SfuEvent};
use crate::ids::{NodeId, ProducerId, SessionId};
use crate::media::extensions::{IncomingExtensions, FORWARDED};
use crate::media::Codec;
use crate::proto::pipe::{
    Datagram, MediaFrame, NackFrame, ProducerAnnouncement, RtpParts, FRAME_HEADER,
};

/// Counters of one pipe, shared with the mesh for reporting.
#[derive(Debug, Default)]
pub struct PipeCounters {
    pub datagrams_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Datagrams quinn refused (too large, connection gone).
    pub send_failed: AtomicU64,
    /// Datagrams sent while quinn's send buffer was full: quinn drops the oldest queued
    /// datagrams to make room, without saying so.
    pub send_displaced: AtomicU64,
    /// Sequence numbers found missing on arrival and asked for again.
    pub nacked: AtomicU64,
    /// Packets resent on request of the other end.
    pub retransmitted: AtomicU64,
}

/// A pipe as the worker uses it: the connection to send datagrams on, and its counters.
#[derive(Clone)]
pub struct PipeLink {
    pub conn: quinn::Connection,
    pub node: NodeId,
    pub counters: Arc<PipeCounters>,
}

/// A pipe as the worker core knows it: which node is behind it, its counters, and its
/// round-trip time as the driver last measured it.
pub(super) struct PipeState {
    pub(super) node: NodeId,
    pub(super) counters: Arc<PipeCounters>,
    pub(super) rtt: Duration,
}

/// Size of the buffer pipe frames are cut from.
const ARENA_CHUNK: usize = 64 * 1024;

/// A request to resend `seqs` of a stream layer, queued for `pipe`.
fn queue_nack(
    out: &mut Vec<(PipeId, Bytes)>,
    state: &PipeState,
    pipe: PipeId,
    stream: u32,
    layer: u8,
    seqs: Vec<u16>,
) {
    state.counters.nacked.fetch_add(seqs.len() as u64, Relaxed);
    out.push((
        pipe,
        NackFrame {
            stream,
            layer,
            seqs,
        }
        .encode(),
    ));
}

/// One RTP packet of a producer layer as a media frame, cut from `arena` (one allocation per
/// ~64 KiB of frames, not one per frame). Forwarded header extensions travel under wire ids
/// 1.. (their index in `FORWARDED` plus one).
pub(super) fn media_frame(
    arena: &mut BytesMut,
    stream: u32,
    layer: u8,
    pkt: &rtc::rtp::Packet,
    kept: &[Option<Bytes>; FORWARDED.len()],
) -> Bytes {
    let mut ext: [(u8, &[u8]); FORWARDED.len()] = [(0, &[]); FORWARDED.len()];
    let mut n = 0;
    for (i, e) in kept.iter().enumerate() {
        if let Some(e) = e.as_ref().filter(|e| (1..=16).contains(&e.len())) {
            ext[n] = (i as u8 + 1, e);
            n += 1;
        }
    }
    let h = &pkt.header;
    let parts = RtpParts {
        marker: h.marker,
        payload_type: h.payload_type,
        sequence_number: h.sequence_number,
        timestamp: h.timestamp,
        ssrc: h.ssrc,
        csrc: &h.csrc,
        extensions: &ext[..n],
        payload: &pkt.payload,
    };
    let size = FRAME_HEADER + parts.size();
    if arena.capacity() < size {
        arena.reserve(ARENA_CHUNK.max(size));
    }
    MediaFrame::put_header(arena, stream, layer);
    parts.put(arena);
    arena.split().freeze()
}

fn wire_extensions() -> IncomingExtensions {
    IncomingExtensions::new(
        FORWARDED
            .iter()
            .enumerate()
            .map(|(i, uri)| (*uri, i as u16 + 1)),
    )
}

impl Worker {
    /// Queues news for the mesh.
    pub(super) fn mesh_event(&mut self, ev: MeshEvent) {
        self.mesh_out.push(ev);
    }

    pub(super) fn pipe_up(&mut self, pipe: PipeId, node: NodeId, counters: Arc<PipeCounters>) {
        tracing::info!(pipe = %pipe, node = %node, "pipe up");
        self.pipes.insert(
            pipe,
            PipeState {
                node,
                counters,
                rtt: Duration::from_millis(100),
            },
        );
    }

    /// The driver's latest round-trip measurement of a pipe (it paces resend requests).
    pub(super) fn set_pipe_rtt(&mut self, pipe: PipeId, rtt: Duration) {
        if let Some(p) = self.pipes.get_mut(&pipe) {
            p.rtt = rtt;
        }
    }

    /// Tears down everything that came or went through a closed pipe.
    pub(super) fn pipe_down(&mut self, pipe: PipeId) {
        let Some(state) = self.pipes.remove(&pipe) else {
            return;
        };
        // Participants known through this pipe are gone with it.
        let gone: Vec<(SessionId, crate::ids::ParticipantId)> = self
            .remote_participants
            .iter()
            .flat_map(|(s, list)| {
                list.iter()
                    .filter(|(q, _)| *q == pipe)
                    .map(move |(_, p)| (s.clone(), p.participant_id.clone()))
            })
            .collect();
        for (session, p) in gone {
            self.remote_participant_left(&session, &p);
        }
        let piped_in: Vec<ProducerKey> = self
            .producers
            .iter()
            .filter(|(_, p)| matches!(p.origin, Origin::Pipe { pipe: q, .. } if q == pipe))
            .map(|(k, _)| k)
            .collect();
        for pk in piped_in {
            self.close_producer(pk);
        }
        for (_, p) in self.producers.iter_mut() {
            p.pipes_out.retain(|(q, _)| *q != pipe);
        }
        tracing::info!(pipe = %pipe, node = %state.node, "pipe down");
    }

    /// A producer of another node, announced for a session hosted here.
    pub(super) fn remote_producer(&mut self, pipe: PipeId, a: ProducerAnnouncement) {
        if !self.hosts_session(&a.session) || self.producer_ids.contains_key(&a.producer) {
            return;
        }
        let kind = if a.kind == "audio" {
            MediaKind::Audio
        } else {
            MediaKind::Video
        };
        let rtp_codec = RTCRtpCodec {
            mime_type: a.mime_type.clone(),
            clock_rate: a.clock_rate,
            channels: a.channels,
            sdp_fmtp_line: a.fmtp.clone(),
            rtcp_feedback: vec![],
        };
        let layers = (0..a.rids.len().max(1))
            .map(|_| LayerStat::new(kind))
            .collect();
        let stream = self.allocate_stream();
        let producer = Producer::new(
            a.producer.clone(),
            a.session.clone(),
            crate::sfu::ParticipantInfo {
                participant_id: a.participant.clone(),
                user_id: a.user.clone(),
                role: a.role,
            },
            Origin::Pipe {
                pipe,
                stream: a.stream,
            },
            stream,
            kind,
            Codec::from_mime(&a.mime_type),
            rtp_codec,
            a.rids.clone(),
            layers,
            a.paused,
            wire_extensions(),
        );
        let pk = self.insert_producer(producer);
        self.pipe_streams.insert((pipe, a.stream), pk);
        let info = self.producer_info(pk);
        tracing::info!(producer = %a.producer, pipe = %pipe, "remote producer added");
        self.notify_session(&a.session, a.role, None, SfuEvent::ProducerAdded(info));
    }

    /// A participant of another node joined a session hosted here.
    pub(super) fn remote_participant_joined(
        &mut self,
        pipe: PipeId,
        session: SessionId,
        participant: crate::sfu::ParticipantInfo,
    ) {
        if !self.hosts_session(&session) {
            return;
        }
        let list = self.remote_participants.entry(session.clone()).or_default();
        if list
            .iter()
            .any(|(_, p)| p.participant_id == participant.participant_id)
        {
            return;
        }
        list.push((pipe, participant.clone()));
        self.notify_presence(&session, &participant, true);
    }

    /// A participant of another node left a session hosted here.
    pub(super) fn remote_participant_left(
        &mut self,
        session: &SessionId,
        participant: &crate::ids::ParticipantId,
    ) {
        let Some(list) = self.remote_participants.get_mut(session) else {
            return;
        };
        let Some(i) = list
            .iter()
            .position(|(_, p)| p.participant_id == *participant)
        else {
            return;
        };
        let (_, info) = list.remove(i);
        self.notify_presence(session, &info, false);
    }

    pub(super) fn remote_producer_closed(&mut self, pipe: PipeId, producer: &ProducerId) {
        if let Some(pk) = self.piped_producer(pipe, producer) {
            self.close_producer(pk);
        }
    }

    pub(super) fn remote_producer_paused(
        &mut self,
        pipe: PipeId,
        producer: &ProducerId,
        paused: bool,
    ) {
        if let Some(pk) = self.piped_producer(pipe, producer) {
            self.set_producer_paused(pk, paused);
        }
    }

    pub(super) fn remote_layer_bitrates(
        &mut self,
        pipe: PipeId,
        producer: &ProducerId,
        bitrates: &[Option<u64>],
    ) {
        if let Some(pk) = self.piped_producer(pipe, producer) {
            for (l, b) in self.producers[pk].layers.iter_mut().zip(bitrates) {
                l.bitrate = *b;
            }
        }
    }

    /// The origin's sender report for a piped-in producer: for its recording here.
    pub(super) fn remote_sender_report(
        &mut self,
        pipe: PipeId,
        producer: &ProducerId,
        layer: u8,
        ntp: u64,
        rtp: u32,
    ) {
        let (Some(pk), Some(sink)) = (self.piped_producer(pipe, producer), &self.cfg.recording)
        else {
            return;
        };
        if let Some(tap) = &self.producers[pk].tap {
            tap.sender_report(sink, layer, ntp, rtp);
        }
    }

    fn piped_producer(&self, pipe: PipeId, producer: &ProducerId) -> Option<ProducerKey> {
        let pk = *self.producer_ids.get(producer)?;
        matches!(self.producers[pk].origin, Origin::Pipe { pipe: q, .. } if q == pipe).then_some(pk)
    }

    fn local_producer(&self, producer: &ProducerId) -> Option<ProducerKey> {
        let pk = *self.producer_ids.get(producer)?;
        matches!(self.producers[pk].origin, Origin::Local { .. }).then_some(pk)
    }

    /// The node behind `pipe` wants `layers` of a local producer (0 = stop).
    pub(super) fn pipe_consume(
        &mut self,
        now: Instant,
        pipe: PipeId,
        producer: &ProducerId,
        layers: u32,
    ) {
        let Some(pk) = self.local_producer(producer) else {
            return;
        };
        let p = &mut self.producers[pk];
        let before = p
            .pipes_out
            .iter()
            .find(|(q, _)| *q == pipe)
            .map(|(_, l)| *l)
            .unwrap_or(0);
        p.pipes_out.retain(|(q, _)| *q != pipe);
        if layers != 0 {
            p.pipes_out.push((pipe, layers));
        }
        // Newly wanted layers start on a keyframe at the far end.
        let added = layers & !before;
        for layer in 0..32u8 {
            if added & (1 << layer) != 0 {
                self.request_keyframe(now, pk, layer);
            }
        }
    }

    pub(super) fn pipe_keyframe(&mut self, now: Instant, producer: &ProducerId, layer: u8) {
        if let Some(pk) = self.local_producer(producer) {
            self.request_keyframe(now, pk, layer);
        }
    }

    /// Resends packets the far end of `pipe` reported missing, from the producer's cache.
    fn pipe_nack(&mut self, pipe: PipeId, nack: &NackFrame) {
        let Worker {
            local_streams,
            pipes,
            producers,
            pipe_arena,
            pipe_out,
            ..
        } = self;
        let Some(&pk) = local_streams.get(&nack.stream) else {
            return;
        };
        let (Some(link), Some(p)) = (pipes.get(&pipe), producers.get(pk)) else {
            return;
        };
        let Some(cache) = p
            .layers
            .get(nack.layer as usize)
            .and_then(|l| l.cache.as_ref())
        else {
            return;
        };
        for &seq in &nack.seqs {
            if let Some(c) = cache.get(seq) {
                pipe_out.push((
                    pipe,
                    media_frame(pipe_arena, p.stream, nack.layer, &c.pkt, &c.kept),
                ));
                link.counters.retransmitted.fetch_add(1, Relaxed);
            }
        }
    }

    pub(super) fn pipe_session_ended(&mut self, pipe: PipeId, session: &SessionId) {
        if let Some(list) = self.session_producers.get(session) {
            for &pk in list {
                self.producers[pk].pipes_out.retain(|(q, _)| *q != pipe);
            }
        }
    }

    /// One media frame from a pipe: repair gaps, then forward like any other packet.
    pub(super) fn handle_pipe_datagram(&mut self, now: Instant, pipe: PipeId, data: Bytes) {
        let frame = match Datagram::decode(&data) {
            Ok(Datagram::Media(f)) => (f.stream, f.layer),
            Ok(Datagram::Nack(n)) => {
                self.pipe_nack(pipe, &n);
                return;
            }
            Err(_) => {
                self.stats.pipe_frames_bad.fetch_add(1, Relaxed);
                return;
            }
        };
        let (stream, layer) = frame;
        let Some(&pk) = self.pipe_streams.get(&(pipe, stream)) else {
            // A stream we stopped consuming (frames in flight) or that no worker here knows.
            self.stats.pipe_frames_unknown.fetch_add(1, Relaxed);
            return;
        };
        let mut rtp = data.slice(FRAME_HEADER..);
        let Ok(pkt) = rtc::rtp::Packet::unmarshal(&mut rtp) else {
            self.stats.pipe_frames_bad.fetch_add(1, Relaxed);
            return;
        };
        self.stats.pipe_frames_in.fetch_add(1, Relaxed);
        if let Some(link) = self.pipes.get(&pipe) {
            link.counters.datagrams_in.fetch_add(1, Relaxed);
            link.counters.bytes_in.fetch_add(data.len() as u64, Relaxed);
        }
        let p = &mut self.producers[pk];
        let Some(l) = p.layers.get_mut(layer as usize) else {
            return;
        };
        l.ssrc = Some(pkt.header.ssrc);
        let mut gap = Vec::new();
        l.repair
            .on_packet(now, pkt.header.sequence_number, &mut gap);
        if !gap.is_empty() {
            if let Some(link) = self.pipes.get(&pipe) {
                queue_nack(&mut self.pipe_out, link, pipe, stream, layer, gap);
            }
        }
        self.forward(now, pk, layer, pkt);
    }

    /// Every tick: ask origins for exactly the layers consumers here need, and tell remote
    /// consumers of local producers their layers' bitrates (once a second).
    pub(super) fn pipe_tick(&mut self, now: Instant, measured: bool) {
        let mut events = Vec::new();
        for (_, p) in self.producers.iter_mut() {
            match p.origin {
                Origin::Pipe { pipe, stream } => {
                    // Ask again for what is still missing after a round trip.
                    if let Some(link) = self.pipes.get(&pipe) {
                        let wait = link.rtt.mul_f32(1.5).max(Duration::from_millis(30));
                        for (layer, l) in p.layers.iter_mut().enumerate() {
                            let mut again = Vec::new();
                            l.repair.due(now, wait, &mut again);
                            if !again.is_empty() {
                                queue_nack(
                                    &mut self.pipe_out,
                                    link,
                                    pipe,
                                    stream,
                                    layer as u8,
                                    again,
                                );
                            }
                        }
                    }
                    let mut need = 0u32;
                    if let Some(tap) = &p.tap {
                        need |= 1 << tap.selector.target();
                        if let Some(cur) = tap.selector.current() {
                            need |= 1 << cur;
                        }
                    }
                    for &cid in &p.consumers {
                        let c = &self.consumers[cid];
                        if c.is_paused() {
                            continue;
                        }
                        need |= 1 << c.target_layer();
                        if let Some(cur) = c.current_layer() {
                            need |= 1 << cur;
                        }
                    }
                    if need != p.layers_requested {
                        p.layers_requested = need;
                        events.push(if need == 0 {
                            MeshEvent::StopConsume {
                                pipe,
                                producer: p.id.clone(),
                            }
                        } else {
                            MeshEvent::Consume {
                                pipe,
                                producer: p.id.clone(),
                                layers: need,
                            }
                        });
                    }
                }
                Origin::Local { .. } if measured && p.layers.len() > 1 => {
                    for &(pipe, _) in &p.pipes_out {
                        events.push(MeshEvent::LayerBitrates {
                            pipe,
                            producer: p.id.clone(),
                            bitrates: p.layers.iter().map(|l| l.bitrate).collect(),
                        });
                    }
                }
                Origin::Local { .. } => {}
            }
        }
        for ev in events {
            self.mesh_event(ev);
        }
    }

    /// What the mesh announces for a local producer.
    pub(super) fn announcement(&self, pk: ProducerKey) -> ProducerAnnouncement {
        let p = &self.producers[pk];
        ProducerAnnouncement {
            session: p.session.clone(),
            producer: p.id.clone(),
            stream: p.stream,
            participant: p.owner.participant_id.clone(),
            user: p.owner.user_id.clone(),
            role: p.owner.role,
            kind: match p.kind() {
                MediaKind::Audio => "audio".into(),
                MediaKind::Video => "video".into(),
            },
            mime_type: p.rtp_codec().mime_type.clone(),
            clock_rate: p.rtp_codec().clock_rate,
            channels: p.rtp_codec().channels,
            fmtp: p.rtp_codec().sdp_fmtp_line.clone(),
            rids: p.rids().to_vec(),
            paused: p.paused,
        }
    }
}
