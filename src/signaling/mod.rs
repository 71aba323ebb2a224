//! The service edge: HTTP + WebSocket signaling, the browser SDK and demo pages, health and
//! Prometheus metrics. It authenticates, parses and relays; media state lives in the SFU worker.

pub mod edge;
pub mod exposition;
pub mod protocol;
pub mod records;
pub mod review;
pub mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};

use crate::auth::{TokenError, TokenVerifier};
use crate::compliance::policy::Recording;
use crate::ids::{NodeId, ParticipantId, ProducerId, RegionId};
use crate::sfu::{Dismissal, MediaKind, SfuEvent, WorkerHandle, Workers};
use protocol::{close, ClientMessage, ParseError, PublishedProducer, ServerMessage};

/// Counters of refused signaling input, by error code.
#[derive(Default)]
pub struct SignalingMetrics {
    errors: Mutex<BTreeMap<&'static str, u64>>,
    connections: std::sync::atomic::AtomicU64,
    /// Join times and the clients' own statistics.
    pub experience: crate::metrics::Experience,
}

impl SignalingMetrics {
    pub fn count(&self, code: &'static str) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    pub fn errors(&self, code: &str) -> u64 {
        self.errors
            .lock()
            .map(|m| m.get(code).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Compliance records of the sessions joined here, when `recording.enabled`.
    pub recorder: Option<crate::compliance::recorder::Recorder>,
    /// Which sessions are recorded, and where (token claims over these defaults).
    pub recording_policy: crate::compliance::policy::RecordingPolicy,
    /// Whether the node takes new sessions (drain, worker health), for `/healthz` and `/readyz`.
    pub availability: Arc<crate::health::Availability>,
    /// Sessions ended because their recording failed (here, or at their recording node):
    /// their connections close.
    pub recording_ended: tokio::sync::broadcast::Sender<crate::compliance::recorder::Ended>,
    /// Compliance profiles (`recording.profile`, `recording.profiles`).
    pub profiles: crate::compliance::profile::Profiles,
    /// The node's media workers; a joined connection talks to the one hosting its session.
    pub workers: Workers,
    pub verifier: TokenVerifier,
    pub metrics: Arc<SignalingMetrics>,
    pub max_message_bytes: usize,
    pub join_timeout: Duration,
    /// A joined WebSocket silent this long is closed.
    pub idle_timeout: Duration,
    /// Signaling connections admitted and refused, for `/metrics`.
    pub admission: Arc<crate::admission::Admission>,
    pub region: RegionId,
    pub node: NodeId,
    /// Pipe figures for `/metrics`, when the node is part of a mesh.
    pub pipes: Option<Arc<dyn Fn() -> Vec<crate::mesh::PipeReport> + Send + Sync>>,
    /// Edge selection for `/v1/edge`.
    pub edge: Arc<edge::EdgeRouting>,
    /// Mesh counters, when the node is part of a mesh.
    pub mesh_stats: Option<Arc<crate::mesh::MeshStats>>,
    /// Records of participants whose session is recorded on another node go through it.
    pub records: Option<crate::mesh::records::RecordRelay>,
    /// Signs the review page's file links (a fresh key each start: links last an hour).
    pub review_key: ring::hmac::Key,
    /// Participants whose connection was lost, kept for the resume grace period.
    pub parking: Arc<Parking>,
    /// Participants told to move to other nodes (a drain with a deadline, a rebalance): each
    /// is told where to, see `ServerMessage::Migrate`; `None` otherwise.
    pub migration: Arc<tokio::sync::watch::Sender<Option<MoveOrder>>>,
    /// Issues the region's TURN credentials (`[turn]`).
    pub turn: Option<crate::auth::turn::TurnIssuer>,
}

impl AppState {
    /// TURN servers with credentials for `user`, for `joined` and `resumed`.
    fn ice_servers(&self, user: &crate::ids::UserId) -> Vec<crate::auth::turn::IceServer> {
        self.turn
            .iter()
            .map(|t| t.issue(user.as_str(), SystemTime::now()))
            .collect()
    }
}

/// An operator's order to move participants off this node.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveOrder {
    pub deadline: tokio::time::Instant,
    /// Only these sessions' participants (a rebalance); `None`: every participant (a drain).
    pub sessions: Option<Arc<std::collections::HashSet<crate::ids::SessionId>>>,
    /// Close the participants still here at the deadline (a drain); a rebalance lets them stay.
    pub enforce: bool,
    /// Participants here the order applied to when it was given.
    pub told: u64,
}

impl MoveOrder {
    pub fn applies_to(&self, session: &crate::ids::SessionId) -> bool {
        self.sessions.as_ref().is_none_or(|s| s.contains(session))
    }
}

const SDK_JS: &str = include_str!("../../web/sdk/meridian.js");
const SDK_DTS: &str = include_str!("../../web/sdk/meridian.d.ts");
const USER_HTML: &str = include_str!("../../web/demo/user.html");
const AGENT_HTML: &str = include_str!("../../web/demo/agent.html");
const DEMO_JS: &str = include_str!("../../web/demo/demo.js");
const DEMO_CSS: &str = include_str!("../../web/demo/demo.css");
const REVIEW_HTML: &str = include_str!("../../web/review/review.html");
const REVIEW_JS: &str = include_str!("../../web/review/review.js");

/// Headers every page and script carries: the demo pages read a JWT from the URL and open the
/// camera, so they may not be framed, sniffed, or leak their URL to another site.
const SECURITY_HEADERS: [(header::HeaderName, &str); 4] = [
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (
        header::CONTENT_SECURITY_POLICY,
        // The SDK may ask another node's /v1/edge and join any node's WebSocket.
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         media-src 'self' blob: mediastream:; connect-src 'self' ws: wss: http: https:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
];

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    for (name, value) in SECURITY_HEADERS {
        r.headers_mut()
            .insert(name, header::HeaderValue::from_static(value));
    }
    r
}

/// The SDK is imported by integrators' pages on their own origins: a module script from
/// another origin loads only with CORS.
fn sdk(content_type: &'static str, body: &'static str) -> Response {
    let mut r = asset(content_type, body);
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    h.insert(
        "cross-origin-resource-policy",
        header::HeaderValue::from_static("cross-origin"),
    );
    r
}

/// The client-facing routes: signaling, edge selection, health, the SDK and demo pages.
pub fn router(state: AppState) -> Router {
    const JS: &str = "text/javascript; charset=utf-8";
    const HTML: &str = "text/html; charset=utf-8";
    Router::new()
        .route("/v1/ws", get(ws_upgrade))
        .route("/v1/edge", get(edge::edge))
        .route(
            "/v1/snapshot",
            axum::routing::post(snapshot_upload).options(snapshot_preflight),
        )
        .route("/v1/review/{session}", get(review::review))
        .route("/v1/review/{session}/{run}/{*file}", get(review::file))
        .route("/review.html", get(|| async { asset(HTML, REVIEW_HTML) }))
        .route("/review/review.js", get(|| async { asset(JS, REVIEW_JS) }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/sdk/meridian.js",
            get(|| async { sdk("text/javascript; charset=utf-8", SDK_JS) }),
        )
        .route(
            "/sdk/meridian.d.ts",
            get(|| async { sdk("text/plain; charset=utf-8", SDK_DTS) }),
        )
        .route("/demo/demo.js", get(|| async { asset(JS, DEMO_JS) }))
        .route(
            "/demo/demo.css",
            get(|| async { asset("text/css; charset=utf-8", DEMO_CSS) }),
        )
        .route("/demo/user.html", get(|| async { asset(HTML, USER_HTML) }))
        .route(
            "/demo/agent.html",
            get(|| async { asset(HTML, AGENT_HTML) }),
        )
        .with_state(state)
}

/// `ok` while the media worker answers a no-op command within a second; `503` otherwise, so a
/// load balancer or orchestrator stops sending clients to a node whose media thread is stuck.
/// `/readyz`: 200 while the node takes new sessions; 503 with the reason while it is drained
/// or a media worker is not answering (routing skips it then).
async fn readyz(State(s): State<AppState>) -> Response {
    match s.availability.not_ready() {
        None => "ready".into_response(),
        Some(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn healthz(State(s): State<AppState>) -> Response {
    if !s.availability.unhealthy() && s.workers.respond(Duration::from_secs(1)).await {
        "ok".into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "media worker not responding",
        )
            .into_response()
    }
}

/// An HTTP API error answer, `{"code","message"}`, counted by its code.
pub(crate) fn api_error(
    s: &AppState,
    status: axum::http::StatusCode,
    code: &'static str,
    message: String,
) -> Response {
    s.metrics.count(code);
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            // Token-authorized APIs: a console served by another node may read the answer.
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        serde_json::json!({"code": code, "message": message}).to_string(),
    )
        .into_response()
}

/// Why a session's rules refuse a participant before it joins.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RulesRefusal {
    #[error(transparent)]
    Profile(#[from] crate::compliance::profile::ProfileRefusal),
    #[error(transparent)]
    Policy(#[from] crate::compliance::policy::PolicyRefusal),
}

impl RulesRefusal {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            RulesRefusal::Profile(e) => e.code(),
            RulesRefusal::Policy(e) => e.code(),
        }
    }

    fn close_code(&self) -> u16 {
        match self {
            RulesRefusal::Profile(_)
            | RulesRefusal::Policy(crate::compliance::policy::PolicyRefusal::UnknownResidency(_)) => {
                close::UNAUTHORIZED
            }
            RulesRefusal::Policy(_) => close::INTERNAL,
        }
    }
}

type SessionRules = (
    Option<Arc<crate::compliance::profile::Profile>>,
    Option<Recording>,
);

impl AppState {
    /// The session's compliance profile (its rules over the token's recording claims), and
    /// whether and where the session is recorded, as the mesh stands now: the same answer on
    /// every node.
    pub(crate) fn session_rules(
        &self,
        claims: &crate::auth::Claims,
    ) -> Result<SessionRules, RulesRefusal> {
        let profile = self.profiles.resolve(claims.profile.as_deref())?;
        let (rec, residency) = match &profile {
            None => (claims.rec, claims.residency.clone()),
            Some(p) => p.recording(claims.rec, claims.residency.as_deref())?,
        };
        let members: Vec<(NodeId, RegionId)> = self
            .edge
            .members
            .borrow()
            .iter()
            .map(|m| (m.info.node.clone(), m.info.region.clone()))
            .collect();
        let recording = self.recording_policy.decide(
            rec,
            residency.as_deref(),
            (&self.node, &self.region),
            &members,
        )?;
        Ok((profile, recording))
    }

    /// Where the records of a session recorded as `recording` go from this node.
    fn records_to(&self, recording: Option<&Recording>) -> Option<records::RecordsTo> {
        match recording? {
            Recording::Here => self.recorder.clone().map(records::RecordsTo::Here),
            Recording::At(node) => self.records.clone().map(|relay| records::RecordsTo::There {
                relay,
                node: node.clone(),
            }),
        }
    }

    /// Writes a refused join (`join_refused`, with `code` and `fields`) to the audit log of
    /// the session `claims` name, wherever it is recorded; a session that is not recorded,
    /// or whose rules cannot be read from the claims, has no log to write to.
    async fn audit_refusal(
        &self,
        claims: &crate::auth::Claims,
        code: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) {
        let Ok((profile, recording)) = self.session_rules(claims) else {
            return;
        };
        let Some(rec) = self.records_to(recording.as_ref()) else {
            return;
        };
        let refusal = crate::compliance::recorder::Refusal {
            session: claims.sid.clone(),
            user: claims.sub.clone(),
            role: claims.role,
            via: None,
            profile: profile.map(|p| p.name.clone()),
            code: code.into(),
            fields,
        };
        if let Err(e) = rec.refused(refusal).await {
            tracing::error!(session = %claims.sid, error = %e, "a refused join was not recorded");
        }
    }

    /// The HTTP base (`http://host:port`) of a member's signaling.
    fn http_base_of(&self, node: &NodeId) -> Option<String> {
        let members = self.edge.members.borrow();
        let m = members.iter().find(|m| m.info.node == *node)?;
        let url = m.info.signaling_url.as_str();
        let url = url.strip_suffix("/v1/ws").unwrap_or(url);
        Some(if let Some(rest) = url.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if let Some(rest) = url.strip_prefix("ws://") {
            format!("http://{rest}")
        } else {
            url.to_owned()
        })
    }
}

/// The verified claims of a request's `Authorization: Bearer` token, or the error to answer.
fn bearer_claims(
    s: &AppState,
    headers: &axum::http::HeaderMap,
) -> Result<crate::auth::Claims, Box<Response>> {
    use axum::http::StatusCode;
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Err(Box::new(api_error(
            s,
            StatusCode::UNAUTHORIZED,
            "token_missing",
            "send the session token as `Authorization: Bearer <token>`".into(),
        )));
    };
    s.verifier.verify(token.trim()).map_err(|e| {
        Box::new(api_error(
            s,
            StatusCode::UNAUTHORIZED,
            e.code(),
            e.to_string(),
        ))
    })
}

/// For the recording APIs: this node's recorder and the verified claims of the request's
/// `Authorization: Bearer` token, or the error to answer.
pub(crate) fn recorder_and_claims<'a>(
    s: &'a AppState,
    headers: &axum::http::HeaderMap,
) -> Result<
    (
        &'a crate::compliance::recorder::Recorder,
        crate::auth::Claims,
    ),
    Box<Response>,
