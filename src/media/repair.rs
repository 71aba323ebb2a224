//! Sans-I/O pieces of loss handling that need a clock: repairing a stream received over a pipe
//! (find gaps, ask for them at once, again after a round trip, give up after a few tries) and
//! spacing keyframe requests to one publisher layer. Time is passed in; nothing here reads a
//! clock, so both are tested on a virtual one.

use std::time::{Duration, Instant};

/// Most sequence numbers asked for after one gap; a longer jump is a stream restart.
pub const MAX_GAP: u16 = 64;
/// Times one missing packet is asked for before it is given up.
pub const TRIES: u8 = 4;

/// Gap tracking for one received stream layer.
#[derive(Debug, Clone)]
pub struct GapRepair {
    highest: Option<u16>,
    /// Missing sequence numbers: (seq, when last asked for, times asked).
    missing: Vec<(u16, Instant, u8)>,
    /// Most sequence numbers tracked at once; the oldest give way.
    capacity: usize,
}

impl GapRepair {
    pub fn new(capacity: usize) -> Self {
        Self {
            highest: None,
            missing: Vec::new(),
            capacity,
        }
    }

    /// Packet `seq` arrived at `now`: appends to `ask` the sequence numbers this shows
    /// missing, to be asked for at once.
    pub fn on_packet(&mut self, now: Instant, seq: u16, ask: &mut Vec<u16>) {
        if let Some((after, count)) = self.track(now, seq) {
            ask.extend((1..=count).map(|i| after.wrapping_add(i)));
        }
    }

    /// Packet `seq` arrived at `now`: notes what it shows missing (someone else asks for it,
    /// as rtc's NACK generator does for a publisher). Returns the new gap, if any: the
    /// sequence numbers after the first value, as many as the second.
    pub fn track(&mut self, now: Instant, seq: u16) -> Option<(u16, u16)> {
        let Some(h) = self.highest else {
            self.highest = Some(seq);
            return None;
        };
        let ahead = seq.wrapping_sub(h);
        let mut gap = None;
        if ahead != 0 && ahead < 0x8000 {
            if ahead > 1 && ahead <= MAX_GAP {
                self.missing
                    .extend((1..ahead).map(|i| (h.wrapping_add(i), now, 1)));
                let excess = self.missing.len().saturating_sub(self.capacity);
                self.missing.drain(..excess);
                gap = Some((h, ahead - 1));
            }
            self.highest = Some(seq);
        } else {
            // A late packet: a repair, or reordering.
            self.missing.retain(|(s, _, _)| *s != seq);
        }
        gap
    }

    /// Whether a packet noted missing (and not asked for again since) has stayed missing
    /// for `age`: its sender is not going to repair it.
    pub fn overdue(&self, now: Instant, age: Duration) -> bool {
        self.missing
            .iter()
            .any(|(_, at, _)| now.saturating_duration_since(*at) >= age)
    }

    /// Forgets every missing packet (a keyframe has been asked for instead).
    pub fn forget(&mut self) {
        self.missing.clear();
    }

    /// Appends to `ask` what is still missing `wait` (about a round trip) after it was last
    /// asked for, and forgets what has been asked for [`TRIES`] times.
    pub fn due(&mut self, now: Instant, wait: Duration, ask: &mut Vec<u16>) {
        self.missing.retain(|(_, _, tries)| *tries < TRIES);
        for (seq, at, tries) in self.missing.iter_mut() {
            if now.duration_since(*at) >= wait {
                *at = now;
                *tries += 1;
                ask.push(*seq);
            }
        }
    }

    /// Sequence numbers still awaited.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }
}

/// Keyframe requests to one publisher layer are spaced at least this far apart, however many
/// consumers ask: one keyframe serves them all.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);

/// Spacing of keyframe requests to one layer.
#[derive(Debug, Clone, Default)]
pub struct KeyframeThrottle {
    last: Option<Instant>,
}

impl KeyframeThrottle {
    /// Whether a request may go out at `now`; if so it counts as sent.
    pub fn allow(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_gap_left_unrepaired_is_overdue_and_a_repaired_one_is_not() {
        let t0 = Instant::now();
        let mut r = GapRepair::new(64);
        for s in [10u16, 11, 14, 15] {
            r.track(t0, s);
        }
        assert_eq!(r.missing(), 2);
        r.track(t0 + ms(50), 12);
        assert!(!r.overdue(t0 + ms(400), ms(500)));
        assert!(r.overdue(t0 + ms(500), ms(500)), "13 never came");
        r.track(t0 + ms(510), 13);
        assert!(!r.overdue(t0 + ms(600), ms(500)), "repaired late");
        r.track(t0 + ms(600), 20);
        r.forget();
        assert!(!r.overdue(t0 + ms(5000), ms(500)));
    }

    #[test]
    fn a_gap_is_asked_for_at_once_then_after_each_round_trip_until_given_up() {
        let t0 = Instant::now();
        let mut r = GapRepair::new(64);
        let mut ask = Vec::new();
        r.on_packet(t0, 10, &mut ask);
        r.on_packet(t0, 14, &mut ask);
        assert_eq!(ask, [11, 12, 13]);
        ask.clear();
        r.due(t0 + ms(100), ms(150), &mut ask);
        assert!(ask.is_empty(), "not before a round trip");
        r.due(t0 + ms(150), ms(150), &mut ask);
        assert_eq!(ask, [11, 12, 13]);
        // 12 arrives late: no longer asked for.
        r.on_packet(t0 + ms(200), 12, &mut ask);
        ask.clear();
        r.due(t0 + ms(300), ms(150), &mut ask);
        assert_eq!(ask, [11, 13]);
        ask.clear();
        r.due(t0 + ms(450), ms(150), &mut ask);
        assert_eq!(ask, [11, 13], "fourth ask");
        ask.clear();
        r.due(t0 + ms(600), ms(150), &mut ask);
        assert!(ask.is_empty(), "given up after {TRIES} tries");
        assert_eq!(r.missing(), 0);
    }

    #[test]
    fn a_long_jump_is_a_restart_and_sequence_numbers_wrap() {
        let t0 = Instant::now();
        let mut r = GapRepair::new(64);
        let mut ask = Vec::new();
        r.on_packet(t0, 100, &mut ask);
        r.on_packet(t0, 100 + MAX_GAP + 1, &mut ask);
        assert!(ask.is_empty(), "a jump past {MAX_GAP} is not repaired");
        let mut r = GapRepair::new(64);
        r.on_packet(t0, 65534, &mut ask);
        r.on_packet(t0, 1, &mut ask);
        assert_eq!(ask, [65535, 0]);
    }

    #[test]
    fn the_oldest_missing_give_way_to_newer_ones() {
        let t0 = Instant::now();
        let mut r = GapRepair::new(4);
        let mut ask = Vec::new();
        r.on_packet(t0, 0, &mut ask);
        r.on_packet(t0, 7, &mut ask);
        assert_eq!(ask.len(), 6, "all asked for at once");
        assert_eq!(r.missing(), 4, "only the newest tracked for retries");
        ask.clear();
        r.due(t0 + ms(200), ms(100), &mut ask);
        assert_eq!(ask, [3, 4, 5, 6]);
    }

    #[test]
    fn keyframe_requests_to_one_layer_are_spaced() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::default();
        assert!(k.allow(t0));
        assert!(!k.allow(t0 + ms(10)));
        assert!(!k.allow(t0 + ms(299)));
        assert!(k.allow(t0 + KEYFRAME_REQUEST_INTERVAL));
        assert!(!k.allow(t0 + KEYFRAME_REQUEST_INTERVAL + ms(1)));
    }
}
