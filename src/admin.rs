//! The operators' API: a listener of its own (`[admin]`, off unless configured, never the
//! public signaling port), every request authorized by a bearer token read from a file.
//! `meridian ctl` is its client. What it shows is the mesh as this node sees it: every member
//! with its load, health and drain state (from the heartbeats), this node's pipes with their
//! figures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ids::{NodeId, RegionId};
use crate::mesh::membership::MemberView;
use crate::mesh::PipeReport;
use crate::proto::pipe::Load;
use crate::signaling::SignalingMetrics;

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

/// What the admin API reads and changes.
#[derive(Clone)]
pub struct AdminState {
    /// SHA-256 of the token: requests are compared by digest.
    pub token_digest: Arc<[u8; 32]>,
    pub node: NodeId,
    pub region: RegionId,
    pub availability: Arc<crate::health::Availability>,
    pub members: watch::Receiver<Arc<Vec<MemberView>>>,
    pub pipes: Option<Arc<dyn Fn() -> Vec<PipeReport> + Send + Sync>>,
    pub metrics: Arc<SignalingMetrics>,
    /// The drain deadline its participants are told to move by (see `AppState::migration`).
    pub migration: Arc<watch::Sender<Option<tokio::time::Instant>>>,
    pub workers: crate::sfu::Workers,
}

/// SHA-256 of a token.
pub fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// One member as `ctl status` shows it.
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
}

/// One pipe of the answering node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipeStatus {
    pub node: NodeId,
    pub rtt_ms: f64,
    /// QUIC packets lost over packets sent, since the pipe opened.
    pub loss: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub nacked: u64,
    pub retransmitted: u64,
}

/// `GET /v1/admin/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeId,
    pub region: RegionId,
    pub draining: bool,
    /// Its media workers answer (else it is out of routing).
    pub healthy: bool,
    pub nodes: Vec<NodeStatus>,
    pub pipes: Vec<PipeStatus>,
    /// Sessions and participants on the answering node now (the load in `nodes` is a
    /// heartbeat old).
    #[serde(default)]
    pub sessions: u64,
    #[serde(default)]
    pub participants: u64,
    /// Seconds until the participants of a drain with a deadline must have moved.
    #[serde(default)]
    pub move_deadline_secs: Option<u64>,
    /// Participants closed because they had not moved by a drain's deadline, since start.
    #[serde(default)]
    pub closed_at_deadline: u64,
}

impl AdminState {
    fn status(&self) -> Status {
        let members = self.members.borrow().clone();
        let nodes = members
            .iter()
            .map(|m| NodeStatus {
                node: m.info.node.clone(),
                region: m.info.region.clone(),
                signaling_url: m.info.signaling_url.clone(),
                // The local view follows the switch at once, not at the next heartbeat.
                draining: if m.local {
                    self.availability.drained()
                } else {
                    m.draining
                },
                local: m.local,
                rtt_ms: m.rtt.map(|r| r.as_secs_f64() * 1000.0),
                load: m.load,
            })
            .collect();
        let pipes = self
            .pipes
            .as_ref()
            .map(|f| f())
            .unwrap_or_default()
            .into_iter()
            .map(|p| PipeStatus {
                node: p.node,
                rtt_ms: p.rtt.as_secs_f64() * 1000.0,
                loss: if p.sent_packets == 0 {
                    0.0
                } else {
                    p.lost_packets as f64 / p.sent_packets as f64
                },
                bytes_in: p.bytes_in,
                bytes_out: p.bytes_out,
                datagrams_in: p.datagrams_in,
                datagrams_out: p.datagrams_out,
                nacked: p.nacked,
                retransmitted: p.retransmitted,
            })
            .collect();
        let w = self.workers.stats();
        Status {
            node: self.node.clone(),
            region: self.region.clone(),
            draining: self.availability.drained(),
            healthy: !self.availability.unhealthy(),
            nodes,
            pipes,
            sessions: w.sessions.load(std::sync::atomic::Ordering::Relaxed),
            participants: w.participants.load(std::sync::atomic::Ordering::Relaxed),
            move_deadline_secs: self.migration.borrow().map(|d| {
                d.saturating_duration_since(tokio::time::Instant::now())
                    .as_secs()
            }),
            closed_at_deadline: self.metrics.errors("drained"),
        }
    }