> {
    use axum::http::StatusCode;
    let Some(recorder) = &s.recorder else {
        return Err(Box::new(api_error(
            s,
            StatusCode::NOT_FOUND,
            "not_recorded",
            "this node does not record sessions (recording.enabled)".into(),
        )));
    };
    Ok((recorder, bearer_claims(s, headers)?))
}

/// CORS preflight of `POST /v1/snapshot`: an agent console served by one node uploads to the
/// session's recording node. The request is authorized by its bearer token, never by cookies,
/// so any origin may send it.
async fn snapshot_preflight() -> Response {
    (
        axum::http::StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::ACCESS_CONTROL_ALLOW_METHODS, "POST"),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "authorization, content-type",
            ),
            (header::ACCESS_CONTROL_MAX_AGE, "600"),
        ],
    )
        .into_response()
}

/// Largest evidence still accepted (bytes).
pub const MAX_SNAPSHOT_BYTES: usize = 4 << 20;

/// `POST /v1/snapshot`: an evidence still from the agent console (PNG or JPEG, at most
/// [`MAX_SNAPSHOT_BYTES`]), authorized by the agent's session token (`Authorization: Bearer`),
/// stored in the session's folder with its hash in the audit log. Answers `201` with
/// `{"file","sha256"}`, or an error `{"code","message"}`.
async fn snapshot_upload(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    use axum::http::StatusCode;
    let fail = |status: StatusCode, code: &'static str, message: String| {
        api_error(&s, status, code, message)
    };
    let claims = match bearer_claims(&s, &headers) {
        Ok(c) => c,
        Err(answer) => return *answer,
    };
    if claims.role != crate::auth::Role::Agent {
        return fail(
            StatusCode::FORBIDDEN,
            "not_allowed",
            "only the agent takes evidence snapshots".into(),
        );
    }
    // A session recorded by another node (its residency region's): the still goes there,
    // straight from the browser, and is never stored here.
    match s.session_rules(&claims) {
        Err(e) => return fail(StatusCode::FORBIDDEN, e.code(), e.to_string()),
        Ok((_, None)) => {
            return fail(
                StatusCode::NOT_FOUND,
                "not_recorded",
                "this session is not recorded, so it keeps no evidence".into(),
            )
        }
        Ok((_, Some(Recording::At(node)))) => {
            let Some(base) = s.http_base_of(&node) else {
                return fail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "recording_unavailable",
                    format!("the session is recorded by node {node}, which is not up"),
                );
            };
            s.metrics.count("recorded_elsewhere");
            return (
                StatusCode::MISDIRECTED_REQUEST,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
                ],
                serde_json::json!({
                    "code": "recorded_elsewhere",
                    "message": format!("the session is recorded by node {node}: send the snapshot to {base}/v1/snapshot"),
                    "url": format!("{base}/v1/snapshot"),
                })
                .to_string(),
            )
                .into_response();
        }
        Ok((_, Some(Recording::Here))) => {}
    }
    let Some(recorder) = &s.recorder else {
        return fail(
            StatusCode::NOT_FOUND,
            "not_recorded",
            "this node does not record sessions (recording.enabled)".into(),
        );
    };
    let bytes = match axum::body::to_bytes(body, MAX_SNAPSHOT_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_big",
                format!("a snapshot is at most {MAX_SNAPSHOT_BYTES} bytes"),
            )
        }
    };
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    let (extension, content_type) = if bytes.starts_with(PNG) {
        ("png", "image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        ("jpg", "image/jpeg")
    } else {
        return fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_an_image",
            "a snapshot is a PNG or JPEG image".into(),
        );
    };
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(content_type);
    if declared != content_type {
        return fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_an_image",
            format!("Content-Type says {declared:?} but the body is {content_type}"),
        );
    }
    let shot = crate::compliance::recorder::Snapshot {
        session: claims.sid.clone(),
        user: claims.sub.clone(),
        role: claims.role,
        extension,
        content_type,
        bytes: bytes.to_vec(),
    };
    match recorder.snapshot(shot).await {
        Ok(stored) => (
            StatusCode::CREATED,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            ],
            serde_json::json!({"file": stored.file, "sha256": stored.sha256}).to_string(),
        )
            .into_response(),
        Err(e @ crate::compliance::recorder::RecordError::NotOpen(_)) => {
            fail(StatusCode::NOT_FOUND, e.code(), e.to_string())
        }
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string()),
    }
}

