//! From the RTP packets of one stream to whole coded frames, as a recording stores them:
//! VP8, VP9 and H.264 payloads lose their RTP payload descriptors (H.264 NAL units come out
//! length-prefixed, as Matroska's `V_MPEG4/ISO/AVC` wants), Opus packets are frames already.
//!
//! No I/O and no clock: packets go in with their arrival time, frames come out in order once
//! every packet of them is there. A frame whose packets do not all arrive within
//! [`MAX_WAIT`] is given up; after that, video frames are skipped up to the next keyframe
//! (a decoder could not use them) and the caller is told to ask the publisher for one.
//! Hostile payloads never panic: a malformed packet is counted and its frame given up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::media::keyframe::is_keyframe;
use crate::media::Codec;

/// How long an incomplete frame waits for its missing packets (repairs included).
pub const MAX_WAIT: Duration = Duration::from_millis(600);
/// Packets held at most while waiting; beyond this the oldest gap is given up at once.
pub const MAX_PENDING: usize = 2048;
/// Largest frame assembled (a 4K keyframe is well under this).
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// One coded frame, ready for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub rtp_timestamp: u32,
    pub keyframe: bool,
    pub data: Vec<u8>,
    /// When its last packet arrived.
    pub arrived: Instant,
}

/// What was seen of a stream's parameters (for the container's track header).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamInfo {
    /// Picture size from the latest keyframe, where the codec states it plainly (VP8).
    pub size: Option<(u16, u16)>,
    /// H.264 parameter sets from the first keyframe that carried them.
    pub sps: Option<Vec<u8>>,
    pub pps: Option<Vec<u8>>,
}

/// Counts of what was lost or refused on the way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssemblyStats {
    pub frames: u64,
    /// Gaps given up (each may cost several frames).
    pub gaps: u64,
    /// Frames dropped while waiting for a keyframe after a gap.
    pub skipped: u64,
    /// Packets whose payload could not be read.
    pub malformed: u64,
}

struct Pending {
    ts: u32,
    marker: bool,
    payload: Bytes,
    at: Instant,
}

/// Reassembles the frames of one RTP stream (one SSRC).
pub struct FrameAssembler {
    codec: Codec,
    pending: BTreeMap<u64, Pending>,
    /// The extended sequence number the next frame starts at.
    next: Option<u64>,
    /// A frame came out or a gap was given up: `next` is settled.
    started: bool,
    /// Highest extended sequence number seen, for unwrapping.
    highest: Option<u64>,
    /// Video: nothing is emitted before a keyframe (at the start and after a gap).
    want_keyframe: bool,
    /// Set when a keyframe should be asked of the publisher; taken by [`Self::take_keyframe_request`].
    keyframe_request: bool,
    info: StreamInfo,
    stats: AssemblyStats,
}

impl FrameAssembler {
    pub fn new(codec: Codec) -> Self {
        Self {
            codec,
            pending: BTreeMap::new(),
            next: None,
            started: false,
            highest: None,
            want_keyframe: codec.is_video(),
            keyframe_request: false,
            info: StreamInfo::default(),
            stats: AssemblyStats::default(),
        }
    }

    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    pub fn stats(&self) -> AssemblyStats {
        self.stats
    }

    /// True once after a gap cost video frames: the publisher should send a keyframe.
    pub fn take_keyframe_request(&mut self) -> bool {
        std::mem::take(&mut self.keyframe_request)
    }

    fn extend(&mut self, seq: u16) -> u64 {
        let ext = match self.highest {
            // Start far from zero so that packets a little older than the first unwrap.
            None => (1u64 << 32) + seq as u64,
            Some(h) => {
                let delta = seq.wrapping_sub(h as u16) as i16 as i64;
                (h as i64 + delta) as u64
            }
        };
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// One packet of the stream, in whatever order it came.
    pub fn push(&mut self, seq: u16, timestamp: u32, marker: bool, payload: Bytes, at: Instant) {
        let ext = self.extend(seq);
        if self.started && self.next.is_some_and(|n| ext < n) {
            return; // already written or given up: a late repair or a duplicate
        }
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&ext) {
            // Far behind: give up the oldest gap now rather than grow.
            self.give_up_oldest();
        }
        self.pending.entry(ext).or_insert(Pending {
            ts: timestamp,
            marker,
            payload,
            at,
        });
    }

