//! Per-consumer simulcast layer choice. The target layer follows the consumer's preference and
//! estimated bandwidth; the layer actually forwarded only changes on a keyframe of the target,
//! so the receiver's decoder never sees a reference it does not have.

use std::time::{Duration, Instant};

/// Simulcast layer index: 0 is the lowest resolution.
pub type Layer = u8;

/// What to do with one packet of one layer for one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Forward,
    Drop,
}

/// Why a consumer's target layer last changed (reported with `consumerLayerChanged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerReason {
    /// The first layer chosen for the consumer.
    #[default]
    Start,
    /// The subscriber changed its maximum layer.
    Preference,
    /// The bandwidth estimate rose (a probe confirmed it, or REMB recovered).
    EstimateRose,
    /// The bandwidth estimate no longer carries the layer.
    EstimateFell,
    /// The layer stopped flowing from the publisher.
    LayerStopped,
}

#[derive(Debug, Clone)]
pub struct LayerSelector {
    current: Option<Layer>,
    target: Layer,
    /// Highest layer the consumer asked for.
    max_layer: Layer,
    /// Consumer's estimated receive bandwidth (bits/s), when known.
    bandwidth_bps: Option<u64>,
    /// After a step down for lack of bandwidth, no step up before this time.
    hold_until: Option<Instant>,
    /// After a step up, the estimate is not trusted to step down before this time: it only
    /// grows once the higher layer flows.
    grace_until: Option<Instant>,
    /// The estimate is our own send-side one (transport-cc and GCC), not the receiver's REMB.
    send_side: bool,
    /// The consumer raised its maximum: the next choice tries it whatever REMB says.
    raised: bool,
    /// The send-side estimator sees heavy loss towards the subscriber.
    lossy: bool,
    /// Why the target last changed.
    reason: LayerReason,
    /// Send-side, with probing: the most a step up may rely on (see `set_send_side_bandwidth`).
    up_bps: Option<u64>,
}

/// How long an estimate gets to catch up with a higher layer before it may force a step down.
pub const UPGRADE_GRACE: Duration = Duration::from_secs(5);

/// How long a consumer stays down after the bandwidth estimate forced it down: a receiver-side
/// estimate (REMB) only grows with what is sent, so upward moves are tried optimistically, and
/// this keeps a congested consumer from oscillating.
pub const CONGESTION_HOLD: Duration = Duration::from_secs(8);
/// With a send-side estimate: a layer is moved up to only when the estimate exceeds its
/// bitrate by this factor, and left only when the estimate falls below its bitrate, so an
/// estimate between the two keeps the layer (no oscillation on a stable link).
pub const UP_HEADROOM: f64 = 1.15;
/// With a send-side estimate: the current layer is kept while the estimate carries this
/// fraction of its measured bitrate (a layer's rate swings with keyframes and content, and a
/// delay-based estimate dips on scheduling noise; stepping down on each dip oscillates).
pub const STAY_MARGIN: f64 = 0.8;
/// With a send-side estimate: after a step down, no step up before this time.
pub const SEND_SIDE_HOLD: Duration = Duration::from_secs(2);

impl LayerSelector {
    pub fn new(max_layer: Layer) -> Self {
        Self {
            current: None,
            target: max_layer,
            max_layer,
            bandwidth_bps: None,
            hold_until: None,
            grace_until: None,
            send_side: false,
            raised: false,
            lossy: false,
            reason: LayerReason::Start,
            up_bps: None,
        }
    }

    /// A selector that a send-side estimate will drive: until the first estimate reaches it
    /// (next tick), it waits for the lowest layer rather than taking the top one on sight.
    pub fn for_send_side(max_layer: Layer) -> Self {
        Self {
            target: 0,
            send_side: true,
            ..Self::new(max_layer)
        }
    }

    pub fn current(&self) -> Option<Layer> {
        self.current
    }

    pub fn target(&self) -> Layer {
        self.target
    }