    /// The request's bearer token against the configured one; the refusal to answer if it
    /// is missing or wrong (counted by code).
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let refuse = |status: StatusCode, code: &'static str, message: &str| {
            self.metrics.count(code);
            Box::new(
                (
                    status,
                    [(header::CONTENT_TYPE, "application/json")],
                    serde_json::json!({"code": code, "message": message}).to_string(),
                )
                    .into_response(),
            )
        };
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "admin_token_missing",
                "send the admin token as `Authorization: Bearer <token>` (meridian ctl --token-file)",
            ));
        };
        if digest(token.trim()) != *self.token_digest {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "admin_token_wrong",
                "the admin token is not this node's admin.token_file",
            ));
        }
        Ok(())
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/admin/status", get(status))
        .route("/v1/admin/drain", post(drain))
        .route("/v1/admin/undrain", post(undrain))
        .with_state(state)
}

fn json(status: &Status) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::to_string(status).unwrap_or_default(),
    )
        .into_response()
}

async fn status(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(refused) = s.authorize(&headers) {
        return *refused;
    }
    json(&s.status())
}

#[derive(Debug, Deserialize)]
struct DrainQuery {
    /// Move the participants away within this many seconds (at most a day).
    deadline_secs: Option<u64>,
}

/// Stops taking new sessions (routing skips the node; peers learn within a heartbeat). With
/// `?deadline_secs=N`, every participant here is told to move to the edge routing chooses for
/// it (make-before-break, by the SDK) and those still here after N seconds are closed
/// (`drained`, 4503). Without, sessions here carry on until they end.
async fn drain(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<DrainQuery>,
) -> Response {
    if let Err(refused) = s.authorize(&headers) {
        return *refused;
    }
    if !s.availability.set_drained(true) {
        tracing::warn!(node = %s.node, "draining: no new sessions (admin API)");
    }
    if let Some(secs) = q.deadline_secs {
        let secs = secs.min(86_400);
        tracing::warn!(node = %s.node, "draining: participants told to move within {secs} s");
        s.migration.send_replace(Some(
            tokio::time::Instant::now() + Duration::from_secs(secs),
        ));
    }
    json(&s.status())
}

async fn undrain(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(refused) = s.authorize(&headers) {
        return *refused;
    }
    if s.availability.set_drained(false) {
        tracing::warn!(node = %s.node, "drain undone: taking new sessions again (admin API)");
    }
    // Participants not yet moved stay.
    s.migration.send_replace(None);
    json(&s.status())
}

/// `meridian ctl`'s side: one request to a node's admin API.
pub async fn call(
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> Result<Status, CtlError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    // reqwest's TLS (an https admin URL behind a proxy) uses the process's rustls provider:
    // ring, as everywhere else here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let res = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(token)
        .timeout(std::time::Duration::from_secs(10))
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
    #[error("the node's answer is not a status: {0}")]
    Answer(String),
}

/// `ctl status` as a table.
pub fn table(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "answered by {} (region {}){}{}",
        s.node,
        s.region,
        if s.draining { ", draining" } else { "" },
        if s.healthy {
            ""
        } else {
            ", UNHEALTHY (media workers not answering)"
        }
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:<10} {:<9} {:>5} {:>8} {:>12} {:>9} {:>6} {:>9}",
        "NODE", "REGION", "STATE", "CPU", "SESSIONS", "PARTICIPANTS", "CONSUMERS", "LOAD", "RTT"
    );
    for n in &s.nodes {
        let state = if n.draining { "draining" } else { "up" };
        let rtt = n
            .rtt_ms
            .map(|r| format!("{r:.1} ms"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<9} {:>4.0}% {:>8} {:>12} {:>9} {:>6.2} {:>9}",
            format!("{}{}", n.node, if n.local { "*" } else { "" }),
            n.region,
            state,
            n.load.cpu * 100.0,
            n.load.sessions,
            n.load.participants,
            n.load.consumers,
            n.load.factor,
            rtt
        );
    }
    if !s.pipes.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<16} {:>9} {:>7} {:>12} {:>12}",
            "PIPE TO", "RTT", "LOSS", "IN", "OUT"
        );
        for p in &s.pipes {
            let _ = writeln!(
                out,
                "{:<16} {:>6.1} ms {:>6.2}% {:>12} {:>12}",
                p.node.to_string(),
                p.rtt_ms,
                p.loss * 100.0,
                bytes(p.bytes_in),
                bytes(p.bytes_out)
            );
        }
    }
    out
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
