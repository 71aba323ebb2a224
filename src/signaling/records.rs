//! Where a participant's audit records go: this node's recorder, or the recorder of the
//! session's residency region over the mesh ([`crate::mesh::records`]). And the recording
//! node's side: records relayed by other nodes are written here, and each session recorded
//! for them holds a seat on a media worker, so that its producers are piped in and recorded
//! although no participant is connected here.

use std::collections::HashMap;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::compliance::recorder::{Arrival, ProducerEvent, RecordError, Recorder, Refusal};
use crate::ids::{NodeId, ParticipantId, SessionId};
use crate::mesh::records::{Inbound, RecordRelay, RelayError};
use crate::proto::pipe::RecordEntry;
use crate::sfu::{Seat, Workers};

/// The records of one participant's session, here or at the recording node.
#[derive(Clone)]
pub enum RecordsTo {
    Here(Recorder),
    There { relay: RecordRelay, node: NodeId },
}

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error(transparent)]
    Here(#[from] RecordError),
    #[error(
        "the session's records are kept by node {node}, which did not take this one: {source}"
    )]
    There { node: NodeId, source: RelayError },
}

impl RecordsError {
    /// The code a refused client is told.
    pub fn code(&self) -> &'static str {
        match self {
            RecordsError::Here(e) => e.code(),
            RecordsError::There { .. } => "recording_unavailable",
        }
    }
}

/// Reasons a departure may carry in a relayed record; anything else is written as `left`.
const LEAVE_REASONS: &[&str] = &[
    "left",
    "connection_closed",
    "token_expired",
    "replaced",
    "too_slow",
    "node_lost",
    "recording_failed",
];

/// Verification steps a relayed record may carry.
const NOTES: &[&str] = &[
    "checklist_marked",
    "outcome_recorded",
    "consent_given",
    "location_captured",
    "question_asked",
    "recording_resumed",
];

impl RecordsTo {
    /// This node's recorder, when the records are kept here.
    pub fn here(&self) -> Option<&Recorder> {
        match self {
            RecordsTo::Here(r) => Some(r),
            RecordsTo::There { .. } => None,
        }
    }

    /// Whether `by` (a recording node, `None` for this node's recorder) keeps these records.
    pub fn kept_by(&self, by: Option<&NodeId>) -> bool {
        match self {
            RecordsTo::Here(_) => by.is_none(),
            RecordsTo::There { node, .. } => by == Some(node),
        }
    }

    /// Records a participant's arrival; returns once it is on the recording node's disk.
    pub async fn joined(&self, a: Arrival) -> Result<(), RecordsError> {
        match self {
            RecordsTo::Here(r) => Ok(r.joined(a).await?),
            RecordsTo::There { relay, node } => {
                let entry = RecordEntry::Joined {
                    participant: a.participant,
                    user: a.user,
                    role: a.role,
                    profile: a.profile,
                };
                relay
                    .send(node, &a.session, entry)
                    .await
                    .map_err(|source| RecordsError::There {
                        node: node.clone(),
                        source,
                    })
            }
        }
    }

    /// A refused join; returns once it is on the recording node's disk.
    pub async fn refused(&self, r: Refusal) -> Result<(), RecordsError> {
        match self {
            RecordsTo::Here(rec) => Ok(rec.refused(r).await?),
            RecordsTo::There { relay, node } => {
                let entry = RecordEntry::Refused {
                    user: r.user,
                    role: r.role,
                    profile: r.profile,
                    code: r.code,
                    fields: Value::Object(r.fields).to_string(),
                };
                relay
                    .send(node, &r.session, entry)
                    .await
                    .map_err(|source| RecordsError::There {
                        node: node.clone(),
                        source,
                    })
            }
        }
    }