/// The operator-facing routes, served on `metrics.listen` only.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, exposition::CONTENT_TYPE)],
        exposition::render(&s),
    )
}

async fn ws_upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    permit: Option<axum::Extension<Arc<crate::admission::Permit>>>,
) -> Response {
    // Where the client is, for the compliance profile's country rule: behind a trusted
    // proxy, the address it forwarded.
    let client = edge::client_ip(
        peer.ip(),
        &headers,
        &state.edge.trusted_proxies,
        state.edge.client_address_header,
    );
    // The transport limit is a backstop well above the protocol limit, so that a message just
    // over the protocol limit still gets a precise error before the close.
    let hard = state.max_message_bytes.saturating_mul(4);
    // The WebSocket outlives the HTTP exchange that upgraded it: it keeps the connection's
    // admission permit until it closes.
    let permit = permit.map(|axum::Extension(p)| p);
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| async move {
            connection(socket, state, peer, client).await;
            drop(permit);
        })
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// A write that takes longer than this means the client stopped reading: the connection is
/// dropped rather than left holding memory.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A joined connection is pinged this often, so an idle but healthy client is heard from.
const PING_EVERY: Duration = Duration::from_secs(15);

async fn send(sink: &mut Sink, msg: &ServerMessage) -> bool {
    matches!(
        tokio::time::timeout(
            WRITE_TIMEOUT,
            sink.send(Message::Text(msg.to_json().into()))
        )
        .await,
        Ok(Ok(()))
    )
}

async fn close_with(sink: &mut Sink, code: u16, reason: &str) {
    let reason: String = reason.chars().take(120).collect();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
        let _ = sink.close().await;
    })
    .await;
}

/// Refuses and closes, counting the refusal.
async fn refuse(
    state: &AppState,
    sink: &mut Sink,
    code: &'static str,
    message: String,
    close_code: u16,
) {
    state.metrics.count(code);
    let _ = send(sink, &ServerMessage::error(None, code, message.clone())).await;
    close_with(sink, close_code, &message).await;
}

/// Client IPs are personal data: logs keep only the network part.
fn redact(peer: SocketAddr) -> String {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.x", o[0], o[1], o[2])
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::x", s[0], s[1], s[2])
        }
    }
}

/// Whether a WebSocket read failed because the frame or message exceeded the transport limit
/// (four times the protocol limit): answered like any message over the limit.
fn too_big_for_transport(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

fn too_big_message(state: &AppState) -> String {
    format!(
        "a message exceeds the limit of {} bytes",
        state.max_message_bytes
    )
}

/// Removes a joined participant from the worker however its connection ends (return, error,
/// panic), so no seat is ever left behind.
struct LeaveOnDrop {
    worker: WorkerHandle,
    participant: ParticipantId,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.worker.leave(self.participant.clone());
    }
}

/// Records a participant's departure however its connection ends.
struct RecordLeave {
    recorder: records::RecordsTo,
    session: crate::ids::SessionId,
    participant: ParticipantId,
    reason: &'static str,
}

/// The audit entry of a participant joined through this node.
fn arrival(
    claims: &crate::auth::Claims,
    pid: &ParticipantId,
    profile: Option<&std::sync::Arc<crate::compliance::profile::Profile>>,
) -> crate::compliance::recorder::Arrival {
    crate::compliance::recorder::Arrival {
        session: claims.sid.clone(),
        participant: pid.clone(),
        user: claims.sub.clone(),
        role: claims.role,
        via: None,
        profile: profile.map(|p| p.name.clone()),
    }
}

/// How long a session's recording node must stay out of the membership before its records
/// move elsewhere.
const RECORDER_LOSS_CONFIRM: Duration = Duration::from_secs(1);

/// The recording node `lost` of the participant's session has left the mesh. The session may
/// not go on unrecorded, so its records continue at the node that records it now (the same
/// rule as a join: the first node of the residency region): the participant's arrival, a
/// `recording_resumed` entry naming the lost node (the gap runs from that node's last entry
/// to this one), and the producers it publishes; that node then takes a recording seat and
/// the media is piped to it (or tapped here, when it is this node). When no node of the
/// residency region is left, the error the participant is closed with.
async fn continue_recording(
    state: &AppState,
    claims: &crate::auth::Claims,
    pid: &ParticipantId,
    worker: &WorkerHandle,
    lost: &NodeId,
) -> Result<records::RecordsTo, (&'static str, String)> {
    use crate::compliance::recorder::ProducerEvent;
    let ended = |why: String| {
        (
            "recording_failed",
            format!("the session's recording node {lost} left the mesh and {why}; the session has ended, because it may not go on unrecorded"),
        )
    };
    let (profile, recording) = state
        .session_rules(claims)
        .map_err(|e| ended(format!("no node can take the recording over ({e})")))?;
    let rec = state
        .records_to(recording.as_ref())
        .ok_or_else(|| ended("this node cannot reach another recording node".into()))?;
    if matches!(recording, Some(Recording::Here)) {
        worker.record(claims.sid.clone());
    }
    rec.joined(arrival(claims, pid, profile.as_ref()))
        .await
        .map_err(|e| ended(e.to_string()))?;
    let noticed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let fields = serde_json::Map::from_iter([
        ("previous_node".into(), lost.to_string().into()),
        ("noticed_at_ms".into(), noticed.into()),
        (
            "confirmed_after_ms".into(),
            (RECORDER_LOSS_CONFIRM.as_millis() as u64).into(),
        ),
    ]);
    rec.note(claims.sid.clone(), pid.clone(), "recording_resumed", fields)
        .await
        .map_err(|e| ended(e.to_string()))?;
    if let Some(view) = worker.describe(claims.sid.clone()).await {
        for p in view
            .producers
            .into_iter()
            .filter(|p| &p.participant == pid && p.piped_from.is_none())
        {
            rec.producer(
                claims.sid.clone(),
                pid.clone(),
                ProducerEvent::Started {
                    producer: p.producer.clone(),
                    kind: p.kind,
                },
            );
            if p.paused {
                rec.producer(
                    claims.sid.clone(),
                    pid.clone(),
                    ProducerEvent::Paused(p.producer),
                );
            }
        }
    }
    Ok(rec)
}

