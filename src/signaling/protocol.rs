//! Signaling protocol v1: JSON text frames over WebSocket. `docs/signaling.md` is the contract;
//! this module is its Rust form. Parsing distinguishes "not JSON / wrong shape" from "a type
//! this version does not know", so clients get a precise error.

use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::ids::{ConsumerId, NodeId, ProducerId, RegionId, SessionId, UserId};
use crate::media::layers::Layer;
use crate::sfu::{MediaKind, ParticipantInfo, ProducerInfo, SfuEvent, TransportKind};

pub const PROTOCOL_VERSION: u32 = 1;

/// WebSocket close codes Meridian uses.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const MALFORMED: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    /// Refused by the session's compliance profile (for example, outside its countries).
    pub const FORBIDDEN: u16 = 4403;
    pub const JOIN_TIMEOUT: u16 = 4408;
    pub const REPLACED: u16 = 4409;
    pub const IDLE: u16 = 4410;
    pub const TOO_SLOW: u16 = 4412;
    pub const FULL: u16 = 4429;
    pub const SESSION_EXPIRED: u16 = 4440;
    /// A `join` with `resume` for a place no longer kept (or never given).
    pub const RESUME_EXPIRED: u16 = 4441;
    /// The node was drained and the participant did not move by the deadline.
    pub const DRAINED: u16 = 4503;
}

/// Messages a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ClientMessage {
    #[serde(rename_all = "camelCase")]
    Join {
        /// Protocol version the client speaks; must be 1.
        version: u32,
        /// Missing is the same as empty: refused as `token_missing`, not as malformed.
        #[serde(default)]
        token: String,
        /// If given, must match the token's session.
        #[serde(default)]
        session_id: Option<SessionId>,
        /// The `resumeKey` of an earlier `joined`: takes that participant back (same
        /// producers, consumers and transports) if its connection was lost less than
        /// `resumeWithinSecs` ago. The token must name the same session, user and role.
        #[serde(default)]
        resume: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Publish {
        request_id: u64,
        sdp: String,
    },
    #[serde(rename_all = "camelCase")]
    Subscribe {
        request_id: u64,
        producer_id: ProducerId,
        sdp: String,
        #[serde(default)]
        max_layer: Option<Layer>,
    },
    #[serde(rename_all = "camelCase")]
    Candidate {
        #[serde(default)]
        request_id: Option<u64>,
        transport: TransportKind,
        candidate: String,
        #[serde(default)]
        sdp_mid: Option<String>,
    },
    /// A new offer for an existing transport with the same media: an ICE restart.
    #[serde(rename_all = "camelCase")]
    RestartIce {
        request_id: u64,
        transport: TransportKind,
        sdp: String,
    },
    #[serde(rename_all = "camelCase")]
    SetConsumerLayer {
        request_id: u64,
        consumer_id: ConsumerId,
        max_layer: Layer,
    },
    #[serde(rename_all = "camelCase")]
    PauseProducer {
        request_id: u64,
        producer_id: ProducerId,
    },
    #[serde(rename_all = "camelCase")]
    ResumeProducer {
        request_id: u64,
        producer_id: ProducerId,
    },
    #[serde(rename_all = "camelCase")]
    CloseProducer {
        request_id: u64,
        producer_id: ProducerId,
    },
    #[serde(rename_all = "camelCase")]
    PauseConsumer {
        request_id: u64,
        consumer_id: ConsumerId,
    },
    #[serde(rename_all = "camelCase")]
    ResumeConsumer {
        request_id: u64,
        consumer_id: ConsumerId,
    },
    #[serde(rename_all = "camelCase")]
    CloseConsumer {
        request_id: u64,
        consumer_id: ConsumerId,
    },
    #[serde(rename_all = "camelCase")]
    Ping {
        #[serde(default)]
        request_id: Option<u64>,
    },
    /// Agent only, on a recorded session: a verification checklist step marked.
    #[serde(rename_all = "camelCase")]
    MarkChecklist {
        request_id: u64,
        step: String,
        checked: bool,
    },
    /// Agent only, on a recorded session: the verification's outcome.
    #[serde(rename_all = "camelCase")]
    RecordOutcome {
        request_id: u64,
        outcome: Outcome,
        #[serde(default)]
        note: String,
    },
    /// Customer (`user` role) only, under a profile with a consent step: the consent text
    /// they were shown (`joined.profile.consent`) and agreed to.
    #[serde(rename_all = "camelCase")]
    GiveConsent {
        request_id: u64,
        text: String,
    },
    /// Customer only, under a profile that captures location: the browser's fix.
    #[serde(rename_all = "camelCase")]
    ShareLocation {
        request_id: u64,
        latitude: f64,
        longitude: f64,
        /// Metres.
        accuracy: f64,
        /// When the fix was taken: milliseconds since the Unix epoch (`GeolocationPosition.timestamp`).
        captured_at: u64,
    },
    /// Agent only, under a profile with a question pool: the next question to ask.
    #[serde(rename_all = "camelCase")]
    DrawQuestion {
        request_id: u64,
    },
    /// A summary of the client's `getStats()`, sent every few seconds; never answered unless
    /// refused (`stats_too_frequent`, `bad_stats`).
    Stats(StatsReport),
    Leave,
}

