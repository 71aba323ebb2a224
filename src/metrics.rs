//! Prometheus exposition with `prometheus-client`: the node's figures are encoded by its
//! OpenMetrics text encoder (types, help, `_total` suffixes, escaping), never written by hand.
//!
//! Two kinds of figures feed it:
//! - live `prometheus-client` metrics for what happens off the media path (join time, the
//!   clients' own statistics: [`Experience`]);
//! - atomics the media workers bump lock-free ([`AtomicHistogram`] and the workers' counters),
//!   read at scrape time by a [`prometheus_client::collector::Collector`] (see
//!   `signaling::exposition`). A media worker never takes a lock or allocates to count.
//!
//! Labels are bounded: region and node on every series, then worker index, role, direction,
//! peer node or reason code. Never a session, participant or user.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;

use crate::auth::Role;

/// The upper bounds of a histogram's buckets (the `+Inf` bucket is implied).
pub trait Buckets: Send + Sync + 'static {
    const BOUNDS: &'static [f64];
}

/// Durations in seconds: RTT, jitter, join and first-frame times.
#[derive(Debug)]
pub struct Seconds;
impl Buckets for Seconds {
    const BOUNDS: &'static [f64] = &[
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
}

/// Ratios 0..=1 (packet loss); the first bucket holds exactly no loss.
#[derive(Debug)]
pub struct Ratio;
impl Buckets for Ratio {
    const BOUNDS: &'static [f64] = &[0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];
}

/// Decoded picture heights in pixels.
#[derive(Debug)]
pub struct Pixels;
impl Buckets for Pixels {
    const BOUNDS: &'static [f64] = &[0.0, 180.0, 240.0, 360.0, 480.0, 720.0, 1080.0, 2160.0];
}

const MAX_BUCKETS: usize = 13;

/// A histogram a media worker observes into without locking: one atomic per bucket.
/// Several (one per worker) add up with [`AtomicHistogram::absorb`].
pub struct AtomicHistogram<B: Buckets> {
    counts: [AtomicU64; MAX_BUCKETS],
    /// Sum of the observations in millionths.
    sum_micros: AtomicU64,
    _bounds: PhantomData<B>,
}

impl<B: Buckets> Default for AtomicHistogram<B> {
    fn default() -> Self {
        const { assert!(B::BOUNDS.len() < MAX_BUCKETS) };
        Self {
            counts: Default::default(),
            sum_micros: AtomicU64::new(0),
            _bounds: PhantomData,
        }
    }
}

impl<B: Buckets> fmt::Debug for AtomicHistogram<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sum, count, _) = self.snapshot();
        f.debug_struct("AtomicHistogram")
            .field("sum", &sum)
            .field("count", &count)
            .finish()
    }
}

impl<B: Buckets> AtomicHistogram<B> {
    /// Counts one observation; negative or NaN values count as 0.
    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() && v > 0.0 { v } else { 0.0 };
        let i = B::BOUNDS
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(B::BOUNDS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((v * 1e6).min(u64::MAX as f64 / 2.0) as u64, Relaxed);
    }