/// A checklist step or an outcome from the agent console: written to the audit log (with the
/// official's identity) before it is acknowledged.
async fn verification_step(
    recorded: Option<&RecordLeave>,
    role: crate::auth::Role,
    msg: ClientMessage,
) -> ServerMessage {
    let (request_id, event, fields) = match msg {
        ClientMessage::MarkChecklist {
            request_id,
            step,
            checked,
        } => {
            if step.trim().is_empty()
                || step.chars().count() > protocol::MAX_STEP_CHARS
                || step.chars().any(char::is_control)
            {
                return ServerMessage::error(
                    Some(request_id),
                    "invalid_field",
                    format!(
                        "a checklist step is 1 to {} characters of text",
                        protocol::MAX_STEP_CHARS
                    ),
                );
            }
            (
                request_id,
                "checklist_marked",
                serde_json::json!({"step": step, "checked": checked}),
            )
        }
        ClientMessage::RecordOutcome {
            request_id,
            outcome,
            note,
        } => {
            if note.chars().count() > protocol::MAX_NOTE_CHARS {
                return ServerMessage::error(
                    Some(request_id),
                    "invalid_field",
                    format!("a note is at most {} characters", protocol::MAX_NOTE_CHARS),
                );
            }
            (
                request_id,
                "outcome_recorded",
                serde_json::json!({"outcome": outcome.as_str(), "note": note}),
            )
        }
        _ => return ServerMessage::error(None, "internal", "not a verification step"),
    };
    if role != crate::auth::Role::Agent {
        return ServerMessage::error(
            Some(request_id),
            "not_allowed",
            "only the agent marks checklist steps and records outcomes",
        );
    }
    let Some(r) = recorded else {
        return ServerMessage::error(
            Some(request_id),
            "not_recorded",
            "this node does not record sessions (recording.enabled), so it cannot keep verification steps",
        );
    };
    let fields = fields.as_object().cloned().unwrap_or_default();
    match r
        .recorder
        .note(r.session.clone(), r.participant.clone(), event, fields)
        .await
    {
        Ok(()) => ServerMessage::Ok { request_id },
        Err(e) => ServerMessage::error(Some(request_id), e.code(), e.to_string()),
    }
}

/// A session's compliance profile as one connection lives it.
struct ProfileSteps {
    profile: Arc<crate::compliance::profile::Profile>,
    /// Where GeoIP placed the client.
    country: Option<String>,
    consented: bool,
    located: bool,
    /// Question pool indexes not yet drawn by this agent, drawn from the end.
    questions: Vec<usize>,
}

/// Refuses a customer's publish or subscribe before the profile's steps are done.
fn media_gate(
    steps: Option<&ProfileSteps>,
    role: crate::auth::Role,
    msg: &ClientMessage,
) -> Option<crate::compliance::profile::ProfileRefusal> {
    let steps = steps?;
    if role != crate::auth::Role::User
        || !matches!(
            msg,
            ClientMessage::Publish { .. } | ClientMessage::Subscribe { .. }
        )
    {
        return None;
    }
    steps
        .profile
        .media_allowed(steps.consented, steps.located)
        .err()
}

fn msg_request_id(msg: &ClientMessage) -> Option<u64> {
    match msg {
        ClientMessage::Publish { request_id, .. } | ClientMessage::Subscribe { request_id, .. } => {
            Some(*request_id)
        }
        _ => None,
    }
}

/// A step of the session's compliance profile: the customer's consent or location, or the
/// agent drawing a question. Written to the audit log before it is acknowledged.
async fn profile_step(
    steps: Option<&mut ProfileSteps>,
    recorded: Option<&RecordLeave>,
    role: crate::auth::Role,
    msg: ClientMessage,
) -> ServerMessage {
    use crate::auth::Role;
    use crate::compliance::profile::{Location, ProfileRefusal};
    let (request_id, needs) = match &msg {
        ClientMessage::GiveConsent { request_id, .. } => (*request_id, Role::User),
        ClientMessage::ShareLocation { request_id, .. } => (*request_id, Role::User),
        ClientMessage::DrawQuestion { request_id } => (*request_id, Role::Agent),
        _ => return ServerMessage::error(None, "internal", "not a profile step"),
    };
    let refused =
        |e: ProfileRefusal| ServerMessage::error(Some(request_id), e.code(), e.to_string());
    let (Some(steps), Some(r)) = (steps, recorded) else {
        return refused(ProfileRefusal::NotAllowed(
            "this session runs under no compliance profile".into(),
        ));
    };
    if role != needs {
        return refused(ProfileRefusal::NotAllowed(format!(
            "only the {} does this step",
            needs.as_str()
        )));
    }
    let p = steps.profile.clone();
    let mut drawn = None;
    let (event, fields, reply) = match msg {
        ClientMessage::GiveConsent { text, .. } => match p.consent_entry(&text) {
            Ok(f) => ("consent_given", f, ServerMessage::Ok { request_id }),
            Err(e) => return refused(e),
        },
        ClientMessage::ShareLocation {
            latitude,
            longitude,
            accuracy,
            captured_at,
            ..
        } => {
            let fix = Location {
                latitude,
                longitude,
                accuracy,
                captured_at_ms: captured_at,
            };
            match p.location_entry(fix, steps.country.as_deref(), SystemTime::now()) {
                Ok(f) => ("location_captured", f, ServerMessage::Ok { request_id }),
                Err(e) => return refused(e),
            }
        }
        _ => {
            let Some(i) = steps.questions.pop() else {
                return refused(ProfileRefusal::NotAllowed(format!(
                    "no questions left: compliance profile {} has {} in its pool",
                    p.name,
                    p.rules.questions.len()
                )));
            };
            drawn = Some(i);
            let question = p.rules.questions[i].clone();
            let fields = serde_json::json!({"profile": p.name, "question": question});
            let reply = ServerMessage::Question {
                request_id,
                question,
                remaining: steps.questions.len(),
            };
            ("question_asked", fields, reply)
        }
    };
    let fields = fields.as_object().cloned().unwrap_or_default();
    match r
        .recorder
        .note(r.session.clone(), r.participant.clone(), event, fields)
        .await
    {
        Ok(()) => {
            match event {
                "consent_given" => steps.consented = true,
                "location_captured" => steps.located = true,
                _ => {}
            }
            reply
        }
        Err(e) => {
            if let Some(i) = drawn {
                // Not recorded, so not asked: it stays in the pool.
                steps.questions.push(i);
            }
            ServerMessage::error(Some(request_id), e.code(), e.to_string())
        }
    }
}

/// What a request does to the participant's producers, for the audit log.
enum ProducerOp {
    Publish,
    Pause(ProducerId),
    Resume(ProducerId),
    Close(ProducerId),
}

fn producer_op(msg: &ClientMessage) -> Option<ProducerOp> {
    Some(match msg {
        ClientMessage::Publish { .. } => ProducerOp::Publish,
        ClientMessage::PauseProducer { producer_id, .. } => ProducerOp::Pause(producer_id.clone()),
        ClientMessage::ResumeProducer { producer_id, .. } => {
            ProducerOp::Resume(producer_id.clone())
        }
        ClientMessage::CloseProducer { producer_id, .. } => ProducerOp::Close(producer_id.clone()),
        _ => return None,
    })
}

impl RecordLeave {
    /// Records what a producer request did, once it succeeded.
    fn producer_result(&self, op: ProducerOp, reply: &ServerMessage) {
        use crate::compliance::recorder::ProducerEvent;
        let events = match (op, reply) {
            (_, ServerMessage::Error { .. }) => Vec::new(),
            (ProducerOp::Publish, ServerMessage::Published { producers, .. }) => producers
                .iter()
                .map(|p| ProducerEvent::Started {
                    producer: p.producer_id.clone(),
                    kind: match p.kind {
                        MediaKind::Audio => "audio",
                        MediaKind::Video => "video",
                    }
                    .into(),
                })
                .collect(),
            (ProducerOp::Pause(id), ServerMessage::Ok { .. }) => vec![ProducerEvent::Paused(id)],
            (ProducerOp::Resume(id), ServerMessage::Ok { .. }) => vec![ProducerEvent::Resumed(id)],
            (ProducerOp::Close(id), ServerMessage::Ok { .. }) => vec![ProducerEvent::Stopped(id)],
            _ => Vec::new(),
        };
        for e in events {
            self.recorder
                .producer(self.session.clone(), self.participant.clone(), e);
        }
    }
}

impl Drop for RecordLeave {
    fn drop(&mut self) {
        self.recorder
            .left(self.session.clone(), self.participant.clone(), self.reason);
    }
}

