//! Send-side bandwidth estimation towards subscribers, reachable from Meridian's own code.
//!
//! Each subscribe connection runs rtc's congestion control chain: the TWCC sender numbers every
//! packet that leaves, the subscriber's browser reports their arrival (transport-cc feedback),
//! and `CongestionControlInterceptor` resolves those reports and hands them to a
//! [`BandwidthEstimator`]. Ours is [`Estimator`]: GCC assembled from rtc-interceptor's own
//! parts (arrival-group slope and Kalman filter, overuse detector, AIMD rate controller, loss
//! controller — the same pipeline as rtc's `Gcc`), plus two things rtc's `Gcc` lacks and a
//! forwarding SFU needs:
//!
//! - **A ceiling from what is acknowledged.** An SFU sends what the chosen layers carry, not
//!   what the estimate allows, so GCC's multiplicative increase runs on with nothing on the
//!   wire to contradict it, and a full drop-tail queue (constant delay) hides the path's limit.
//!   As libwebrtc does, the estimate is held within 1.5 times the rate the subscriber
//!   acknowledges, plus 10 kbit/s. Only on connections that can probe (RTX negotiated): without
//!   probes, that ceiling would never let a consumer move up.
//! - **Probe clusters.** To move up, the worker ([`Prober`]) sends a short burst of RTX copies
//!   of recent packets on top of the media, at the rate the higher layers need. The estimator
//!   measures the rate at which that cluster arrived (bytes over the arrival span, as
//!   libwebrtc's probe bitrate estimator does) and, if it is above the current estimate,
//!   restarts its rate controllers from it. A cluster that queues behind a bottleneck arrives
//!   at the bottleneck's rate, so a failed probe also says what the path carries.
//!
//! The estimator lives boxed inside the connection's chain where the worker cannot reach it,
//! so it publishes into a [`SendEstimate`] the worker holds too; the probe handshake goes
//! through the same atomics. Layer choice reads it there; a future send path that bypasses
//! rtc's sender must report its packets to the same interceptor.
//!
//! No pacer is installed: a forwarding SFU sends what arrives, and a pacer's queue would add delay
//! to every copy. Layer choice is the rate control.
//!
//! One thing had to be fixed on Meridian's side for the numbers to mean anything: forwarded
//! copies kept the publisher's extension padding, so once the TWCC sender added its extension
//! many copies failed to marshal and were dropped after the send history had recorded them,
//! which GCC then read as 30-98% loss (`media::extensions::strip`).

use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::interceptor::{
    BandwidthEstimator, EstimatorStats, LossController, OveruseDetector, PacketReport,
    RateCalculator, RateController, SlopeEstimator,
};

/// Where the first estimate starts before any feedback (bits/s): enough for a middle layer
/// (a picture an agent can read), not for a top one; a probe right after the first feedback
/// finds out whether the path carries the top layer, instead of sending it and seeing.
pub const INITIAL_BITRATE: f64 = 450_000.0;
pub const MIN_BITRATE: f64 = 100_000.0;
pub const MAX_BITRATE: f64 = 20_000_000.0;
/// The ceiling over the acknowledged rate (libwebrtc's factor and offset).
pub const ACKED_FACTOR: f64 = 1.5;
pub const ACKED_OFFSET: f64 = 10_000.0;
/// The window the acknowledged rate is measured over, and the least of it needed to use it.
const ACKED_WINDOW: Duration = Duration::from_secs(1);
const ACKED_MIN_SPAN: Duration = Duration::from_millis(500);
/// After a successful probe the ceiling stays at the probed rate this long: long enough for
/// the higher layer's keyframe to arrive and its own traffic to be acknowledged.
pub const PROBE_HOLD: Duration = Duration::from_secs(3);
/// How long a probe cluster is sent for.
pub const PROBE_DURATION: Duration = Duration::from_millis(300);
/// How long the measurement of a cluster may take after it was sent.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a confirmed probe's rate may carry a step up (the switch waits for a keyframe).
pub const PROBE_CONFIRMED_FOR: Duration = Duration::from_secs(5);
/// Wait after a confirmed probe before the next, if the consumers still want more.
pub const PROBE_AFTER_CONFIRMED: Duration = Duration::from_secs(1);
/// Waits after a failed probe: doubling from the first to the last.
pub const PROBE_BACKOFF_MIN: Duration = Duration::from_secs(2);
pub const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A cluster is sent this much above what the consumers want, so success leaves headroom.
pub const PROBE_OVERSHOOT: f64 = 1.25;
/// Fewer packets than this say nothing about a rate.
const PROBE_MIN_PACKETS: u32 = 5;

