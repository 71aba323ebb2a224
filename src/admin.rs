//! The operators' API: a listener of its own (`[admin]`, off unless configured, never the
//! public signaling port), every request authorized by a bearer token read from a file.
//! `meridian ctl` is its client, and reaches the whole mesh through any one node: a call for
//! another node (`?node=`, or every node of `?region=`) is carried over the pipe to it
//! ([`crate::mesh::operators`]) and carried out there by its [`Operations`], the same code
//! that serves calls for the node itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::ids::{NodeId, RegionId, SessionId};
use crate::mesh::load::Tuning;
use crate::mesh::membership::MemberView;
use crate::mesh::operators::{self, AdminRelay};
use crate::mesh::PipeReport;
pub use crate::proto::admin::{AdminCall, AdminReply, NodeReport, PipeStatus, SessionPart};
use crate::proto::pipe::Load;
use crate::signaling::{MoveOrder, SignalingMetrics};

/// `[admin]`: where the operators' API listens and the token it accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// A loopback or private address; put a TLS proxy in front to reach it from elsewhere.
    pub listen: SocketAddr,
    /// A file holding the bearer token (at least 32 characters; surrounding whitespace is
    /// ignored). `meridian ctl --token-file` reads the same file.
    pub token_file: PathBuf,
}

/// Shortest token accepted.
pub const MIN_TOKEN_CHARS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("cannot read admin.token_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin.token_file {path} holds {chars} characters; a token is at least {MIN_TOKEN_CHARS} (for example `openssl rand -hex 32`)")]
    TooShort { path: PathBuf, chars: usize },
}

/// Reads a token file (the node's and `ctl`'s).
pub fn read_token(path: &Path) -> Result<String, AdminTokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdminTokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim().to_owned();
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(AdminTokenError::TooShort {
            path: path.to_path_buf(),
            chars: token.chars().count(),
        });
    }
    Ok(token)
}

/// What operators' calls act on, on this node (for its own admin API and for calls its peers
/// relay).
#[derive(Clone)]
pub struct Operations {
    pub node: NodeId,
    pub region: RegionId,
    pub availability: Arc<crate::health::Availability>,
    pub members: watch::Receiver<Arc<Vec<MemberView>>>,
    pub pipes: Option<Arc<dyn Fn() -> Vec<PipeReport> + Send + Sync>>,
    pub metrics: Arc<SignalingMetrics>,
    /// Participants told to move (see `AppState::migration`).
    pub migration: Arc<watch::Sender<Option<MoveOrder>>>,
    pub workers: crate::sfu::Workers,
    pub tuning: Arc<Tuning>,
    /// `limits.max_sessions`: the capacity unless an operator set another.
    pub max_sessions: u32,
}

/// Longest deadline accepted for a move (a day).
const MAX_DEADLINE_SECS: u64 = 86_400;

/// Load factor a rebalance brings a node down to unless told otherwise.
pub const DEFAULT_REBALANCE_BELOW: f32 = 0.8;

impl Operations {
    /// Carries out one call.
    pub async fn carry_out(&self, call: AdminCall) -> AdminReply {
        match call {
            AdminCall::Report => {}
            AdminCall::Drain { deadline_secs } => self.drain(deadline_secs),
            AdminCall::Undrain => self.undrain(),
            AdminCall::Tune {
                weight,
                max_sessions,
            } => {
                // Both checked before either is applied.
                if let Err(reason) = check_tune(weight, max_sessions) {
                    return AdminReply::Refused { reason };
                }
                if let Some(w) = weight {
                    let _ = self.tuning.set_weight(w);
                }
                if let Some(n) = max_sessions {
                    let _ = self.tuning.set_max_sessions(n);
                }
                tracing::warn!(node = %self.node, weight = self.tuning.weight(), max_sessions = ?self.tuning.max_sessions(), "routing weight and capacity set (admin)");
            }
            AdminCall::Rebalance {
                below,
                deadline_secs,
            } => {
                if !(below > 0.0 && below <= 1.0) {
                    return AdminReply::Refused {
                        reason: format!("a rebalance brings the load factor below a figure in (0, 1], not {below}"),
                    };
                }
                self.rebalance(below, deadline_secs);
            }
            AdminCall::Session { session } => {
                return AdminReply::Session {
                    part: self.session_part(&session).await,
                };
            }
        }
        AdminReply::Report(self.report())
    }