    fn give_up_oldest(&mut self) {
        self.started = true;
        let Some(next) = self.next.or_else(|| self.pending.keys().next().copied()) else {
            return;
        };
        // Skip past the frame at `next` (whatever of it is here) to the next packet held.
        let ts = self.pending.get(&next).map(|p| p.ts);
        let mut to = next + 1;
        while let Some((&s, p)) = self.pending.range(to..).next() {
            if ts.is_some_and(|t| p.ts == t) {
                to = s + 1;
            } else {
                break;
            }
        }
        let kept = self.pending.split_off(&to);
        self.pending = kept;
        self.next = self.pending.keys().next().copied();
        self.lost();
    }

    fn lost(&mut self) {
        self.stats.gaps += 1;
        if self.codec.is_video() {
            if !self.want_keyframe {
                self.keyframe_request = true;
            }
            self.want_keyframe = true;
        }
    }

    /// The next complete frame, if there is one by `now`; call until `None`.
    pub fn pop(&mut self, now: Instant) -> Option<Frame> {
        loop {
            if !self.started {
                // Until something came out, the stream starts at its oldest packet.
                self.next = self.pending.keys().next().copied();
            }
            let next = self.next?;
            let stale = self
                .pending
                .values()
                .map(|p| p.at)
                .min()
                .is_some_and(|t| now.saturating_duration_since(t) > MAX_WAIT);
            match self.frame_at(next) {
                Scan::Complete(end) => {
                    let frame = self.take_frame(next, end);
                    self.next = Some(end + 1);
                    self.started = true;
                    match frame {
                        Some(f) => return Some(f),
                        None => continue,
                    }
                }
                Scan::NotAStart if !self.started && !stale => {
                    // The first packets may come out of order: wait for the frame's start.
                    return None;
                }
                Scan::NotAStart => {
                    // The start of this frame was lost: what is here of it is useless.
                    self.started = true;
                    self.pending.remove(&next);
                    self.next = Some(next + 1);
                    if !self.codec.is_video() {
                        continue;
                    }
                    if !self.want_keyframe {
                        self.lost();
                    }
                    self.advance_to_held();
                }
                Scan::Incomplete if stale || self.pending.len() >= MAX_PENDING => {
                    self.give_up_oldest();
                }
                Scan::Missing if stale || self.pending.len() >= MAX_PENDING => {
                    self.started = true;
                    self.next = self.pending.keys().next().copied();
                    self.lost();
                }
                Scan::Incomplete | Scan::Missing => return None,
            }
        }
    }

    /// After dropping packets: continue from the oldest packet still held, if it is near.
    fn advance_to_held(&mut self) {
        if let (Some(n), Some(&first)) = (self.next, self.pending.keys().next()) {
            if first > n {
                self.next = Some(first);
            }
        }
    }

    fn frame_at(&self, start: u64) -> Scan {
        let Some(first) = self.pending.get(&start) else {
            return Scan::Missing;
        };
        if self.codec == Codec::Opus {
            return Scan::Complete(start);
        }
        if !starts_frame(self.codec, &first.payload) {
            return Scan::NotAStart;
        }
        let mut s = start;
        loop {
            let Some(p) = self.pending.get(&s) else {
                return Scan::Incomplete;
            };
            if p.ts != first.ts {
                // A new frame began without a marker on the last: end the frame before it.
                return Scan::Complete(s - 1);
            }
            if p.marker {
                return Scan::Complete(s);
            }
            s += 1;
        }
    }

