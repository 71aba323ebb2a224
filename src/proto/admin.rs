//! Operators' calls between nodes. `meridian ctl` talks to one node's admin API; that node
//! carries a call meant for another node over the pipe's control stream (`admin_request`,
//! answered by `admin_answer`), so the whole mesh is reached through any one node. The pipe's
//! mutual TLS (the cluster CA) authenticates the relaying node; the admin token stays on the
//! node that received it.
//!
//! The same types are the admin API's JSON, so `ctl --json` prints what crossed the mesh.

use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::ids::{ConsumerId, NodeId, ParticipantId, ProducerId, RegionId, SessionId, UserId};

/// What an operator asks of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminCall {
    /// The node's report.
    Report,
    /// Take no new sessions; with a deadline, tell every participant to move and close those
    /// still here when it passes.
    Drain {
        #[serde(default)]
        deadline_secs: Option<u64>,
    },
    /// Take new sessions again; participants told to move and still here stay.
    Undrain,
    /// The node's routing weight (its region's attraction is the distance divided by it) and
    /// the sessions at which it counts as full; `None` leaves a value as it is.
    Tune {
        #[serde(default)]
        weight: Option<f32>,
        #[serde(default)]
        max_sessions: Option<u32>,
    },
    /// Move whole sessions off the node until its load factor is at most `below` (all of them
    /// when it is draining): their participants are told to move within `deadline_secs`, and
    /// those that do not stay.
    Rebalance { below: f32, deadline_secs: u64 },
    /// The node's part of a session.
    Session { session: SessionId },
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminReply {
    Report(NodeReport),
    /// `None`: the node has no part in the session.
    Session {
        part: Option<SessionPart>,
    },
    /// The call could not be carried out, and why.
    Refused {
        reason: String,
    },
}

/// One node as it reports itself: state, figures, pipes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: NodeId,
    pub region: RegionId,
    pub draining: bool,
    /// Its media workers answer (else it is out of routing).
    pub healthy: bool,
    pub sessions: u64,
    pub participants: u64,
    /// Fraction of the machine's CPU used over the last heartbeat interval.
    pub cpu: f32,
    /// Load relative to capacity (1.0: full, no new sessions).
    pub load: f32,
    /// Operator's routing weight (1 unless set by `ctl weight`).
    pub weight: f32,
    /// Sessions at which the node counts as full.
    pub max_sessions: u32,
    /// Seconds until participants told to move (drain with a deadline) are closed.
    #[serde(default)]
    pub move_deadline_secs: Option<u64>,
    /// Participants told to move by a rebalance and still here.
    #[serde(default)]
    pub moving: u64,
    /// Participants the node's last order to move (a drain with a deadline, a rebalance)
    /// applied to when it was given; 0 when no order stands.
    #[serde(default)]
    pub told_to_move: u64,
    /// Participants closed because they had not moved by a drain's deadline, since start.
    pub closed_at_deadline: u64,
    pub pipes: Vec<PipeStatus>,
}

/// One pipe of a node, with its figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipeStatus {
    /// The node at the other end.
    pub node: NodeId,
    pub rtt_ms: f64,
    /// QUIC packets lost over packets sent, since the pipe opened.
    pub loss: f64,
    /// Media bits per second each way, over the last second.
    #[serde(default)]
    pub bitrate_in: u64,
    #[serde(default)]
    pub bitrate_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub nacked: u64,
    pub retransmitted: u64,
}

/// What one node holds of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionPart {
    pub node: NodeId,
    pub region: RegionId,
    /// The media worker hosting it.
    pub worker: u32,
    /// Participants connected to this node.
    pub participants: Vec<ParticipantPart>,
    /// Every producer of the session this node forwards: its own and those piped in.
    pub producers: Vec<ProducerPart>,
    /// Consumers of this node's participants.
    pub consumers: Vec<ConsumerPart>,
    /// The session's media and audit log are recorded on this node.
    pub recorded_here: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantPart {
    pub participant: ParticipantId,
    pub user: UserId,
    pub role: Role,
    pub publishing: bool,
    pub subscribing: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProducerPart {
    pub producer: ProducerId,
    pub participant: ParticipantId,
    pub user: UserId,
    /// `audio` or `video`.
    pub kind: String,
    /// Simulcast RIDs, lowest first.
    pub rids: Vec<String>,
    pub paused: bool,
    /// The node it is published on when piped in from another node; `None`: published here.
    pub piped_from: Option<NodeId>,
    /// Nodes this node pipes it to.
    pub piped_to: Vec<NodeId>,
    /// Consumers of it on this node.
    pub consumers: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerPart {
    pub consumer: ConsumerId,
    pub producer: ProducerId,
    pub participant: ParticipantId,
    pub paused: bool,
    /// The layer being forwarded now (`None`: none yet).
    pub layer: Option<u8>,
}