    fn drain(&self, deadline_secs: Option<u64>) {
        if !self.availability.set_drained(true) {
            tracing::warn!(node = %self.node, "draining: no new sessions (admin)");
        }
        if let Some(secs) = deadline_secs {
            let secs = secs.min(MAX_DEADLINE_SECS);
            tracing::warn!(node = %self.node, "draining: participants told to move within {secs} s");
            let told = self.workers.sessions().iter().map(|(_, n)| *n as u64).sum();
            self.migration.send_replace(Some(MoveOrder {
                deadline: tokio::time::Instant::now() + Duration::from_secs(secs),
                sessions: None,
                enforce: true,
                told,
            }));
        }
    }

    fn undrain(&self) {
        if self.availability.set_drained(false) {
            tracing::warn!(node = %self.node, "drain undone: taking new sessions again (admin)");
        }
        // Participants not yet moved stay.
        self.migration.send_replace(None);
    }

    /// Tells the participants of enough whole sessions to move that the node's load factor
    /// falls to `below` (every session when the node is drained). Sessions with the fewest
    /// participants here go first: the fewest people are disturbed per session moved. A drain
    /// with a deadline under way is left as it is.
    fn rebalance(&self, below: f32, deadline_secs: u64) {
        if self.migration.borrow().as_ref().is_some_and(|o| o.enforce) {
            return;
        }
        let mut sessions = self.workers.sessions();
        let factor = self.local_load().factor;
        let take = if self.availability.drained() {
            sessions.len()
        } else if factor <= below || sessions.is_empty() {
            0
        } else {
            let share = f64::from(1.0 - below / factor);
            ((sessions.len() as f64 * share).ceil() as usize).clamp(1, sessions.len())
        };
        if take == 0 {
            tracing::info!(node = %self.node, factor, below, "rebalance: nothing to move");
            return;
        }
        sessions.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        sessions.truncate(take);
        let told = sessions.iter().map(|(_, n)| *n as u64).sum();
        let chosen: std::collections::HashSet<SessionId> =
            sessions.into_iter().map(|(s, _)| s).collect();
        tracing::warn!(node = %self.node, factor, below, sessions = chosen.len(), "rebalance: participants of {} sessions told to move", chosen.len());
        let secs = deadline_secs.min(MAX_DEADLINE_SECS);
        let order = MoveOrder {
            deadline: tokio::time::Instant::now() + Duration::from_secs(secs),
            sessions: Some(Arc::new(chosen)),
            enforce: false,
            told,
        };
        self.migration.send_replace(Some(order.clone()));
        // At the deadline the order lapses (those who stayed are told they may), unless
        // another has replaced it: later joins of those sessions here are not sent away.
        let migration = self.migration.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(order.deadline).await;
            migration.send_if_modified(|now| {
                let lapsed = now.as_ref() == Some(&order);
                if lapsed {
                    *now = None;
                }
                lapsed
            });
        });
    }

    fn local_load(&self) -> Load {
        self.members
            .borrow()
            .iter()
            .find(|m| m.local)
            .map(|m| m.load)
            .unwrap_or_default()
    }

    /// This node as it reports itself.
    pub fn report(&self) -> NodeReport {
        let load = self.local_load();
        let w = self.workers.stats();
        let order = self.migration.borrow().clone();
        let moving = match &order {
            Some(o) if !o.enforce => self
                .workers
                .sessions()
                .iter()
                .filter(|(s, _)| o.applies_to(s))
                .map(|(_, seats)| *seats as u64)
                .sum(),
            _ => 0,
        };
        NodeReport {
            node: self.node.clone(),
            region: self.region.clone(),
            draining: self.availability.drained(),
            healthy: !self.availability.unhealthy(),
            sessions: w.sessions.load(std::sync::atomic::Ordering::Relaxed),
            participants: w.participants.load(std::sync::atomic::Ordering::Relaxed),
            cpu: load.cpu,
            load: load.factor,
            weight: self.tuning.weight(),
            max_sessions: self.tuning.max_sessions().unwrap_or(self.max_sessions),
            move_deadline_secs: order.as_ref().filter(|o| o.enforce).map(|o| {
                o.deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs()
            }),
            moving,
            told_to_move: order.as_ref().map_or(0, |o| o.told),
            closed_at_deadline: self.metrics.errors("drained"),
            pipes: self
                .pipes
                .as_ref()
                .map(|f| f())
                .unwrap_or_default()
                .into_iter()
                .map(pipe_status)
                .collect(),
        }
    }

    async fn session_part(&self, session: &SessionId) -> Option<SessionPart> {
        let (worker, v) = self.workers.describe(session).await?;
        Some(SessionPart {
            node: self.node.clone(),
            region: self.region.clone(),
            worker: worker as u32,
            participants: v.participants,
            producers: v.producers,
            consumers: v.consumers,
            recorded_here: v.recorded,
        })
    }
}