    /// Removes packets `start..=end` and makes them a frame; `None` when it cannot be used.
    fn take_frame(&mut self, start: u64, end: u64) -> Option<Frame> {
        let rest = self.pending.split_off(&(end + 1));
        let packets = std::mem::replace(&mut self.pending, rest);
        let first = packets.values().next()?;
        let (ts, keyframe) = (first.ts, is_keyframe(self.codec, &first.payload));
        let arrived = packets.values().map(|p| p.at).max().unwrap_or(first.at);
        debug_assert!(packets.keys().next() == Some(&start));
        if self.want_keyframe && !keyframe {
            self.stats.skipped += 1;
            return None;
        }
        let mut data = Vec::new();
        let mut h264 = H264Nal::default();
        for p in packets.values() {
            let ok = match self.codec {
                Codec::Vp8 => append_vp8(&mut data, &p.payload),
                Codec::Vp9 => append_vp9(&mut data, &p.payload),
                Codec::H264 => h264.append(&mut data, &p.payload, &mut self.info),
                Codec::Opus => {
                    data.extend_from_slice(&p.payload);
                    !p.payload.is_empty()
                }
            };
            if !ok || data.len() > MAX_FRAME_BYTES {
                self.stats.malformed += 1;
                self.lost();
                return None;
            }
        }
        if self.codec == Codec::H264 && !h264.finish() {
            self.stats.malformed += 1;
            self.lost();
            return None;
        }
        if keyframe {
            self.want_keyframe = false;
            if self.codec == Codec::Vp8 {
                if let Some(size) = vp8_size(&data) {
                    self.info.size = Some(size);
                }
            }
        }
        self.stats.frames += 1;
        Some(Frame {
            rtp_timestamp: ts,
            keyframe,
            data,
            arrived,
        })
    }
}

enum Scan {
    /// Every packet from the start to this one (the frame's last) is here.
    Complete(u64),
    /// The packet at the start is here but is not the first of a frame.
    NotAStart,
    /// A packet inside the frame is missing.
    Incomplete,
    /// The packet the next frame starts at is missing.
    Missing,
}

/// Whether this payload is the first packet of a frame.
fn starts_frame(codec: Codec, p: &[u8]) -> bool {
    match codec {
        // S bit with partition 0.
        Codec::Vp8 => p.first().is_some_and(|b| b & 0x10 != 0 && b & 0x0f == 0),
        // B bit (start of a layer frame).
        Codec::Vp9 => p.first().is_some_and(|b| b & 0x08 != 0),
        Codec::H264 => match p.first().map(|b| b & 0x1f) {
            // FU-A: only its start fragment begins a NAL unit.
            Some(28) => p.get(1).is_some_and(|b| b & 0x80 != 0),
            Some(t) => (1..=24).contains(&t),
            None => false,
        },
        Codec::Opus => true,
    }
}

/// Length of the VP8 payload descriptor (RFC 7741) at the start of `p`.
fn vp8_descriptor(p: &[u8]) -> Option<usize> {
    let b0 = *p.first()?;
    let mut at = 1;
    if b0 & 0x80 != 0 {
        let x = *p.get(at)?;
        at += 1;
        if x & 0x80 != 0 {
            let pid = *p.get(at)?;
            at += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1;
        }
        if x & 0x30 != 0 {
            at += 1;
        }
    }
    (at < p.len()).then_some(at)
}

fn append_vp8(out: &mut Vec<u8>, p: &[u8]) -> bool {
    match vp8_descriptor(p) {
        Some(at) => {
            out.extend_from_slice(&p[at..]);
            true
        }
        None => false,
    }
}

/// Width and height from a VP8 keyframe's header (RFC 6386 section 9.1).
fn vp8_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 10 || frame[0] & 1 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let h = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    (w > 0 && h > 0).then_some((w, h))
}

