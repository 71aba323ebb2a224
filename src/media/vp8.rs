//! Keeps a consumer's VP8 picture IDs and TL0PICIDX continuous across source changes.
//!
//! Each simulcast encoding numbers its frames on its own (libwebrtc starts every encoding's
//! picture ID and TL0PICIDX at random), so a consumer switched from one layer to another would
//! hand its receiver a picture ID jump. libwebrtc's receivers (Chromium, Firefox) order and
//! reference frames by picture ID: a keyframe whose ID is "older" than the last decoded frame
//! is discarded, and the decoder waits, possibly for good, for an ID it will never see. As
//! mediasoup's and LiveKit's VP8 handling do, the output continues at the last ID sent + 1 at
//! every source change (the [`RtpRewriter`](super::rewrite::RtpRewriter)'s generation) and
//! keeps the input's spacing within a source. Pure arithmetic on the RFC 7741 descriptor.

/// Where a packet's picture ID and TL0PICIDX sit in its payload, and their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fields {
    /// Offset of the picture ID, whether it is the 15-bit form, and its value.
    picture_id: Option<(usize, bool, u16)>,
    /// Offset of TL0PICIDX and its value.
    tl0: Option<(usize, u8)>,
}

fn parse(p: &[u8]) -> Option<Fields> {
    let b0 = *p.first()?;
    if b0 & 0x80 == 0 {
        return Some(Fields {
            picture_id: None,
            tl0: None,
        });
    }
    let x = *p.get(1)?;
    let mut at = 2;
    let mut picture_id = None;
    if x & 0x80 != 0 {
        let hi = *p.get(at)?;
        if hi & 0x80 != 0 {
            let lo = *p.get(at + 1)?;
            picture_id = Some((at, true, u16::from(hi & 0x7f) << 8 | u16::from(lo)));
            at += 2;
        } else {
            picture_id = Some((at, false, u16::from(hi)));
            at += 1;
        }
    }
    let tl0 = if x & 0x40 != 0 {
        Some((at, *p.get(at)?))
    } else {
        None
    };
    Some(Fields { picture_id, tl0 })
}

const PID_MASK: u16 = 0x7fff;

/// `a` is newer than `b` among 15-bit picture IDs.
fn pid_newer(a: u16, b: u16) -> bool {
    let d = a.wrapping_sub(b) & PID_MASK;
    d != 0 && d < 0x4000
}

/// What to write into one packet's descriptor (see [`Vp8Rewriter::rewrite`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Edit {
    picture_id: Option<(usize, bool, u16)>,
    tl0: Option<(usize, u8)>,
}