    pub fn max_layer(&self) -> Layer {
        self.max_layer
    }

    /// True while the consumer waits for a keyframe on the target layer; the caller should
    /// make sure one has been requested.
    pub fn wants_keyframe(&self) -> bool {
        self.current != Some(self.target)
    }

    /// A new maximum from the subscriber. Raising it is a request for the better picture, so
    /// with REMB (which only grows with what is sent) the higher layer is tried at once, hold
    /// or not, and gets the usual grace before the estimate may take it back.
    pub fn set_max_layer(&mut self, max: Layer) {
        self.raised |= max > self.max_layer;
        self.max_layer = max;
    }

    /// The receiver's estimate (REMB). Ignored once a send-side estimate is in charge.
    pub fn set_bandwidth(&mut self, bps: Option<u64>) {
        if self.send_side {
            return;
        }
        self.bandwidth_bps = bps;
    }

    /// Picks the target among the layers that are currently flowing, given each layer's
    /// measured bitrate (`None` = not flowing). Returns true when the target changed.
    ///
    /// The bandwidth estimate moves the consumer down when it no longer carries the current
    /// layer; moving up to the requested layer is tried whenever the consumer is not congested
    /// and not holding after a recent step down.
    /// This consumer's share of the send-side estimate towards its subscriber (bits/s). From
    /// then on REMB is ignored and layer choice follows [`UP_HEADROOM`] and [`SEND_SIDE_HOLD`].
    /// `lossy`: the subscriber reports losses beyond what a healthy path shows; the current
    /// layer then gets no [`STAY_MARGIN`] (a bottleneck's drop-tail queue keeps the delay-based
    /// estimate near the layer while the layer does not get through). `up`: when the
    /// connection can probe, the share a recent probe confirmed (0 when none did): a step up
    /// must fit within it too, so layers go up on measured capacity, never on the estimate's
    /// own growth.
    pub fn set_send_side_bandwidth(&mut self, bps: u64, lossy: bool, up: Option<u64>) {
        self.send_side = true;
        self.bandwidth_bps = Some(bps);
        self.lossy = lossy;
        self.up_bps = up;
    }

    pub fn bandwidth(&self) -> Option<u64> {
        self.bandwidth_bps
    }

    /// Why the target last changed.
    pub fn reason(&self) -> LayerReason {
        self.reason
    }

    /// Records why the target moves from `old` to `new`.
    fn note_change(&mut self, old: Layer, new: Layer, bitrates: &[Option<u64>], raised: bool) {
        let flowing = |l: Layer| bitrates.get(l as usize).copied().flatten().is_some();
        self.reason = if self.current.is_none() {
            LayerReason::Start
        } else if new > old && raised || new < old && old > self.max_layer {
            LayerReason::Preference
        } else if new < old && !flowing(old) {
            LayerReason::LayerStopped
        } else if new > old {
            LayerReason::EstimateRose
        } else {
            LayerReason::EstimateFell
        };
    }

    pub fn update_target(&mut self, now: Instant, bitrates: &[Option<u64>]) -> bool {
        let raised = self.raised;
        let old = self.target;
        let changed = self.choose_target(now, bitrates);
        if changed {
            self.note_change(old, self.target, bitrates, raised);
        }
        changed
    }

