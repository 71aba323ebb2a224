//! Per-consumer simulcast layer choice. The target layer follows the consumer's preference and
//! estimated bandwidth; the layer actually forwarded only changes on a keyframe of the target,
//! so the receiver's decoder never sees a reference it does not have.

/// Simulcast layer index: 0 is the lowest resolution.
pub type Layer = u8;

/// What to do with one packet of one layer for one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Forward,
    Drop,
}

#[derive(Debug, Clone)]
pub struct LayerSelector {
    current: Option<Layer>,
    target: Layer,
    /// Highest layer the consumer asked for.
    max_layer: Layer,
    /// Consumer's estimated receive bandwidth (bits/s), when known.
    bandwidth_bps: Option<u64>,
}

impl LayerSelector {
    pub fn new(max_layer: Layer) -> Self {
        Self {
            current: None,
            target: max_layer,
            max_layer,
            bandwidth_bps: None,
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

    pub fn set_max_layer(&mut self, max: Layer) {
        self.max_layer = max;
    }

    pub fn set_bandwidth(&mut self, bps: Option<u64>) {
        self.bandwidth_bps = bps;
    }

    /// Picks the target among the layers that are currently flowing, given each layer's
    /// measured bitrate (`None` = not flowing). Returns true when the target changed.
    pub fn update_target(&mut self, bitrates: &[Option<u64>]) -> bool {
        let mut best: Option<Layer> = None;
        let mut lowest: Option<Layer> = None;
        for (i, rate) in bitrates.iter().enumerate() {
            let Some(rate) = rate else { continue };
            let layer = i as Layer;
            if lowest.is_none() {
                lowest = Some(layer);
            }
            if layer > self.max_layer {
                continue;
            }
            if self.bandwidth_bps.is_some_and(|bw| *rate > bw) && best.is_some() {
                continue;
            }
            best = Some(layer);
        }
        let Some(new) = best.or(lowest) else {
            return false;
        };
        let changed = new != self.target;
        self.target = new;
        changed
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
        assert!(s.update_target(&[Some(150_000), Some(500_000), Some(1_500_000)]));
        assert_eq!(s.target(), 2);
        assert_eq!(s.on_packet(2, false), Decision::Drop);
        assert_eq!(s.on_packet(0, false), Decision::Forward);
        assert_eq!(s.on_packet(2, true), Decision::Forward);
        assert_eq!(s.on_packet(0, false), Decision::Drop);
        assert_eq!(s.current(), Some(2));
    }

    #[test]
    fn bandwidth_caps_the_target_but_never_below_the_lowest_layer() {
        let mut s = LayerSelector::new(2);
        s.set_bandwidth(Some(600_000));
        s.update_target(&[Some(150_000), Some(500_000), Some(1_500_000)]);
        assert_eq!(s.target(), 1);
        s.set_bandwidth(Some(10_000));
        s.update_target(&[Some(150_000), Some(500_000), Some(1_500_000)]);
        assert_eq!(s.target(), 0);
    }

    #[test]
    fn missing_layers_are_skipped() {
        let mut s = LayerSelector::new(2);
        s.update_target(&[Some(150_000), None, None]);
        assert_eq!(s.target(), 0);
        s.set_max_layer(1);
        s.update_target(&[None, None, Some(1_000_000)]);
        assert_eq!(
            s.target(),
            2,
            "only layer flowing is used even above the cap"
        );
    }
}