    pub fn absorb(&self, other: &Self) {
        for (a, b) in self.counts.iter().zip(&other.counts) {
            a.fetch_add(b.load(Relaxed), Relaxed);
        }
        self.sum_micros
            .fetch_add(other.sum_micros.load(Relaxed), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Sum, count and the per-bucket counts (not cumulative) with their upper bounds, the
    /// last being `f64::MAX` for `+Inf`, as `prometheus-client`'s encoder takes them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = B::BOUNDS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(&self.counts)
            .map(|(le, c)| (le, c.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        (self.sum_micros.load(Relaxed) as f64 / 1e6, count, buckets)
    }
}

/// Label set of one role.
pub type RoleLabel = [(&'static str, &'static str); 1];

fn role_label(role: Role) -> RoleLabel {
    [("role", role.as_str())]
}

fn seconds_histogram() -> Histogram {
    Histogram::new(Seconds::BOUNDS.iter().copied())
}
fn ratio_histogram() -> Histogram {
    Histogram::new(Ratio::BOUNDS.iter().copied())
}
fn pixels_histogram() -> Histogram {
    Histogram::new(Pixels::BOUNDS.iter().copied())
}

type Hist = Family<RoleLabel, Histogram, fn() -> Histogram>;

/// What participants experience: the node's own join time, and the summaries the SDK sends
/// of its `getStats()` (see `ClientMessage::Stats`), by role. The node's region and name are
/// on every series.
#[derive(Debug, Clone)]
pub struct Experience {
    /// From the WebSocket's acceptance to the `joined` answer.
    pub join_seconds: Hist,
    pub client_rtt_seconds: Hist,
    pub client_jitter_seconds: Hist,
    pub client_loss_ratio: Hist,
    pub client_first_frame_seconds: Hist,
    pub client_frame_height_pixels: Hist,
    pub client_frames_decoded: Family<RoleLabel, Counter>,
    pub client_freezes: Family<RoleLabel, Counter>,
    pub client_reports: Family<RoleLabel, Counter>,
}

impl Default for Experience {
    fn default() -> Self {
        Self {
            join_seconds: Family::new_with_constructor(seconds_histogram),
            client_rtt_seconds: Family::new_with_constructor(seconds_histogram),
            client_jitter_seconds: Family::new_with_constructor(seconds_histogram),
            client_loss_ratio: Family::new_with_constructor(ratio_histogram),
            client_first_frame_seconds: Family::new_with_constructor(seconds_histogram),
            client_frame_height_pixels: Family::new_with_constructor(pixels_histogram),
            client_frames_decoded: Family::default(),
            client_freezes: Family::default(),
            client_reports: Family::default(),
        }
    }
}

/// One client's statistics summary, already checked for sane ranges.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClientSummary {
    pub rtt: Option<f64>,
    pub jitter: Option<f64>,
    pub loss: Option<f64>,
    pub first_frame: Option<f64>,
    pub frame_height: Option<f64>,
    /// Frames decoded and freezes since the previous summary.
    pub frames_decoded: u64,
    pub freezes: u64,
}

impl Experience {
    pub fn joined(&self, role: Role, took: std::time::Duration) {
        self.join_seconds
            .get_or_create(&role_label(role))
            .observe(took.as_secs_f64());
    }

    pub fn client_summary(&self, role: Role, s: &ClientSummary) {
        let l = role_label(role);
        let pairs = [
            (&self.client_rtt_seconds, s.rtt),
            (&self.client_jitter_seconds, s.jitter),
            (&self.client_loss_ratio, s.loss),
            (&self.client_first_frame_seconds, s.first_frame),
            (&self.client_frame_height_pixels, s.frame_height),
        ];
        for (h, v) in pairs {
            if let Some(v) = v {
                h.get_or_create(&l).observe(v);
            }
        }
        self.client_frames_decoded
            .get_or_create(&l)
            .inc_by(s.frames_decoded);
        self.client_freezes.get_or_create(&l).inc_by(s.freezes);
        self.client_reports.get_or_create(&l).inc();
    }

    /// Encodes every family (called by the node's collector on each scrape).
    pub fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let hists: [(&str, &str, &Hist); 6] = [
            (
                "meridian_join_seconds",
                "Time from the signaling connection's acceptance to the joined answer",
                &self.join_seconds,
            ),
            (
                "meridian_client_rtt_seconds",
                "Round-trip time the clients measure (getStats candidate pair), by role",
                &self.client_rtt_seconds,
            ),
            (
                "meridian_client_jitter_seconds",
                "Jitter of the media the clients receive (getStats inbound-rtp), by role",
                &self.client_jitter_seconds,
            ),
            (
                "meridian_client_loss_ratio",
                "Share of the packets the clients expected that never came, per report, by role",
                &self.client_loss_ratio,
            ),
            (
                "meridian_client_first_frame_seconds",
                "Time from a subscription to its first decoded video frame at the client",
                &self.client_first_frame_seconds,
            ),
            (
                "meridian_client_frame_height_pixels",
                "Height of the video the clients decode, per report, by role",
                &self.client_frame_height_pixels,
            ),
        ];
        for (name, help, h) in hists {
            h.encode(enc.encode_descriptor(name, help, None, MetricType::Histogram)?)?;
        }
        let counters: [(&str, &str, &Family<RoleLabel, Counter>); 3] = [
            (
                "meridian_client_frames_decoded",
                "Video frames the clients decoded, by role",
                &self.client_frames_decoded,
            ),
            (
                "meridian_client_freezes",
                "Video freezes the clients saw, by role",
                &self.client_freezes,
            ),
            (
                "meridian_client_reports",
                "Statistics summaries received from clients, by role",
                &self.client_reports,
            ),
        ];
        for (name, help, c) in counters {
            c.encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        Ok(())
    }
}

type NoExemplar = Option<&'static Exemplar<NoLabelSet, u64>>;

/// A counter family: `name` without `_total` (the encoder adds it).
pub fn counter<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?
            .encode_counter(&v, NoExemplar::None)?;
    }
    Ok(())
}

/// A counter without labels of its own.
pub fn scalar_counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter(&v, NoExemplar::None)
}

/// A gauge family.
pub fn gauge<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// A gauge without labels of its own.
pub fn scalar_gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: V,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// A histogram family from atomic histograms.
pub fn histogram<'h, L: EncodeLabelSet, B: Buckets>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, &'h AtomicHistogram<B>)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        let (sum, count, buckets) = h.snapshot();
        m.encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observation_lands_in_the_first_bucket_at_or_above_it() {
        let h = AtomicHistogram::<Ratio>::default();
        h.observe(0.0);
        h.observe(0.03);
        h.observe(7.0);
        h.observe(f64::NAN);
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 7.03).abs() < 1e-6);
        assert_eq!(buckets[0], (0.0, 2), "exact zero and NaN");
        assert_eq!(buckets[4], (0.05, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::MAX, 1), "+Inf");
    }

    #[test]
    fn workers_histograms_add_up() {
        let (a, b) = (
            AtomicHistogram::<Seconds>::default(),
            AtomicHistogram::<Seconds>::default(),
        );
        a.observe(0.02);
        b.observe(0.02);
        b.observe(3.0);
        a.absorb(&b);
        assert_eq!(a.count(), 3);
    }
}
