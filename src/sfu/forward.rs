//! The forwarding path and keyframe requests: a packet of a producer layer goes once to each
//! remote node that wants the layer and to every local consumer whose layer choice lets it
//! through; subscribers' feedback (PLI/FIR, NACK, REMB) comes back here. Nothing on this path
//! allocates per packet, locks or logs.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;

use super::egress::{number_for_rtc, send_in_place, OutgoingCopy, SendPath};
use super::keys::{ConnKey, ConsumerKey, ProducerKey};
use super::*;
use super::{producer::*, worker::*};
use crate::media::keyframe::is_keyframe;
use crate::media::layers::Decision;

impl Worker {
    pub(super) fn resolve_ssrc(
        &mut self,
        ck: ConnKey,
        track: &str,
        ssrc: u32,
    ) -> Option<(ProducerKey, u8)> {
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

    pub(super) fn on_rtp(&mut self, now: Instant, ck: ConnKey, track: &str, pkt: rtc::rtp::Packet) {
        self.stats.rtp_in.fetch_add(1, Relaxed);
        let Some((pk, layer)) = self.resolve_ssrc(ck, track, pkt.header.ssrc) else {
            return;
        };
        if let Some(p) = self.producers.get_mut(pk) {
            let clock_rate = p.rtp_codec.clock_rate;
            if let Some(l) = p.layers.get_mut(usize::from(layer)) {
                let (seq, ts) = (pkt.header.sequence_number, pkt.header.timestamp);
                l.reception.on_packet(now, seq, ts, clock_rate);
                // rtc's NACK generator asks the publisher for what is missing; this notes
                // what it never repaired (the tick asks for a keyframe instead, see
                // `UNREPAIRED_LOSS_KEYFRAME`).
                if l.cache.is_some() {
                    l.repair.track(now, seq);
                }
            }
        }
        self.forward(now, pk, layer, pkt);
    }

    /// Hands one packet of one producer layer to its consumers here and to the remote nodes
    /// that want it. The same path serves local producers and producers piped in.
    pub(super) fn forward(
        &mut self,
        now: Instant,
        pk: ProducerKey,
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
            cfg,
            batch,
            tcp_frames,
            tcp_open,
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
        crate::media::extensions::strip(&mut pkt.header);
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
        let keyframe = producer.codec.is_some_and(|c| is_keyframe(c, &pkt.payload));
        if keyframe {
            stats.keyframes_in.fetch_add(1, Relaxed);
        }
        if let (Some(tap), Some(sink)) = (&mut producer.tap, &cfg.recording) {
            tap.on_packet(sink, now, layer, keyframe, &pkt);
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
            if let Some(since) = c.awaiting_first.take() {
                stats
                    .first_frame
                    .observe(now.duration_since(since).as_secs_f64());
            }
            if before.is_some() && before != c.selector.current() {
                stats.layer_switches.fetch_add(1, Relaxed);
            }
            // Only a simulcast consumer has layers to report.
            if before != c.selector.current() && producer.layers.len() > 1 {
                if let Some(p) = participants.get(c.participant) {
                    p.send(SfuEvent::ConsumerLayerChanged {
                        consumer_id: c.id.clone(),
                        layer,
                        reason: c.selector.reason(),
                        estimate_bps: c.selector.bandwidth(),
                    });
                }
            }
            let _copy = crate::alloc::CopyPath::enter();
            match conn.send_path {
                SendPath::InPlace(_) => {
                    let vp8 = c.vp8_edit(producer.codec, &pkt.payload);
                    let copy = OutgoingCopy {
                        marker: pkt.header.marker,
                        payload_type: c.payload_type,
                        seq: out_seq,
                        timestamp: out_ts,
                        ssrc: c.ssrc,
                        kept: &kept,
                        ids: c.extensions,
                        twcc: None,
                        osn: None,
                        payload: &pkt.payload,
                        vp8,
                    };
                    let sent =
                        send_in_place(now, c, conn, batch, tcp_frames, tcp_open, stats, copy);
                    if sent.is_some() {
                        c.sent.on_packet(now, out_seq, out_ts, pkt.payload.len());
                        stats.rtp_forwarded.fetch_add(1, Relaxed);
                    }
                }
                SendPath::Rtc => {
                    let mut out = pkt.clone();
                    c.renumber_payload(producer.codec, &mut out);
                    out.header.ssrc = c.ssrc;
                    out.header.sequence_number = out_seq;
                    out.header.timestamp = out_ts;
                    out.header.payload_type = c.payload_type;
                    set_forwarded_extensions(&mut out, &kept, &c.extensions);
                    number_for_rtc(now, conn, c.twcc_id, &mut out);
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
                // Not up yet: nothing may be sent on the connection's SSRCs.
                SendPath::Pending => {}
            }
        }
    }

    pub(super) fn on_subscriber_rtcp(
        &mut self,
        now: Instant,
        ck: ConnKey,
        track: &str,
        pkts: &[Box<dyn rtc::rtcp::Packet>],
    ) {
        let Some(conn) = self.conns.get(ck) else {
            return;
        };
        if conn.kind != TransportKind::Subscribe {
            return;
        }
        // Transport-wide feedback is about the connection, whichever track it came on.
        for p in pkts {
            if let Some(fb) = p.as_any().downcast_ref::<TransportLayerCc>() {
                self.on_transport_feedback(now, ck, fb);
            }
        }
        let Some(conn) = self.conns.get(ck) else {
            return;
        };
        let Some(&cid) = conn.track_consumer.get(track) else {
            return;
        };
        for p in pkts {
            let any = p.as_any();
            if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                self.stats.keyframe_requests_received.fetch_add(1, Relaxed);
                self.request_keyframe_for_consumer(now, cid);
            } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                self.on_receiver_report(now, ck, &rr.reports);
            } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
                for pair in &nack.nacks {
                    self.stats
                        .nacks_received
                        .fetch_add(1 + u64::from(pair.lost_packets.count_ones()), Relaxed);
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

    /// A subscriber's reception reports on the streams this node sends it: loss, jitter and,
    /// when the report answers one of our sender reports, the round-trip time.
    fn on_receiver_report(
        &mut self,
        now: Instant,
        ck: ConnKey,
        reports: &[rtc::rtcp::reception_report::ReceptionReport],
    ) {
        let Some(conn) = self.conns.get(ck) else {
            return;
        };
        let now_ntp = self.wall_clock.ntp(now);
        for r in reports {
            let Some(c) = conn
                .track_consumer
                .values()
                .map(|&cid| &self.consumers[cid])
                .find(|c| c.ssrc == r.ssrc)
            else {
                continue; // an RTX stream, or one already closed
            };
            let q = crate::media::reception::from_report(
                r.fraction_lost,
                r.jitter,
                c.clock_rate,
                r.last_sender_report,
                r.delay,
                now_ntp,
            );
            self.stats.loss_downstream.observe(q.loss);
            self.stats.jitter_downstream.observe(q.jitter);
            if let Some(rtt) = q.rtt {
                self.stats.rtt_downstream.observe(rtt);
            }
        }
    }

    pub(super) fn request_keyframe_for_consumer(&mut self, now: Instant, cid: ConsumerKey) {
        let Some(c) = self.consumers.get(cid) else {
            return;
        };
        let (pk, layer) = (c.producer, c.selector.target());
        self.request_keyframe(now, pk, layer);
    }

    /// Sends a PLI for one layer of a producer, at most once per interval.
    pub(super) fn request_keyframe(&mut self, now: Instant, pk: ProducerKey, layer: u8) {
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
}