    fn choose_target(&mut self, now: Instant, bitrates: &[Option<u64>]) -> bool {
        let flowing = |l: usize| bitrates.get(l).copied().flatten();
        let lowest = (0..bitrates.len()).find(|&l| flowing(l).is_some());
        let Some(lowest) = lowest else {
            return false;
        };
        if self.send_side {
            let new = self.send_side_target(now, bitrates).unwrap_or(lowest) as Layer;
            let changed = new != self.target;
            self.target = new;
            return changed;
        }
        let best_within = |cap: Option<u64>| {
            (0..bitrates.len())
                .filter(|&l| l as Layer <= self.max_layer)
                .filter(|&l| flowing(l).is_some_and(|r| cap.is_none_or(|bw| r <= bw)))
                .max()
        };
        let bw = self.bandwidth_bps;
        let current_rate = self.current.and_then(|c| flowing(c as usize));
        if std::mem::take(&mut self.raised) && self.current.is_some() {
            self.hold_until = None;
            self.grace_until = Some(now + UPGRADE_GRACE);
        }
        let in_grace = self.grace_until.is_some_and(|t| now < t);
        let congested =
            !in_grace && matches!((bw, current_rate), (Some(bw), Some(r)) if bw * 10 < r * 9);
        let new = if congested || self.current.is_none() {
            if congested {
                self.hold_until = Some(now + CONGESTION_HOLD);
            }
            best_within(bw)
        } else if self.hold_until.is_some_and(|t| now < t) {
            // Hold: never above where we are, but follow a lowered preference.
            self.current
                .map(|c| c.min(self.max_layer) as usize)
                .filter(|&c| flowing(c).is_some())
                .or_else(|| best_within(bw))
        } else {
            best_within(None)
        };
        let new = new.unwrap_or(lowest) as Layer;
        if self.current.is_some_and(|c| new > c) && new != self.target {
            self.grace_until = Some(now + UPGRADE_GRACE);
        }
        let changed = new != self.target;
        self.target = new;
        changed
    }

    /// The layer a send-side estimate calls for: the highest that fits with headroom when going
    /// up, the current one while it fits at all, else the highest that fits.
    fn send_side_target(&mut self, now: Instant, bitrates: &[Option<u64>]) -> Option<usize> {
        let bw = self.bandwidth_bps.unwrap_or(0) as f64;
        let allowed = |l: usize| l as Layer <= self.max_layer;
        let lowest = (0..bitrates.len()).find(|&l| bitrates[l].is_some());
        // A layer flowing for less than a measurement period has no rate yet (1 bit/s stands
        // for "flowing"): only the lowest is assumed to fit.
        let fits = |l: usize, headroom: f64| {
            bitrates
                .get(l)
                .copied()
                .flatten()
                .is_some_and(|r| (r > 1 || Some(l) == lowest) && r as f64 * headroom <= bw)
        };
        let best = |headroom: f64| {
            (0..bitrates.len())
                .filter(|&l| allowed(l) && fits(l, headroom))
                .max()
        };
        let Some(current) = self.current.map(usize::from) else {
            return best(UP_HEADROOM).or_else(|| best(1.0));
        };
        let margin = if self.lossy { 1.0 } else { STAY_MARGIN };
        if !allowed(current) || !fits(current, margin) {
            self.hold_until = Some(now + SEND_SIDE_HOLD);
            return best(1.0);
        }
        let holding = self.hold_until.is_some_and(|t| now < t);
        let confirmed = |l: usize| {
            self.up_bps
                .is_none_or(|up| bitrates[l].is_some_and(|r| r as f64 * UP_HEADROOM <= up as f64))
        };
        match best(UP_HEADROOM) {
            Some(up) if up > current && !holding => {
                // The highest layer the probe confirmed, if above the current one.
                (current + 1..=up)
                    .rev()
                    .find(|&l| confirmed(l))
                    .or(Some(current))
            }
            _ => Some(current),
        }
    }

