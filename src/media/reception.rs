//! Reception quality in both directions, as RTCP states it (RFC 3550 §6.4): what a subscriber's
//! receiver report says about a stream this node sends, and what this node measures about a
//! stream a publisher sends it. Pure: times come in as arguments.

use std::time::Instant;

/// One report block, in plain units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Share of the packets expected since the previous report that did not arrive, 0..=1.
    pub loss: f64,
    /// Interarrival jitter in seconds.
    pub jitter: f64,
    /// Round-trip time in seconds, when the report answers one of our sender reports.
    pub rtt: Option<f64>,
}

/// Reads a reception report block: `fraction_lost` (n/256), `jitter` in RTP units of a
/// `clock_rate` clock, and the LSR/DLSR pair (middle 32 bits of NTP, and 1/65536 s), giving
/// the round-trip time against `now_ntp` (64-bit NTP, the clock our sender reports used).
pub fn from_report(
    fraction_lost: u8,
    jitter: u32,
    clock_rate: u32,
    last_sender_report: u32,
    delay: u32,
    now_ntp: u64,
) -> Quality {
    let rtt = (last_sender_report != 0).then(|| {
        let now_mid = (now_ntp >> 16) as u32;
        // Wrapping: the middle 32 bits roll over every 18 hours. A report from a clock ahead
        // of ours (or a forged one) would give a huge value: not a round trip.
        let units = now_mid.wrapping_sub(last_sender_report).wrapping_sub(delay);
        units as f64 / 65536.0
    });
    Quality {
        loss: f64::from(fraction_lost) / 256.0,
        jitter: f64::from(jitter) / f64::from(clock_rate.max(1)),
        rtt: rtt.filter(|&s| s < 60.0),
    }
}

/// Reception statistics of one incoming RTP stream: loss from sequence numbers and
/// interarrival jitter, per RFC 3550 (A.3, A.8), without allocation.
#[derive(Debug, Clone, Default)]
pub struct Reception {
    /// When the first packet came (arrival times are counted from it in RTP units).
    origin: Option<Instant>,
    /// Highest extended sequence number and the first one.
    max_ext: u64,
    base_ext: u64,
    received: u64,
    /// Transit time of the previous packet (RTP units, wrapping).
    last_transit: Option<u32>,
    /// Jitter in RTP units, scaled by 16 (RFC 3550 A.8's integer form).
    jitter16: u64,
    /// Figures at the previous `interval` call.
    expected_prior: u64,
    received_prior: u64,
}

impl Reception {
    /// One packet with sequence number `seq` and RTP timestamp `ts`, arrived `now`.
    pub fn on_packet(&mut self, now: Instant, seq: u16, ts: u32, clock_rate: u32) {
        let origin = *self.origin.get_or_insert(now);
        if self.received == 0 {
            self.max_ext = u64::from(seq) + (1 << 16);
            self.base_ext = self.max_ext;
        } else {
            let max_seq = self.max_ext as u16;
            let delta = seq.wrapping_sub(max_seq) as i16;
            if delta > 0 {
                self.max_ext += delta as u64;
            }
        }
        self.received += 1;
        let arrival =
            (now.duration_since(origin).as_secs_f64() * f64::from(clock_rate)) as u64 as u32;
        let transit = arrival.wrapping_sub(ts);
        if let Some(last) = self.last_transit {
            let d = u64::from((transit.wrapping_sub(last) as i32).unsigned_abs());
            // J += (|D| - J) / 16, kept as 16·J.
            self.jitter16 = (self.jitter16 + d).saturating_sub(self.jitter16.div_ceil(16));
        }
        self.last_transit = Some(transit);
    }

    /// Loss share and jitter (seconds) since the previous call; `None` when nothing was
    /// expected in between (a stream that paused or never started).
    pub fn interval(&mut self, clock_rate: u32) -> Option<Quality> {
        if self.received == 0 {
            return None;
        }
        let expected = self.max_ext - self.base_ext + 1;
        let expected_interval = expected.saturating_sub(self.expected_prior);
        let received_interval = self.received.saturating_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = self.received;
        if expected_interval == 0 {
            return None;
        }
        // Duplicates (retransmissions) can make more arrive than was expected.
        let lost = expected_interval.saturating_sub(received_interval);
        Some(Quality {
            loss: lost as f64 / expected_interval as f64,
            jitter: self.jitter16 as f64 / 16.0 / f64::from(clock_rate.max(1)),
            rtt: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_report_answering_our_sender_report_gives_the_round_trip() {
        // Our SR went out at NTP second 1000.5; the receiver held it 0.25 s; now 1001.0.
        let ntp = |s: f64| ((s * 65536.0) as u64) << 16;
        let lsr = (ntp(1000.5) >> 16) as u32;
        let q = from_report(64, 900, 90_000, lsr, 65536 / 4, ntp(1001.0));
        assert_eq!(q.loss, 0.25);
        assert!((q.jitter - 0.01).abs() < 1e-9);
        let rtt = q.rtt.unwrap();
        assert!((rtt - 0.25).abs() < 1e-3, "{rtt}");
    }

    #[test]
    fn a_report_without_sender_report_or_from_the_future_has_no_round_trip() {
        assert_eq!(from_report(0, 0, 48_000, 0, 0, 1 << 40).rtt, None);
        let now = 1000u64 << 32;
        let ahead = ((now >> 16) as u32).wrapping_add(65536);
        assert_eq!(from_report(0, 0, 48_000, ahead, 0, now).rtt, None);
    }

    #[test]
    fn loss_counts_the_sequence_numbers_that_never_came_even_across_a_wrap() {
        let t0 = Instant::now();
        let mut r = Reception::default();
        // 65530..=65535, 0..=13 is 20 packets; 5 of them missing.
        let mut n = 0u32;
        for seq in (65530u16..=65535).chain(0..=13) {
            n += 1;
            if [65533, 2, 3, 7, 11].contains(&seq) {
                continue;
            }
            r.on_packet(
                t0 + Duration::from_millis(20 * u64::from(n)),
                seq,
                n * 1800,
                90_000,
            );
        }
        let q = r.interval(90_000).unwrap();
        assert!((q.loss - 0.25).abs() < 1e-9, "{q:?}");
        assert!(q.jitter < 0.001, "evenly paced: {q:?}");
        assert_eq!(r.interval(90_000), None, "nothing new expected");
    }

    #[test]
    fn uneven_arrival_shows_as_jitter() {
        let t0 = Instant::now();
        let mut r = Reception::default();
        for i in 0..200u32 {
            // Sent every 20 ms; arrives 0 or 30 ms late, alternately.
            let late = if i % 2 == 0 { 0 } else { 30 };
            let at = t0 + Duration::from_millis(u64::from(20 * i + late));
            r.on_packet(at, i as u16, i * 960, 48_000);
        }
        let q = r.interval(48_000).unwrap();
        assert!((0.02..0.04).contains(&q.jitter), "{q:?}");
        assert_eq!(q.loss, 0.0);
    }
}