fn check_tune(weight: Option<f32>, max_sessions: Option<u32>) -> Result<(), String> {
    let probe = Tuning::default();
    if let Some(w) = weight {
        probe.set_weight(w)?;
    }
    if let Some(n) = max_sessions {
        probe.set_max_sessions(n)?;
    }
    if weight.is_none() && max_sessions.is_none() {
        return Err("nothing to set: give a weight or a capacity".into());
    }
    Ok(())
}

fn pipe_status(p: PipeReport) -> PipeStatus {
    PipeStatus {
        node: p.node,
        rtt_ms: p.rtt.as_secs_f64() * 1000.0,
        loss: if p.sent_packets == 0 {
            0.0
        } else {
            p.lost_packets as f64 / p.sent_packets as f64
        },
        bitrate_in: p.bitrate_in,
        bitrate_out: p.bitrate_out,
        bytes_in: p.bytes_in,
        bytes_out: p.bytes_out,
        datagrams_in: p.datagrams_in,
        datagrams_out: p.datagrams_out,
        nacked: p.nacked,
        retransmitted: p.retransmitted,
    }
}

/// Answers the calls other nodes relay here (each in its own task: a slow session lookup
/// holds up no other call).
pub async fn serve_relayed(
    mut inbox: mpsc::UnboundedReceiver<operators::Inbound>,
    ops: Operations,
) {
    while let Some(inbound) = inbox.recv().await {
        if inbound.call != AdminCall::Report {
            tracing::info!(from = %inbound.from, call = ?inbound.call, "operator's call relayed by a peer");
        }
        let ops = ops.clone();
        tokio::spawn(async move {
            let reply = ops.carry_out(inbound.call).await;
            let _ = inbound.reply.send(reply);
        });
    }
}

/// What the admin API reads and changes.
#[derive(Clone)]
pub struct AdminState {
    /// SHA-256 of the token: requests are compared by digest.
    pub token_digest: Arc<[u8; 32]>,
    pub ops: Operations,
    /// Carries calls to other nodes; `None` on a node outside a mesh.
    pub relay: Option<AdminRelay>,
}

/// SHA-256 of a token.
pub fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// One member as the answering node's membership shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: NodeId,
    pub region: RegionId,
    pub signaling_url: String,
    pub draining: bool,
    /// The node that answered.
    pub local: bool,
    /// Round trip of the answering node's pipe to it.
    pub rtt_ms: Option<f64>,
    pub load: Load,
    #[serde(default = "neutral")]
    pub weight: f32,
}

fn neutral() -> f32 {
    1.0
}

/// A node a call could not reach or that refused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeError {
    pub node: NodeId,
    pub error: String,
}

/// `GET /v1/admin/status`, and the answer to every action: the mesh after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The node that answered.
    pub node: NodeId,
    pub region: RegionId,
    pub draining: bool,
    /// Its media workers answer (else it is out of routing).
    pub healthy: bool,
    /// Every member as the answering node sees it (heartbeat figures).
    pub nodes: Vec<NodeStatus>,
    /// The answering node's pipes.
    pub pipes: Vec<PipeStatus>,
    /// Sessions and participants on the answering node now.
    #[serde(default)]
    pub sessions: u64,
    #[serde(default)]
    pub participants: u64,
    /// Seconds until the answering node's participants of a drain must have moved.
    #[serde(default)]
    pub move_deadline_secs: Option<u64>,
    /// Participants the answering node closed at a drain's deadline, since start.
    #[serde(default)]
    pub closed_at_deadline: u64,
    /// Every member's own report, asked now (the answering node's first): the mesh's
    /// pipes, sessions and states.
    #[serde(default)]
    pub reports: Vec<NodeReport>,
    /// Members that did not answer, and targets of the action that refused it.
    #[serde(default)]
    pub errors: Vec<NodeError>,
}