    /// Decides about one packet of `layer`; `keyframe` says whether it starts a keyframe.
    pub fn on_packet(&mut self, layer: Layer, keyframe: bool) -> Decision {
        if layer == self.target && keyframe && self.current != Some(layer) {
            self.current = Some(layer);
            return Decision::Forward;
        }
        if Some(layer) == self.current {
            Decision::Forward
        } else {
            Decision::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_keyframe_before_first_packet() {
        let mut s = LayerSelector::new(0);
        assert_eq!(s.on_packet(0, false), Decision::Drop);
        assert!(s.wants_keyframe());
        assert_eq!(s.on_packet(0, true), Decision::Forward);
        assert_eq!(s.on_packet(0, false), Decision::Forward);
        assert!(!s.wants_keyframe());
    }

    #[test]
    fn switches_up_only_on_target_keyframe() {
        let mut s = LayerSelector::new(0);
        s.on_packet(0, true);
        s.set_max_layer(2);
        assert!(s.update_target(
            Instant::now(),
            &[Some(150_000), Some(500_000), Some(1_500_000)]
        ));
        assert_eq!(s.target(), 2);
        assert_eq!(s.on_packet(2, false), Decision::Drop);
        assert_eq!(s.on_packet(0, false), Decision::Forward);
        assert_eq!(s.on_packet(2, true), Decision::Forward);
        assert_eq!(s.on_packet(0, false), Decision::Drop);
        assert_eq!(s.current(), Some(2));
    }

    #[test]
    fn bandwidth_caps_the_first_choice_but_never_below_the_lowest_layer() {
        let rates = [Some(150_000), Some(500_000), Some(1_500_000)];
        let mut s = LayerSelector::new(2);
        s.set_bandwidth(Some(600_000));
        s.update_target(Instant::now(), &rates);
        assert_eq!(s.target(), 1);
        let mut s = LayerSelector::new(2);
        s.set_bandwidth(Some(10_000));
        s.update_target(Instant::now(), &rates);
        assert_eq!(s.target(), 0);
    }

    #[test]
    fn an_estimate_that_only_reflects_what_is_sent_does_not_block_going_up() {
        let rates = [Some(150_000), Some(500_000), Some(1_500_000)];
        let t = Instant::now();
        let mut s = LayerSelector::new(0);
        s.update_target(t, &rates);
        s.on_packet(0, true);
        // The receiver estimates a little above the low layer it gets.
        s.set_bandwidth(Some(180_000));
        s.set_max_layer(2);
        s.update_target(t, &rates);
        assert_eq!(s.target(), 2);
    }

    #[test]
    fn a_fresh_step_up_is_not_undone_by_an_estimate_still_catching_up() {
        let rates = [Some(150_000), Some(500_000), Some(1_500_000)];
        let t = Instant::now();
        let mut s = LayerSelector::new(0);
        s.update_target(t, &rates);
        s.on_packet(0, true);
        s.set_max_layer(2);
        s.update_target(t, &rates);
        s.on_packet(2, true);
        s.set_bandwidth(Some(200_000));
        s.update_target(t + Duration::from_secs(1), &rates);
        assert_eq!(s.target(), 2, "within the grace period");
        s.update_target(t + UPGRADE_GRACE + Duration::from_secs(1), &rates);
        assert_eq!(s.target(), 0, "still no bandwidth after the grace period");
    }

    #[test]
    fn congestion_steps_down_and_holds_before_trying_again() {
        let rates = [Some(150_000), Some(500_000), Some(1_500_000)];
        let t = Instant::now();
        let mut s = LayerSelector::new(2);
        s.update_target(t, &rates);
        s.on_packet(2, true);
        s.set_bandwidth(Some(700_000));
        s.update_target(t, &rates);
        assert_eq!(s.target(), 1, "1.5 Mb/s does not fit in 700 kb/s");
        s.on_packet(1, true);
        s.set_bandwidth(Some(900_000));
        s.update_target(t + Duration::from_secs(1), &rates);
        assert_eq!(s.target(), 1, "held after congestion");
        s.update_target(t + CONGESTION_HOLD + Duration::from_secs(1), &rates);
        assert_eq!(s.target(), 2, "tries the top layer again after the hold");
    }

    #[test]
    fn missing_layers_are_skipped() {
        let mut s = LayerSelector::new(2);
        s.update_target(Instant::now(), &[Some(150_000), None, None]);
        assert_eq!(s.target(), 0);
        s.set_max_layer(1);
        s.update_target(Instant::now(), &[None, None, Some(1_000_000)]);
        assert_eq!(
            s.target(),
            2,
            "only layer flowing is used even above the cap"
        );
    }

    /// Layer bitrates of a 180p/360p/720p simulcast: 150 kbit/s, 500 kbit/s, 1.5 Mbit/s.
    const LAYERS: [Option<u64>; 3] = [Some(150_000), Some(500_000), Some(1_500_000)];

    /// Runs the chooser once a second for `seconds` at estimate `bps`, switching the layer
    /// forwarded as soon as the target moves (a keyframe every second); returns the layers.
    fn follow(s: &mut LayerSelector, t: &mut Instant, seconds: u64, bps: u64) -> Vec<Layer> {
        let mut seen = Vec::new();
        for _ in 0..seconds {
            s.set_send_side_bandwidth(bps, false, None);
            s.update_target(*t, &LAYERS);
            s.on_packet(s.target(), true);
            seen.push(s.current().unwrap());
            *t += Duration::from_secs(1);
        }
        seen
    }

    #[test]
    fn a_send_side_estimate_picks_the_highest_layer_it_carries_with_headroom() {
        let mut t = Instant::now();
        let mut s = LayerSelector::new(2);
        assert_eq!(follow(&mut s, &mut t, 1, 2_000_000), vec![2]);
        let mut s = LayerSelector::new(2);
        // 600 kbit/s carries the middle layer (500 kbit/s) with headroom, not the top.
        assert_eq!(follow(&mut s, &mut t, 1, 600_000), vec![1]);
        // The requested maximum still caps it.
        let mut s = LayerSelector::new(0);
        assert_eq!(follow(&mut s, &mut t, 1, 5_000_000), vec![0]);
    }

    #[test]
    fn a_falling_send_side_estimate_steps_down_at_once_and_waits_before_going_up() {
        let mut t = Instant::now();
        let mut s = LayerSelector::new(2);
        assert_eq!(follow(&mut s, &mut t, 2, 2_000_000), vec![2, 2]);
        // Capacity drops to 600 kbit/s: down to the middle layer in the same second.
        assert_eq!(follow(&mut s, &mut t, 1, 600_000), vec![1]);
        // It comes back: the top layer returns once the hold has passed, not before.
        let back = follow(&mut s, &mut t, 4, 2_000_000);
        assert_eq!(back[0], 1, "held right after the step down: {back:?}");
        assert_eq!(*back.last().unwrap(), 2, "{back:?}");
        assert!(back.iter().position(|&l| l == 2).unwrap() as u64 <= SEND_SIDE_HOLD.as_secs());
    }

    #[test]
    fn with_probing_a_step_up_waits_for_a_probe_to_confirm_it() {
        let t = Instant::now();
        let mut s = LayerSelector::new(2);
        s.set_send_side_bandwidth(600_000, false, Some(0));
        s.update_target(t, &LAYERS);
        s.on_packet(s.target(), true);
        assert_eq!(
            s.current(),
            Some(1),
            "the first choice follows the estimate"
        );
        // The estimate grows past the top layer on its own: no step up without a probe.
        s.set_send_side_bandwidth(2_000_000, false, Some(0));
        s.update_target(t + SEND_SIDE_HOLD, &LAYERS);
        assert_eq!(s.target(), 1);
        // A probe confirmed 2 Mbit/s: up.
        s.set_send_side_bandwidth(2_000_000, false, Some(2_000_000));
        s.update_target(t + SEND_SIDE_HOLD, &LAYERS);
        assert_eq!(s.target(), 2);
    }

    #[test]
    fn each_layer_change_says_why() {
        let mut t = Instant::now();
        let mut s = LayerSelector::new(2);
        follow(&mut s, &mut t, 1, 600_000);
        assert_eq!((s.current(), s.reason()), (Some(1), LayerReason::Start));
        follow(&mut s, &mut t, 4, 2_000_000);
        assert_eq!(
            (s.current(), s.reason()),
            (Some(2), LayerReason::EstimateRose)
        );
        follow(&mut s, &mut t, 1, 600_000);
        assert_eq!(
            (s.current(), s.reason()),
            (Some(1), LayerReason::EstimateFell)
        );
        s.set_max_layer(0);
        follow(&mut s, &mut t, 1, 600_000);
        assert_eq!(
            (s.current(), s.reason()),
            (Some(0), LayerReason::Preference)
        );
        s.set_max_layer(2);
        t += SEND_SIDE_HOLD;
        s.update_target(t, &[Some(150_000), Some(500_000), None]);
        assert_eq!((s.target(), s.reason()), (1, LayerReason::Preference));
        s.on_packet(1, true);
        s.update_target(t, &[Some(150_000), None, None]);
        assert_eq!((s.target(), s.reason()), (0, LayerReason::LayerStopped));
    }

    #[test]
    fn a_send_side_consumer_does_not_take_the_top_layer_before_its_first_estimate() {
        let mut s = LayerSelector::for_send_side(2);
        assert_eq!(
            s.on_packet(2, true),
            Decision::Drop,
            "a top keyframe seen first"
        );
        assert_eq!(s.on_packet(0, true), Decision::Forward);
        assert_eq!(s.current(), Some(0));
    }

    #[test]
    fn a_dip_of_the_estimate_just_under_the_layer_keeps_it() {
        let mut t = Instant::now();
        let mut s = LayerSelector::new(2);
        follow(&mut s, &mut t, 1, 2_000_000);
        // 1.3 Mbit/s against a 1.5 Mbit/s layer: within the stay margin.
        assert!(follow(&mut s, &mut t, 10, 1_300_000)
            .iter()
            .all(|&l| l == 2));
        // 1.1 Mbit/s is below it: down.
        assert_eq!(follow(&mut s, &mut t, 1, 1_100_000), vec![1]);
    }

    #[test]
    fn an_estimate_between_a_layer_and_its_headroom_changes_nothing_for_a_minute() {
        let mut t = Instant::now();
        let mut s = LayerSelector::new(2);
        // 1.6 Mbit/s: enough to keep the top layer (1.5), not enough to step up to it.
        follow(&mut s, &mut t, 1, 2_000_000);
        let stable = follow(&mut s, &mut t, 60, 1_600_000);
        assert!(stable.iter().all(|&l| l == 2), "{stable:?}");
        let mut s = LayerSelector::new(2);
        follow(&mut s, &mut t, 1, 600_000);
        let stable = follow(&mut s, &mut t, 60, 1_600_000);
        assert!(stable.iter().all(|&l| l == 1), "{stable:?}");
    }

    #[test]
    fn remb_is_ignored_once_a_send_side_estimate_is_in_charge() {
        let mut t = Instant::now();
        let mut s = LayerSelector::new(2);
        follow(&mut s, &mut t, 1, 2_000_000);
        s.set_bandwidth(Some(100_000));
        assert_eq!(s.bandwidth(), Some(2_000_000));
    }

    #[test]
    fn raising_the_maximum_tries_the_higher_layer_even_under_a_low_remb() {
        let t = Instant::now();
        let mut s = LayerSelector::new(0);
        s.set_bandwidth(Some(50_000));
        s.update_target(t, &LAYERS);
        s.on_packet(0, true);
        // REMB says less than the low layer carries: congested, held there.
        s.update_target(t + Duration::from_secs(1), &LAYERS);
        assert_eq!(s.target(), 0);
        s.set_max_layer(2);
        s.update_target(t + Duration::from_secs(2), &LAYERS);
        assert_eq!(s.target(), 2, "the request is tried at once");
        s.on_packet(2, true);
        // Within the grace the low estimate does not take it back; after it, it may.
        s.update_target(t + Duration::from_secs(4), &LAYERS);
        assert_eq!(s.current(), Some(2));
        assert_eq!(s.target(), 2);
        s.update_target(t + Duration::from_secs(2) + UPGRADE_GRACE, &LAYERS);
        assert_eq!(s.target(), 0, "congested after the grace");
    }
}