/// What a client measured since its previous summary (every field optional but the counts).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsReport {
    /// Round-trip time of the selected candidate pair (publish side if any, else subscribe).
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Largest interarrival jitter among the received streams.
    #[serde(default)]
    pub jitter_ms: Option<f64>,
    /// Share of expected packets lost since the previous summary, over every received stream.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Video frames decoded and freezes since the previous summary.
    #[serde(default)]
    pub frames_decoded: u32,
    #[serde(default)]
    pub freezes: u32,
    /// Height of the largest video being decoded.
    #[serde(default)]
    pub frame_height: Option<u32>,
    /// From a subscription to its first decoded frame, once per subscription.
    #[serde(default)]
    pub first_frame_ms: Option<f64>,
}

/// How a verification ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Approved,
    Rejected,
    Escalated,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Approved => "approved",
            Outcome::Rejected => "rejected",
            Outcome::Escalated => "escalated",
        }
    }
}

/// Longest checklist step name and outcome note accepted (characters).
pub const MAX_STEP_CHARS: usize = 200;
pub const MAX_NOTE_CHARS: usize = 2000;

const KNOWN_TYPES: &[&str] = &[
    "join",
    "publish",
    "subscribe",
    "candidate",
    "restartIce",
    "setConsumerLayer",
    "pauseProducer",
    "resumeProducer",
    "closeProducer",
    "pauseConsumer",
    "resumeConsumer",
    "closeConsumer",
    "ping",
    "markChecklist",
    "recordOutcome",
    "giveConsent",
    "shareLocation",
    "drawQuestion",
    "stats",
    "leave",
];

/// Why a text frame is not a valid client message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message is not a JSON object: {0}")]
    NotJson(String),
    #[error("message has no string field `type`")]
    NoType,
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: String, reason: String },
}

impl ParseError {
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::NotJson(_) | ParseError::NoType | ParseError::Malformed { .. } => {
                "malformed"
            }
            ParseError::UnknownType(_) => "unknown_type",
        }
    }

    /// The request id, when the broken message had a readable one.
    pub fn request_id(text: &str) -> Option<u64> {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()?
            .get("requestId")?
            .as_u64()
    }
}

pub fn parse(text: &str) -> Result<ClientMessage, ParseError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ParseError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(ParseError::NotJson("expected an object".into()));
    }
    let ty = value
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or(ParseError::NoType)?
        .to_owned();
    if !KNOWN_TYPES.contains(&ty.as_str()) {
        let shown: String = ty.chars().take(40).collect();
        return Err(ParseError::UnknownType(shown));
    }
    serde_json::from_value(value).map_err(|e| ParseError::Malformed {
        kind: ty,
        reason: e.to_string(),
    })
}