/// One connection's latest send-side estimate, written by its estimator and read by the worker;
/// also the probe handshake between the two.
/// A zero target means "no transport-cc feedback yet": the consumer falls back to REMB.
#[derive(Debug)]
pub struct SendEstimate {
    epoch: Instant,
    target_bps: AtomicU64,
    delay_bps: AtomicU64,
    loss_bps: AtomicU64,
    acked_bps: AtomicU64,
    /// Loss fraction in parts per million.
    loss_ppm: AtomicU64,
    /// Feedback batches that reached the estimator.
    reports: AtomicU64,
    /// Set by the worker when this connection can send probes (RTX negotiated).
    probing: AtomicBool,
    /// The cluster being sent or measured (0: none), its start and end (µs since `epoch`;
    /// end is `u64::MAX` while it is being sent).
    probe_id: AtomicU64,
    probe_start_us: AtomicU64,
    probe_end_us: AtomicU64,
    /// The last cluster measured and its result (bits/s; 0 = nothing could be measured).
    probe_done: AtomicU64,
    probe_result_bps: AtomicU64,
    probe_queued: AtomicBool,
}

impl SendEstimate {
    fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            target_bps: AtomicU64::new(0),
            delay_bps: AtomicU64::new(0),
            loss_bps: AtomicU64::new(0),
            acked_bps: AtomicU64::new(0),
            loss_ppm: AtomicU64::new(0),
            reports: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            probe_id: AtomicU64::new(0),
            probe_start_us: AtomicU64::new(0),
            probe_end_us: AtomicU64::new(u64::MAX),
            probe_done: AtomicU64::new(0),
            probe_result_bps: AtomicU64::new(0),
            probe_queued: AtomicBool::new(false),
        }
    }

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

    /// The rate the subscriber acknowledged over the last second (0 until measured).
    pub fn acknowledged(&self) -> u64 {
        self.acked_bps.load(Relaxed)
    }

    /// Fraction of packets the subscriber reported lost, per the estimator's window.
    pub fn loss(&self) -> f64 {
        self.loss_ppm.load(Relaxed) as f64 / 1e6
    }

    pub fn reports(&self) -> u64 {
        self.reports.load(Relaxed)
    }

    /// Whether the estimate is held to the acknowledged rate (the connection can probe).
    pub fn set_probing(&self, on: bool) {
        self.probing.store(on, Relaxed);
    }

    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn at(&self, us: u64) -> Instant {
        self.epoch + Duration::from_micros(us)
    }

    /// Cluster `id` starts being sent now.
    pub fn begin_probe(&self, id: u64, now: Instant) {
        self.probe_start_us.store(self.us(now), Relaxed);
        self.probe_end_us.store(u64::MAX, Relaxed);
        self.probe_id.store(id, Release);
    }

    /// The current cluster's last packet has been sent.
    pub fn end_probe(&self, now: Instant) {
        self.probe_end_us.store(self.us(now), Release);
    }

    /// What cluster `id` measured, once it has been measured.
    pub fn probe_result(&self, id: u64) -> Option<ProbeMeasure> {
        (self.probe_done.load(Acquire) == id).then(|| ProbeMeasure {
            bps: self.probe_result_bps.load(Relaxed),
            queued: self.probe_queued.load(Relaxed),
        })
    }
}

/// What the feedback said about one probe cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeMeasure {
    /// The rate it was delivered at (bits/s; 0 = it said nothing).
    pub bps: u64,
    /// It arrived markedly slower than it was sent, or lost packets: the path's limit.
    pub queued: bool,
}

/// The rate acknowledged by the subscriber, over [`ACKED_WINDOW`] of feedback batches.
#[derive(Debug, Default)]
struct AckedRate {
    batches: VecDeque<(Instant, u64)>,
}

impl AckedRate {
    fn add(&mut self, now: Instant, bytes: u64) {
        self.batches.push_back((now, bytes));
        while self
            .batches
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > ACKED_WINDOW)
        {
            self.batches.pop_front();
        }
    }

    /// Bits per second, once at least [`ACKED_MIN_SPAN`] of feedback is in the window.
    fn rate(&self, now: Instant) -> Option<f64> {
        let &(oldest, _) = self.batches.front()?;
        let span = now.saturating_duration_since(oldest);
        if span < ACKED_MIN_SPAN {
            return None;
        }
        // The oldest batch opens the window; what arrived after it is the rate.
        let bytes: u64 = self.batches.iter().skip(1).map(|&(_, b)| b).sum();
        Some(bytes as f64 * 8.0 / span.as_secs_f64())
    }
}

