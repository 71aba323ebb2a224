//! The node's compliance records of its sessions: one folder per session run, its audit log
//! written as participants come and go, sealed when the last one leaves, and sealed as
//! `interrupted` on the next start when the node stopped in the middle of one.
//!
//! File I/O (every audit entry is `fsync`ed) runs on a thread of its own, never on the async
//! runtime or a media worker: callers send requests and, for a join, wait for the entry to be
//! on disk, so a session that must be recorded never runs unrecorded.
//!
//! This increment records what this node sees: the participants who joined through it. The
//! recorder in the residency region taking the other nodes' participants and the media is the
//! rest of issue 13.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::audit::{AuditError, AuditLog};
use super::media::{MediaInput, MediaSink, RecordedFile};
use super::seal::{seal, SealError, SealStatus, SigningKey, MANIFEST};
use super::utc_rfc3339;
use crate::auth::Role;
use crate::ids::{NodeId, ParticipantId, ProducerId, RegionId, SessionId, UserId};

pub const AUDIT_FILE: &str = "audit.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write the session's records: {0}")]
    Audit(#[from] AuditError),
    #[error("cannot create the session folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session id {0:?} cannot name a folder (it starts with a dot)")]
    UnsafeSession(String),
    #[error("the recorder has stopped")]
    Stopped,
    #[error("session {0} is not being recorded on this node")]
    NotOpen(String),
    #[error("cannot store the snapshot {path}: {source}")]
    Snapshot {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RecordError {
    /// The code a refused client is told.
    pub fn code(&self) -> &'static str {
        match self {
            RecordError::NotOpen(_) => "not_recorded_here",
            _ => "recording_unavailable",
        }
    }
}

/// Where and as whom this node keeps records.
pub struct RecorderSettings {
    /// Session folders go under `<dir>/<session>/<start>/`.
    pub dir: PathBuf,
    pub key: SigningKey,
    pub node: NodeId,
    pub region: RegionId,
    /// Where the session database's updates go (every entry, every seal), if it has one.
    pub db: Option<tokio::sync::mpsc::UnboundedSender<super::db::DbUpdate>>,
    /// Where sealed runs are queued for the object store, if one is configured.
    pub uploads: Option<super::storage::Uploads>,
    /// Told of each session whose recording failed (`recording_failed`): it must end.
    pub ended: Option<tokio::sync::broadcast::Sender<Ended>>,
}

/// A session that must end because its recording failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The recording node that said so: `None` for this node's own recorder. A connection
    /// heeds only the node that records its session.
    pub by: Option<NodeId>,
    pub session: SessionId,
    pub reason: String,
}

/// What starting the recorder found from a previous run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Folders sealed as interrupted.
    pub sealed: Vec<PathBuf>,
    /// Folders whose audit log does not verify: left as they are (never appended to), named
    /// here and in the log for an operator.
    pub broken: Vec<(PathBuf, String)>,
}

/// One participant's arrival, as its audit entry says it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub session: SessionId,
    pub participant: ParticipantId,
    pub user: UserId,
    pub role: Role,
    /// The node and region the participant joined through, when not this node (its
    /// records relayed here, the session's recording node).
    pub via: Option<(NodeId, RegionId)>,
    /// The compliance profile the session runs under.
    pub profile: Option<String>,
}

/// A join refused by the session's rules (for example a customer outside the profile's
/// countries), as its audit entry says it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub session: SessionId,
    pub user: UserId,
    pub role: Role,
    /// As for [`Arrival::via`].
    pub via: Option<(NodeId, RegionId)>,
    pub profile: Option<String>,
    /// The error code the client was told, and what else the rule looked at.
    pub code: String,
    pub fields: Map<String, Value>,
}

/// What a participant did with its media, as the audit log says it.
#[derive(Debug, Clone)]
pub enum ProducerEvent {
    Started { producer: ProducerId, kind: String },
    Paused(ProducerId),
    Resumed(ProducerId),
    Stopped(ProducerId),
}

/// An evidence still the agent took.
#[derive(Debug)]
pub struct Snapshot {
    pub session: SessionId,
    pub user: UserId,
    pub role: Role,
    /// `png` or `jpg`.
    pub extension: &'static str,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// Where a stored snapshot went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Relative to the session folder.
    pub file: String,
    pub sha256: String,
}