    /// A verification step; returns once it is on the recording node's disk.
    pub async fn note(
        &self,
        session: SessionId,
        participant: ParticipantId,
        event: &'static str,
        fields: Map<String, Value>,
    ) -> Result<(), RecordsError> {
        match self {
            RecordsTo::Here(r) => Ok(r.note(session, participant, event, fields).await?),
            RecordsTo::There { relay, node } => {
                let entry = RecordEntry::Note {
                    participant,
                    event: event.to_owned(),
                    fields: Value::Object(fields).to_string(),
                };
                relay
                    .send(node, &session, entry)
                    .await
                    .map_err(|source| RecordsError::There {
                        node: node.clone(),
                        source,
                    })
            }
        }
    }

    pub fn producer(&self, session: SessionId, participant: ParticipantId, event: ProducerEvent) {
        match self {
            RecordsTo::Here(r) => r.producer(session, participant, event),
            RecordsTo::There { relay, node } => {
                let (event, producer, media) = match event {
                    ProducerEvent::Started { producer, kind } => ("started", producer, Some(kind)),
                    ProducerEvent::Paused(p) => ("paused", p, None),
                    ProducerEvent::Resumed(p) => ("resumed", p, None),
                    ProducerEvent::Stopped(p) => ("stopped", p, None),
                };
                let entry = RecordEntry::Producer {
                    participant,
                    producer,
                    event: event.to_owned(),
                    media,
                };
                relay.post(node, &session, entry);
            }
        }
    }

    pub fn left(&self, session: SessionId, participant: ParticipantId, reason: &'static str) {
        match self {
            RecordsTo::Here(r) => r.left(session, participant, reason),
            RecordsTo::There { relay, node } => {
                let entry = RecordEntry::Left {
                    participant,
                    reason: reason.to_owned(),
                };
                relay.post(node, &session, entry);
            }
        }
    }
}

/// A session recorded here for participants of other nodes.
struct Held {
    seat: Seat,
    /// Its participants on other nodes, with the node each joined through.
    participants: HashMap<ParticipantId, NodeId>,
}

