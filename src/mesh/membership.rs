//! Membership: which nodes are in the mesh right now, where they are, how loaded they are and
//! whether they accept new sessions. Protocol logic only: the mesh core feeds it pipe events
//! and heartbeats with the time, and asks it which peers have gone silent. No sockets, no clock.
//!
//! A member is a node with an established pipe (its `Hello` received). Every node sends a
//! heartbeat on each pipe once a second; a peer not heard from for [`FAILURE_AFTER`] is
//! declared down even if its QUIC connection has not timed out yet, and the driver closes its
//! pipe, which cleans the peer's remote state out of every session on this node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, PipeId, RegionId};

/// How often each node sends a heartbeat on every pipe.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Silence after which a peer is declared down (three missed heartbeats).
pub const FAILURE_AFTER: Duration = Duration::from_secs(3);

/// What a node tells its peers about itself when a pipe opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: NodeId,
    pub region: RegionId,
    /// WebSocket URL clients use to join this node, e.g. `wss://in-1.example.com/v1/ws`.
    pub signaling_url: String,
    pub latitude: f64,
    pub longitude: f64,
    /// Pipe address this node is reachable on (what discovery publishes for it).
    pub pipe_addr: Option<SocketAddr>,
}

pub use crate::proto::pipe::Load;

/// What a peer's heartbeat says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heartbeat {
    pub load: Load,
    pub draining: bool,
    pub weight: f32,
}

/// One member as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub info: NodeInfo,
    pub load: Load,
    /// Draining nodes keep their sessions but get no new ones.
    pub draining: bool,
    /// This node itself.
    pub local: bool,
    /// Smoothed round-trip time of the pipe to it (none for the local node).
    pub rtt: Option<Duration>,
    /// The operator's routing weight for the node (`meridian ctl weight`; 1 is neutral).
    pub weight: f32,
}

struct Peer {
    info: NodeInfo,
    pipe: PipeId,
    load: Load,
    draining: bool,
    weight: f32,
    last_heard: Instant,
}

/// The peers this node has heard from.
pub struct Membership {
    peers: HashMap<NodeId, Peer>,
}

impl Default for Membership {
    fn default() -> Self {
        Self::new()
    }
}

impl Membership {
    pub fn new() -> Self {
        Membership {
            peers: HashMap::new(),
        }
    }

    /// A pipe to `info.node` completed its Hello exchange.
    pub fn handle_joined(&mut self, now: Instant, pipe: PipeId, info: NodeInfo) {
        self.peers.insert(
            info.node.clone(),
            Peer {
                info,
                pipe,
                load: Load::default(),
                draining: false,
                weight: 1.0,
                last_heard: now,
            },
        );
    }

    /// A heartbeat arrived on `pipe`. Heartbeats on a pipe that is not the member's current one
    /// (a replaced duplicate) are ignored.
    pub fn handle_heartbeat(&mut self, now: Instant, pipe: PipeId, beat: Heartbeat) {
        if let Some(p) = self.peers.values_mut().find(|p| p.pipe == pipe) {
            p.load = beat.load;
            p.draining = beat.draining;
            p.weight = beat.weight;
            p.last_heard = now;
        }
    }

    /// The pipe closed: the member is gone.
    pub fn handle_pipe_closed(&mut self, pipe: PipeId) -> Option<NodeId> {
        let node = self
            .peers
            .iter()
            .find(|(_, p)| p.pipe == pipe)
            .map(|(n, _)| n.clone())?;
        self.peers.remove(&node);
        Some(node)
    }

    /// Peers silent for longer than [`FAILURE_AFTER`]: removed here, and their pipes returned so
    /// the driver closes them.
    pub fn poll_silent(&mut self, now: Instant) -> Vec<(NodeId, PipeId)> {
        let silent: Vec<(NodeId, PipeId)> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_heard) > FAILURE_AFTER)
            .map(|(n, p)| (n.clone(), p.pipe))
            .collect();
        for (n, _) in &silent {
            self.peers.remove(n);
        }
        silent
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Every member, this node first, peers in node id order. `rtt` gives a pipe's RTT.
    pub fn views(
        &self,
        local: MemberView,
        rtt: impl Fn(PipeId) -> Option<Duration>,
    ) -> Vec<MemberView> {
        let mut peers: Vec<&Peer> = self.peers.values().collect();
        peers.sort_by(|a, b| a.info.node.cmp(&b.info.node));
        std::iter::once(local)
            .chain(peers.into_iter().map(|p| MemberView {
                info: p.info.clone(),
                load: p.load,
                draining: p.draining,
                local: false,
                rtt: rtt(p.pipe),
                weight: p.weight,
            }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(node: &str, region: &str) -> NodeInfo {
        NodeInfo {
            node: node.parse().unwrap(),
            region: region.parse().unwrap(),
            signaling_url: format!("ws://{node}/v1/ws"),
            latitude: 0.0,
            longitude: 0.0,
            pipe_addr: None,
        }
    }

    fn local() -> MemberView {
        MemberView {
            info: info("a-1", "a"),
            load: Load::default(),
            draining: false,
            local: true,
            rtt: None,
            weight: 1.0,
        }
    }

    fn beat(load: Load, draining: bool, weight: f32) -> Heartbeat {
        Heartbeat {
            load,
            draining,
            weight,
        }
    }

    #[test]
    fn silent_peer_is_declared_down_after_three_missed_heartbeats() {
        let t0 = Instant::now();
        let mut m = Membership::new();
        m.handle_joined(t0, PipeId(1), info("b-1", "b"));
        m.handle_joined(t0, PipeId(2), info("c-1", "c"));
        for s in 1..=10u64 {
            let now = t0 + Duration::from_secs(s);
            // b keeps talking, c went quiet after joining.
            m.handle_heartbeat(now, PipeId(1), beat(Load::default(), false, 1.0));
            let down = m.poll_silent(now);
            if s <= 3 {
                assert!(down.is_empty(), "at {s}s");
            } else if s == 4 {
                assert_eq!(down, vec![("c-1".parse().unwrap(), PipeId(2))]);
            } else {
                assert!(down.is_empty());
            }
        }
        let views = m.views(local(), |_| None);
        let nodes: Vec<&str> = views.iter().map(|v| v.info.node.as_str()).collect();
        assert_eq!(nodes, ["a-1", "b-1"]);
    }

    #[test]
    fn heartbeats_carry_load_drain_state_and_weight() {
        let t0 = Instant::now();
        let mut m = Membership::new();
        m.handle_joined(t0, PipeId(7), info("b-1", "b"));
        let load = Load {
            consumers: 12,
            factor: 0.25,
            ..Load::default()
        };
        m.handle_heartbeat(t0, PipeId(7), beat(load, true, 0.5));
        // A heartbeat on an unknown pipe (a duplicate being replaced) changes nothing.
        m.handle_heartbeat(t0, PipeId(8), beat(Load::default(), false, 1.0));
        let v = m.views(local(), |p| Some(Duration::from_millis(p.0)));
        assert_eq!(v[1].load, load);
        assert!(v[1].draining);
        assert_eq!(v[1].weight, 0.5);
        assert_eq!(v[1].rtt, Some(Duration::from_millis(7)));
        assert_eq!(
            m.handle_pipe_closed(PipeId(7)),
            Some("b-1".parse().unwrap())
        );
        assert!(m.is_empty());
    }
}