/// What the feedback says about one probe cluster: every packet that left between its start
/// and end, media and probes alike.
#[derive(Debug, Default, Clone, Copy)]
struct Cluster {
    id: u64,
    start: Option<Instant>,
    end: Option<Instant>,
    sent: u32,
    sent_bytes: u64,
    first_departure: Option<Instant>,
    last_departure: Option<Instant>,
    last_sent_size: u64,
    arrived: u32,
    arrived_bytes: u64,
    first_arrival: Option<(Duration, u64)>,
    last_arrival: Option<Duration>,
    /// A report of a packet sent after the cluster: its feedback is complete.
    past_end: bool,
}

impl Cluster {
    fn add(&mut self, r: &PacketReport) {
        let (Some(start), end) = (self.start, self.end) else {
            return;
        };
        if r.departure < start {
            return;
        }
        if end.is_some_and(|e| r.departure > e) {
            self.past_end = true;
            return;
        }
        self.sent += 1;
        self.sent_bytes += r.size as u64;
        if self.first_departure.is_none_or(|t| r.departure < t) {
            self.first_departure = Some(r.departure);
        }
        if self.last_departure.is_none_or(|t| r.departure >= t) {
            self.last_departure = Some(r.departure);
            self.last_sent_size = r.size as u64;
        }
        if let (true, Some(at)) = (r.arrived, r.arrival) {
            self.arrived += 1;
            self.arrived_bytes += r.size as u64;
            if self.first_arrival.is_none_or(|(t, _)| at < t) {
                self.first_arrival = Some((at, r.size as u64));
            }
            if self.last_arrival.is_none_or(|t| at > t) {
                self.last_arrival = Some(at);
            }
        }
    }

    /// The cluster's delivered rate (bits/s): the lesser of the rate it was sent at and the
    /// rate it arrived at, and 0 when it is too small or lost too much to say; and whether it
    /// queued (arrived markedly slower than sent, or lost packets).
    fn rate(&self) -> (u64, bool) {
        if self.sent < PROBE_MIN_PACKETS || self.arrived < PROBE_MIN_PACKETS - 1 {
            return (0, false);
        }
        if (self.sent - self.arrived) as f64 > self.sent as f64 * 0.1 {
            return (0, true);
        }
        let (Some(d0), Some(d1), Some((a0, first_size)), Some(a1)) = (
            self.first_departure,
            self.last_departure,
            self.first_arrival,
            self.last_arrival,
        ) else {
            return (0, false);
        };
        let send_span = d1.saturating_duration_since(d0).as_secs_f64();
        let recv_span = a1.saturating_sub(a0).as_secs_f64();
        if send_span <= 0.0 || recv_span <= 0.0 {
            return (0, false);
        }
        let send = (self.sent_bytes - self.last_sent_size) as f64 * 8.0 / send_span;
        let recv = (self.arrived_bytes - first_size) as f64 * 8.0 / recv_span;
        // Arriving markedly slower than sent: the cluster queued behind the path's limit, and
        // its arrival rate is that limit (a little under, as libwebrtc takes it).
        if recv < 0.9 * send {
            ((0.95 * recv) as u64, true)
        } else {
            (send.min(recv) as u64, false)
        }
    }
}

/// GCC from rtc-interceptor's parts, with the acknowledged-rate ceiling and probe results (see
/// the module docs), publishing into a [`SendEstimate`].
pub struct Estimator {
    slope: SlopeEstimator,
    detector: OveruseDetector,
    received: RateCalculator,
    delay: RateController,
    loss: LossController,
    acked: AckedRate,
    target: f64,
    cluster: Cluster,
    /// After a successful probe: the ceiling stays at least at the probed rate until then.
    probed: Option<(f64, Instant)>,
    /// The target when the cluster in progress started: while it is measured, the probe's own
    /// traffic must not raise the estimate through the acknowledged-rate ceiling.
    before_probe: Option<f64>,
    out: Arc<SendEstimate>,
}

impl Estimator {
    /// A new estimator starting at [`INITIAL_BITRATE`], and the estimate it publishes to.
    pub fn new() -> (Self, Arc<SendEstimate>) {
        Self::starting_at(Instant::now())
    }

    /// The same with an explicit epoch for the probe handshake (tests on a virtual clock).
    pub fn starting_at(epoch: Instant) -> (Self, Arc<SendEstimate>) {
        let out = Arc::new(SendEstimate::new(epoch));
        (
            Self {
                slope: SlopeEstimator::new(),
                detector: OveruseDetector::new(),
                received: RateCalculator::default(),
                delay: RateController::new(INITIAL_BITRATE, MIN_BITRATE, MAX_BITRATE),
                loss: LossController::new(INITIAL_BITRATE, MIN_BITRATE, MAX_BITRATE),
                acked: AckedRate::default(),
                target: INITIAL_BITRATE,
                cluster: Cluster::default(),
                probed: None,
                before_probe: None,
                out: out.clone(),
            },
            out,
        )
    }