/// A joined participant's side of the node: it outlives one WebSocket when the connection is
/// lost and the client comes back within the grace period (`join.resume`).
struct Attached {
    /// The secret that takes this place back; `None` when the node keeps no places.
    resume_key: Option<String>,
    claims: crate::auth::Claims,
    pid: ParticipantId,
    worker: WorkerHandle,
    /// Holds the session on its worker while the participant is here (or parked).
    _seat: crate::sfu::Seat,
    /// Dropped last: the participant leaves the worker.
    _leave: LeaveOnDrop,
    recorded: Option<RecordLeave>,
    steps: Option<ProfileSteps>,
    /// Events keep queueing while parked (the worker dismisses a participant whose queue
    /// fills, as for a slow reader).
    events_rx: tokio::sync::mpsc::Receiver<SfuEvent>,
    recording_ended: tokio::sync::broadcast::Receiver<crate::compliance::recorder::Ended>,
    client_stats: ClientStatsGate,
    /// Where the client connects from (for the edge to move it to on a drain).
    client: std::net::IpAddr,
}

fn new_resume_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>())
}

/// Participants whose connection was lost, kept by resume key until they come back or the
/// grace period ends (then they leave, as `connection_lost`).
pub struct Parking {
    grace: Duration,
    parked: Mutex<std::collections::HashMap<String, Attached>>,
    /// Participants taken back, and places given up at the end of the grace period.
    pub resumed: std::sync::atomic::AtomicU64,
    pub expired: std::sync::atomic::AtomicU64,
}

/// Why a `join` with `resume` was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("no place is kept for this resume key (it expired after the grace period, was used, or never existed); join again")]
    Expired,
}

impl Parking {
    pub fn new(grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            grace,
            parked: Mutex::new(Default::default()),
            resumed: 0.into(),
            expired: 0.into(),
        })
    }

    fn enabled(&self) -> bool {
        !self.grace.is_zero()
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Participants parked now.
    pub fn len(&self) -> usize {
        self.parked.lock().map(|p| p.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps `a` for the grace period; afterwards it leaves (its guards run).
    fn park(self: &Arc<Self>, a: Attached) {
        let Some(key) = a.resume_key.clone() else {
            return;
        };
        tracing::info!(session = %a.claims.sid, participant = %a.pid, "connection lost; place kept for {} s", self.grace.as_secs());
        if let Ok(mut p) = self.parked.lock() {
            p.insert(key.clone(), a);
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.grace).await;
            let gone = me.parked.lock().ok().and_then(|mut p| p.remove(&key));
            if let Some(a) = gone {
                me.expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(session = %a.claims.sid, participant = %a.pid, "place given up: the client did not come back");
                drop(a);
            }
        });
    }

    /// Takes back the place `key` for a client holding `claims` of the same session, user and
    /// role. A key presented with another identity's token stays parked (and is refused).
    fn take(&self, key: &str, claims: &crate::auth::Claims) -> Result<Attached, ResumeError> {
        let mut p = self.parked.lock().map_err(|_| ResumeError::Expired)?;
        match p.get(key) {
            Some(a)
                if a.claims.sid == claims.sid
                    && a.claims.sub == claims.sub
                    && a.claims.role == claims.role =>
            {
                self.resumed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                p.remove(key).ok_or(ResumeError::Expired)
            }
            _ => Err(ResumeError::Expired),
        }
    }
}

/// Why a joined connection's loop ended and what the client is told.
enum Ending {
    /// The client left, or could not be written to: nothing more to say.
    Quiet,
    /// The connection ended without a close: the participant keeps its place for the grace
    /// period (when the node keeps places).
    Lost,
    /// Say this error, then close with this code.
    Refuse(&'static str, String, u16),
    Expired,
}

async fn connection(
    socket: WebSocket,
    state: AppState,
    peer: SocketAddr,
    client: std::net::IpAddr,
) {
    state
        .metrics
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();

    // Phase 1: the first message must be a valid join, within the join timeout.
    let first = tokio::time::timeout(state.join_timeout, stream.next()).await;
    let text = match first {
        Err(_) => {
            return refuse(
                &state,
                &mut sink,
                "join_timeout",
                "no join message in time".into(),
                close::JOIN_TIMEOUT,
            )
            .await;
        }
        Ok(Some(Err(e))) if too_big_for_transport(&e) => {
            return refuse(
                &state,
                &mut sink,
                "too_big",
                too_big_message(&state),
                close::TOO_BIG,
            )
            .await;
        }
        Ok(None) | Ok(Some(Err(_))) => return,
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(Message::Close(_)))) => return,
        Ok(Some(Ok(_))) => {
            return refuse(
                &state,
                &mut sink,
                "unsupported_data",
                "only text frames carry signaling".into(),
                close::UNSUPPORTED_DATA,
            )
            .await;
        }
    };
    // Join time: from the join message to the `joined` answer (the node's own work).
    let join_received = std::time::Instant::now();
    if text.len() > state.max_message_bytes {
        return refuse(
            &state,
            &mut sink,
            "too_big",
            format!(
                "message of {} bytes exceeds the limit of {}",
                text.len(),
                state.max_message_bytes
            ),
            close::TOO_BIG,
        )
        .await;
    }
    let (token, session_hint, resume) = match protocol::parse(&text) {
        Ok(ClientMessage::Join {
            version,
            token,
            session_id,
            resume,
        }) => {
            if version != protocol::PROTOCOL_VERSION {
                return refuse(
                    &state,
                    &mut sink,
                    "unsupported_version",
                    format!(
                        "protocol version {version} is not supported; this node speaks {}",
                        protocol::PROTOCOL_VERSION
                    ),
                    close::MALFORMED,
                )
                .await;
            }
            (token, session_id, resume)
        }
        Ok(_) => {
            return refuse(
                &state,
                &mut sink,
                "not_joined",
                "the first message must be `join`".into(),
                close::MALFORMED,
            )
            .await;
        }
        Err(e) => {
            return refuse(&state, &mut sink, e.code(), e.to_string(), close::MALFORMED).await
        }
    };
    let verified = state
        .verifier
        .verify_attributed(&token)
        .and_then(|c| match session_hint {
            Some(s) if s != c.sid => Err((
                TokenError::WrongSession {
                    token: c.sid.clone(),
                    requested: s,
                },
                Some(Box::new(c)),
            )),
            _ => Ok(c),
        });
    let claims = match verified {
        Ok(c) => c,
        Err((e, named)) => {
            tracing::info!(client = %redact(peer), code = e.code(), "join refused");
            // A token signed by this mesh's key names its session: the refusal goes to that
            // session's audit log. A forged or malformed one is only counted.
            if let Some(c) = named {
                let fields = serde_json::Map::from_iter([("reason".into(), e.to_string().into())]);
                state.audit_refusal(&c, e.code(), fields).await;
            }
            return refuse(
                &state,
                &mut sink,
                e.code(),
                e.to_string(),
                close::UNAUTHORIZED,
            )
            .await;
        }
    };
    if let Some(key) = resume {
        return match state.parking.take(&key, &claims) {
            Ok(mut attached) => {
                tracing::info!(session = %claims.sid, participant = %attached.pid, "participant back");
                attached.claims = claims;
                attached.client = client;
                let ok = send(
                    &mut sink,
                    &ServerMessage::Resumed {
                        participant_id: attached.pid.to_string(),
                        session_id: attached.claims.sid.clone(),
                        expires_at: attached.claims.exp,
                        resume_key: key,
                        ice_servers: state.ice_servers(&attached.claims.sub),
                    },
                )
                .await;
                if ok {
                    serve(state, sink, stream, attached).await;
                } else {
                    state.parking.park(attached);
                }
            }
            Err(e) => {
                refuse(
                    &state,
                    &mut sink,
                    "resume_expired",
                    e.to_string(),
                    close::RESUME_EXPIRED,
                )
                .await
            }
        };
    }
    // Heard from the start, so that a failure during the join is not missed.
    let recording_ended = state.recording_ended.subscribe();
    // The session's profile and whether and where it is recorded: decided before the
    // session gets a seat.
    let (profile, recording) = match state.session_rules(&claims) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(session = %claims.sid, code = e.code(), "join refused by the session's rules");
            return refuse(&state, &mut sink, e.code(), e.to_string(), e.close_code()).await;
        }
    };
    let records_to = state.records_to(recording.as_ref());
    if recording.is_some() && records_to.is_none() {
        let e = crate::compliance::policy::PolicyRefusal::CannotRecord;
        return refuse(&state, &mut sink, e.code(), e.to_string(), close::INTERNAL).await;
    }
    // The customer's network address must be in the profile's countries; a refusal is
    // written to the session's audit log.
    let country = state.edge.geo.lookup(client).and_then(|p| p.country);
    if let (Some(p), crate::auth::Role::User) = (&profile, claims.role) {
        if let Err(e) = p.admits_country(country.as_deref()) {
            tracing::info!(session = %claims.sid, code = e.code(), "join refused by the compliance profile");
            let fields = serde_json::Map::from_iter([
                ("reason".into(), e.to_string().into()),
                ("geoip_country".into(), country.clone().into()),
            ]);
            state.audit_refusal(&claims, e.code(), fields).await;
            return refuse(&state, &mut sink, e.code(), e.to_string(), close::FORBIDDEN).await;
        }
    }
    let (events_tx, events_rx) = crate::sfu::event_channel();
    // Held until the connection ends, so the session stays on this worker while it lasts.
    let seat = match state.workers.place(&claims.sid) {
        Ok(seat) => seat,
        Err(e) => {
            return refuse(&state, &mut sink, e.code(), e.to_string(), close::FULL).await;
        }
    };
    let worker = seat.worker().clone();
    let joined = match worker
        .join(
            claims.sid.clone(),
            claims.sub.clone(),
            claims.role,
            matches!(recording, Some(Recording::Here)),
            events_tx,
        )
        .await
    {
        Ok(j) => j,
        Err(e) => {
            let code = e.code();
            return refuse(&state, &mut sink, code, e.to_string(), close::FULL).await;
        }
    };
    let pid = joined.participant_id.clone();
    let _leave = LeaveOnDrop {
        worker: worker.clone(),
        participant: pid.clone(),
    };
    // A session that is recorded never runs unrecorded: no audit entry, no session.
    let mut recorded = None;
    if let Some(rec) = records_to {
        if let Err(e) = rec.joined(arrival(&claims, &pid, profile.as_ref())).await {
            tracing::error!(session = %claims.sid, error = %e, "join refused: not recorded");
            return refuse(&state, &mut sink, e.code(), e.to_string(), close::INTERNAL).await;
        }
        recorded = Some(RecordLeave {
            recorder: rec,
            session: claims.sid.clone(),
            participant: pid.clone(),
            reason: "connection_closed",
        });
    }
    let resume_key = state.parking.enabled().then(new_resume_key);
    let ok = send(
        &mut sink,
        &ServerMessage::Joined {
            version: protocol::PROTOCOL_VERSION,
            participant_id: pid.to_string(),
            session_id: claims.sid.clone(),
            user_id: claims.sub.clone(),
            role: claims.role,
            expires_at: claims.exp,
            node: state.node.clone(),
            region: state.region.clone(),
            recorded: recorded.is_some(),
            profile: profile.as_ref().map(|p| p.summary()),
            participants: joined.participants,
            producers: joined.producers,
            resume_key: resume_key.clone(),
            resume_within_secs: state.parking.grace().as_secs(),
            ice_servers: state.ice_servers(&claims.sub),
        },
    )
    .await;
    if !ok {
        return;
    }
    state
        .metrics
        .experience
        .joined(claims.role, join_received.elapsed());
    let client_stats = ClientStatsGate::default();

    let steps = profile.map(|profile| ProfileSteps {
        questions: profile.question_order(&mut rand::rng()),
        profile,
        country,
        consented: false,
        located: false,
    });
    let attached = Attached {
        resume_key,
        claims,
        pid,
        worker,
        _seat: seat,
        _leave,
        recorded,
        steps,
        events_rx,
        recording_ended,
        client_stats,
        client,
    };
    serve(state, sink, stream, attached).await;
}