impl Vp8Edit {
    /// Writes the new values into a copy of the payload the edit was made for.
    pub fn apply(&self, payload: &mut [u8]) {
        if let Some((at, long, v)) = self.picture_id {
            if long {
                payload[at] = 0x80 | (v >> 8) as u8;
                payload[at + 1] = v as u8;
            } else {
                payload[at] = (v & 0x7f) as u8;
            }
        }
        if let Some((at, v)) = self.tl0 {
            payload[at] = v;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    generation: u32,
    pid_offset: u16,
    tl0_offset: u8,
}

/// Output picture-ID numbering for one VP8 consumer.
#[derive(Debug, Clone, Default)]
pub struct Vp8Rewriter {
    mapping: Option<Mapping>,
    last_pid: Option<u16>,
    last_tl0: Option<u8>,
}

impl Vp8Rewriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The edit one packet of source `generation` needs, or `None` when its descriptor stays
    /// as it is (same numbering as the input, no picture ID, or too short to parse). The first
    /// packet of a new generation continues right after the newest values sent so far; the
    /// same packet given again (a retransmission) gets the same edit.
    pub fn rewrite(&mut self, generation: u32, payload: &[u8]) -> Option<Vp8Edit> {
        let f = parse(payload)?;
        if f.picture_id.is_none() && f.tl0.is_none() {
            return None;
        }
        let m = match self.mapping {
            Some(m) if m.generation == generation => m,
            _ => {
                let pid_offset = match (self.last_pid, f.picture_id) {
                    (Some(last), Some((_, _, v))) => {
                        last.wrapping_add(1).wrapping_sub(v) & PID_MASK
                    }
                    _ => 0,
                };
                let tl0_offset = match (self.last_tl0, f.tl0) {
                    (Some(last), Some((_, v))) => last.wrapping_add(1).wrapping_sub(v),
                    _ => 0,
                };
                let m = Mapping {
                    generation,
                    pid_offset,
                    tl0_offset,
                };
                self.mapping = Some(m);
                m
            }
        };
        let picture_id = f.picture_id.map(|(at, long, v)| {
            let mask = if long { PID_MASK } else { 0x7f };
            (at, long, v.wrapping_add(m.pid_offset) & mask)
        });
        let tl0 = f.tl0.map(|(at, v)| (at, v.wrapping_add(m.tl0_offset)));
        if let Some((_, _, out)) = picture_id {
            if self.last_pid.is_none_or(|last| pid_newer(out, last)) {
                self.last_pid = Some(out);
            }
        }
        if let Some((_, out)) = tl0 {
            // TL0PICIDX moves by one per base-layer frame: newer within half its range.
            if self
                .last_tl0
                .is_none_or(|last| out != last && out.wrapping_sub(last) < 0x80)
            {
                self.last_tl0 = Some(out);
            }
        }
        if m.pid_offset == 0 && m.tl0_offset == 0 {
            return None;
        }
        Some(Vp8Edit { picture_id, tl0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor with a 15-bit picture ID and TL0PICIDX, then one payload byte.
    fn packet(pid: u16, tl0: u8, keyframe: bool) -> Vec<u8> {
        vec![
            0x90,
            0xc0,
            0x80 | (pid >> 8) as u8,
            pid as u8,
            tl0,
            if keyframe { 0x00 } else { 0x01 },
        ]
    }

    fn out(r: &mut Vp8Rewriter, generation: u32, p: &[u8]) -> (u16, u8) {
        let mut b = p.to_vec();
        if let Some(e) = r.rewrite(generation, p) {
            e.apply(&mut b);
        }
        let f = parse(&b).unwrap();
        (f.picture_id.unwrap().2, f.tl0.unwrap().1)
    }

    #[test]
    fn the_first_source_passes_through_untouched() {
        let mut r = Vp8Rewriter::new();
        for i in 0..5 {
            assert_eq!(r.rewrite(0, &packet(1000 + i, 7 + i as u8, i == 0)), None);
        }
    }

    #[test]
    fn a_layer_switch_continues_the_picture_ids_and_tl0picidx() {
        let mut r = Vp8Rewriter::new();
        for i in 0..3 {
            out(&mut r, 0, &packet(30_000 + i, 200 + i as u8, i == 0));
        }
        // The other encoding numbers its frames far behind (and wraps TL0PICIDX).
        assert_eq!(out(&mut r, 1, &packet(12, 250, true)), (30_003, 203));
        assert_eq!(out(&mut r, 1, &packet(13, 251, false)), (30_004, 204));
        // Retransmission of the switch keyframe: same edit.
        assert_eq!(out(&mut r, 1, &packet(12, 250, true)), (30_003, 203));
        // And back up again, across the 15-bit wrap.
        let mut r2 = Vp8Rewriter::new();
        out(&mut r2, 0, &packet(0x7ffe, 0, true));
        assert_eq!(out(&mut r2, 1, &packet(500, 9, true)), (0x7fff, 1));
        assert_eq!(out(&mut r2, 1, &packet(501, 9, false)), (0, 1));
    }

    #[test]
    fn seven_bit_picture_ids_keep_their_width() {
        let mut r = Vp8Rewriter::new();
        let short = |pid: u8| vec![0x90, 0x80, pid & 0x7f, 0x00];
        assert_eq!(r.rewrite(0, &short(126)), None);
        let e = r.rewrite(1, &short(3)).unwrap();
        let mut b = short(3);
        e.apply(&mut b);
        assert_eq!(b[2], 127);
        assert_eq!(b.len(), 4);
    }

    #[test]
    fn truncated_or_bare_descriptors_are_left_alone() {
        let mut r = Vp8Rewriter::new();
        assert_eq!(r.rewrite(0, &[]), None);
        assert_eq!(r.rewrite(0, &[0x90]), None);
        assert_eq!(r.rewrite(0, &[0x90, 0x80, 0x85]), None);
        assert_eq!(r.rewrite(0, &[0x10, 0x00]), None);
    }
}