impl Status {
    /// The report of `node`, if it answered.
    pub fn report(&self, node: &NodeId) -> Option<&NodeReport> {
        self.reports.iter().find(|r| &r.node == node)
    }
}

/// `GET /v1/admin/session?id=`: where each part of a session lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub session: SessionId,
    /// One per node holding part of the session.
    pub parts: Vec<SessionPart>,
    #[serde(default)]
    pub errors: Vec<NodeError>,
}

/// The query of every admin request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// The node to act on (default: the answering one).
    node: Option<NodeId>,
    /// Every node of this region.
    region: Option<RegionId>,
    deadline_secs: Option<u64>,
    weight: Option<f32>,
    max_sessions: Option<u32>,
    below: Option<f32>,
    /// A session id (`/v1/admin/session`).
    id: Option<SessionId>,
}

type Refusal = Box<Response>;

fn refuse(status: StatusCode, code: &'static str, message: &str) -> Refusal {
    Box::new(
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({"code": code, "message": message}).to_string(),
        )
            .into_response(),
    )
}

impl AdminState {
    /// The request's bearer token against the configured one; the refusal to answer if it
    /// is missing or wrong (counted by code).
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            self.ops.metrics.count("admin_token_missing");
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "admin_token_missing",
                "send the admin token as `Authorization: Bearer <token>` (meridian ctl --token-file)",
            ));
        };
        if digest(token.trim()) != *self.token_digest {
            self.ops.metrics.count("admin_token_wrong");
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "admin_token_wrong",
                "the admin token is not this node's admin.token_file",
            ));
        }
        Ok(())
    }

    /// Authorizes and reads the query.
    fn admit(
        &self,
        headers: &HeaderMap,
        query: Result<Query<Params>, QueryRejection>,
    ) -> Result<Params, Refusal> {
        self.authorize(headers)?;
        query.map(|Query(p)| p).map_err(|e| {
            self.ops.metrics.count("admin_bad_query");
            refuse(StatusCode::BAD_REQUEST, "admin_bad_query", &e.body_text())
        })
    }

    /// The nodes a call is for: `node=`, every member of `region=`, or this node.
    fn targets(&self, p: &Params) -> Result<Vec<NodeId>, Refusal> {
        let members = self.ops.members.borrow().clone();
        match (&p.node, &p.region) {
            (Some(_), Some(_)) => Err(refuse(
                StatusCode::BAD_REQUEST,
                "admin_bad_query",
                "name a node or a region, not both",
            )),
            (Some(n), None) => {
                if members.iter().any(|m| &m.info.node == n) {
                    Ok(vec![n.clone()])
                } else {
                    Err(refuse(
                        StatusCode::NOT_FOUND,
                        "unknown_node",
                        &format!("{n} is not a member of the mesh as {} sees it (ctl status lists the members)", self.ops.node),
                    ))
                }
            }
            (None, Some(r)) => {
                let nodes: Vec<NodeId> = members
                    .iter()
                    .filter(|m| &m.info.region == r)
                    .map(|m| m.info.node.clone())
                    .collect();
                if nodes.is_empty() {
                    Err(refuse(
                        StatusCode::NOT_FOUND,
                        "unknown_region",
                        &format!(
                            "no member of the mesh is in region {r} (ctl status lists the members)"
                        ),
                    ))
                } else {
                    Ok(nodes)
                }
            }
            (None, None) => Ok(vec![self.ops.node.clone()]),
        }
    }

    /// Carries out `call` on `node`: here, or relayed over the pipe to it.
    async fn call_on(&self, node: &NodeId, call: AdminCall) -> Result<AdminReply, String> {
        if node == &self.ops.node {
            return Ok(self.ops.carry_out(call).await);
        }
        match &self.relay {
            Some(relay) => relay.call(node, call).await.map_err(|e| e.to_string()),
            None => Err(format!("{node} is not connected to this node")),
        }
    }

    /// `call` on every target at once; the refusals and failures by node.
    async fn call_all(&self, targets: &[NodeId], call: &AdminCall) -> Vec<NodeError> {
        let answers =
            futures_util::future::join_all(targets.iter().map(|n| self.call_on(n, call.clone())))
                .await;
        targets
            .iter()
            .zip(answers)
            .filter_map(|(n, a)| {
                let error = match a {
                    Ok(AdminReply::Refused { reason }) => reason,
                    Err(e) => e,
                    Ok(_) => return None,
                };
                Some(NodeError {
                    node: n.clone(),
                    error,
                })
            })
            .collect()
    }

    /// The mesh now: this node's view of its members and every member's own report.
    async fn status(&self, mut errors: Vec<NodeError>) -> Status {
        let members = self.ops.members.borrow().clone();
        let nodes: Vec<NodeStatus> = members
            .iter()
            .map(|m| NodeStatus {
                node: m.info.node.clone(),
                region: m.info.region.clone(),
                signaling_url: m.info.signaling_url.clone(),
                // The local view follows the switch at once, not at the next heartbeat.
                draining: if m.local {
                    self.ops.availability.drained()
                } else {
                    m.draining
                },
                local: m.local,
                rtt_ms: m.rtt.map(|r| r.as_secs_f64() * 1000.0),
                load: m.load,
                weight: if m.local {
                    self.ops.tuning.weight()
                } else {
                    m.weight
                },
            })
            .collect();
        let answers = futures_util::future::join_all(
            nodes
                .iter()
                .map(|n| self.call_on(&n.node, AdminCall::Report)),
        )
        .await;
        let mut reports = Vec::new();
        for (n, a) in nodes.iter().zip(answers) {
            match a {
                Ok(AdminReply::Report(r)) => reports.push(r),
                Ok(AdminReply::Refused { reason }) => errors.push(NodeError {
                    node: n.node.clone(),
                    error: reason,
                }),
                Ok(AdminReply::Session { .. }) => {}
                Err(error) => errors.push(NodeError {
                    node: n.node.clone(),
                    error,
                }),
            }
        }
        let me = self.ops.report();
        Status {
            node: me.node.clone(),
            region: me.region.clone(),
            draining: me.draining,
            healthy: me.healthy,
            nodes,
            pipes: me.pipes.clone(),
            sessions: me.sessions,
            participants: me.participants,
            move_deadline_secs: me.move_deadline_secs,
            closed_at_deadline: me.closed_at_deadline,
            reports,
            errors,
        }
    }

    /// Authorizes, finds the targets, carries `call` out on each, and answers with the mesh.
    async fn act(
        &self,
        headers: &HeaderMap,
        query: Result<Query<Params>, QueryRejection>,
        call: impl FnOnce(&Params) -> Result<AdminCall, Refusal>,
    ) -> Response {
        let answer = async {
            let p = self.admit(headers, query)?;
            let call = call(&p)?;
            let targets = self.targets(&p)?;
            let errors = self.call_all(&targets, &call).await;
            Ok::<_, Refusal>(json(&self.status(errors).await))
        };
        answer.await.unwrap_or_else(|r| *r)
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/admin/status", get(status))
        .route("/v1/admin/drain", post(drain))
        .route("/v1/admin/undrain", post(undrain))
        .route("/v1/admin/weight", post(weight))
        .route("/v1/admin/capacity", post(capacity))
        .route("/v1/admin/rebalance", post(rebalance))
        .route("/v1/admin/session", get(session))
        .with_state(state)
}

