//! This node's load, sampled for heartbeats and routing: CPU from /proc, sessions, producers,
//! consumers and outgoing bitrate from the counters of all the node's workers.

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

/// Turns counters into a [`Load`] by differencing successive samples.
pub struct LoadMeter {
    /// Every worker's counters.
    stats: Vec<Arc<WorkerStats>>,
    capacity: Capacity,
    cores: f64,
    last: Option<(Instant, u64, u64)>,
    current: Load,
}

impl LoadMeter {
    pub fn new(stats: Vec<Arc<WorkerStats>>, capacity: Capacity) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        LoadMeter {
            stats,
            capacity,
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
        let factor = (f64::from(cpu) / c.max_cpu)
            .max(f64::from(sessions) / c.max_sessions as f64)
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
}
