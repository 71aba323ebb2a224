//! A node's media workers, one per core as mediasoup runs them, and the rule that places a
//! session (router) on one of them.
//!
//! Each worker owns its own media socket and every peer connection of the sessions placed on
//! it, so workers share nothing on the forwarding path. Placement happens at a session's first
//! join here: the worker hosting the fewest sessions takes it (the lowest number on a tie), and
//! every later participant of the session joins the same worker. A placement lasts while any
//! signaling connection holds a [`Seat`] in the session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{JoinError, WorkerHandle, WorkerStats};
use crate::ids::SessionId;

/// The workers of one node and where its sessions live.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<WorkerHandle>,
    /// Node-wide cap on sessions (`limits.max_sessions`).
    max_sessions: usize,
    placed: Mutex<Placements>,
}

#[derive(Default)]
struct Placements {
    /// Session → (worker, seats held).
    sessions: HashMap<SessionId, (usize, usize)>,
    /// Sessions placed on each worker.
    per_worker: Vec<usize>,
}

/// A signaling connection's place in a session: the worker hosting it. While any seat of a
/// session is held, later joins of the session go to the same worker.
pub struct Seat {
    workers: Workers,
    session: SessionId,
    worker: usize,
}

impl Seat {
    /// The worker hosting the session.
    pub fn worker(&self) -> &WorkerHandle {
        &self.workers.inner.handles[self.worker]
    }

    /// Its number on the node.
    pub fn index(&self) -> usize {
        self.worker
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let Ok(mut p) = self.workers.inner.placed.lock() else {
            return;
        };
        let Some((worker, seats)) = p.sessions.get_mut(&self.session) else {
            return;
        };
        *seats -= 1;
        if *seats == 0 {
            let worker = *worker;
            p.sessions.remove(&self.session);
            p.per_worker[worker] -= 1;
        }
    }
}

impl Workers {
    /// Wraps started workers (at least one), numbered by their position.
    pub fn new(handles: Vec<WorkerHandle>, max_sessions: usize) -> Self {
        assert!(!handles.is_empty(), "a node has at least one media worker");
        let per_worker = vec![0; handles.len()];
        Self {
            inner: Arc::new(Inner {
                handles,
                max_sessions,
                placed: Mutex::new(Placements {
                    sessions: HashMap::new(),
                    per_worker,
                }),
            }),
        }
    }

    /// Places a joining participant: on the worker already hosting the session, else on the
    /// worker with the fewest sessions. Refused when the node hosts `max_sessions` already.
    pub fn place(&self, session: &SessionId) -> Result<Seat, JoinError> {
        let mut p = self
            .inner
            .placed
            .lock()
            .map_err(|_| JoinError::WorkerGone)?;
        let worker = match p.sessions.get_mut(session) {
            Some((worker, seats)) => {
                *seats += 1;
                *worker
            }
            None => {
                if p.sessions.len() >= self.inner.max_sessions {
                    return Err(JoinError::TooManySessions);
                }
                let worker = (0..p.per_worker.len())
                    .min_by_key(|&i| p.per_worker[i])
                    .unwrap_or(0);
                p.per_worker[worker] += 1;
                p.sessions.insert(session.clone(), (worker, 1));
                worker
            }
        };
        Ok(Seat {
            workers: self.clone(),
            session: session.clone(),
            worker,
        })
    }

    /// The worker a session is placed on, if it is.
    pub fn worker_of(&self, session: &SessionId) -> Option<usize> {
        let p = self.inner.placed.lock().ok()?;
        p.sessions.get(session).map(|&(w, _)| w)
    }

    /// Sessions placed on each worker.
    pub fn placements(&self) -> Vec<usize> {
        self.inner
            .placed
            .lock()
            .map(|p| p.per_worker.clone())
            .unwrap_or_default()
    }