/// Length of the VP9 payload descriptor (RFC 9628) at the start of `p`.
fn vp9_descriptor(p: &[u8]) -> Option<usize> {
    let b0 = *p.first()?;
    let (i, pf, l, f, v) = (
        b0 & 0x80 != 0,
        b0 & 0x40 != 0,
        b0 & 0x20 != 0,
        b0 & 0x10 != 0,
        b0 & 0x02 != 0,
    );
    let mut at = 1;
    if i {
        let pid = *p.get(at)?;
        at += if pid & 0x80 != 0 { 2 } else { 1 };
    }
    if l {
        at += 1;
        if !f {
            at += 1; // TL0PICIDX
        }
    }
    if f && pf {
        // Up to three reference differences, each saying whether another follows.
        for _ in 0..3 {
            let d = *p.get(at)?;
            at += 1;
            if d & 0x01 == 0 {
                break;
            }
        }
    }
    if v {
        let ss = *p.get(at)?;
        at += 1;
        let spatial = ((ss >> 5) + 1) as usize;
        if ss & 0x10 != 0 {
            at += spatial * 4;
        }
        if ss & 0x08 != 0 {
            let groups = *p.get(at)? as usize;
            at += 1;
            for _ in 0..groups {
                let g = *p.get(at)?;
                at += 1 + ((g >> 2) & 0x03) as usize;
            }
        }
    }
    (at < p.len()).then_some(at)
}

fn append_vp9(out: &mut Vec<u8>, p: &[u8]) -> bool {
    match vp9_descriptor(p) {
        Some(at) => {
            out.extend_from_slice(&p[at..]);
            true
        }
        None => false,
    }
}

/// An H.264 frame being rebuilt from single NAL units, STAP-A aggregates and FU-A fragments
/// (RFC 6184), written out with 4-byte lengths.
#[derive(Default)]
struct H264Nal {
    /// Where the length of a NAL unit being rebuilt from fragments goes.
    fragment: Option<usize>,
}

impl H264Nal {
    fn remember(nal: &[u8], info: &mut StreamInfo) {
        match nal.first().map(|b| b & 0x1f) {
            Some(7) if info.sps.is_none() => info.sps = Some(nal.to_vec()),
            Some(8) if info.pps.is_none() => info.pps = Some(nal.to_vec()),
            _ => {}
        }
    }

    fn nal(out: &mut Vec<u8>, nal: &[u8], info: &mut StreamInfo) {
        Self::remember(nal, info);
        out.extend_from_slice(&(nal.len() as u32).to_be_bytes());
        out.extend_from_slice(nal);
    }

    fn append(&mut self, out: &mut Vec<u8>, p: &[u8], info: &mut StreamInfo) -> bool {
        let Some(&b0) = p.first() else { return false };
        match b0 & 0x1f {
            0 | 25..=27 | 29..=31 => false,
            // A new unit while a fragmented one is open: that one lost its end.
            1..=24 if self.fragment.is_some() => false,
            24 => {
                let mut at = 1;
                while at < p.len() {
                    let Some(size) = p.get(at..at + 2) else {
                        return false;
                    };
                    let size = u16::from_be_bytes([size[0], size[1]]) as usize;
                    at += 2;
                    let Some(nal) = p.get(at..at + size).filter(|n| !n.is_empty()) else {
                        return false;
                    };
                    Self::nal(out, nal, info);
                    at += size;
                }
                true
            }
            1..=23 => {
                Self::nal(out, p, info);
                true
            }
            _ => {
                // FU-A.
                let Some(&fu) = p.get(1) else { return false };
                let (start, end) = (fu & 0x80 != 0, fu & 0x40 != 0);
                match (start, self.fragment) {
                    (true, None) => {
                        self.fragment = Some(out.len());
                        out.extend_from_slice(&[0; 4]);
                        out.push((b0 & 0xe0) | (fu & 0x1f));
                    }
                    (false, Some(_)) => {}
                    _ => return false,
                }
                out.extend_from_slice(&p[2..]);
                if end {
                    let Some(at) = self.fragment.take() else {
                        return false;
                    };
                    let len = (out.len() - at - 4) as u32;
                    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
                    Self::remember(&out[at + 4..], info);
                }
                true
            }
        }
    }

    /// The frame ended: a fragmented unit still open lost its end.
    fn finish(&self) -> bool {
        self.fragment.is_none()
    }
}