enum Request {
    Joined(Arrival, oneshot::Sender<Result<(), RecordError>>),
    Refused(Refusal, oneshot::Sender<Result<(), RecordError>>),
    Note {
        session: SessionId,
        participant: ParticipantId,
        event: &'static str,
        fields: Map<String, Value>,
        reply: oneshot::Sender<Result<(), RecordError>>,
    },
    Snapshot(Snapshot, oneshot::Sender<Result<Stored, RecordError>>),
    Producer {
        session: SessionId,
        participant: ParticipantId,
        event: ProducerEvent,
    },
    Left {
        session: SessionId,
        participant: ParticipantId,
        reason: String,
    },
    /// An entry from the media writer (a recording file started).
    MediaNote {
        session: SessionId,
        event: &'static str,
        fields: Value,
    },
    #[cfg(test)]
    Sync(oneshot::Sender<()>),
}

/// A handle to the recorder thread (cheap to clone).
#[derive(Clone)]
pub struct Recorder {
    tx: std_mpsc::Sender<Request>,
    stats: Arc<RecorderStats>,
    media: MediaSink,
    /// Where session folders are, and the key that seals them (for review).
    dir: Arc<PathBuf>,
    public_key: Arc<Vec<u8>>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub sessions_sealed: std::sync::atomic::AtomicU64,
    /// Refused joins of an idle session beyond [`REFUSAL_RUNS_PER_HOUR`]: refused, logged,
    /// not given a run of their own.
    pub refusals_unrecorded: std::sync::atomic::AtomicU64,
    pub entries: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
    /// Session database updates that failed (the folder is still written).
    db_failures: std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>,
    /// The object store uploads, when configured.
    storage: std::sync::OnceLock<Arc<super::storage::StorageStats>>,
}

impl RecorderStats {
    pub fn set_db_failures(&self, c: Arc<std::sync::atomic::AtomicU64>) {
        let _ = self.db_failures.set(c);
    }

    pub fn set_storage(&self, s: Arc<super::storage::StorageStats>) {
        let _ = self.storage.set(s);
    }

    pub fn storage(&self) -> Option<&super::storage::StorageStats> {
        self.storage.get().map(|s| s.as_ref())
    }

    pub fn db_failures(&self) -> u64 {
        self.db_failures
            .get()
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Recorder {
    /// Seals what a previous run left unsealed, then starts the recorder thread.
    pub fn start(settings: RecorderSettings) -> Result<(Recorder, Recovered), RecordError> {
        std::fs::create_dir_all(&settings.dir).map_err(|source| RecordError::Folder {
            path: settings.dir.clone(),
            source,
        })?;
        let recovered = recover(&settings);
        let (tx, rx) = std_mpsc::channel();
        let stats = Arc::new(RecorderStats::default());
        let thread_err = |source| RecordError::Folder {
            path: PathBuf::from("<recorder thread>"),
            source,
        };
        let notes = tx.clone();
        let media = super::media::start(move |session, event, fields| {
            let _ = notes.send(Request::MediaNote {
                session: session.clone(),
                event,
                fields,
            });
        })
        .map_err(thread_err)?;
        let (dir, public_key) = (
            Arc::new(settings.dir.clone()),
            Arc::new(settings.key.public_key()),
        );
        let mut state = State {
            settings,
            open: HashMap::new(),
            stats: stats.clone(),
            media: media.clone(),
            rx,
            deferred: std::collections::VecDeque::new(),
            refusal_runs: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("meridian-recorder".into())
            .spawn(move || {
                while let Some(req) = state.next() {
                    state.handle(req);
                }
            })
            .map_err(thread_err)?;
        Ok((
            Recorder {
                tx,
                stats,
                media,
                dir,
                public_key,
            },
            recovered,
        ))
    }

    pub fn stats(&self) -> &RecorderStats {
        &self.stats
    }

    /// Where session folders are kept: `<dir>/<session>/<run>/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The public key of the key this node seals with.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Where media workers copy the packets of recorded producers.
    pub fn media(&self) -> &MediaSink {
        &self.media
    }

    /// Records a participant's arrival; returns once the entry is on disk.
    pub async fn joined(&self, arrival: Arrival) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Joined(arrival, reply))
            .map_err(|_| RecordError::Stopped)?;
        rx.await.unwrap_or(Err(RecordError::Stopped))
    }

    /// Records a refused join in the session's log (a session with nobody in it gets a run of
    /// its own, sealed at once); returns once the entry is on disk.
    pub async fn refused(&self, refusal: Refusal) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Refused(refusal, reply))
            .map_err(|_| RecordError::Stopped)?;
        rx.await.unwrap_or(Err(RecordError::Stopped))
    }

    /// Records something `participant` did (a checklist step, an outcome), with its identity;
    /// returns once the entry is on disk.
    pub async fn note(
        &self,
        session: SessionId,
        participant: ParticipantId,
        event: &'static str,
        fields: Map<String, Value>,
    ) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Note {
                session,
                participant,
                event,
                fields,
                reply,
            })
            .map_err(|_| RecordError::Stopped)?;
        rx.await.unwrap_or(Err(RecordError::Stopped))
    }

    /// Stores an evidence still in the session's folder and records it with its hash.
    pub async fn snapshot(&self, snapshot: Snapshot) -> Result<Stored, RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Snapshot(snapshot, reply))
            .map_err(|_| RecordError::Stopped)?;
        rx.await.unwrap_or(Err(RecordError::Stopped))
    }

    /// Records a producer of `participant` starting, pausing, resuming or stopping.
    pub fn producer(&self, session: SessionId, participant: ParticipantId, event: ProducerEvent) {
        let _ = self.tx.send(Request::Producer {
            session,
            participant,
            event,
        });
    }

    /// Records a departure (`reason`: `left`, `token_expired`, `replaced`, …) and the end of
    /// the producers it leaves behind; the last one out seals the session.
    pub fn left(&self, session: SessionId, participant: ParticipantId, reason: impl Into<String>) {
        let _ = self.tx.send(Request::Left {
            session,
            participant,
            reason: reason.into(),
        });
    }

    /// Waits until every request sent before has been handled (tests).
    #[cfg(test)]
    async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Request::Sync(tx));
        let _ = rx.await;
    }
}