/// Messages the node sends.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    #[serde(rename_all = "camelCase")]
    Joined {
        version: u32,
        participant_id: String,
        session_id: SessionId,
        user_id: UserId,
        role: Role,
        /// Token expiry, seconds since the Unix epoch: access ends then.
        expires_at: u64,
        /// The node and region the client joined, for display and support.
        node: NodeId,
        region: RegionId,
        /// The session is recorded: its audit log (and, later, media) kept for compliance.
        /// Clients must tell the participant (the demo pages show a recording indicator).
        recorded: bool,
        /// The compliance profile the session runs under (`name`, `consent` text, whether
        /// `location` is captured, whether the agent has `questions`); absent: none.
        #[serde(skip_serializing_if = "Option::is_none")]
        profile: Option<serde_json::Value>,
        participants: Vec<ParticipantInfo>,
        producers: Vec<ProducerInfo>,
        /// Secret that takes this participant back after a lost connection (`join.resume`);
        /// absent when the node does not keep places (`signaling.resume_grace_secs = 0`).
        #[serde(skip_serializing_if = "Option::is_none")]
        resume_key: Option<String>,
        /// How long the place is kept after the connection is lost.
        resume_within_secs: u64,
        /// The region's TURN servers with credentials for this participant (for
        /// `RTCConfiguration.iceServers`); empty when the node has no `[turn]`.
        ice_servers: Vec<crate::auth::turn::IceServer>,
    },
    /// The node is being drained: move to `edge` (or, failing it, the `alternates` in order)
    /// within `deadlineSecs` — join there, publish and subscribe there, then leave here. Sent
    /// again if the drain is renewed; `migrateCancelled` when it is undone.
    #[serde(rename_all = "camelCase")]
    Migrate {
        edge: super::edge::EdgeNode,
        alternates: Vec<super::edge::EdgeNode>,
        deadline_secs: u64,
    },
    /// The drain was undone: stay.
    MigrateCancelled,
    /// Answer to `restartIce`.
    #[serde(rename_all = "camelCase")]
    IceRestarted { request_id: u64, sdp: String },
    /// Answer to a `join` with `resume`: the participant is back, with everything it had;
    /// events of the gap follow.
    #[serde(rename_all = "camelCase")]
    Resumed {
        participant_id: String,
        session_id: SessionId,
        expires_at: u64,
        resume_key: String,
        /// Fresh TURN credentials (those of `joined` may be near their expiry).
        ice_servers: Vec<crate::auth::turn::IceServer>,
    },
    #[serde(rename_all = "camelCase")]
    Published {
        request_id: u64,
        sdp: String,
        producers: Vec<PublishedProducer>,
    },
    #[serde(rename_all = "camelCase")]
    Subscribed {
        request_id: u64,
        sdp: String,
        consumer_id: ConsumerId,
        producer_id: ProducerId,
        mid: String,
    },
    #[serde(rename_all = "camelCase")]
    Ok { request_id: u64 },
    /// The answer to `drawQuestion`: the question to ask, and how many are left in the pool.
    #[serde(rename_all = "camelCase")]
    Question {
        request_id: u64,
        question: String,
        remaining: usize,
    },
    #[serde(rename_all = "camelCase")]
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<u64>,
        /// One of the codes in docs/signaling.md; also the metrics label.
        code: &'static str,
        message: String,
    },
    #[serde(rename_all = "camelCase")]
    ParticipantJoined { participant: ParticipantInfo },
    #[serde(rename_all = "camelCase")]
    ParticipantLeft { participant: ParticipantInfo },
    #[serde(rename_all = "camelCase")]
    ProducerAdded { producer: ProducerInfo },
    #[serde(rename_all = "camelCase")]
    ProducerClosed { producer_id: ProducerId },
    #[serde(rename_all = "camelCase")]
    ProducerPaused { producer_id: ProducerId },
    #[serde(rename_all = "camelCase")]
    ProducerResumed { producer_id: ProducerId },
    #[serde(rename_all = "camelCase")]
    ConsumerClosed { consumer_id: ConsumerId },
    #[serde(rename_all = "camelCase")]
    ConsumerLayerChanged {
        consumer_id: ConsumerId,
        layer: Layer,
        reason: crate::media::layers::LayerReason,
        estimate_bps: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    TransportState {
        transport: TransportKind,
        state: String,
    },
    #[serde(rename_all = "camelCase")]
    SessionExpired { message: String },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedProducer {
    pub mid: String,
    pub producer_id: ProducerId,
    pub kind: MediaKind,
}

impl ServerMessage {
    pub fn error(request_id: Option<u64>, code: &'static str, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            request_id,
            code,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing these plain data types cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{\"type\":\"error\"}".into())
    }
}

impl From<SfuEvent> for ServerMessage {
    fn from(ev: SfuEvent) -> Self {
        match ev {
            SfuEvent::ParticipantJoined(participant) => {
                ServerMessage::ParticipantJoined { participant }
            }
            SfuEvent::ParticipantLeft(participant) => {
                ServerMessage::ParticipantLeft { participant }
            }
            SfuEvent::ProducerAdded(producer) => ServerMessage::ProducerAdded { producer },
            SfuEvent::ProducerClosed(producer_id) => ServerMessage::ProducerClosed { producer_id },
            SfuEvent::ProducerPaused(producer_id) => ServerMessage::ProducerPaused { producer_id },
            SfuEvent::ProducerResumed(producer_id) => {
                ServerMessage::ProducerResumed { producer_id }
            }
            SfuEvent::ConsumerClosed(consumer_id) => ServerMessage::ConsumerClosed { consumer_id },
            SfuEvent::ConsumerLayerChanged {
                consumer_id,
                layer,
                reason,
                estimate_bps,
            } => ServerMessage::ConsumerLayerChanged {
                consumer_id,
                layer,
                reason,
                estimate_bps,
            },
            SfuEvent::TransportState { transport, state } => {
                ServerMessage::TransportState { transport, state }
            }
            SfuEvent::Dismissed(why) => ServerMessage::error(None, why.code(), why.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_type_and_malformed_are_told_apart() {
        assert_eq!(
            parse(r#"{"type":"teleport"}"#).unwrap_err().code(),
            "unknown_type"
        );
        assert_eq!(parse("not json").unwrap_err().code(), "malformed");
        assert_eq!(parse("[1,2]").unwrap_err().code(), "malformed");
        assert_eq!(parse(r#"{"sdp":"x"}"#).unwrap_err(), ParseError::NoType);
        assert!(matches!(
            parse(r#"{"type":"publish","requestId":1}"#).unwrap_err(),
            ParseError::Malformed { .. }
        ));
        assert!(matches!(
            parse(r#"{"type":"publish","requestId":1,"sdp":"v=0","extra":1}"#).unwrap_err(),
            ParseError::Malformed { .. }
        ));
    }

    #[test]
    fn a_stats_summary_parses_with_its_optional_fields() {
        let m = parse(
            r#"{"type":"stats","rttMs":42.5,"loss":0.01,"framesDecoded":150,"frameHeight":720}"#,
        )
        .unwrap();
        let ClientMessage::Stats(r) = m else {
            panic!("{m:?}")
        };
        assert_eq!(r.rtt_ms, Some(42.5));
        assert_eq!(r.frame_height, Some(720));
        assert_eq!((r.frames_decoded, r.freezes, r.jitter_ms), (150, 0, None));
        assert_eq!(
            parse(r#"{"type":"stats","loss":"lots"}"#)
                .unwrap_err()
                .code(),
            "malformed"
        );
    }

    #[test]
    fn join_parses() {
        let m = parse(r#"{"type":"join","version":1,"token":"a.b.c"}"#).unwrap();
        assert!(matches!(m, ClientMessage::Join { version: 1, .. }));
    }
}
