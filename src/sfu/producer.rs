//! Producers: incoming tracks, published by a participant here or piped in from another
//! node, each with its layers, their packet caches and keyframe throttles.

use std::time::Instant;

use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::RTCRtpReceiverId;

use super::keys::{ConnKey, ConsumerKey, ParticipantKey, ProducerKey};
use super::*;
use super::{transport::*, worker::*};
use crate::media::cache::PacketCache;
use crate::media::extensions::{IncomingExtensions, OutgoingExtensions, FORWARDED};
use crate::media::layers::LayerSelector;
use crate::media::repair::{GapRepair, KeyframeThrottle};

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
pub(super) fn set_forwarded_extensions(
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
pub(super) const PACKET_CACHE: usize = 512;

pub(super) struct LayerStat {
    pub(super) ssrc: Option<u32>,
    pub(super) bytes: u64,
    pub(super) bitrate: Option<u64>,
    pub(super) last_packet: Option<Instant>,
    pub(super) keyframe_requests: KeyframeThrottle,
    /// One copy of recent packets for every consumer's NACKs; video only.
    pub(super) cache: Option<PacketCache<CachedPacket>>,
    /// Gaps in what arrives from a pipe, asked for again until repaired.
    pub(super) repair: GapRepair,
    /// Loss and jitter of what the publisher sends (local producers).
    pub(super) reception: crate::media::reception::Reception,
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
            reception: Default::default(),
        }
    }
}

/// Where a producer's media comes from.
pub(super) enum Origin {
    /// A participant on this node, through its publish peer connection.
    Local {
        participant: ParticipantKey,
        conn: ConnKey,
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
    pub(super) kind: MediaKind,
    pub(super) codec: Option<Codec>,
    pub(super) rtp_codec: RTCRtpCodec,
    pub(super) rids: Vec<String>,
    pub(super) layers: Vec<LayerStat>,
    pub(super) paused: bool,
    pub(super) consumers: Vec<ConsumerKey>,
    pub(super) extensions: IncomingExtensions,
    /// Copies packets to the recording, in a session recorded here.
    pub(super) tap: Option<super::record::RecordTap>,
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
            tap: None,
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

    pub(super) fn local_participant(&self) -> Option<ParticipantKey> {
        match self.origin {
            Origin::Local { participant, .. } => Some(participant),
            Origin::Pipe { .. } => None,
        }
    }
}

impl Worker {
    pub(super) fn publish(
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
                .new_conn(now, pk, TransportKind::Publish, false)
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

    /// Pauses or resumes a producer; consumers resume on a keyframe without a numbering gap.
    pub(super) fn set_producer_paused(&mut self, pk: ProducerKey, paused: bool) {
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

    pub(super) fn own_producer(
        &self,
        participant: &ParticipantId,
        id: &ProducerId,
    ) -> Result<ProducerKey, ControlError> {
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

    /// Registers a new producer with its session; returns its key.
    pub(super) fn insert_producer(&mut self, producer: Producer) -> ProducerKey {
        let (id, session) = (producer.id.clone(), producer.session.clone());
        let local_stream =
            matches!(producer.origin, Origin::Local { .. }).then_some(producer.stream);
        let pk = self.producers.insert(producer);
        if let Some(stream) = local_stream {
            self.local_streams.insert(stream, pk);
        }
        self.producer_ids.insert(id, pk);
        self.session_producers.entry(session).or_default().push(pk);
        self.tap(pk);
        self.update_gauges();
        pk
    }

    pub(super) fn producer_info(&self, pk: ProducerKey) -> ProducerInfo {
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

    pub(super) fn close_producer(&mut self, prk: ProducerKey) {
        if !self.producers.contains(prk) {
            return;
        }
        let consumers = self.producers[prk].consumers.clone();
        for cid in consumers {
            self.close_consumer(cid, true);
        }
        let mut p = self.producers.remove(prk);
        if let (Some(tap), Some(sink)) = (p.tap.take(), &self.cfg.recording) {
            tap.close(sink);
        }
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
}