/// Phase 2 of a connection: requests, events and the token's expiry, for a participant that
/// just joined or came back (`join.resume`). A connection lost rather than closed parks the
/// participant for `signaling.resume_grace_secs`.
async fn serve(
    state: AppState,
    mut sink: Sink,
    mut stream: futures_util::stream::SplitStream<WebSocket>,
    mut attached: Attached,
) {
    let Attached {
        claims,
        pid,
        worker,
        recorded,
        steps,
        events_rx,
        recording_ended,
        client_stats,
        client,
        ..
    } = &mut attached;
    let client = *client;
    // A drain with a deadline already under way applies to a participant back or new here.
    let mut migration = state.migration.subscribe();
    migration.mark_changed();
    let mut migration_open = true;
    let mut told_to_move = false;
    let mut must_move_by: Option<tokio::time::Instant> = None;
    // A session recorded on another node follows that node's membership: when it leaves the
    // mesh (checked again a second later, so a pipe being replaced does not count), the
    // records and the recording move to the node that records the session now.
    let mut membership = state.edge.members.clone();
    membership.mark_changed();
    let mut membership_open = true;
    let recorded_elsewhere = |r: &Option<RecordLeave>| {
        matches!(
            r.as_ref().map(|r| &r.recorder),
            Some(records::RecordsTo::There { .. })
        )
    };
    // Only those recorded on another node wake for membership changes (once a heartbeat).
    let mut watch_recorder = recorded_elsewhere(recorded);
    let mut recorder_lost: Option<(NodeId, tokio::time::Instant)> = None;
    let expires_at = claims.expires_at();
    let until_expiry = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let expiry = tokio::time::sleep(until_expiry);
    tokio::pin!(expiry);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_heard = tokio::time::Instant::now();
    let ending = loop {
        tokio::select! {
            // Expiry first: once the token has run out, no pending request is served.
            biased;
            _ = &mut expiry => break Ending::Expired,
            e = recording_ended.recv() => {
                use tokio::sync::broadcast::error::RecvError;
                match e {
                    // A session may not go on unrecorded: its recording node said it failed.
                    Ok(e) if e.session == claims.sid
                        && recorded.as_ref().is_some_and(|r| r.recorder.kept_by(e.by.as_ref())) =>
                    {
                        break Ending::Refuse(
                            "recording_failed",
                            format!("the session's recording failed ({}); the session has ended, because it may not go on unrecorded", e.reason),
                            close::INTERNAL,
                        );
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break Ending::Quiet,
                }
            }
            changed = migration.changed(), if migration_open => {
                if changed.is_err() {
                    // The node is stopping: its sender is gone; nothing more will come.
                    migration_open = false;
                    continue;
                }
                let order = migration
                    .borrow_and_update()
                    .clone()
                    .filter(|o| o.applies_to(&claims.sid));
                match (order, told_to_move) {
                    (Some(o), _) => {
                        let d = o.deadline;
                        told_to_move = true;
                        must_move_by = o.enforce.then_some(d);
                        let place = state.edge.geo.lookup(client);
                        let hosting = match &state.edge.hosts {
                            Some(h) => h.of(&claims.sid),
                            None => Default::default(),
                        };
                        // Anywhere but here (this node's own entry may be a heartbeat old).
                        let elsewhere = state
                            .edge
                            .route(place.as_ref(), None, &hosting)
                            .map(|r| std::iter::once(r.edge).chain(r.alternates).filter(|n| n.node != state.node).collect::<Vec<_>>());
                        match elsewhere.as_deref() {
                            Ok([edge, alternates @ ..]) => {
                                let msg = ServerMessage::Migrate {
                                    edge: edge.clone(),
                                    alternates: alternates.to_vec(),
                                    deadline_secs: d.saturating_duration_since(tokio::time::Instant::now()).as_secs(),
                                };
                                if !send(&mut sink, &msg).await { break Ending::Lost; }
                            }
                            Ok([]) => {
                                tracing::warn!(session = %claims.sid, participant = %pid, "told to move, but no other node can take it");
                            }
                            Err(why) => {
                                tracing::warn!(session = %claims.sid, participant = %pid, "told to move, but nowhere to go: {why}");
                            }
                        }
                    }
                    (None, true) => {
                        told_to_move = false;
                        must_move_by = None;
                        if !send(&mut sink, &ServerMessage::MigrateCancelled).await { break Ending::Lost; }
                    }
                    (None, false) => {}
                }
            }
            changed = membership.changed(), if watch_recorder && membership_open && recorder_lost.is_none() => {
                if changed.is_err() {
                    membership_open = false;
                    continue;
                }
                let members = membership.borrow_and_update().clone();
                if let Some(records::RecordsTo::There { node, .. }) = recorded.as_ref().map(|r| &r.recorder) {
                    if !members.iter().any(|m| &m.info.node == node) {
                        recorder_lost = Some((node.clone(), tokio::time::Instant::now() + RECORDER_LOSS_CONFIRM));
                    }
                }
            }
            _ = async { tokio::time::sleep_until(recorder_lost.as_ref().map_or_else(tokio::time::Instant::now, |l| l.1)).await }, if recorder_lost.is_some() => {
                let Some((lost, _)) = recorder_lost.take() else { continue };
                let back = state.edge.members.borrow().iter().any(|m| m.info.node == lost);
                if back {
                    continue;
                }
                match continue_recording(&state, claims, pid, worker, &lost).await {
                    Ok(rec) => {
                        tracing::warn!(session = %claims.sid, participant = %pid, lost = %lost, "the session's recording node left the mesh: its records continue at the node recording it now");
                        if let Some(r) = recorded.as_mut() {
                            r.recorder = rec;
                        }
                        watch_recorder = recorded_elsewhere(recorded);
                    }
                    Err((code, message)) => break Ending::Refuse(code, message, close::INTERNAL),
                }
            }
            _ = async { tokio::time::sleep_until(must_move_by.unwrap_or_else(tokio::time::Instant::now)).await }, if must_move_by.is_some() => {
                break Ending::Refuse("drained", "the node was drained and this participant did not move to another node in time".into(), close::DRAINED);
            }
            ev = events_rx.recv() => {
                let Some(ev) = ev else {
                    break Ending::Refuse("internal", "the media worker has stopped".into(), close::INTERNAL);
                };
                if let SfuEvent::Dismissed(why) = ev {
                    let close_code = match why {
                        Dismissal::Replaced => close::REPLACED,
                        Dismissal::TooSlow => close::TOO_SLOW,
                    };
                    break Ending::Refuse(why.code(), why.to_string(), close_code);
                }
                if !send(&mut sink, &ServerMessage::from(ev)).await {
                    state.metrics.count("too_slow");
                    break Ending::Quiet;
                }
            }
            incoming = stream.next() => {
                last_heard = tokio::time::Instant::now();
                let text = match incoming {
                    Some(Err(e)) if too_big_for_transport(&e) => {
                        break Ending::Refuse("too_big", too_big_message(&state), close::TOO_BIG);
                    }
                    // The transport went away without a close: the client may come back.
                    None | Some(Err(_)) => break Ending::Lost,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => break Ending::Quiet,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Binary(_))) => {
                        break Ending::Refuse("unsupported_data", "only text frames carry signaling".into(), close::UNSUPPORTED_DATA);
                    }
                };
                if text.len() > state.max_message_bytes {
                    break Ending::Refuse("too_big", format!("message of {} bytes exceeds the limit of {}", text.len(), state.max_message_bytes), close::TOO_BIG);
                }
                // A request that arrives as the token runs out is not served.
                if claims.expired_at(SystemTime::now()) {
                    break Ending::Expired;
                }
                match protocol::parse(&text) {
                    Ok(ClientMessage::Leave) => {
                        close_with(&mut sink, close::NORMAL, "bye").await;
                        break Ending::Quiet;
                    }
                    Ok(ClientMessage::Stats(report)) => {
                        // Never answered when accepted: a summary every few seconds costs
                        // the client nothing to wait for.
                        match client_stats.accept(std::time::Instant::now(), &report) {
                            Ok(summary) => state.metrics.experience.client_summary(claims.role, &summary),
                            Err(e) => {
                                state.metrics.count(e.code());
                                let reply = ServerMessage::error(None, e.code(), e.to_string());
                                if !send(&mut sink, &reply).await { break Ending::Quiet; }
                            }
                        }
                    }
                    Ok(msg @ (ClientMessage::MarkChecklist { .. } | ClientMessage::RecordOutcome { .. })) => {
                        let reply = verification_step(recorded.as_ref(), claims.role, msg).await;
                        if let ServerMessage::Error { code, .. } = &reply {
                            state.metrics.count(code);
                        }
                        if !send(&mut sink, &reply).await { break Ending::Quiet; }
                    }
                    Ok(msg @ (ClientMessage::GiveConsent { .. } | ClientMessage::ShareLocation { .. } | ClientMessage::DrawQuestion { .. })) => {
                        let reply = profile_step(steps.as_mut(), recorded.as_ref(), claims.role, msg).await;
                        if let ServerMessage::Error { code, .. } = &reply {
                            state.metrics.count(code);
                        }
                        if !send(&mut sink, &reply).await { break Ending::Quiet; }
                    }
                    Ok(msg) => {
                        // The customer's media waits for the profile's steps.
                        if let (Some(refusal), Some(request_id)) = (media_gate(steps.as_ref(), claims.role, &msg), msg_request_id(&msg)) {
                            state.metrics.count(refusal.code());
                            let reply = ServerMessage::error(Some(request_id), refusal.code(), refusal.to_string());
                            if !send(&mut sink, &reply).await { break Ending::Quiet; }
                            continue;
                        }
                        let op = recorded.as_ref().and_then(|_| producer_op(&msg));
                        let reply = handle_request(worker, pid, msg).await;
                        if let (Some(r), Some(op)) = (&recorded, op) {
                            r.producer_result(op, &reply);
                        }
                        if let ServerMessage::Error { code, .. } = &reply {
                            state.metrics.count(code);
                        }
                        if !send(&mut sink, &reply).await { break Ending::Quiet; }
                    }
                    Err(e @ ParseError::UnknownType(_)) => {
                        // Kept open: a newer client may send types this node does not know.
                        state.metrics.count(e.code());
                        let reply = ServerMessage::error(ParseError::request_id(&text), e.code(), e.to_string());
                        if !send(&mut sink, &reply).await { break Ending::Quiet; }
                    }
                    Err(e) => {
                        state.metrics.count(e.code());
                        let reply = ServerMessage::error(ParseError::request_id(&text), e.code(), e.to_string());
                        let _ = send(&mut sink, &reply).await;
                        close_with(&mut sink, close::MALFORMED, "malformed message").await;
                        break Ending::Quiet;
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= state.idle_timeout {
                    break Ending::Refuse("idle", format!("nothing heard from the client for {} s", state.idle_timeout.as_secs()), close::IDLE);
                }
                let ping = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Default::default()))).await;
                if !matches!(ping, Ok(Ok(()))) {
                    state.metrics.count("too_slow");
                    break Ending::Quiet;
                }
            }
        }
    };
    if let Some(r) = recorded.as_mut() {
        r.reason = match &ending {
            // Told to move and gone of its own accord: it went to the node it was sent to.
            Ending::Quiet if must_move_by.is_some() => "migrated",
            Ending::Quiet => "left",
            Ending::Lost => "connection_lost",
            Ending::Expired => "token_expired",
            Ending::Refuse(code, ..) => code,
        };
    }
    match ending {
        Ending::Quiet => {}
        Ending::Lost => {
            if attached.resume_key.is_some() {
                state.parking.park(attached);
            }
        }
        Ending::Refuse(code, message, close_code) => {
            refuse(&state, &mut sink, code, message, close_code).await;
        }
        Ending::Expired => {
            state.metrics.count("session_expired");
            // Media stops before the client is told, so nothing flows past the expiry.
            worker.leave(pid.clone());
            let _ = send(
                &mut sink,
                &ServerMessage::SessionExpired {
                    message:
                        "your access token expired; media has stopped. Rejoin with a new token."
                            .into(),
                },
            )
            .await;
            close_with(&mut sink, close::SESSION_EXPIRED, "token expired").await;
        }
    }
}

