//! Consumers: one outgoing copy of a producer to one subscriber, with its own SSRC, sequence
//! and timestamp space, simulcast layer choice and retransmissions.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpRtxParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection};

use super::egress::{number_for_rtc, send_in_place, OutgoingCopy, SendPath};
use super::keys::{ConnKey, ConsumerKey, ParticipantKey, ProducerKey};
use super::*;
use super::{producer::*, transport::*, worker::*};
use crate::media::extensions::OutgoingExtensions;
use crate::media::layers::LayerSelector;
use crate::media::rewrite::RtpRewriter;
use crate::media::vp8::Vp8Rewriter;
use crate::media::Codec;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_RTX;

pub(super) struct Consumer {
    pub(super) id: ConsumerId,
    pub(super) producer: ProducerKey,
    pub(super) participant: ParticipantKey,
    pub(super) conn: ConnKey,
    pub(super) sender: RTCRtpSenderId,
    pub(super) ssrc: u32,
    pub(super) payload_type: u8,
    pub(super) extensions: OutgoingExtensions,
    pub(super) rewriter: RtpRewriter,
    /// VP8 picture IDs continuous across layer switches (used when the producer is VP8).
    pub(super) vp8: Vp8Rewriter,
    pub(super) selector: LayerSelector,
    pub(super) paused: bool,
    pub(super) track_id: String,
    /// Which recent packet the next bandwidth probe copies (counts back from the newest).
    pub(super) probe_cursor: u16,
    /// RTP clock of the stream (receiver reports state jitter in its units).
    pub(super) clock_rate: u32,
    /// When the subscription was made, until its first packet went out (first-frame time).
    pub(super) awaiting_first: Option<Instant>,
    /// The transport-wide sequence number's extension id, when negotiated.
    pub(super) twcc_id: Option<u8>,
    /// The RTX stream repairs and probes go on, when negotiated (copies sent in place).
    pub(super) rtx: Option<super::egress::RtxStream>,
    /// What went out in place, for sender reports.
    pub(super) sent: super::egress::Sent,
    /// Without RTX but numbered transport-wide: each recent copy's transport-wide number, so a
    /// repair on the primary SSRC is byte-identical (indexed by sequence number; empty until
    /// needed).
    pub(super) twcc_log: Vec<Option<(u16, u16)>>,
}

/// Copies whose transport-wide numbers are remembered for repairs (as the packet cache).
const TWCC_LOG: usize = super::producer::PACKET_CACHE;

impl Consumer {
    /// Notes the transport-wide number copy `seq` went out with, where a repair will need it.
    pub(super) fn remember_twcc(&mut self, seq: u16, twcc: Option<u16>) {
        let Some(n) = twcc.filter(|_| self.rtx.is_none()) else {
            return;
        };
        if self.twcc_log.is_empty() {
            self.twcc_log = vec![None; TWCC_LOG];
        }
        self.twcc_log[usize::from(seq) % TWCC_LOG] = Some((seq, n));
    }

    /// The transport-wide number copy `seq` went out with, if still remembered.
    pub(super) fn logged_twcc(&self, seq: u16) -> Option<u16> {
        match self.twcc_log.get(usize::from(seq) % TWCC_LOG) {
            Some(Some((s, n))) if *s == seq => Some(*n),
            _ => None,
        }
    }

    /// Renumbers the codec's own frame numbering in a copy about to go through rtc's sender,
    /// after its RTP header went through `rewriter` (so the source generation is current).
    /// Copies the payload when the numbering differs from the producer's, which for a VP8
    /// simulcast consumer is every packet from its first layer switch on; copies sent in place
    /// get the same edit written into their own buffer instead ([`Consumer::vp8_edit`]).
    pub(super) fn renumber_payload(&mut self, codec: Option<Codec>, pkt: &mut rtc::rtp::Packet) {
        if codec != Some(Codec::Vp8) {
            return;
        }
        if let Some(edit) = self.vp8.rewrite(self.rewriter.generation(), &pkt.payload) {
            let mut payload = bytes::BytesMut::from(&pkt.payload[..]);
            edit.apply(&mut payload);
            pkt.payload = payload.freeze();
        }
    }

