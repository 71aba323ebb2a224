//! Send-side bandwidth estimation towards subscribers, reachable from Meridian's own code.
//!
//! Each subscribe connection runs rtc's congestion control chain: the TWCC sender numbers every
//! packet that leaves, the subscriber's browser reports their arrival (transport-cc feedback),
//! and `CongestionControlInterceptor` resolves those reports and hands them to a
//! [`BandwidthEstimator`] — GCC (delay-based and loss-based, as libwebrtc does it), from
//! rtc-interceptor. That interceptor lives boxed inside the connection's chain where the worker
//! cannot reach it, so the estimator given to it is wrapped in [`Published`], which copies every
//! new estimate into a [`SendEstimate`] the worker holds too. Layer choice reads it there; a
//! future send path that bypasses rtc's sender must report its packets to the same estimator.
//!
//! No pacer is installed: a forwarding SFU sends what arrives, and a pacer's queue would add delay
//! to every copy. Layer choice is the rate control.
//!
//! Where this goes beyond rtc-interceptor: nothing in the estimator; Meridian adds the
//! publication of the estimate (this module), its sharing among a connection's consumers and
//! the layer choice on top of it (`media::layers`). One thing had to be fixed on Meridian's side
//! for the numbers to mean anything: forwarded copies kept the publisher's extension padding, so
//! once the TWCC sender added its extension many copies failed to marshal and were dropped after
//! the send history had recorded them, which GCC then read as 30-98% loss
//! (`media::extensions::strip`).
//!
//! Not done yet: probing (padding or RTX) before stepping up; GCC's own growth (about 8% a
//! second from the 800 kbit/s start) is what raises the estimate on an idle path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use rtc::interceptor::{BandwidthEstimator, EstimatorStats, Gcc, PacketReport};

/// Where the first estimate starts before any feedback (bits/s): enough for a middle layer, so
/// a fresh subscriber starts on a picture an agent can read and steps up from there.
pub const INITIAL_BITRATE: f64 = 800_000.0;
pub const MIN_BITRATE: f64 = 100_000.0;
pub const MAX_BITRATE: f64 = 20_000_000.0;

/// One connection's latest send-side estimate, written by its estimator and read by the worker.
/// Zero means "no transport-cc feedback yet": the consumer falls back to REMB.
#[derive(Debug, Default)]
pub struct SendEstimate {
    target_bps: AtomicU64,
    delay_bps: AtomicU64,
    loss_bps: AtomicU64,
    /// Loss fraction in parts per million.
    loss_ppm: AtomicU64,
    /// Feedback batches that reached the estimator.
    reports: AtomicU64,
}

impl SendEstimate {
    /// The target bitrate towards this subscriber, once its feedback has been seen.
    pub fn target(&self) -> Option<u64> {
        (self.reports.load(Relaxed) > 0).then(|| self.target_bps.load(Relaxed))
    }

    pub fn delay_based(&self) -> u64 {
        self.delay_bps.load(Relaxed)
    }

    pub fn loss_based(&self) -> u64 {
        self.loss_bps.load(Relaxed)
    }

    /// Fraction of packets the subscriber reported lost, per the estimator's window.
    pub fn loss(&self) -> f64 {
        self.loss_ppm.load(Relaxed) as f64 / 1e6
    }

    pub fn reports(&self) -> u64 {
        self.reports.load(Relaxed)
    }
}

/// An estimator whose estimates are also published to a [`SendEstimate`].
pub struct Published<E> {
    inner: E,
    out: Arc<SendEstimate>,
}

impl Published<Gcc> {
    /// GCC with Meridian's starting point and bounds, publishing to a new [`SendEstimate`].
    pub fn gcc() -> (Self, Arc<SendEstimate>) {
        Self::new(Gcc::new(INITIAL_BITRATE, MIN_BITRATE, MAX_BITRATE))
    }
}

impl<E: BandwidthEstimator> Published<E> {
    pub fn new(inner: E) -> (Self, Arc<SendEstimate>) {
        let out = Arc::new(SendEstimate::default());
        (
            Self {
                inner,
                out: out.clone(),
            },
            out,
        )
    }

    fn publish(&self) {
        let s = self.inner.stats();
        self.out
            .target_bps
            .store(self.inner.target_bitrate() as u64, Relaxed);
        self.out
            .delay_bps
            .store(s.delay_based_bitrate.unwrap_or(0.0) as u64, Relaxed);
        self.out
            .loss_bps
            .store(s.loss_based_bitrate.unwrap_or(0.0) as u64, Relaxed);
        self.out
            .loss_ppm
            .store((s.packet_loss.unwrap_or(0.0) * 1e6) as u64, Relaxed);
    }
}

impl<E: BandwidthEstimator> BandwidthEstimator for Published<E> {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        self.inner.on_reports(now, reports);
        if !reports.is_empty() {
            self.out.reports.fetch_add(1, Relaxed);
            self.publish();
        }
    }

    fn target_bitrate(&self) -> f64 {
        self.inner.target_bitrate()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
        if self.out.reports.load(Relaxed) > 0 {
            self.publish();
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    fn stats(&self) -> EstimatorStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Feedback for `n` packets of `size` bytes sent every `gap` from `t0`, each arriving
    /// `delay` after it left (plus `extra` per packet, a growing queue), every `lose`-th lost.
    fn reports(
        t0: Instant,
        first_id: u64,
        n: u64,
        size: usize,
        gap: Duration,
        extra: Duration,
        lose: u64,
    ) -> Vec<PacketReport> {
        (0..n)
            .map(|i| {
                let id = first_id + i;
                let departure = t0 + gap * i as u32;
                let arrival = Duration::from_millis(20) + gap * (id as u32) + extra * (id as u32);
                PacketReport {
                    ssrc: 1,
                    id,
                    rtp_sequence_number: id as u16,
                    is_twcc: true,
                    twcc_sequence_number: id as u16,
                    size,
                    arrived: lose == 0 || (id + 1) % lose != 0,
                    departure,
                    arrival: Some(arrival),
                    ecn: rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn::NotEct,
                }
            })
            .collect()
    }

    /// Runs `seconds` of 100 ms feedback batches of 1000-byte packets at 1 ms spacing.
    fn run(est: &mut Published<Gcc>, t0: Instant, seconds: u64, extra: Duration, lose: u64) {
        let mut id = 0;
        for batch in 0..seconds * 10 {
            let at = t0 + Duration::from_millis(100 * batch);
            let r = reports(at, id, 100, 1000, Duration::from_millis(1), extra, lose);
            id += 100;
            est.on_reports(at + Duration::from_millis(120), &r);
        }
    }

    #[test]
    fn no_estimate_is_published_before_feedback() {
        let (_est, out) = Published::gcc();
        assert_eq!(out.target(), None, "REMB stays in charge until then");
    }

    #[test]
    fn a_clean_path_raises_the_published_estimate() {
        let (mut est, out) = Published::gcc();
        run(&mut est, Instant::now(), 10, Duration::ZERO, 0);
        let target = out.target().expect("published");
        assert!(target > INITIAL_BITRATE as u64, "{target}");
        assert_eq!(target, est.target_bitrate() as u64);
        assert!(out.reports() >= 100);
    }

    #[test]
    fn heavy_loss_lowers_the_published_estimate() {
        let (mut est, out) = Published::gcc();
        run(&mut est, Instant::now(), 10, Duration::ZERO, 5);
        let target = out.target().expect("published");
        assert!(target < INITIAL_BITRATE as u64, "{target}");
        assert_eq!(target, out.loss_based());
        assert!(out.loss() > 0.1, "{}", out.loss());
    }
}