    /// Sessions placed here, with the seats (signaling connections) each holds.
    pub fn sessions(&self) -> Vec<(SessionId, usize)> {
        self.inner
            .placed
            .lock()
            .map(|p| {
                p.sessions
                    .iter()
                    .map(|(s, &(_, seats))| (s.clone(), seats))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the node's workers hold of `session`: the worker and its part.
    pub async fn describe(&self, session: &SessionId) -> Option<(usize, super::SessionView)> {
        for (i, w) in self.iter().enumerate() {
            if let Some(v) = w.describe(session.clone()).await {
                return Some((i, v));
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.inner.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.handles.is_empty()
    }

    /// Worker `i`. Panics past [`Workers::len`]: worker numbers come from this set.
    pub fn get(&self, i: usize) -> &WorkerHandle {
        &self.inner.handles[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &WorkerHandle> {
        self.inner.handles.iter()
    }

    /// Each worker's media address, by worker number (all are announced in candidates of
    /// the sessions they host).
    pub fn media_addrs(&self) -> Vec<SocketAddr> {
        self.iter().map(WorkerHandle::media_addr).collect()
    }

    /// The node's counters: every worker's, added up now.
    pub fn stats(&self) -> WorkerStats {
        let total = WorkerStats::default();
        for w in self.iter() {
            total.absorb(w.stats());
        }
        total
    }

    /// Every worker's counters, shared, for holders that outlive a borrow (the load meter).
    pub fn shared_stats(&self) -> Vec<Arc<WorkerStats>> {
        self.iter().map(WorkerHandle::shared_stats).collect()
    }

    /// Whether every worker answers a command within `within` (for `/healthz`).
    pub async fn respond(&self, within: Duration) -> bool {
        for w in self.iter() {
            if !w.responds(within).await {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::spawn_worker;

    fn workers(n: u8, max_sessions: usize) -> Workers {
        let handles = (0..n)
            .map(|index| spawn_worker(crate::sfu::test_worker_config(index)).unwrap())
            .collect();
        Workers::new(handles, max_sessions)
    }

    fn sid(s: &str) -> SessionId {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn sessions_spread_over_workers_and_a_session_stays_on_one() {
        let w = workers(2, 100);
        let a1 = w.place(&sid("kyc-a")).unwrap();
        let b1 = w.place(&sid("kyc-b")).unwrap();
        assert_ne!(a1.index(), b1.index(), "two sessions on two idle workers");
        let a2 = w.place(&sid("kyc-a")).unwrap();
        assert_eq!(
            a1.index(),
            a2.index(),
            "a session's participants share a worker"
        );
        assert_eq!(w.placements(), vec![1, 1]);
        // The third session goes to either worker; the fourth to the other one.
        let c = w.place(&sid("kyc-c")).unwrap();
        let d = w.place(&sid("kyc-d")).unwrap();
        assert_ne!(c.index(), d.index());
        assert_eq!(w.placements(), vec![2, 2]);
    }

    #[tokio::test]
    async fn a_placement_ends_with_its_last_seat() {
        let w = workers(2, 100);
        let a1 = w.place(&sid("kyc-a")).unwrap();
        let a2 = w.place(&sid("kyc-a")).unwrap();
        let worker = a1.index();
        drop(a1);
        assert_eq!(w.worker_of(&sid("kyc-a")), Some(worker));
        drop(a2);
        assert_eq!(w.worker_of(&sid("kyc-a")), None);
        assert_eq!(w.placements(), vec![0, 0]);
    }

    #[tokio::test]
    async fn the_node_wide_session_cap_holds_across_workers() {
        let w = workers(2, 2);
        let _a = w.place(&sid("kyc-a")).unwrap();
        let _b = w.place(&sid("kyc-b")).unwrap();
        assert_eq!(
            w.place(&sid("kyc-c")).err(),
            Some(JoinError::TooManySessions)
        );
        // Joining a session already here is not a new session.
        assert!(w.place(&sid("kyc-a")).is_ok());
    }

    #[tokio::test]
    async fn node_counters_add_up_every_worker() {
        let w = workers(2, 10);
        use std::sync::atomic::Ordering::Relaxed;
        w.get(0).stats().rtp_in.fetch_add(3, Relaxed);
        w.get(1).stats().rtp_in.fetch_add(4, Relaxed);
        assert_eq!(WorkerStats::get(&w.stats().rtp_in), 7);
        assert!(w.respond(Duration::from_secs(5)).await);
        let ports: std::collections::HashSet<_> =
            w.media_addrs().iter().map(|a| a.port()).collect();
        assert_eq!(ports.len(), 2, "each worker has its own media port");
    }
}
