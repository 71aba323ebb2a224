//! Recording taps: in a session recorded on this node, every producer (published here or
//! piped in from another node) copies one layer, the best one flowing, switched on
//! keyframes like any consumer's, to the node's media writer
//! ([`crate::compliance::media`]). The copy shares the packet's payload (reference-counted)
//! and goes through a bounded queue without waiting: a full queue drops the packet and
//! counts it there.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::keys::ProducerKey;
use super::producer::Producer;
use super::worker::Worker;
use super::{MeshEvent, SessionId};
use crate::compliance::media::{MediaInput, MediaSink, TrackId, TrackOpen};
use crate::media::layers::Layer;
use crate::media::layers::{Decision, LayerSelector};

pub(super) struct RecordTap {
    track: TrackId,
    /// The track's description, until the writer has it (nothing is copied before).
    open: Option<TrackOpen>,
    pub(super) selector: LayerSelector,
    /// Raised by the writer after a gap.
    wants_keyframe: Arc<AtomicBool>,
}

impl RecordTap {
    /// A tap for `p`, or `None` for a codec the recorder cannot store.
    pub(super) fn new(sink: &MediaSink, p: &Producer) -> Option<Self> {
        let codec = p.codec?;
        let wants_keyframe = Arc::new(AtomicBool::new(false));
        let track = sink.new_track();
        let top = p.layers.len().saturating_sub(1) as Layer;
        Some(Self {
            track,
            open: Some(TrackOpen {
                track,
                session: p.session.clone(),
                participant: p.owner.participant_id.clone(),
                user: p.owner.user_id.clone(),
                role: p.owner.role,
                producer: p.id.clone(),
                codec,
                channels: p.rtp_codec.channels.max(1) as u8,
                wants_keyframe: wants_keyframe.clone(),
            }),
            selector: LayerSelector::new(top),
            wants_keyframe,
        })
    }

    /// One packet of the producer's `layer`, as it is forwarded.
    pub(super) fn on_packet(
        &mut self,
        sink: &MediaSink,
        now: Instant,
        layer: u8,
        keyframe: bool,
        pkt: &rtc::rtp::Packet,
    ) {
        if let Some(open) = self.open.take() {
            if !sink.offer(MediaInput::Open(open.clone())) {
                self.open = Some(open);
                return;
            }
        }
        if self.selector.on_packet(layer, keyframe) == Decision::Drop {
            return;
        }
        sink.offer(MediaInput::Packet {
            track: self.track,
            layer,
            seq: pkt.header.sequence_number,
            timestamp: pkt.header.timestamp,
            marker: pkt.header.marker,
            payload: pkt.payload.clone(),
            at: now,
        });
    }

    pub(super) fn sender_report(&self, sink: &MediaSink, layer: u8, ntp: u64, rtp: u32) {
        if self.open.is_none() {
            sink.offer(MediaInput::SenderReport {
                track: self.track,
                layer,
                ntp,
                rtp,
            });
        }
    }

    /// True when the recording needs a keyframe of the tapped layer (at the start, after a
    /// layer change or a gap).
    pub(super) fn wants_keyframe(&self) -> bool {
        self.selector.wants_keyframe() || self.wants_keyframe.swap(false, Relaxed)
    }

    pub(super) fn close(self, sink: &MediaSink) {
        if self.open.is_none() {
            sink.offer(MediaInput::Close { track: self.track });
        }
    }
}

impl Worker {
    /// Starts recording a producer of a recorded session.
    pub(super) fn tap(&mut self, pk: ProducerKey) {
        let Some(sink) = &self.cfg.recording else {
            return;
        };
        let Some(p) = self.producers.get_mut(pk) else {
            return;
        };
        if p.tap.is_none() && self.recorded.contains(&p.session) {
            p.tap = RecordTap::new(sink, p);
        }
    }

    /// Holds a session recorded here for participants on other nodes, or lets it go.
    pub(super) fn record_seat(&mut self, session: SessionId, on: bool) {
        if !on {
            self.record_seats.remove(&session);
            self.end_if_empty(&session);
            return;
        }
        if self.cfg.recording.is_none() || !self.record_seats.insert(session.clone()) {
            return;
        }
        if !self.routers.contains_key(&session) {
            self.routers.insert(session.clone(), Vec::new());
            // Other nodes announce the session's producers from now on.
            self.mesh_event(MeshEvent::SessionActive(session.clone()));
        }
        self.record_session(&session);
        self.update_gauges();
    }

    /// Records `session` here from now on: every producer it has gets a tap.
    pub(super) fn record_session(&mut self, session: &SessionId) {
        if !self.recorded.insert(session.clone()) {
            return;
        }
        for pk in self.producers_of(session) {
            self.tap(pk);
        }
    }

    /// A sender report from a publisher, for the recording of the stream it describes.
    pub(super) fn on_sender_report(
        &mut self,
        ck: super::keys::ConnKey,
        sr: &rtc::rtcp::sender_report::SenderReport,
    ) {
        let Some(&(pk, layer)) = self.conns.get(ck).and_then(|c| c.ssrc_route.get(&sr.ssrc)) else {
            return;
        };
        let Some(p) = self.producers.get(pk) else {
            return;
        };
        if let (Some(tap), Some(sink)) = (&p.tap, &self.cfg.recording) {
            tap.sender_report(sink, layer, sr.ntp_time, sr.rtp_time);
        }
        // Nodes that receive the layer record it too, wherever their recording is.
        let events: Vec<MeshEvent> = p
            .pipes_out
            .iter()
            .filter(|(_, wanted)| wanted & (1 << layer) != 0)
            .map(|&(pipe, _)| MeshEvent::SenderReport {
                pipe,
                producer: p.id.clone(),
                layer,
                ntp: sr.ntp_time,
                rtp: sr.rtp_time,
            })
            .collect();
        for ev in events {
            self.mesh_event(ev);
        }
    }
}