/// The `avcC` record (ISO/IEC 14496-15) Matroska's `V_MPEG4/ISO/AVC` takes as codec
/// private data, from one SPS and one PPS.
pub fn avc_decoder_configuration(sps: &[u8], pps: &[u8]) -> Option<Vec<u8>> {
    if sps.len() < 4 || pps.is_empty() || sps.len() > 0xffff || pps.len() > 0xffff {
        return None;
    }
    let mut c = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
    c.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    c.extend_from_slice(sps);
    c.push(1);
    c.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    c.extend_from_slice(pps);
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    /// A VP8 packet: descriptor with a 15-bit picture ID, then `body`.
    fn vp8(start: bool, body: &[u8]) -> Bytes {
        let mut p = vec![0x80 | if start { 0x10 } else { 0 }, 0x80, 0x80, 0x01];
        p.extend_from_slice(body);
        Bytes::from(p)
    }

    fn vp8_key(w: u16, h: u16) -> Vec<u8> {
        let mut f = vec![0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a];
        f.extend_from_slice(&w.to_le_bytes());
        f.extend_from_slice(&h.to_le_bytes());
        f.extend_from_slice(&[7; 20]);
        f
    }

    fn drain(a: &mut FrameAssembler, now: Instant) -> Vec<Frame> {
        std::iter::from_fn(|| a.pop(now)).collect()
    }

    #[test]
    fn a_vp8_frame_split_over_packets_out_of_order_comes_out_whole_without_descriptors() {
        let now = t0();
        let key = vp8_key(640, 360);
        let mut a = FrameAssembler::new(Codec::Vp8);
        a.push(11, 3000, true, vp8(false, &key[16..]), now);
        a.push(10, 3000, false, vp8(true, &key[..16]), now);
        let frames = drain(&mut a, now);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].keyframe);
        assert_eq!(frames[0].data, key);
        assert_eq!(frames[0].rtp_timestamp, 3000);
        assert_eq!(a.info().size, Some((640, 360)));
    }

    #[test]
    fn video_waits_for_a_keyframe_and_a_lost_packet_costs_frames_until_the_next_one() {
        let now = t0();
        let mut a = FrameAssembler::new(Codec::Vp8);
        // A delta frame first: skipped.
        a.push(1, 100, true, vp8(true, &[0x01, 1, 2, 3]), now);
        assert!(drain(&mut a, now).is_empty());
        a.push(2, 200, true, vp8(true, &vp8_key(320, 180)), now);
        assert_eq!(drain(&mut a, now).len(), 1);
        // Packet 3 (a whole frame) lost; 4 waits for it until MAX_WAIT.
        a.push(4, 400, true, vp8(true, &[0x01, 9]), now);
        assert!(drain(&mut a, now).is_empty());
        let later = now + MAX_WAIT + Duration::from_millis(1);
        assert!(
            drain(&mut a, later).is_empty(),
            "a delta frame after a gap is useless"
        );
        assert!(a.take_keyframe_request());
        assert!(!a.take_keyframe_request(), "asked once");
        a.push(5, 500, true, vp8(true, &vp8_key(320, 180)), later);
        let f = drain(&mut a, later);
        assert_eq!(f.len(), 1);
        assert!(f[0].keyframe);
        assert_eq!(a.stats().gaps, 1);
        assert_eq!(a.stats().skipped, 2);
    }

    #[test]
    fn a_repair_arriving_in_time_completes_the_frame() {
        let now = t0();
        let mut a = FrameAssembler::new(Codec::Vp8);
        let key = vp8_key(320, 180);
        a.push(65535, 7, false, vp8(true, &key[..12]), now);
        a.push(1, 7, true, vp8(false, &key[14..]), now);
        assert!(drain(&mut a, now).is_empty());
        a.push(
            0,
            7,
            false,
            vp8(false, &key[12..14]),
            now + Duration::from_millis(100),
        );
        let f = drain(&mut a, now + Duration::from_millis(100));
        assert_eq!(f.len(), 1, "sequence numbers wrap inside the frame");
        assert_eq!(f[0].data, key);
        // A late duplicate of what was written is ignored.
        a.push(0, 7, false, vp8(false, &key[12..14]), now);
        assert!(drain(&mut a, now).is_empty());
    }

    #[test]
    fn opus_packets_are_frames_and_a_gap_does_not_stop_audio() {
        let now = t0();
        let mut a = FrameAssembler::new(Codec::Opus);
        a.push(1, 960, true, Bytes::from_static(&[1, 2]), now);
        a.push(3, 2880, false, Bytes::from_static(&[3]), now);
        assert_eq!(drain(&mut a, now).len(), 1);
        let f = drain(&mut a, now + MAX_WAIT * 2);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].rtp_timestamp, 2880);
        assert!(!a.take_keyframe_request());
    }

    #[test]
    fn h264_aggregates_and_fragments_become_length_prefixed_units_and_parameter_sets_are_kept() {
        let now = t0();
        let mut a = FrameAssembler::new(Codec::H264);
        let sps = [0x67, 0x42, 0xc0, 0x1f, 0xaa];
        let pps = [0x68, 0xce, 0x3c, 0x80];
        let mut stap = vec![24u8];
        for n in [&sps[..], &pps[..]] {
            stap.extend_from_slice(&(n.len() as u16).to_be_bytes());
            stap.extend_from_slice(n);
        }
        a.push(1, 90, false, Bytes::from(stap), now);
        // An IDR slice (type 5, NRI 3) in three fragments.
        a.push(2, 90, false, Bytes::from(vec![0x7c, 0x85, 1, 2]), now);
        a.push(3, 90, false, Bytes::from(vec![0x7c, 0x05, 3]), now);
        a.push(4, 90, true, Bytes::from(vec![0x7c, 0x45, 4, 5]), now);
        let f = drain(&mut a, now);
        assert_eq!(f.len(), 1);
        assert!(f[0].keyframe);
        let mut want = Vec::new();
        for n in [&sps[..], &pps[..], &[0x65, 1, 2, 3, 4, 5][..]] {
            want.extend_from_slice(&(n.len() as u32).to_be_bytes());
            want.extend_from_slice(n);
        }
        assert_eq!(f[0].data, want);
        let avcc = avc_decoder_configuration(
            a.info().sps.as_deref().unwrap(),
            a.info().pps.as_deref().unwrap(),
        )
        .unwrap();
        assert_eq!(&avcc[..6], &[1, 0x42, 0xc0, 0x1f, 0xff, 0xe1]);
    }

    #[test]
    fn malformed_payloads_are_counted_and_never_panic() {
        let now = t0();
        for codec in [Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Opus] {
            let mut a = FrameAssembler::new(codec);
            let garbage: [&[u8]; 9] = [
                &[],
                &[0xff],
                &[0x18],
                &[0x98, 0x80],
                &[24, 0, 9, 1],
                &[28, 0x45, 1],
                &[0xfe, 0xff, 0xff, 0xff],
                &[0x9a, 0xff, 0xff, 0x07, 0xe0],
                &[0x0e, 0xff, 0xff, 0xff, 0x13, 0xff],
            ];
            for (i, g) in garbage.iter().enumerate() {
                a.push(i as u16, i as u32, true, Bytes::copy_from_slice(g), now);
            }
            let _ = drain(&mut a, now + MAX_WAIT * 2);
        }
    }

    #[test]
    fn vp9_descriptors_with_layer_indices_and_scalability_structure_are_stripped() {
        let now = t0();
        let mut a = FrameAssembler::new(Codec::Vp9);
        // I, L, B, E, V set: 15-bit picture id, layer byte, TL0PICIDX, SS with sizes.
        let mut p = vec![0x80 | 0x20 | 0x08 | 0x04 | 0x02, 0x81, 0x02, 0x00, 0x11];
        p.push(0x10); // one spatial layer, Y
        p.extend_from_slice(&[0x02, 0x80, 0x01, 0x68]);
        p.extend_from_slice(&[0x82, 0x49, 0x83]);
        a.push(9, 1, true, Bytes::from(p), now);
        let f = drain(&mut a, now);
        assert_eq!(f.len(), 1);
        assert!(f[0].keyframe);
        assert_eq!(f[0].data, vec![0x82, 0x49, 0x83]);
    }
}