    /// What a repair of copy `out_seq` resends: the producer's cached packet it was made from
    /// and its output sequence number and timestamp again (`None` once it left the cache or
    /// belongs to an earlier source).
    pub(super) fn cached_copy<'p>(
        &mut self,
        now: Instant,
        producer: &'p Producer,
        out_seq: u16,
    ) -> Option<(&'p CachedPacket, u16, u32)> {
        let (ssrc, seq) = self.rewriter.input_of(out_seq)?;
        let layer = producer.layers.iter().find(|l| l.ssrc == Some(ssrc))?;
        let cached = layer.cache.as_ref()?.get(seq)?;
        let h = &cached.pkt.header;
        let (out_seq, out_ts) =
            self.rewriter
                .rewrite(now, h.ssrc, h.sequence_number, h.timestamp)?;
        Some((cached, out_seq, out_ts))
    }

    /// The VP8 numbering to write over a copy sent in place (see `renumber_payload`).
    pub(super) fn vp8_edit(
        &mut self,
        codec: Option<Codec>,
        payload: &[u8],
    ) -> Option<crate::media::vp8::Vp8Edit> {
        if codec != Some(Codec::Vp8) {
            return None;
        }
        self.vp8.rewrite(self.rewriter.generation(), payload)
    }

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

impl Worker {
    pub(super) fn subscribe(
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
                .new_conn(now, pk, TransportKind::Subscribe, offers_rtx(&offer))
                .map_err(SubscribeError::BadSdp)?,
        };
        let id = ConsumerId::random();
        let nonzero = || loop {
            let s = rand::random::<u32>();
            if s != 0 {
                break s;
            }
        };
        let (ssrc, rtx_ssrc) = (nonzero(), nonzero());
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
                    // Named here so that copies sent in place use the SSRC rtc announces.
                    rtx: Some(RTCRtpRtxParameters { ssrc: rtx_ssrc }),
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
            let twcc_id = params
                .header_extensions
                .iter()
                .find(|e| e.uri == rtc::sdp::extmap::TRANSPORT_CC_URI)
                .and_then(|e| u8::try_from(e.id).ok());
            // RTX is in use when the answer kept an RTX format for the consumer's own one.
            let rtx = payload_type.and_then(|pt| {
                let apt = format!("apt={pt}");
                codecs
                    .iter()
                    .find(|c| {
                        c.rtp_codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_RTX)
                            && c.rtp_codec
                                .sdp_fmtp_line
                                .split(';')
                                .any(|p| p.trim() == apt)
                    })
                    .map(|c| super::egress::RtxStream {
                        ssrc: rtx_ssrc,
                        payload_type: c.payload_type,
                        next_seq: rand::random(),
                    })
            });
            (payload_type, extensions, twcc_id, rtx)
        });
        let (payload_type, extensions, twcc_id, rtx) = negotiated.unwrap_or_default();
        let Some(payload_type) = payload_type else {
            return fail(
                self,
                SubscribeError::BadSdp(format!(
                    "the subscriber does not accept {}",
                    rtp_codec.mime_type
                )),
            );
        };
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
            vp8: Vp8Rewriter::new(),
            selector: if self.conns[ck].estimate.is_some() {
                LayerSelector::for_send_side(max_layer.unwrap_or(top).min(top))
            } else {
                LayerSelector::new(max_layer.unwrap_or(top).min(top))
            },
            paused: false,
            track_id: id.to_string(),
            probe_cursor: 0,
            clock_rate: rtp_codec.clock_rate,
            awaiting_first: (kind == MediaKind::Video).then_some(now),
            twcc_id,
            rtx,
            sent: Default::default(),
            twcc_log: Vec::new(),
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

    pub(super) fn own_consumer(
        &self,
        participant: &ParticipantId,
        id: &ConsumerId,
    ) -> Result<ConsumerKey, ControlError> {
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

    pub(super) fn close_consumer(&mut self, cid: ConsumerKey, producer_gone: bool) {
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

    /// Resends one packet a consumer reported lost, from its producer's cache.
    pub(super) fn retransmit(&mut self, now: Instant, cid: ConsumerKey, out_seq: u16) {
        match self.resend(now, cid, out_seq, false) {
            Resent::Sent(_) => {
                self.stats.rtp_retransmitted.fetch_add(1, Relaxed);
            }
            Resent::NotCached => {
                self.stats.nack_unserved.fetch_add(1, Relaxed);
            }
            Resent::NoSafeRepair => {
                self.stats.nack_unserved_no_rtx.fetch_add(1, Relaxed);
            }
            Resent::Gone => {}
        }
    }

    /// Sends the copy of `out_seq` again from the producer's cache: on the RTX stream when the
    /// subscriber negotiated one, else on the consumer's own SSRC as a byte-identical copy
    /// (never when transport-wide numbering would make it differ, see `sfu::rtx`). A probe
    /// (`rtx_only`) goes on RTX or not at all.
    pub(super) fn resend(
        &mut self,
        now: Instant,
        cid: ConsumerKey,
        out_seq: u16,
        rtx_only: bool,
    ) -> Resent {
        let _copy = crate::alloc::CopyPath::enter();
        let Some(c) = self.consumers.get_mut(cid) else {
            return Resent::Gone;
        };
        let Some(conn) = self.conns.get_mut(c.conn) else {
            return Resent::Gone;
        };
        match conn.send_path {
            SendPath::InPlace(_) => return self.resend_in_place(now, cid, out_seq, rtx_only),
            SendPath::Pending => return Resent::Gone,
            SendPath::Rtc => {}
        }
        let repairs = conn.repairs.clone();
        let rtx = repairs.as_ref().is_some_and(|r| r.rtx());
        if (rtx_only && !rtx) || !repairs.as_ref().is_none_or(|r| r.can_repair()) {
            return Resent::NoSafeRepair;
        }
        let Some(producer) = self.producers.get(c.producer) else {
            return Resent::Gone;
        };
        let codec = producer.codec;
        let Some((cached, out_seq, out_ts)) = c.cached_copy(now, producer, out_seq) else {
            return Resent::NotCached;
        };
        let CachedPacket { mut pkt, kept } = cached.clone();
        c.renumber_payload(codec, &mut pkt);
        pkt.header.ssrc = c.ssrc;
        pkt.header.sequence_number = out_seq;
        pkt.header.timestamp = out_ts;
        pkt.header.payload_type = c.payload_type;
        set_forwarded_extensions(&mut pkt, &kept, &c.extensions);
        if rtx {
            super::rtx::mark(&mut pkt);
        }
        if rtx {
            // On RTX every copy has an index of its own, so it gets a number of its own.
            number_for_rtc(now, conn, c.twcc_id, &mut pkt);
        }
        let size = pkt.payload.len() + 40;
        let ck = c.conn;
        let mut written = false;
        if let Some(mut sender) = conn.pc.rtp_sender(c.sender) {
            written = crate::alloc::in_rtc(|| sender.write_rtp(now, pkt)).is_ok();
        }
        self.mark_dirty(ck);
        if written {
            Resent::Sent(size)
        } else {
            Resent::Gone
        }
    }
}

impl Worker {
    /// [`Worker::resend`] on a connection sending in place: on the consumer's RTX stream, or
    /// without RTX as a byte-identical copy of the original (same transport-wide number; one
    /// whose number is no longer known is not sent).
    fn resend_in_place(
        &mut self,
        now: Instant,
        cid: ConsumerKey,
        out_seq: u16,
        rtx_only: bool,
    ) -> Resent {
        let Worker {
            consumers,
            conns,
            producers,
            batch,
            tcp_frames,
            tcp_open,
            stats,
            ..
        } = self;
        let Some(c) = consumers.get_mut(cid) else {
            return Resent::Gone;
        };
        let Some(conn) = conns.get_mut(c.conn) else {
            return Resent::Gone;
        };
        if rtx_only && c.rtx.is_none() {
            return Resent::NoSafeRepair;
        }
        let Some(producer) = producers.get(c.producer) else {
            return Resent::Gone;
        };
        let Some((CachedPacket { pkt, kept }, out_seq, out_ts)) =
            c.cached_copy(now, producer, out_seq)
        else {
            return Resent::NotCached;
        };
        let vp8 = c.vp8_edit(producer.codec, &pkt.payload);
        let mut copy = OutgoingCopy {
            marker: pkt.header.marker,
            payload_type: c.payload_type,
            seq: out_seq,
            timestamp: out_ts,
            ssrc: c.ssrc,
            kept,
            ids: c.extensions,
            twcc: None,
            osn: None,
            payload: &pkt.payload,
            vp8,
        };
        if let Some(rtx) = &mut c.rtx {
            copy.osn = Some(out_seq);
            copy.ssrc = rtx.ssrc;
            copy.payload_type = rtx.payload_type;
            copy.seq = rtx.next_seq;
            rtx.next_seq = rtx.next_seq.wrapping_add(1);
        } else if conn.send_side.is_some() && c.twcc_id.is_some() {
            match (c.twcc_id, c.logged_twcc(out_seq)) {
                (Some(id), Some(n)) => copy.twcc = Some((id, n)),
                _ => return Resent::NoSafeRepair,
            }
        }
        match send_in_place(now, c, conn, batch, tcp_frames, tcp_open, stats, copy) {
            Some(size) => Resent::Sent(size),
            None => Resent::Gone,
        }
    }
}

/// What became of a request to send a packet again.
pub(super) enum Resent {
    /// Sent; about this many bytes on the wire.
    Sent(usize),
    /// The packet is no longer (or never was) in the producer's cache.
    NotCached,
    /// The subscriber has no RTX and a copy on its own SSRC would not be byte-identical.
    NoSafeRepair,
    /// The consumer or its connection is gone.
    Gone,
}