    /// Picks up a cluster the worker started, and measures the one in progress when its
    /// feedback is complete (or overdue).
    fn follow_probe(&mut self, now: Instant) {
        let id = self.out.probe_id.load(Acquire);
        if id != 0 && id != self.cluster.id && self.out.probe_done.load(Relaxed) != id {
            self.cluster = Cluster {
                id,
                start: Some(self.out.at(self.out.probe_start_us.load(Relaxed))),
                ..Cluster::default()
            };
            self.before_probe = Some(self.target);
        }
        if self.cluster.id == 0 {
            return;
        }
        let end_us = self.out.probe_end_us.load(Acquire);
        if self.cluster.end.is_none()
            && end_us != u64::MAX
            && self.out.probe_id.load(Relaxed) == self.cluster.id
        {
            self.cluster.end = Some(self.out.at(end_us));
        }
        let Some(end) = self.cluster.end else {
            return;
        };
        if !self.cluster.past_end && now < end + PROBE_TIMEOUT {
            return;
        }
        let (rate, queued) = self.cluster.rate();
        let before = self.before_probe.take().unwrap_or(self.target);
        if queued {
            // The path's limit, measured (or, when the cluster lost too much to measure, no
            // more than before): the delay-based half restarts from it rather than from a
            // figure the ceiling had been hiding.
            let limit = if rate > 0 { rate as f64 } else { before };
            if limit < self.delay.target() {
                self.delay = RateController::new(limit, MIN_BITRATE, MAX_BITRATE);
            }
            self.target = self.target.min(limit).clamp(MIN_BITRATE, MAX_BITRATE);
        } else if rate as f64 > self.target {
            let r = rate as f64;
            self.delay = RateController::new(r, MIN_BITRATE, MAX_BITRATE);
            if self.loss.target() < r {
                self.loss = LossController::new(r, MIN_BITRATE, MAX_BITRATE);
            }
            self.probed = Some((r, now + PROBE_HOLD));
            self.target = r.clamp(MIN_BITRATE, MAX_BITRATE);
        }
        self.out.probe_result_bps.store(rate, Relaxed);
        self.out.probe_queued.store(queued, Relaxed);
        self.out.probe_done.store(self.cluster.id, Release);
        self.cluster = Cluster::default();
    }

    fn publish(&self, now: Instant) {
        let o = &self.out;
        o.target_bps.store(self.target as u64, Relaxed);
        o.delay_bps.store(self.delay.target() as u64, Relaxed);
        o.loss_bps.store(self.loss.target() as u64, Relaxed);
        o.acked_bps
            .store(self.acked.rate(now).unwrap_or(0.0) as u64, Relaxed);
        o.loss_ppm.store(
            (self.loss.average_loss().unwrap_or(0.0) * 1e6) as u64,
            Relaxed,
        );
    }
}

impl BandwidthEstimator for Estimator {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        self.follow_probe(now);
        let mut usage = self.detector.usage();
        let (mut lost, mut acked) = (0, 0u64);
        for r in reports {
            if r.arrived {
                self.received.add(now, r.size);
                acked += r.size as u64;
            } else {
                lost += 1;
            }
            if let Some(trend) = self.slope.accumulate(r) {
                usage = self.detector.update(trend.at, trend.estimate_ms);
            }
            self.cluster.add(r);
        }
        self.acked.add(now, acked);
        let received = self.received.rate_bits_per_second(now);
        let delay = self.delay.update(now, usage, received);
        let loss = self.loss.update(now, lost, reports.len());
        let mut target = delay.min(loss);
        if self.out.probing.load(Relaxed) {
            if let Some(acked) = self.acked.rate(now) {
                let mut ceiling = ACKED_FACTOR * acked + ACKED_OFFSET;
                if let Some((probed, until)) = self.probed {
                    if now < until {
                        ceiling = ceiling.max(probed);
                    }
                }
                target = target.min(ceiling);
            }
        }
        if let Some(before) = self.before_probe {
            target = target.min(before);
        }
        self.target = target.clamp(MIN_BITRATE, MAX_BITRATE);
        self.follow_probe(now);
        self.out.reports.fetch_add(1, Relaxed);
        self.publish(now);
    }

    fn target_bitrate(&self) -> f64 {
        self.target
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.out.reports.load(Relaxed) > 0 {
            self.follow_probe(now);
            self.publish(now);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn stats(&self) -> EstimatorStats {
        let mut s = EstimatorStats::default();
        s.delay_based_bitrate = Some(self.delay.target());
        s.loss_based_bitrate = Some(self.loss.target());
        s.packet_loss = self.loss.average_loss();
        s
    }
}

/// Why the last probe ended as it did (for the session view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeOutcome {
    #[default]
    None,
    /// The path carried the cluster at the rate the consumers want.
    Confirmed,
    /// It queued behind the path's limit (or lost too much): the consumers get no more than
    /// the limit it measured.
    Refused,
    /// It arrived as fast as it was sent, but went out slower than asked (a busy node): the
    /// rate it reached is known to be carried, and the next probe comes soon.
    Unsaturated,
    /// No feedback in time.
    Unanswered,
}

