//! Rewrites a consumer's outgoing SSRC, sequence numbers and timestamps so that the receiver
//! sees one continuous stream even when the source underneath changes (simulcast layer switch,
//! producer replaced). Pure arithmetic, no allocation.

use std::time::Instant;

/// Output numbering for one consumer.
#[derive(Debug, Clone)]
pub struct RtpRewriter {
    clock_rate: u32,
    source: Option<Source>,
    last_out: Option<Last>,
    /// The next packet starts a new mapping even from the same SSRC.
    resync: bool,
    /// Counts the mappings started: what codec-level rewriting keys its own numbering on.
    generation: u32,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    /// First input sequence number forwarded from this source; anything older would collide
    /// with numbers already used for the previous source.
    base_seq: u16,
    seq_offset: u16,
    ts_offset: u32,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    seq: u16,
    ts: u32,
    at: Instant,
}

/// `a` is newer than `b` in 16-bit serial arithmetic.
fn seq_newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

impl RtpRewriter {
    pub fn new(clock_rate: u32) -> Self {
        Self {
            clock_rate: clock_rate.max(1),
            source: None,
            last_out: None,
            resync: false,
            generation: 0,
        }
    }

    /// Which mapping the last packet went through (changes at every source change or resync).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Maps an input packet to output `(seq, timestamp)`, or `None` when the packet must be
    /// dropped (it predates the current source's first forwarded packet).
    ///
    /// A packet from a new SSRC starts a new source: the caller only passes such a packet at a
    /// switching point (a keyframe), so the output continues at `last + 1` with a timestamp
    /// advanced by the wall-clock gap.
    pub fn rewrite(&mut self, now: Instant, ssrc: u32, seq: u16, ts: u32) -> Option<(u16, u32)> {
        let src = match self.source {
            Some(s) if s.ssrc == ssrc && !self.resync => {
                if seq != s.base_seq && !seq_newer(seq, s.base_seq) {
                    return None;
                }
                s
            }
            _ => {
                let (out_seq, out_ts) = match self.last_out {
                    Some(last) => {
                        let gap = now.saturating_duration_since(last.at);
                        let ticks = (gap.as_secs_f64() * self.clock_rate as f64) as u32;
                        (last.seq.wrapping_add(1), last.ts.wrapping_add(ticks.max(1)))
                    }
                    None => (seq, ts),
                };
                let s = Source {
                    ssrc,
                    base_seq: seq,
                    seq_offset: out_seq.wrapping_sub(seq),
                    ts_offset: out_ts.wrapping_sub(ts),
                };
                if self.source.is_some() {
                    self.generation = self.generation.wrapping_add(1);
                }
                self.source = Some(s);
                self.resync = false;
                s
            }
        };
        let out_seq = seq.wrapping_add(src.seq_offset);
        let out_ts = ts.wrapping_add(src.ts_offset);
        match self.last_out {
            Some(last) if !seq_newer(out_seq, last.seq) => {}
            _ => {
                self.last_out = Some(Last {
                    seq: out_seq,
                    ts: out_ts,
                    at: now,
                })
            }
        }
        Some((out_seq, out_ts))
    }

    /// Makes the next packet continue the output right after the last one sent, as after a
    /// source change: used when packets were deliberately skipped (pause), so the receiver
    /// sees no gap to ask retransmission for.
    pub fn resync(&mut self) {
        self.resync = true;
    }

    /// The newest output sequence number so far.
    pub fn last_seq(&self) -> Option<u16> {
        self.last_out.map(|l| l.seq)
    }

    /// The input `(ssrc, seq)` that produced output `out_seq`, if it belongs to the current
    /// source: what a retransmission request for `out_seq` must fetch.
    pub fn input_of(&self, out_seq: u16) -> Option<(u32, u16)> {
        let s = self.source?;
        let seq = out_seq.wrapping_sub(s.seq_offset);
        if seq == s.base_seq || seq_newer(seq, s.base_seq) {
            Some((s.ssrc, seq))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn single_source_passes_through_with_wraparound() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(90_000);
        assert_eq!(r.rewrite(t, 1, 65535, 100), Some((65535, 100)));
        assert_eq!(r.rewrite(t, 1, 0, 3100), Some((0, 3100)));
        assert_eq!(r.rewrite(t, 1, 1, 6100), Some((1, 6100)));
    }

    #[test]
    fn source_switch_keeps_sequence_continuous() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(90_000);
        for i in 0..10u16 {
            r.rewrite(t, 1, 1000 + i, 50_000 + u32::from(i) * 3000);
        }
        // Layer switch to SSRC 2 whose numbers are unrelated, 33 ms later.
        let later = t + Duration::from_millis(33);
        let (seq, ts) = r.rewrite(later, 2, 40_000, 7).unwrap();
        assert_eq!(seq, 1010);
        assert_eq!(ts, 50_000 + 9 * 3000 + 2970);
        assert_eq!(r.rewrite(later, 2, 40_001, 7).unwrap().0, 1011);
        // A retransmission from before the switch point would collide: dropped.
        assert_eq!(r.rewrite(later, 2, 39_999, 1), None);
        // Output numbers map back to the current source only.
        assert_eq!(r.input_of(1011), Some((2, 40_001)));
        assert_eq!(r.input_of(1005), None);
    }

    #[test]
    fn resync_closes_the_gap_of_skipped_packets() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(90_000);
        r.rewrite(t, 1, 100, 0);
        r.resync();
        assert_eq!(
            r.rewrite(t + Duration::from_secs(1), 1, 150, 90_000)
                .unwrap()
                .0,
            101
        );
        assert_eq!(
            r.rewrite(t + Duration::from_secs(1), 1, 151, 90_000)
                .unwrap()
                .0,
            102
        );
    }

    #[test]
    fn out_of_order_packets_keep_their_place() {
        let t = Instant::now();
        let mut r = RtpRewriter::new(90_000);
        r.rewrite(t, 5, 10, 0);
        r.rewrite(t, 5, 12, 0);
        assert_eq!(r.rewrite(t, 5, 11, 0).unwrap().0, 11);
        // The late packet did not move the high-water mark backwards.
        let (seq, _) = r.rewrite(t + Duration::from_millis(1), 6, 0, 0).unwrap();
        assert_eq!(seq, 13);
    }
}