/// Writes the records other nodes relay, answering each once it is on disk (or why not),
/// until the mesh stops.
/// A session whose recording fails here (`ended`) is ended on the nodes of its participants
/// too.
pub async fn serve_relayed(
    mut inbox: mpsc::UnboundedReceiver<Inbound>,
    recorder: Recorder,
    workers: Workers,
    relay: RecordRelay,
    mut ended: tokio::sync::broadcast::Receiver<crate::compliance::recorder::Ended>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut held: HashMap<SessionId, Held> = HashMap::new();
    loop {
        let msg = tokio::select! {
            m = inbox.recv() => match m {
                Some(m) => m,
                None => return,
            },
            e = ended.recv() => {
                match e {
                    Ok(e) if e.by.is_none() => {
                        if let Some(h) = held.get(&e.session) {
                            let mut nodes: Vec<&NodeId> = h.participants.values().collect();
                            nodes.sort();
                            nodes.dedup();
                            for node in nodes {
                                relay.end(node, &e.session, &e.reason);
                            }
                        }
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
                continue;
            }
        };
        match msg {
            Inbound::Record(r) => {
                let result = relayed(
                    &mut held,
                    &recorder,
                    &workers,
                    r.session,
                    r.entry,
                    (r.from_node, r.from_region),
                )
                .await;
                relay.answer(r.pipe, r.id, result.err());
            }
            Inbound::NodeGone(node) => {
                // Its participants cannot say they left: the recording says why they stopped.
                let gone: Vec<(SessionId, ParticipantId)> = held
                    .iter()
                    .flat_map(|(s, h)| {
                        h.participants
                            .iter()
                            .filter(|(_, n)| **n == node)
                            .map(move |(p, _)| (s.clone(), p.clone()))
                    })
                    .collect();
                for (session, participant) in gone {
                    recorder.left(session.clone(), participant.clone(), "node_lost");
                    release(&mut held, &session, &participant);
                }
            }
        }
    }
}

fn release(held: &mut HashMap<SessionId, Held>, session: &SessionId, participant: &ParticipantId) {
    let Some(h) = held.get_mut(session) else {
        return;
    };
    h.participants.remove(participant);
    if h.participants.is_empty() {
        if let Some(h) = held.remove(session) {
            h.seat.worker().record_seat(session.clone(), false);
        }
    }
}

async fn relayed(
    held: &mut HashMap<SessionId, Held>,
    recorder: &Recorder,
    workers: &Workers,
    session: SessionId,
    entry: RecordEntry,
    via: (NodeId, crate::ids::RegionId),
) -> Result<(), String> {
    match entry {
        RecordEntry::Joined {
            participant,
            user,
            role,
            profile,
        } => {
            let arrival = Arrival {
                session,
                participant,
                user,
                role,
                via: Some(via),
                profile,
            };
            joined(held, recorder, workers, arrival).await
        }
        RecordEntry::Refused {
            user,
            role,
            profile,
            code,
            fields,
        } => {
            let fields = json_object(&fields)?;
            let refusal = Refusal {
                session,
                user,
                role,
                via: Some(via),
                profile,
                code: code.chars().take(64).collect(),
                fields,
            };
            recorder.refused(refusal).await.map_err(|e| e.to_string())
        }
        RecordEntry::Left {
            participant,
            reason,
        } => {
            let reason = LEAVE_REASONS
                .iter()
                .find(|r| **r == reason)
                .copied()
                .unwrap_or("left");
            recorder.left(session.clone(), participant.clone(), reason);
            release(held, &session, &participant);
            Ok(())
        }
        RecordEntry::Producer {
            participant,
            producer,
            event,
            media,
        } => {
            let event = match event.as_str() {
                "started" => ProducerEvent::Started {
                    producer,
                    kind: match media.as_deref() {
                        Some("audio") => "audio",
                        _ => "video",
                    }
                    .into(),
                },
                "paused" => ProducerEvent::Paused(producer),
                "resumed" => ProducerEvent::Resumed(producer),
                "stopped" => ProducerEvent::Stopped(producer),
                other => return Err(format!("unknown producer event {other:?}")),
            };
            recorder.producer(session, participant, event);
            Ok(())
        }
        RecordEntry::Note {
            participant,
            event,
            fields,
        } => {
            let event = NOTES
                .iter()
                .find(|n| **n == event)
                .copied()
                .ok_or_else(|| format!("unknown verification step {event:?}"))?;
            let fields = json_object(&fields)?;
            recorder
                .note(session, participant, event, fields)
                .await
                .map_err(|e| e.to_string())
        }
    }
}

/// A relayed entry's fields.
fn json_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(fields)) => Ok(fields),
        _ => Err("a relayed entry's fields must be a JSON object".into()),
    }
}

async fn joined(
    held: &mut HashMap<SessionId, Held>,
    recorder: &Recorder,
    workers: &Workers,
    arrival: Arrival,
) -> Result<(), String> {
    let session = arrival.session.clone();
    let participant = arrival.participant.clone();
    // The seat first: the session's producers are piped in and tapped from the start.
    if !held.contains_key(&session) {
        let seat = workers.place(&session).map_err(|e| e.to_string())?;
        seat.worker().record_seat(session.clone(), true);
        held.insert(
            session.clone(),
            Held {
                seat,
                participants: HashMap::new(),
            },
        );
    }
    let node = arrival.via.as_ref().map(|v| v.0.clone());
    match recorder.joined(arrival).await {
        Ok(()) => {
            if let (Some(h), Some(node)) = (held.get_mut(&session), node) {
                h.participants.insert(participant, node);
            }
            Ok(())
        }
        Err(e) => {
            if held
                .get(&session)
                .is_some_and(|h| h.participants.is_empty())
            {
                if let Some(h) = held.remove(&session) {
                    h.seat.worker().record_seat(session, false);
                }
            }
            Err(e.to_string())
        }
    }
}