#[derive(Debug, Clone, Copy, Default)]
enum ProbeState {
    #[default]
    Idle,
    Sending {
        id: u64,
        until: Instant,
        extra_bps: u64,
        next: Instant,
    },
    Measuring {
        id: u64,
        wanted: u64,
        deadline: Instant,
    },
}

/// When a subscribe connection probes and how fast, on a virtual clock: a probe is sent when
/// its consumers want more than the estimate allows, then again only after a backoff that
/// doubles while probes fail (see the `PROBE_*` constants).
#[derive(Debug, Default)]
pub struct Prober {
    state: ProbeState,
    next_id: u64,
    backoff: Option<Duration>,
    not_before: Option<Instant>,
    wanted: u64,
    /// Probe clusters started, and the last one's result.
    pub clusters: u64,
    pub last_outcome: ProbeOutcome,
    pub last_result_bps: u64,
    /// Clusters judged (confirmed, refused or unanswered).
    pub finished: u64,
    /// The rate the last confirmed probe measured, and until when it may be relied on.
    confirmed: Option<(u64, Instant)>,
}

impl Prober {
    /// The periodic look (every tick): `sending` is what the chosen layers carry, `wanted` what
    /// the consumers' best allowed layers would (with headroom). Starts, ends or judges a cluster.
    pub fn consider(&mut self, now: Instant, est: &SendEstimate, sending: u64, wanted: u64) {
        match self.state {
            ProbeState::Idle => {
                if est.target().is_none() {
                    return;
                }
                // Consumers want a higher layer than they get, and no recent probe confirmed
                // its rate.
                let more = wanted != sending && wanted > self.confirmed(now);
                if !more || self.not_before.is_some_and(|t| now < t) {
                    return;
                }
                self.next_id += 1;
                self.clusters += 1;
                self.wanted = wanted;
                let total = (wanted as f64 * PROBE_OVERSHOOT) as u64;
                est.begin_probe(self.next_id, now);
                self.state = ProbeState::Sending {
                    id: self.next_id,
                    until: now + PROBE_DURATION,
                    extra_bps: total.saturating_sub(sending).max(100_000),
                    next: now,
                };
            }
            ProbeState::Sending { id, until, .. } if now >= until => {
                est.end_probe(now);
                self.state = ProbeState::Measuring {
                    id,
                    wanted: self.wanted,
                    deadline: now + PROBE_TIMEOUT,
                };
            }
            ProbeState::Sending { .. } => {}
            ProbeState::Measuring {
                id,
                wanted,
                deadline,
            } => {
                let outcome = match est.probe_result(id) {
                    Some(m) => {
                        self.last_result_bps = m.bps;
                        if m.bps >= wanted {
                            ProbeOutcome::Confirmed
                        } else if m.queued || m.bps == 0 {
                            ProbeOutcome::Refused
                        } else {
                            ProbeOutcome::Unsaturated
                        }
                    }
                    None if now >= deadline => ProbeOutcome::Unanswered,
                    None => return,
                };
                self.finish(now, outcome);
            }
        }
    }

    fn finish(&mut self, now: Instant, outcome: ProbeOutcome) {
        self.last_outcome = outcome;
        self.finished += 1;
        self.state = ProbeState::Idle;
        // No more than the cluster was sent at: a measurement above it is an artefact of
        // bunched timestamps, and would let a consumer skip a layer no probe tried.
        let measured = self
            .last_result_bps
            .min((self.wanted as f64 * PROBE_OVERSHOOT) as u64);
        let until = now + PROBE_CONFIRMED_FOR;
        match outcome {
            ProbeOutcome::Confirmed => {
                self.confirmed = Some((measured, until));
                self.backoff = None;
                // Give the layer switch a moment before asking again (layer rates move, and a
                // confirmed rate can still fall short of the next layer's).
                self.not_before = Some(now + PROBE_AFTER_CONFIRMED);
            }
            ProbeOutcome::Unsaturated => {
                // The path carried all it was given: that much may be relied on, and the
                // shortfall was the sender's, so no backoff.
                if measured > self.confirmed(now) {
                    self.confirmed = Some((measured, until));
                }
                self.not_before = Some(now + PROBE_BACKOFF_MIN);
            }
            _ => {
                // The path's limit, measured: layers under it may still be stepped up to.
                if outcome == ProbeOutcome::Refused && measured > 0 {
                    self.confirmed = Some((measured, until));
                }
                let wait = self.backoff.unwrap_or(PROBE_BACKOFF_MIN);
                self.not_before = Some(now + wait);
                self.backoff = Some((wait * 2).min(PROBE_BACKOFF_MAX));
            }
        }
    }