/// Why a client's statistics summary was not taken.
#[derive(Debug, thiserror::Error)]
enum StatsRefusal {
    #[error("statistics summaries come at most one every {} s", STATS_MIN_INTERVAL.as_secs())]
    TooFrequent,
    #[error("statistics summary out of range: {0}")]
    OutOfRange(&'static str),
}

impl StatsRefusal {
    fn code(&self) -> &'static str {
        match self {
            StatsRefusal::TooFrequent => "stats_too_frequent",
            StatsRefusal::OutOfRange(_) => "bad_stats",
        }
    }
}

/// Shortest interval between two statistics summaries of one connection (the SDK sends one
/// every 5 s): a client cannot flood the histograms.
const STATS_MIN_INTERVAL: Duration = Duration::from_secs(2);

/// One connection's statistics summaries: rate-limited and range-checked before they count.
#[derive(Default)]
struct ClientStatsGate {
    last: Option<std::time::Instant>,
}

impl ClientStatsGate {
    fn accept(
        &mut self,
        now: std::time::Instant,
        r: &protocol::StatsReport,
    ) -> Result<crate::metrics::ClientSummary, StatsRefusal> {
        let ms = |v: Option<f64>, max: f64, what: &'static str| match v {
            Some(v) if !(0.0..=max).contains(&v) => Err(StatsRefusal::OutOfRange(what)),
            v => Ok(v.map(|v| v / 1000.0)),
        };
        let summary = crate::metrics::ClientSummary {
            rtt: ms(r.rtt_ms, 60_000.0, "rttMs (0..=60000)")?,
            jitter: ms(r.jitter_ms, 60_000.0, "jitterMs (0..=60000)")?,
            first_frame: ms(r.first_frame_ms, 600_000.0, "firstFrameMs (0..=600000)")?,
            loss: match r.loss {
                Some(l) if !(0.0..=1.0).contains(&l) => {
                    return Err(StatsRefusal::OutOfRange("loss (0..=1)"))
                }
                l => l,
            },
            frame_height: match r.frame_height {
                Some(h) if h > 8640 => {
                    return Err(StatsRefusal::OutOfRange("frameHeight (0..=8640)"))
                }
                h => h.map(f64::from),
            },
            // At most what a 60 fps stream decodes in a minute since the previous summary.
            frames_decoded: match r.frames_decoded {
                n if n > 3600 * 4 => {
                    return Err(StatsRefusal::OutOfRange("framesDecoded (0..=14400)"))
                }
                n => u64::from(n),
            },
            freezes: match r.freezes {
                n if n > 100 => return Err(StatsRefusal::OutOfRange("freezes (0..=100)")),
                n => u64::from(n),
            },
        };
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < STATS_MIN_INTERVAL)
        {
            return Err(StatsRefusal::TooFrequent);
        }
        self.last = Some(now);
        Ok(summary)
    }
}

