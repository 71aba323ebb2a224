//! This node's load, sampled for heartbeats and routing: CPU from /proc, sessions, producers,
//! consumers and outgoing bitrate from the counters of all the node's workers.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use super::membership::Load;
use crate::sfu::WorkerStats;

/// Limits that define "full" (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub max_sessions: usize,
    pub max_consumers: usize,
    /// Fraction of the machine's CPU.
    pub max_cpu: f64,
}

/// What an operator changes at run time (`meridian ctl weight` / `capacity`): the node's
/// routing weight, sent in its heartbeats, and the sessions at which it counts as full.
#[derive(Debug)]
pub struct Tuning {
    /// f32 bits.
    weight: AtomicU32,
    /// 0: `limits.max_sessions`.
    max_sessions: AtomicU32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            weight: AtomicU32::new(1f32.to_bits()),
            max_sessions: AtomicU32::new(0),
        }
    }
}

/// Largest routing weight accepted (a region this many times more attractive than distance
/// alone says).
pub const MAX_WEIGHT: f32 = 100.0;

impl Tuning {
    pub fn weight(&self) -> f32 {
        f32::from_bits(self.weight.load(Relaxed))
    }

    /// A weight above 0 and at most [`MAX_WEIGHT`]; anything else is refused.
    pub fn set_weight(&self, w: f32) -> Result<(), String> {
        if !(w > 0.0 && w <= MAX_WEIGHT) {
            return Err(format!(
                "a weight is above 0 and at most {MAX_WEIGHT} (1 is neutral, 0.5 halves the region's pull), not {w}"
            ));
        }
        self.weight.store(w.to_bits(), Relaxed);
        Ok(())
    }

    /// The operator's session limit, if set.
    pub fn max_sessions(&self) -> Option<u32> {
        match self.max_sessions.load(Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// At least one session.
    pub fn set_max_sessions(&self, n: u32) -> Result<(), String> {
        if n == 0 {
            return Err("a node's capacity is at least one session (drain it to take none)".into());
        }
        self.max_sessions.store(n, Relaxed);
        Ok(())
    }
}

/// Turns counters into a [`Load`] by differencing successive samples.
pub struct LoadMeter {
    /// Every worker's counters.
    stats: Vec<Arc<WorkerStats>>,
    capacity: Capacity,
    tuning: Arc<Tuning>,
    cores: f64,
    last: Option<(Instant, u64, u64)>,
    current: Load,
}

impl LoadMeter {
    pub fn new(stats: Vec<Arc<WorkerStats>>, capacity: Capacity, tuning: Arc<Tuning>) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        LoadMeter {
            stats,
            capacity,
            tuning,
            cores,
            last: None,
            current: Load::default(),
        }
    }

    /// Samples now; CPU and bitrate are averages since the previous call.
    pub fn sample(&mut self, now: Instant) -> Load {
        let s = WorkerStats::default();
        for w in &self.stats {
            s.absorb(w);
        }
        let cpu_ns = crate::procfs::process_cpu_ns(std::process::id()).unwrap_or(0);
        let bytes = WorkerStats::get(&s.bytes_out);
        let (cpu, bitrate_out) = match self.last {
            Some((t, c, b)) => {
                let secs = now.saturating_duration_since(t).as_secs_f64();
                if secs > 0.0 {
                    (
                        (cpu_ns.saturating_sub(c) as f64 / 1e9 / secs / self.cores) as f32,
                        (bytes.saturating_sub(b) as f64 * 8.0 / secs) as u64,
                    )
                } else {
                    (self.current.cpu, self.current.bitrate_out)
                }
            }
            None => (0.0, 0),
        };
        self.last = Some((now, cpu_ns, bytes));
        let sessions = WorkerStats::get(&s.sessions) as u32;
        let consumers = WorkerStats::get(&s.consumers) as u32;
        let c = &self.capacity;
        let max_sessions = self.max_sessions();
        let factor = (f64::from(cpu) / c.max_cpu)
            .max(f64::from(sessions) / f64::from(max_sessions))
            .max(f64::from(consumers) / c.max_consumers as f64) as f32;
        self.current = Load {
            cpu: cpu.clamp(0.0, 1.0),
            sessions,
            participants: WorkerStats::get(&s.participants) as u32,
            producers: WorkerStats::get(&s.producers) as u32,
            consumers,
            bitrate_out,
            factor,
        };
        self.current
    }

    /// Sessions at which the node counts as full: the operator's figure, else the configured.
    pub fn max_sessions(&self) -> u32 {
        self.tuning
            .max_sessions()
            .unwrap_or(self.capacity.max_sessions.min(u32::MAX as usize) as u32)
    }
}