    /// When the next probe packet is due, while a cluster is being sent.
    pub fn next_send(&self) -> Option<Instant> {
        match self.state {
            ProbeState::Sending { next, until, .. } if next < until => Some(next),
            _ => None,
        }
    }

    /// A probe packet of `bytes` went out: the next one is due when the cluster's extra rate
    /// has paid for it. (The cluster ends at the next [`Prober::consider`] after its time.)
    pub fn on_sent(&mut self, now: Instant, bytes: usize) {
        if let ProbeState::Sending {
            extra_bps, next, ..
        } = &mut self.state
        {
            let gap = Duration::from_secs_f64(bytes as f64 * 8.0 / *extra_bps as f64);
            *next = (*next + gap).max(now);
        }
    }

    /// Nothing could be sent (no recent packet to copy): the cluster is abandoned.
    pub fn abandon(&mut self, now: Instant, est: &SendEstimate) {
        if let ProbeState::Sending { .. } = self.state {
            est.end_probe(now);
            self.finish(now, ProbeOutcome::Unanswered);
        }
    }

    /// The rate a probe measured recently (0 when none did): what a step up may rely on.
    /// Not the estimator's starting point: a new publisher's layers run below their settled
    /// rates for a while, so a starting budget would let the top layer in on a rate it soon
    /// outgrows.
    pub fn confirmed(&self, now: Instant) -> u64 {
        self.confirmed
            .filter(|&(_, until)| now < until)
            .map_or(0, |(rate, _)| rate)
    }