fn json<T: Serialize>(body: &T) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::to_string(body).unwrap_or_default(),
    )
        .into_response()
}

async fn status(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Response {
    match s.admit(&headers, query) {
        Ok(_) => json(&s.status(Vec::new()).await),
        Err(r) => *r,
    }
}

/// Stops the targets taking new sessions (routing skips them; peers learn within a
/// heartbeat). With `deadline_secs=N`, every participant there is told to move to the edge
/// routing chooses for it (make-before-break, by the SDK) and those still there after N
/// seconds are closed (`drained`, 4503). Without, sessions there carry on until they end.
async fn drain(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Response {
    s.act(&headers, query, |p| {
        Ok(AdminCall::Drain {
            deadline_secs: p.deadline_secs,
        })
    })
    .await
}

async fn undrain(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Response {
    s.act(&headers, query, |_| Ok(AdminCall::Undrain)).await
}

/// `weight=W`: the targets' routing weight (a region's distance is divided by it).
async fn weight(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Response {
    s.act(&headers, query, |p| tune(p.weight, None)).await
}

/// `max_sessions=N`: the sessions at which each target counts as full.
async fn capacity(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Response {
    s.act(&headers, query, |p| tune(None, p.max_sessions)).await
}

fn tune(weight: Option<f32>, max_sessions: Option<u32>) -> Result<AdminCall, Refusal> {
    check_tune(weight, max_sessions)
        .map_err(|reason| refuse(StatusCode::BAD_REQUEST, "admin_bad_query", &reason))?;
    Ok(AdminCall::Tune {
        weight,
        max_sessions,
    })
}

/// Moves sessions off the targets until each is at most at `below` of its capacity (0.8
/// unless given; all of them from a drained node), within `deadline_secs` (30 unless given).
async fn rebalance(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Response {
    s.act(&headers, query, |p| {
        let below = p.below.unwrap_or(DEFAULT_REBALANCE_BELOW);
        if !(below > 0.0 && below <= 1.0) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "admin_bad_query",
                &format!("below is a load factor in (0, 1], not {below}"),
            ));
        }
        Ok(AdminCall::Rebalance {
            below,
            deadline_secs: p.deadline_secs.unwrap_or(30),
        })
    })
    .await
}

/// `id=S`: every node's part of the session.
async fn session(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Response {
    let p = match s.admit(&headers, query) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let Some(id) = p.id else {
        return *refuse(
            StatusCode::BAD_REQUEST,
            "admin_bad_query",
            "give the session as ?id=",
        );
    };
    let nodes: Vec<NodeId> = s
        .ops
        .members
        .borrow()
        .iter()
        .map(|m| m.info.node.clone())
        .collect();
    let answers = futures_util::future::join_all(nodes.iter().map(|n| {
        s.call_on(
            n,
            AdminCall::Session {
                session: id.clone(),
            },
        )
    }))
    .await;
    let mut out = SessionStatus {
        session: id,
        parts: Vec::new(),
        errors: Vec::new(),
    };
    for (n, a) in nodes.into_iter().zip(answers) {
        match a {
            Ok(AdminReply::Session { part }) => out.parts.extend(part),
            Ok(AdminReply::Refused { reason: error }) | Err(error) => {
                out.errors.push(NodeError { node: n, error })
            }
            Ok(AdminReply::Report(_)) => {}
        }
    }
    json(&out)
}

/// `meridian ctl`'s side: one request to a node's admin API, its JSON answer decoded.
pub async fn call<T: serde::de::DeserializeOwned>(
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> Result<T, CtlError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    // reqwest's TLS (an https admin URL behind a proxy) uses the process's rustls provider:
    // ring, as everywhere else here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let res = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(token)
        .timeout(std::time::Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| CtlError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let code = res.status();
    let body = res.text().await.unwrap_or_default();
    if !code.is_success() {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        return Err(CtlError::Refused {
            status: code.as_u16(),
            code: v["code"].as_str().unwrap_or("").to_owned(),
            message: v["message"].as_str().unwrap_or(&body).to_owned(),
        });
    }
    serde_json::from_str(&body).map_err(|e| CtlError::Answer(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the admin API at {url}: {reason} (is [admin] configured on that node, and --admin its listen address?)")]
    Unreachable { url: String, reason: String },
    #[error("the node refused: {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the node's answer is not what ctl expects: {0}")]
    Answer(String),
}

/// `ctl status` as tables: every node from its own report, every pipe of the mesh.
pub fn table(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "answered by {} (region {})", s.node, s.region);
    let _ = writeln!(
        out,
        "\n{:<16} {:<10} {:<10} {:>5} {:>6} {:>8} {:>12} {:>6} {:>9} {:>9}",
        "NODE",
        "REGION",
        "STATE",
        "CPU",
        "LOAD",
        "SESSIONS",
        "PARTICIPANTS",
        "WEIGHT",
        "CAPACITY",
        "RTT"
    );
    for n in &s.nodes {
        let rtt = n
            .rtt_ms
            .map(|r| format!("{r:.1} ms"))
            .unwrap_or_else(|| "-".into());
        let name = format!("{}{}", n.node, if n.local { "*" } else { "" });
        match s.report(&n.node) {
            Some(r) => {
                let state = match (r.healthy, r.draining) {
                    (false, _) => "UNHEALTHY",
                    (true, true) => "draining",
                    (true, false) if r.moving > 0 => "moving",
                    _ => "up",
                };
                let _ = writeln!(
                    out,
                    "{:<16} {:<10} {:<10} {:>4.0}% {:>6.2} {:>8} {:>12} {:>6.2} {:>9} {:>9}",
                    name,
                    r.region,
                    state,
                    r.cpu * 100.0,
                    r.load,
                    r.sessions,
                    r.participants,
                    r.weight,
                    r.max_sessions,
                    rtt
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{:<16} {:<10} {:<10} {:>4.0}% {:>6.2} {:>8} {:>12} {:>6.2} {:>9} {:>9}",
                    name,
                    n.region,
                    "no answer",
                    n.load.cpu * 100.0,
                    n.load.factor,
                    n.load.sessions,
                    n.load.participants,
                    n.weight,
                    "-",
                    rtt
                );
            }
        }
    }
    let pipes: Vec<(&NodeId, &PipeStatus)> = s
        .reports
        .iter()
        .flat_map(|r| r.pipes.iter().map(move |p| (&r.node, p)))
        .collect();
    if !pipes.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<16} {:<16} {:>9} {:>7} {:>12} {:>12} {:>10} {:>10}",
            "PIPE FROM", "TO", "RTT", "LOSS", "IN", "OUT", "IN/s", "OUT/s"
        );
        for (from, p) in pipes {
            let _ = writeln!(
                out,
                "{:<16} {:<16} {:>6.1} ms {:>6.2}% {:>12} {:>12} {:>10} {:>10}",
                from.to_string(),
                p.node.to_string(),
                p.rtt_ms,
                p.loss * 100.0,
                bytes(p.bytes_in),
                bytes(p.bytes_out),
                bits(p.bitrate_in),
                bits(p.bitrate_out)
            );
        }
    }
    for e in &s.errors {
        let _ = writeln!(out, "\n{}: {}", e.node, e.error);
    }
    out
}

/// `ctl session` as tables: per node, who is there, what is published, consumed and piped.
pub fn session_table(s: &SessionStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if s.parts.is_empty() {
        let _ = writeln!(out, "no node holds session {}", s.session);
    }
    for part in &s.parts {
        let _ = writeln!(
            out,
            "{} on {} (region {}, worker {}){}",
            s.session,
            part.node,
            part.region,
            part.worker,
            if part.recorded_here {
                ", recorded here"
            } else {
                ""
            }
        );
        for p in &part.participants {
            let _ = writeln!(
                out,
                "  participant {} {} ({}){}{}",
                p.participant,
                p.user,
                p.role.as_str(),
                if p.publishing { ", publishing" } else { "" },
                if p.subscribing { ", subscribing" } else { "" }
            );
        }
        for p in &part.producers {
            let from = p
                .piped_from
                .as_ref()
                .map(|n| format!("piped from {n}"))
                .unwrap_or_else(|| "published here".into());
            let to: Vec<String> = p.piped_to.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(
                out,
                "  producer {} {} of {} ({from}{}{}), {} consumers here",
                p.producer,
                p.kind,
                p.user,
                if to.is_empty() {
                    String::new()
                } else {
                    format!(", piped to {}", to.join(", "))
                },
                if p.paused { ", paused" } else { "" },
                p.consumers
            );
        }
        for c in &part.consumers {
            let _ = writeln!(
                out,
                "  consumer {} of {} for {}{}{}",
                c.consumer,
                c.producer,
                c.participant,
                c.layer.map(|l| format!(", layer {l}")).unwrap_or_default(),
                if c.paused { ", paused" } else { "" }
            );
        }
    }
    for e in &s.errors {
        let _ = writeln!(out, "{}: {}", e.node, e.error);
    }
    out
}

fn bits(n: u64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.1} Mb", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.0} kb", n as f64 / 1e3),
        n => format!("{n} b"),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