async fn handle_request(
    w: &WorkerHandle,
    pid: &ParticipantId,
    msg: ClientMessage,
) -> ServerMessage {
    let p = pid.clone();
    let ok_or = |request_id: u64, r: Result<(), crate::sfu::ControlError>| match r {
        Ok(()) => ServerMessage::Ok { request_id },
        Err(e) => ServerMessage::error(Some(request_id), e.code(), e.to_string()),
    };
    match msg {
        ClientMessage::Join { .. } => ServerMessage::error(None, "not_allowed", "already joined"),
        // Answered by the connection loop, which holds the role and the recorder.
        ClientMessage::MarkChecklist { request_id, .. }
        | ClientMessage::RecordOutcome { request_id, .. }
        | ClientMessage::GiveConsent { request_id, .. }
        | ClientMessage::ShareLocation { request_id, .. }
        | ClientMessage::DrawQuestion { request_id, .. } => {
            ServerMessage::error(Some(request_id), "internal", "not dispatched here")
        }
        // The connection loop closes on `leave` before dispatching requests here.
        ClientMessage::Leave | ClientMessage::Stats(_) => ServerMessage::Ok { request_id: 0 },
        ClientMessage::Ping { request_id } => ServerMessage::Pong { request_id },
        ClientMessage::Publish { request_id, sdp } => match w.publish(p, sdp).await {
            Ok(pb) => ServerMessage::Published {
                request_id,
                sdp: pb.answer,
                producers: pb
                    .producers
                    .into_iter()
                    .map(|(mid, info)| PublishedProducer {
                        mid,
                        producer_id: info.producer_id,
                        kind: info.kind,
                    })
                    .collect(),
            },
            Err(e) => ServerMessage::error(Some(request_id), e.code(), e.to_string()),
        },
        ClientMessage::Subscribe {
            request_id,
            producer_id,
            sdp,
            max_layer,
        } => match w.subscribe(p, producer_id, sdp, max_layer).await {
            Ok(s) => ServerMessage::Subscribed {
                request_id,
                sdp: s.answer,
                consumer_id: s.consumer_id,
                producer_id: s.producer_id,
                mid: s.mid,
            },
            Err(e) => ServerMessage::error(Some(request_id), e.code(), e.to_string()),
        },
        ClientMessage::Candidate {
            request_id,
            transport,
            candidate,
            sdp_mid,
        } => {
            let r = w.add_candidate(p, transport, candidate, sdp_mid).await;
            match (request_id, r) {
                (Some(id), r) => ok_or(id, r),
                (None, Ok(())) => ServerMessage::Pong { request_id: None },
                (None, Err(e)) => ServerMessage::error(None, e.code(), e.to_string()),
            }
        }
        ClientMessage::RestartIce {
            request_id,
            transport,
            sdp,
        } => match w.renegotiate(p, transport, sdp).await {
            Ok(sdp) => ServerMessage::IceRestarted { request_id, sdp },
            Err(e) => ServerMessage::error(Some(request_id), e.code(), e.to_string()),
        },
        ClientMessage::SetConsumerLayer {
            request_id,
            consumer_id,
            max_layer,
        } => ok_or(
            request_id,
            w.set_consumer_layer(p, consumer_id, max_layer).await,
        ),
        ClientMessage::PauseProducer {
            request_id,
            producer_id,
        } => ok_or(
            request_id,
            w.set_producer_paused(p, producer_id, true).await,
        ),
        ClientMessage::ResumeProducer {
            request_id,
            producer_id,
        } => ok_or(
            request_id,
            w.set_producer_paused(p, producer_id, false).await,
        ),
        ClientMessage::CloseProducer {
            request_id,
            producer_id,
        } => ok_or(request_id, w.close_producer(p, producer_id).await),
        ClientMessage::PauseConsumer {
            request_id,
            consumer_id,
        } => ok_or(
            request_id,
            w.set_consumer_paused(p, consumer_id, true).await,
        ),
        ClientMessage::ResumeConsumer {
            request_id,
            consumer_id,
        } => ok_or(
            request_id,
            w.set_consumer_paused(p, consumer_id, false).await,
        ),
        ClientMessage::CloseConsumer {
            request_id,
            consumer_id,
        } => ok_or(request_id, w.close_consumer(p, consumer_id).await),
    }
}

#[cfg(test)]
mod stats_gate_tests {
    use super::*;

    #[test]
    fn a_client_summary_counts_at_most_every_two_seconds_and_only_in_range() {
        let mut gate = ClientStatsGate::default();
        let t0 = std::time::Instant::now();
        let good = protocol::StatsReport {
            rtt_ms: Some(80.0),
            loss: Some(0.02),
            frames_decoded: 150,
            ..Default::default()
        };
        let s = gate.accept(t0, &good).unwrap();
        assert_eq!(s.rtt, Some(0.08));
        assert_eq!(s.frames_decoded, 150);
        let e = gate.accept(t0 + Duration::from_secs(1), &good).unwrap_err();
        assert_eq!(e.code(), "stats_too_frequent");
        let later = t0 + Duration::from_secs(5);
        for bad in [
            protocol::StatsReport {
                rtt_ms: Some(-1.0),
                ..Default::default()
            },
            protocol::StatsReport {
                loss: Some(1.5),
                ..Default::default()
            },
            protocol::StatsReport {
                jitter_ms: Some(f64::NAN),
                ..Default::default()
            },
            protocol::StatsReport {
                frames_decoded: 1_000_000,
                ..Default::default()
            },
            protocol::StatsReport {
                frame_height: Some(100_000),
                ..Default::default()
            },
        ] {
            assert_eq!(
                gate.accept(later, &bad).unwrap_err().code(),
                "bad_stats",
                "{bad:?}"
            );
        }
        assert!(
            gate.accept(later, &good).is_ok(),
            "refusals do not start the interval"
        );
    }
}