struct Present {
    user: UserId,
    role: Role,
    joined_at: String,
    /// Producers started and not stopped.
    producers: Vec<ProducerId>,
}

struct OpenSession {
    dir: PathBuf,
    log: AuditLog,
    started_at: String,
    present: HashMap<ParticipantId, Present>,
    /// Everyone who took part, for the manifest.
    participants: Vec<Value>,
    /// The compliance profile, and the customer's captured location (for the manifest).
    profile: Option<String>,
    location: Option<Value>,
}

struct State {
    settings: RecorderSettings,
    open: HashMap<SessionId, OpenSession>,
    stats: Arc<RecorderStats>,
    media: MediaSink,
    rx: std_mpsc::Receiver<Request>,
    /// Requests read ahead while waiting for the media writer, handled next.
    deferred: std::collections::VecDeque<Request>,
    /// Runs opened for refusals alone, per session: (start of the hour, count).
    refusal_runs: HashMap<SessionId, (std::time::Instant, u32)>,
}

/// Runs a session with nobody in it gets for refused joins, per hour: a holder of an old
/// token retrying in a loop must not fill the disk with sealed folders.
pub const REFUSAL_RUNS_PER_HOUR: u32 = 10;
/// Sessions whose refusal runs are counted at once (beyond, the counts start afresh).
const REFUSAL_SESSIONS: usize = 10_000;

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl State {
    fn next(&mut self) -> Option<Request> {
        self.deferred.pop_front().or_else(|| self.rx.recv().ok())
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Joined(a, reply) => {
                let r = self.joined(a);
                self.answer(r, reply);
            }
            Request::Refused(refusal, reply) => {
                let r = self.refused(refusal);
                self.answer(r, reply);
            }
            Request::Note {
                session,
                participant,
                event,
                fields,
                reply,
            } => {
                let r = self.note(&session, &participant, event, fields);
                self.answer(r, reply);
            }
            Request::Snapshot(s, reply) => {
                let r = self.snapshot(s);
                self.answer(r, reply);
            }
            Request::Left {
                session,
                participant,
                reason,
            } => {
                let r = self.left(&session, &participant, &reason);
                self.logged(&session, r);
            }
            Request::Producer {
                session,
                participant,
                event,
            } => {
                let r = self.producer(&session, &participant, event);
                self.logged(&session, r);
            }
            Request::MediaNote {
                session,
                event,
                fields,
            } => {
                let why = fields["error"].as_str().map(str::to_owned);
                let r = self.append(&session, event, fields);
                self.logged(&session, r);
                // A session may not run unrecorded: its participants are let go.
                if let (Some(tx), "recording_failed") = (&self.settings.ended, event) {
                    let _ = tx.send(Ended {
                        by: None,
                        session: session.clone(),
                        reason: why.unwrap_or_default(),
                    });
                }
            }
            #[cfg(test)]
            Request::Sync(tx) => {
                let _ = tx.send(());
            }
        }
    }

    /// Counts a failure to write (a request for a session not recorded here is the caller's).
    fn count<T>(&self, r: &Result<T, RecordError>) {
        if matches!(r, Err(e) if !matches!(e, RecordError::NotOpen(_))) {
            self.stats
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Answers a caller waiting for its entry to be on disk.
    fn answer<T>(&self, r: Result<T, RecordError>, reply: oneshot::Sender<Result<T, RecordError>>) {
        self.count(&r);
        let _ = reply.send(r);
    }

    /// Nobody waits for these entries: a failure is counted and logged for the operator.
    fn logged(&self, session: &SessionId, r: Result<(), RecordError>) {
        self.count(&r);
        if let Err(e) = r {
            tracing::error!(%session, error = %e, "audit entry not written");
        }
    }

    fn append(&mut self, session: &SessionId, event: &str, f: Value) -> Result<(), RecordError> {
        let Some(s) = self.open.get_mut(session) else {
            return Ok(());
        };
        let appended = s.log.append(event, fields(f.clone()))?;
        index_entry(&self.settings, session, &s.dir, event, &appended, f);
        self.stats
            .entries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Opens a run of `session` unless one is open.
    fn open_run(&mut self, session: &SessionId, profile: Option<&str>) -> Result<(), RecordError> {
        let (node, region) = (
            self.settings.node.to_string(),
            self.settings.region.to_string(),
        );
        if let Some(s) = self.open.get_mut(session) {
            if s.profile.is_none() {
                s.profile = profile.map(str::to_owned);
            }
            return Ok(());
        }
        let name = session.to_string();
        if name.starts_with('.') {
            return Err(RecordError::UnsafeSession(name));
        }
        let now = SystemTime::now();
        let started_at = utc_rfc3339(now);
        // One folder per run of the session: a session that empties and starts again
        // gets a new one beside the sealed one.
        let stamp: String = started_at
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
            .collect();
        let dir = self.settings.dir.join(&name).join(stamp);
        std::fs::create_dir_all(&dir).map_err(|source| RecordError::Folder {
            path: dir.clone(),
            source,
        })?;
        let log = AuditLog::create(&dir.join(AUDIT_FILE))?;
        self.media.send(MediaInput::Begin {
            session: session.clone(),
            dir: dir.clone(),
            started: now,
        });
        self.open.insert(
            session.clone(),
            OpenSession {
                dir,
                log,
                started_at,
                present: HashMap::new(),
                participants: Vec::new(),
                profile: profile.map(str::to_owned),
                location: None,
            },
        );
        let mut created = json!({"session": name, "node": node, "region": region});
        if let Some(p) = profile {
            created["profile"] = p.into();
        }
        if let Err(e) = self.append(session, "session_created", created) {
            self.open.remove(session);
            return Err(e);
        }
        Ok(())
    }

    /// Where a participant came through: `via`, else this node.
    fn through(&self, via: &Option<(NodeId, RegionId)>) -> (String, String) {
        match via {
            Some((n, r)) => (n.to_string(), r.to_string()),
            None => (
                self.settings.node.to_string(),
                self.settings.region.to_string(),
            ),
        }
    }

    fn joined(&mut self, a: Arrival) -> Result<(), RecordError> {
        self.open_run(&a.session, a.profile.as_deref())?;
        let (node, region) = self.through(&a.via);
        self.append(
            &a.session,
            "participant_joined",
            json!({
                "participant": a.participant.to_string(),
                "user": a.user.to_string(),
                "role": a.role.as_str(),
                "node": node,
                "region": region,
            }),
        )?;
        let s = self.open.get_mut(&a.session).expect("opened above");
        s.present.insert(
            a.participant.clone(),
            Present {
                user: a.user.clone(),
                role: a.role,
                joined_at: utc_rfc3339(SystemTime::now()),
                producers: Vec::new(),
            },
        );
        Ok(())
    }

    fn refused(&mut self, r: Refusal) -> Result<(), RecordError> {
        if !self.open.contains_key(&r.session) && !self.allow_refusal_run(&r.session) {
            self.stats
                .refusals_unrecorded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(session = %r.session, user = %r.user, code = %r.code,
                "join refused; not given a run of its own (more than {REFUSAL_RUNS_PER_HOUR} this hour)");
            return Ok(());
        }
        self.open_run(&r.session, r.profile.as_deref())?;
        let (node, region) = self.through(&r.via);
        let mut f = r.fields;
        f.insert("user".into(), r.user.to_string().into());
        f.insert("role".into(), r.role.as_str().into());
        f.insert("node".into(), node.into());
        f.insert("region".into(), region.into());
        f.insert("code".into(), r.code.into());
        self.append(&r.session, "join_refused", Value::Object(f))?;
        if self
            .open
            .get(&r.session)
            .is_some_and(|s| s.present.is_empty())
        {
            self.end_run(&r.session)?;
        }
        Ok(())
    }

    /// Whether an idle session may get one more run for a refusal this hour.
    fn allow_refusal_run(&mut self, session: &SessionId) -> bool {
        let now = std::time::Instant::now();
        let hour = std::time::Duration::from_secs(3600);
        if self.refusal_runs.len() >= REFUSAL_SESSIONS {
            self.refusal_runs
                .retain(|_, (start, _)| now.duration_since(*start) < hour);
            if self.refusal_runs.len() >= REFUSAL_SESSIONS {
                self.refusal_runs.clear();
            }
        }
        let (start, count) = self.refusal_runs.entry(session.clone()).or_insert((now, 0));
        if now.duration_since(*start) >= hour {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= REFUSAL_RUNS_PER_HOUR
    }

    fn note(
        &mut self,
        session: &SessionId,
        participant: &ParticipantId,
        event: &str,
        mut f: Map<String, Value>,
    ) -> Result<(), RecordError> {
        let s = self
            .open
            .get_mut(session)
            .ok_or_else(|| RecordError::NotOpen(session.to_string()))?;
        let p = s
            .present
            .get(participant)
            .ok_or_else(|| RecordError::NotOpen(session.to_string()))?;
        // Who did it, in every entry of theirs.
        f.insert("participant".into(), participant.to_string().into());
        f.insert("user".into(), p.user.to_string().into());
        f.insert("role".into(), p.role.as_str().into());
        if event == "location_captured" {
            let at = |k: &str| f.get(k).and_then(Value::as_f64);
            if let (Some(lat), Some(lon)) = (at("latitude"), at("longitude")) {
                // Files started from now on carry it in their title.
                self.media.send(MediaInput::Geotag {
                    session: session.clone(),
                    geotag: super::profile::iso6709(lat, lon),
                });
            }
            s.location = Some(Value::Object(f.clone()));
        }
        self.append(session, event, Value::Object(f))
    }

    fn snapshot(&mut self, shot: Snapshot) -> Result<Stored, RecordError> {
        use std::io::Write;
        let s = self
            .open
            .get(&shot.session)
            .ok_or_else(|| RecordError::NotOpen(shot.session.to_string()))?;
        let sha256 = super::sha256_hex(&shot.bytes);
        let dir = s.dir.join("snapshots");
        std::fs::create_dir_all(&dir).map_err(|source| RecordError::Snapshot {
            path: dir.clone(),
            source,
        })?;
        let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) + 1;
        let file = format!("snapshots/{n:03}-{}.{}", &sha256[..12], shot.extension);
        let path = s.dir.join(&file);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&shot.bytes)?;
                f.sync_all()
            });
        if let Err(source) = written {
            let _ = std::fs::remove_file(&path);
            return Err(RecordError::Snapshot { path, source });
        }
        self.append(
            &shot.session,
            "snapshot_taken",
            json!({
                "file": file,
                "sha256": sha256,
                "bytes": shot.bytes.len(),
                "content_type": shot.content_type,
                "user": shot.user.to_string(),
                "role": shot.role.as_str(),
            }),
        )?;
        Ok(Stored { file, sha256 })
    }

    fn producer(
        &mut self,
        session: &SessionId,
        participant: &ParticipantId,
        event: ProducerEvent,
    ) -> Result<(), RecordError> {
        let Some(p) = self
            .open
            .get_mut(session)
            .and_then(|s| s.present.get_mut(participant))
        else {
            return Ok(());
        };
        let user = p.user.to_string();
        let (name, producer, extra) = match event {
            ProducerEvent::Started { producer, kind } => {
                p.producers.push(producer.clone());
                ("producer_started", producer, Some(kind))
            }
            ProducerEvent::Paused(producer) => ("producer_paused", producer, None),
            ProducerEvent::Resumed(producer) => ("producer_resumed", producer, None),
            ProducerEvent::Stopped(producer) => {
                p.producers.retain(|q| *q != producer);
                ("producer_stopped", producer, None)
            }
        };
        let mut f = json!({
            "participant": participant.to_string(),
            "user": user,
            "producer": producer.to_string(),
        });
        if let Some(kind) = extra {
            f["kind"] = kind.into();
        }
        if name == "producer_stopped" {
            f["reason"] = "closed".into();
        }
        self.append(session, name, f)
    }

    fn left(
        &mut self,
        session: &SessionId,
        participant: &ParticipantId,
        reason: &str,
    ) -> Result<(), RecordError> {
        let Some(s) = self.open.get_mut(session) else {
            return Ok(());
        };
        let Some(p) = s.present.remove(participant) else {
            return Ok(());
        };
        s.participants.push(json!({
            "participant": participant.to_string(),
            "user": p.user.to_string(),
            "role": p.role.as_str(),
            "joined_at": p.joined_at,
            "left_at": utc_rfc3339(SystemTime::now()),
            "left_because": reason,
        }));
        let empty = s.present.is_empty();
        for producer in &p.producers {
            self.append(
                session,
                "producer_stopped",
                json!({
                    "participant": participant.to_string(),
                    "user": p.user.to_string(),
                    "producer": producer.to_string(),
                    "reason": reason,
                }),
            )?;
        }
        self.append(
            session,
            "participant_left",
            json!({
                "participant": participant.to_string(),
                "user": p.user.to_string(),
                "role": p.role.as_str(),
                "reason": reason,
            }),
        )?;
        if empty {
            self.end_run(session)?;
        }
        Ok(())
    }

    /// Closes the session's files, ends its log and seals the run.
    fn end_run(&mut self, session: &SessionId) -> Result<(), RecordError> {
        // A file cut by a failure says so in its `error`; the failure itself was written
        // when it happened (`recording_failed`).
        for f in self.finish_media(session) {
            self.append(session, "recording_stopped", f.audit_fields())?;
        }
        self.append(session, "session_ended", json!({}))?;
        let s = self.open.remove(session).expect("open");
        let mut metadata = json!({
            "node": self.settings.node.to_string(),
            "region": self.settings.region.to_string(),
            "started_at": s.started_at,
            "ended_at": utc_rfc3339(SystemTime::now()),
            "participants": s.participants,
        });
        if let Some(p) = s.profile {
            metadata["profile"] = p.into();
        }
        if let Some(l) = s.location {
            metadata["location"] = l;
        }
        match seal(
            &s.dir,
            &session.to_string(),
            SealStatus::Complete,
            &s.log,
            metadata,
            &self.settings.key,
        ) {
            Ok(_) => {
                index_seal(&self.settings, session, &s.dir, SealStatus::Complete);
                self.stats
                    .sessions_sealed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(%session, dir = %s.dir.display(), error = %e, "session not sealed");
                self.stats
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl State {
    /// Has the media writer write out and close the session's files; the entries it sent
    /// before (recording started) are written first, in the order they came.
    fn finish_media(&mut self, session: &SessionId) -> Vec<RecordedFile> {
        let (reply, rx) = std_mpsc::channel();
        let files = if self.media.send(MediaInput::Finish {
            session: session.clone(),
            reply,
        }) {
            rx.recv_timeout(FINISH_WAIT).unwrap_or_else(|_| {
                tracing::error!(%session, "the media writer did not finish the session's files in time");
                self.stats
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Vec::new()
            })
        } else {
            Vec::new()
        };
        while let Ok(req) = self.rx.try_recv() {
            match req {
                Request::MediaNote {
                    session: s,
                    event,
                    fields,
                } if s == *session => {
                    let r = self.append(session, event, fields);
                    self.logged(session, r);
                }
                other => self.deferred.push_back(other),
            }
        }
        files
    }
}

/// Longest a session's end waits for the media writer to close its files.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Tells the session database about an entry just written.
fn index_entry(
    settings: &RecorderSettings,
    session: &SessionId,
    dir: &Path,
    event: &str,
    appended: &super::audit::Appended,
    fields: Value,
) {
    if let Some(db) = &settings.db {
        let _ = db.send(super::db::DbUpdate::Entry {
            session: session.to_string(),
            run: run_name(dir),
            node: settings.node.to_string(),
            region: settings.region.to_string(),
            folder: dir.display().to_string(),
            seq: appended.seq,
            at: appended.at.clone(),
            event: event.to_owned(),
            hash: appended.hash.clone(),
            fields,
        });
    }
}

/// Tells the session database a run was sealed, with its manifest's hash.
fn index_seal(settings: &RecorderSettings, session: &SessionId, dir: &Path, status: SealStatus) {
    if let Some(u) = &settings.uploads {
        u.queue(super::storage::UploadJob {
            folder: dir.to_path_buf(),
            session: session.to_string(),
            run: run_name(dir),
        });
    }
    if let Some(db) = &settings.db {
        let manifest_sha256 = std::fs::read(dir.join(MANIFEST))
            .map(|b| super::sha256_hex(&b))
            .unwrap_or_default();
        let _ = db.send(super::db::DbUpdate::Sealed {
            session: session.to_string(),
            run: run_name(dir),
            status: match status {
                SealStatus::Complete => "complete",
                SealStatus::Interrupted => "interrupted",
            }
            .to_owned(),
            manifest_sha256,
        });
    }
}

fn run_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every `<dir>/<session>/<run>/` holding an audit log and no manifest: the node stopped in
/// the middle of it. Its log is reopened (a line cut by the stop is dropped), the stop is
/// recorded, and the folder sealed as interrupted.
fn recover(settings: &RecorderSettings) -> Recovered {
    let mut out = Recovered::default();
    for run in session_runs(&settings.dir) {
        if run.join(MANIFEST).exists() || !run.join(AUDIT_FILE).exists() {
            continue;
        }
        match seal_interrupted(settings, &run) {
            Ok(()) => out.sealed.push(run),
            Err(e) => {
                tracing::error!(dir = %run.display(), error = %e, "interrupted session not sealed");
                out.broken.push((run, e.to_string()));
            }
        }
    }
    out
}

fn session_runs(dir: &Path) -> Vec<PathBuf> {
    let mut runs = Vec::new();
    let Ok(sessions) = std::fs::read_dir(dir) else {
        return runs;
    };
    for s in sessions.flatten() {
        if let Ok(rs) = std::fs::read_dir(s.path()) {
            runs.extend(rs.flatten().map(|r| r.path()).filter(|p| p.is_dir()));
        }
    }
    runs.sort();
    runs
}

#[derive(Debug, thiserror::Error)]
enum RecoverError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Seal(#[from] SealError),
}

fn seal_interrupted(settings: &RecorderSettings, run: &Path) -> Result<(), RecoverError> {
    let (mut log, reopened) = AuditLog::reopen(&run.join(AUDIT_FILE))?;
    let f = json!({
        "node": settings.node.to_string(),
        "region": settings.region.to_string(),
        "entries_kept": reopened.entries,
        "bytes_of_a_cut_entry_dropped": reopened.discarded_bytes,
    });
    let appended = log.append("session_interrupted", fields(f.clone()))?;
    let session = run
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Ok(id) = session.parse::<SessionId>() {
        index_entry(settings, &id, run, "session_interrupted", &appended, f);
    }
    seal(
        run,
        &session,
        SealStatus::Interrupted,
        &log,
        json!({
            "node": settings.node.to_string(),
            "region": settings.region.to_string(),
            "sealed_after_restart": true,
        }),
        &settings.key,
    )?;
    if let Ok(id) = session.parse::<SessionId>() {
        index_seal(settings, &id, run, SealStatus::Interrupted);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compliance::seal::verify;

    fn settings(root: &Path) -> RecorderSettings {
        RecorderSettings {
            dir: root.join("recordings"),
            key: SigningKey::load_or_create(&root.join("node.key")).unwrap(),
            node: "india-1".parse().unwrap(),
            region: "india".parse().unwrap(),
            db: None,
            uploads: None,
            ended: None,
        }
    }

    #[tokio::test]
    async fn refusals_of_an_idle_session_get_a_bounded_number_of_runs() {
        let root = tempfile::tempdir().unwrap();
        let (rec, _) = Recorder::start(settings(root.path())).unwrap();
        for _ in 0..REFUSAL_RUNS_PER_HOUR + 2 {
            rec.refused(Refusal {
                session: "kyc-retry".parse().unwrap(),
                user: "mallory".parse().unwrap(),
                role: Role::User,
                via: None,
                profile: None,
                code: "token_expired".into(),
                fields: Map::new(),
            })
            .await
            .unwrap();
        }
        rec.sync().await;
        let runs = std::fs::read_dir(root.path().join("recordings/kyc-retry"))
            .unwrap()
            .count();
        assert_eq!(runs, REFUSAL_RUNS_PER_HOUR as usize);
        assert_eq!(
            rec.stats()
                .refusals_unrecorded
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    fn arrival(session: &str, participant: &str, user: &str, role: Role) -> Arrival {
        Arrival {
            session: session.parse().unwrap(),
            participant: participant.parse().unwrap(),
            user: user.parse().unwrap(),
            role,
            via: None,
            profile: None,
        }
    }

    fn events(run: &Path) -> Vec<String> {
        std::fs::read_to_string(run.join(AUDIT_FILE))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn the_last_one_out_seals_the_session_and_it_verifies() {
        let root = tempfile::tempdir().unwrap();
        let (rec, recovered) = Recorder::start(settings(root.path())).unwrap();
        assert_eq!(recovered, Recovered::default());
        rec.joined(arrival("kyc-1", "p1", "user-1", Role::User))
            .await
            .unwrap();
        rec.joined(arrival("kyc-1", "p2", "agent-7", Role::Agent))
            .await
            .unwrap();
        rec.left("kyc-1".parse().unwrap(), "p1".parse().unwrap(), "left");
        rec.sync().await;
        let runs = session_runs(&root.path().join("recordings"));
        assert_eq!(runs.len(), 1);
        assert!(!runs[0].join(MANIFEST).exists(), "still one participant in");
        rec.left(
            "kyc-1".parse().unwrap(),
            "p2".parse().unwrap(),
            "token_expired",
        );
        rec.sync().await;
        let v = verify(&runs[0], None);
        assert_eq!(v.faults, vec![]);
        let m = v.manifest.unwrap();
        assert_eq!(m.status, SealStatus::Complete);
        assert_eq!(m.metadata["participants"].as_array().unwrap().len(), 2);
        assert_eq!(
            events(&runs[0]),
            [
                "session_created",
                "participant_joined",
                "participant_joined",
                "participant_left",
                "participant_left",
                "session_ended"
            ]
        );
        // The session starting again gets a folder of its own.
        rec.joined(arrival("kyc-1", "p3", "user-1", Role::User))
            .await
            .unwrap();
        rec.sync().await;
        assert_eq!(session_runs(&root.path().join("recordings")).len(), 2);
    }

    #[tokio::test]
    async fn a_session_cut_by_a_stop_is_sealed_as_interrupted_on_the_next_start() {
        let root = tempfile::tempdir().unwrap();
        let (rec, _) = Recorder::start(settings(root.path())).unwrap();
        rec.joined(arrival("kyc-2", "p1", "user-1", Role::User))
            .await
            .unwrap();
        drop(rec);
        let run = session_runs(&root.path().join("recordings")).remove(0);
        // The stop cut an entry in the middle.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(run.join(AUDIT_FILE))
            .unwrap();
        std::io::Write::write_all(&mut f, br#"{"seq":4,"#).unwrap();
        let (_rec, recovered) = Recorder::start(settings(root.path())).unwrap();
        assert_eq!(recovered.sealed, vec![run.clone()]);
        let v = verify(&run, None);
        assert_eq!(v.faults, vec![]);
        assert_eq!(v.manifest.unwrap().status, SealStatus::Interrupted);
        assert_eq!(
            events(&run),
            [
                "session_created",
                "participant_joined",
                "session_interrupted"
            ]
        );
    }

    #[tokio::test]
    async fn a_join_that_cannot_be_recorded_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let (rec, _) = Recorder::start(settings(root.path())).unwrap();
        // A file where the session's folder must go.
        std::fs::write(root.path().join("recordings/kyc-3"), b"").unwrap();
        let err = rec
            .joined(arrival("kyc-3", "p1", "user-1", Role::User))
            .await
            .unwrap_err();
        assert!(matches!(err, RecordError::Folder { .. }), "{err}");
        assert_eq!(err.code(), "recording_unavailable");
        let err = rec
            .joined(arrival("..", "p1", "user-1", Role::User))
            .await
            .unwrap_err();
        assert!(matches!(err, RecordError::UnsafeSession(_)), "{err}");
    }
}
