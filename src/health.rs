//! Whether this node takes new sessions: not while an operator has it drained, nor while its
//! media workers stop answering. Either takes it out of routing at once (its own `/v1/edge`,
//! and its peers' within a heartbeat: the mesh announces it as draining), and `/readyz` says
//! why; `/healthz` reports the workers alone.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::sfu::Workers;

/// How often the workers are asked, and how long an answer may take.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);
pub const ANSWER_WITHIN: Duration = Duration::from_secs(1);

pub struct Availability {
    drained: AtomicBool,
    unhealthy: AtomicBool,
    /// Out of routing: drained or unhealthy (what the mesh announces as `draining`).
    out: Arc<AtomicBool>,
}

impl Availability {
    /// `out` is the flag the mesh announces.
    pub fn new(out: Arc<AtomicBool>) -> Self {
        Self {
            drained: AtomicBool::new(false),
            unhealthy: AtomicBool::new(false),
            out,
        }
    }

    /// Drains (or undrains) the node; returns whether it was drained before.
    pub fn set_drained(&self, on: bool) -> bool {
        let was = self.drained.swap(on, Relaxed);
        self.update();
        was
    }

    pub fn drained(&self) -> bool {
        self.drained.load(Relaxed)
    }

    /// Returns whether it was unhealthy before.
    pub fn set_unhealthy(&self, on: bool) -> bool {
        let was = self.unhealthy.swap(on, Relaxed);
        self.update();
        was
    }

    pub fn unhealthy(&self) -> bool {
        self.unhealthy.load(Relaxed)
    }

    /// Why the node takes no new sessions, if it does not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.unhealthy() {
            Some("a media worker is not answering")
        } else if self.drained() {
            Some("draining")
        } else {
            None
        }
    }

    fn update(&self) {
        self.out.store(self.drained() || self.unhealthy(), Relaxed);
    }
}

/// Asks every media worker to answer, every [`CHECK_EVERY`], and marks the node unhealthy
/// while one does not within [`ANSWER_WITHIN`].
pub async fn watch_workers(workers: Workers, availability: Arc<Availability>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = workers.respond(ANSWER_WITHIN).await;
        let was = availability.set_unhealthy(!ok);
        if was == ok {
            if ok {
                tracing::warn!("media workers answer again: back in routing");
            } else {
                tracing::error!(
                    within_ms = ANSWER_WITHIN.as_millis() as u64,
                    "a media worker did not answer: out of routing until it does"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_a_drain_or_ill_health_takes_the_node_out_of_routing() {
        let out = Arc::new(AtomicBool::new(false));
        let a = Availability::new(out.clone());
        assert_eq!(a.not_ready(), None);
        a.set_drained(true);
        assert!(out.load(Relaxed));
        assert_eq!(a.not_ready(), Some("draining"));
        a.set_unhealthy(true);
        a.set_drained(false);
        assert!(out.load(Relaxed), "still unhealthy");
        assert_eq!(a.not_ready(), Some("a media worker is not answering"));
        a.set_unhealthy(false);
        assert!(!out.load(Relaxed));
    }
}