    pub fn is_sending(&self) -> bool {
        matches!(self.state, ProbeState::Sending { .. })
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
    fn run(est: &mut Estimator, t0: Instant, seconds: u64, extra: Duration, lose: u64) {
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
        let (_est, out) = Estimator::starting_at(Instant::now());
        assert_eq!(out.target(), None, "REMB stays in charge until then");
    }

    #[test]
    fn a_clean_path_raises_the_published_estimate() {
        let (mut est, out) = Estimator::starting_at(Instant::now());
        run(&mut est, Instant::now(), 10, Duration::ZERO, 0);
        let target = out.target().expect("published");
        assert!(target > INITIAL_BITRATE as u64, "{target}");
        assert_eq!(target, est.target_bitrate() as u64);
        assert_eq!(
            out.acknowledged(),
            8_000_000,
            "100 kB acknowledged per 100 ms"
        );
        assert!(out.reports() >= 100);
    }

    #[test]
    fn heavy_loss_lowers_the_published_estimate() {
        let (mut est, out) = Estimator::starting_at(Instant::now());
        run(&mut est, Instant::now(), 10, Duration::ZERO, 5);
        let target = out.target().expect("published");
        assert!(target < INITIAL_BITRATE as u64, "{target}");
        assert_eq!(target, out.loss_based());
        assert!(out.loss() > 0.1, "{}", out.loss());
    }

    /// A drop-tail bottleneck on a virtual clock: packets leave at their departure, queue
    /// behind the link's rate, and are lost when the queue holds more than `queue` of delay.
    struct Path {
        capacity_bps: f64,
        queue: Duration,
        free_at: Duration,
        next_id: u64,
        pending: Vec<PacketReport>,
        t0: Instant,
    }

    impl Path {
        fn new(t0: Instant, capacity_bps: f64) -> Self {
            Self {
                capacity_bps,
                queue: Duration::from_millis(200),
                free_at: Duration::ZERO,
                next_id: 0,
                pending: Vec::new(),
                t0,
            }
        }

        fn send(&mut self, at: Instant, size: usize) {
            let sent = at - self.t0;
            let start = self.free_at.max(sent);
            let arrived = start - sent <= self.queue;
            let arrival = if arrived {
                self.free_at =
                    start + Duration::from_secs_f64(size as f64 * 8.0 / self.capacity_bps);
                Some(self.free_at + Duration::from_millis(20))
            } else {
                None
            };
            self.pending.push(PacketReport {
                ssrc: 1,
                id: self.next_id,
                rtp_sequence_number: self.next_id as u16,
                is_twcc: true,
                twcc_sequence_number: self.next_id as u16,
                size,
                arrived,
                departure: at,
                arrival,
                ecn: rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn::NotEct,
            });
            self.next_id += 1;
        }

        /// Feedback for everything that has arrived (or been lost) by `now`.
        fn feedback(&mut self, now: Instant) -> Vec<PacketReport> {
            let done = |r: &PacketReport| {
                r.arrival
                    .is_none_or(|a| self.t0 + a + Duration::from_millis(20) <= now)
            };
            let n = self.pending.iter().take_while(|r| done(r)).count();
            self.pending.drain(..n).collect()
        }
    }

    /// An estimator fed by 270 kbit/s of 1000-byte media through a [`Path`], with feedback
    /// every 100 ms, on a virtual clock.
    struct Sim {
        est: Estimator,
        out: Arc<SendEstimate>,
        path: Path,
        now: Instant,
        next_feedback: Instant,
    }

    const MEDIA_BPS: f64 = 270_000.0;

    impl Sim {
        fn new(capacity_bps: f64, probing: bool) -> Self {
            let t0 = Instant::now();
            let (est, out) = Estimator::starting_at(t0);
            out.set_probing(probing);
            Self {
                est,
                out,
                path: Path::new(t0, capacity_bps),
                now: t0,
                next_feedback: t0 + Duration::from_millis(100),
            }
        }

        /// The media alone for `dur`, plus `extra_bps` of probe packets on top.
        fn run(&mut self, dur: Duration, extra_bps: f64) {
            let step = Duration::from_millis(5);
            let end = self.now + dur;
            let (mut media, mut extra) = (0.0, 0.0);
            while self.now < end {
                media += MEDIA_BPS * step.as_secs_f64() / 8.0;
                extra += extra_bps * step.as_secs_f64() / 8.0;
                for credit in [&mut media, &mut extra] {
                    while *credit >= 1000.0 {
                        self.path.send(self.now, 1000);
                        *credit -= 1000.0;
                    }
                }
                self.now += step;
                if self.now >= self.next_feedback {
                    let r = self.path.feedback(self.now);
                    self.est.on_reports(self.now, &r);
                    self.next_feedback += Duration::from_millis(100);
                }
            }
        }

        /// Probe cluster `id` at `extra_bps` over the media, then `after` of media alone.
        fn probe(&mut self, id: u64, extra_bps: f64, after: Duration) -> u64 {
            self.out.begin_probe(id, self.now);
            self.run(PROBE_DURATION, extra_bps);
            self.out.end_probe(self.now);
            self.run(after, 0.0);
            self.out.probe_result(id).expect("measured").bps
        }

        fn target(&self) -> u64 {
            self.out.target().unwrap()
        }
    }

    #[test]
    fn a_connection_that_can_probe_is_held_near_what_it_acknowledges() {
        let mut sim = Sim::new(5_000_000.0, true);
        sim.run(Duration::from_secs(20), 0.0);
        let (target, acked) = (sim.target(), sim.out.acknowledged());
        assert!((250_000..290_000).contains(&acked), "acknowledged {acked}");
        assert!(
            target as f64 <= ACKED_FACTOR * acked as f64 + ACKED_OFFSET + 1.0,
            "{target} over {acked}"
        );

        // Without probes the ceiling would pin the consumer: GCC alone is left to grow.
        let mut sim = Sim::new(5_000_000.0, false);
        sim.run(Duration::from_secs(20), 0.0);
        assert!(sim.target() > 1_000_000, "{}", sim.target());
    }

    #[test]
    fn a_probe_that_arrives_at_its_rate_lifts_the_estimate_to_it() {
        let mut sim = Sim::new(5_000_000.0, true);
        sim.run(Duration::from_secs(5), 0.0);
        assert!(sim.target() < 500_000, "{}", sim.target());
        let result = sim.probe(1, 500_000.0, Duration::from_millis(400));
        assert!(
            (700_000..850_000).contains(&result),
            "probe measured {result}"
        );
        assert!(sim.target() >= 700_000, "{}", sim.target());
        // The ceiling holds at the probed rate while the higher layer is switched to.
        sim.run(Duration::from_secs(2), 0.0);
        assert!(sim.target() >= 700_000, "{}", sim.target());
    }

    #[test]
    fn a_probe_behind_a_bottleneck_measures_the_bottleneck_and_lifts_nothing() {
        let mut sim = Sim::new(450_000.0, true);
        sim.run(Duration::from_secs(5), 0.0);
        let before = sim.target();
        let result = sim.probe(1, 400_000.0, Duration::from_millis(800));
        assert!(
            (350_000..480_000).contains(&result),
            "probe measured {result}"
        );
        let after = sim.target();
        assert!(
            after <= before.max(result) + 40_000,
            "{before} -> {after} (delay {} loss {} acked {} probe {result})",
            sim.out.delay_based(),
            sim.out.loss_based(),
            sim.out.acknowledged()
        );
        sim.run(Duration::from_secs(5), 0.0);
        let later = sim.target();
        assert!(later < 621_000, "the top layer must still not fit: {later}");
    }

    fn estimate_at(t0: Instant, target: u64) -> Arc<SendEstimate> {
        let out = Arc::new(SendEstimate::new(t0));
        out.target_bps.store(target, Relaxed);
        out.reports.store(1, Relaxed);
        out
    }

    #[test]
    fn a_prober_probes_only_when_consumers_want_more_and_backs_off_while_refused() {
        let t0 = Instant::now();
        let est = estimate_at(t0, 400_000);
        let mut p = Prober::default();
        p.consider(t0, &est, 350_000, 350_000);
        assert!(!p.is_sending(), "nobody wants more than they get");
        let mut now = t0;
        let mut starts = Vec::new();
        for _ in 0..300 {
            let before = p.clusters;
            p.consider(now, &est, 270_000, 621_000);
            if p.clusters > before {
                starts.push(now - t0);
            }
            if let ProbeState::Measuring { id, .. } = p.state {
                // The path carries 450 kbit/s.
                est.probe_result_bps.store(450_000, Relaxed);
                est.probe_queued.store(true, Relaxed);
                est.probe_done.store(id, Relaxed);
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(p.last_outcome, ProbeOutcome::Refused);
        let gaps: Vec<u64> = starts.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert!(gaps.len() >= 3, "{starts:?}");
        assert!(
            gaps[0] < gaps[1] && gaps[1] < gaps[2],
            "backoff doubles: {gaps:?}"
        );
        assert!(
            gaps.iter().all(|&g| g <= PROBE_BACKOFF_MAX.as_secs() + 1),
            "{gaps:?}"
        );

        // Once the path carries it, the next probe is confirmed and the backoff is reset.
        let mut now = now + PROBE_BACKOFF_MAX;
        loop {
            p.consider(now, &est, 270_000, 621_000);
            if let ProbeState::Measuring { id, .. } = p.state {
                est.probe_result_bps.store(700_000, Relaxed);
                est.probe_queued.store(false, Relaxed);
                est.probe_done.store(id, Relaxed);
                p.consider(now, &est, 270_000, 621_000);
                break;
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(p.last_outcome, ProbeOutcome::Confirmed);
        assert_eq!(p.backoff, None);
    }

    /// Runs `p` until its next cluster is judged, the estimator having measured `bps`.
    fn judge(p: &mut Prober, est: &SendEstimate, now: &mut Instant, bps: u64, queued: bool) {
        let finished = p.finished;
        while p.finished == finished {
            p.consider(*now, est, 270_000, 621_000);
            if let ProbeState::Measuring { id, .. } = p.state {
                est.probe_result_bps.store(bps, Relaxed);
                est.probe_queued.store(queued, Relaxed);
                est.probe_done.store(id, Relaxed);
            }
            *now += Duration::from_millis(100);
        }
    }

    #[test]
    fn a_probe_short_of_its_rate_still_lets_the_layers_under_what_it_measured_in() {
        let t0 = Instant::now();
        let est = estimate_at(t0, 400_000);
        let mut p = Prober::default();
        let mut now = t0;
        // Behind a bottleneck: refused, but the middle layer fits under what it measured.
        judge(&mut p, &est, &mut now, 450_000, true);
        assert_eq!(p.last_outcome, ProbeOutcome::Refused);
        assert_eq!(p.confirmed(now), 450_000);
        assert_eq!(p.backoff, Some(PROBE_BACKOFF_MIN * 2));
        // Delivered as sent, only sent too slowly (a busy node): the rate it reached counts,
        // and the next probe comes after the shortest wait, the backoff untouched.
        let mut now = now + PROBE_BACKOFF_MAX;
        judge(&mut p, &est, &mut now, 500_000, false);
        assert_eq!(p.last_outcome, ProbeOutcome::Unsaturated);
        assert_eq!(p.confirmed(now), 500_000);
        assert_eq!(p.backoff, Some(PROBE_BACKOFF_MIN * 2));
        assert!(p.not_before.is_some_and(|t| t <= now + PROBE_BACKOFF_MIN));
        // Measured rates expire like confirmed ones.
        assert_eq!(p.confirmed(now + PROBE_CONFIRMED_FOR), 0);
    }

    #[test]
    fn a_probe_cluster_paces_its_packets_at_the_extra_rate() {
        let t0 = Instant::now();
        let est = estimate_at(t0, 400_000);
        let mut p = Prober::default();
        p.consider(t0, &est, 270_000, 621_000);
        let mut now = t0;
        let mut sent = 0;
        while let Some(t) = p.next_send() {
            now = t;
            p.on_sent(now, 1000);
            sent += 1;
        }
        // (621k * 1.25 - 270k) for 300 ms in 1000-byte packets: about 19.
        assert!((16..=22).contains(&sent), "{sent}");
        assert!(now - t0 < PROBE_DURATION);
    }
}
