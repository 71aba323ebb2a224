//! The media half of a session's recording: the packets the media workers copy to it become
//! one file per participant with their audio and video ([`super::webm`]), in the session's
//! folder, on a thread of its own so that disk never stalls forwarding.
//!
//! Workers hand packets over through a bounded queue ([`MediaSink`]) and never wait: when
//! the writer falls behind, packets are dropped *and counted* (`meridian_recording_dropped_packets_total`),
//! the gap shows in the file's audit entry, and the assembler asks for a keyframe.
//!
//! Timing: every frame is placed on the session's clock (milliseconds since the session's
//! recording began). A stream whose publisher sent an RTCP sender report is mapped through
//! it, so the participant's audio and video, mapped through the same sender clock, line up
//! exactly; the sender clock is tied to the session clock once per participant, at the
//! arrival of its first mapped frame. A stream without a sender report within
//! [`SENDER_REPORT_WAIT`] is placed by arrival time. Frames wait [`REORDER`] before being
//! written, in time order across the participant's tracks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::{json, Value};

use super::frames::{avc_decoder_configuration, Frame, FrameAssembler};
use super::webm::{extension, FileSummary, MediaFile, TrackSpec};
use crate::auth::Role;
use crate::ids::{ParticipantId, ProducerId, SessionId, UserId};
use crate::media::Codec;

/// Packets (and control messages) in flight from the workers to the writer: about four
/// seconds of a busy node's recorded media.
pub const QUEUE: usize = 16_384;
/// How long frames wait before being written in time order across tracks.
pub const REORDER: Duration = Duration::from_millis(2000);
/// How long a stream's frames wait for its first sender report before arrival time places them.
pub const SENDER_REPORT_WAIT: Duration = Duration::from_millis(1500);
/// Longest a participant's first file waits for all of its tracks to have frames.
pub const FILE_WAIT: Duration = Duration::from_secs(5);
/// Files are synced to disk this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// The writer's clock-driven work (gaps given up, frames due written, files synced) runs
/// this often.
const TICK: Duration = Duration::from_millis(100);
/// The writer sleeps this long when the queue is empty.
const TURN: Duration = Duration::from_millis(10);
/// Tracks kept waiting for their session's folder, at most, and for how long.
const EARLY_TRACKS: usize = 1024;
const EARLY_WAIT: Duration = Duration::from_secs(30);
/// Where media goes inside a session folder.
pub const MEDIA_DIR: &str = "media";

/// A recorded track, numbered by the worker that taps it.
pub type TrackId = u64;

/// A track the worker starts copying to the recorder.
#[derive(Debug, Clone)]
pub struct TrackOpen {
    pub track: TrackId,
    pub session: SessionId,
    pub participant: ParticipantId,
    pub user: UserId,
    pub role: Role,
    pub producer: ProducerId,
    pub codec: Codec,
    pub channels: u8,
    /// Raised by the writer when the stream needs a keyframe (at a gap); the worker asks the
    /// publisher for one and lowers it.
    pub wants_keyframe: Arc<AtomicBool>,
}

/// What goes to the writer.
#[derive(Debug)]
pub enum MediaInput {
    /// A session's folder: its media goes under `<dir>/media/`.
    Begin {
        session: SessionId,
        dir: PathBuf,
        started: SystemTime,
    },
    Open(TrackOpen),
    Packet {
        track: TrackId,
        /// The simulcast layer it belongs to (each its own sequence and clock).
        layer: u8,
        seq: u16,
        timestamp: u32,
        marker: bool,
        payload: Bytes,
        at: Instant,
    },
    SenderReport {
        track: TrackId,
        layer: u8,
        ntp: u64,
        rtp: u32,
    },
    Close {
        track: TrackId,
    },
    /// Where the customer is (ISO 6709): the title of every file started from now on says it.
    Geotag {
        session: SessionId,
        geotag: String,
    },
    /// The session ended: write everything, close its files, say what they are.
    Finish {
        session: SessionId,
        reply: std_mpsc::Sender<Vec<RecordedFile>>,
    },
}

/// A finished recording file, for the audit log and the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedFile {
    /// Relative to the session folder.
    pub file: String,
    pub participant: ParticipantId,
    pub user: UserId,
    pub role: Role,
    pub tracks: Vec<String>,
    pub summary: FileSummary,
    /// Gaps given up while assembling, over the file's tracks.
    pub gaps: u64,
    /// Set when the file could not be finished cleanly (it still plays up to its last cluster).
    pub error: Option<String>,
}

impl RecordedFile {
    pub fn audit_fields(&self) -> Value {
        let mut v = json!({
            "file": self.file,
            "participant": self.participant.to_string(),
            "user": self.user.to_string(),
            "role": self.role.as_str(),
            "tracks": self.tracks,
            "bytes": self.summary.bytes,
            "duration_ms": self.summary.duration_ms,
            "frames": self.summary.frames,
            "gaps": self.gaps,
        });
        if let Some(e) = &self.error {
            v["error"] = e.clone().into();
        }
        v
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MediaStats {
    pub packets: AtomicU64,
    /// Packets a worker could not hand over because the writer was behind.
    pub dropped: AtomicU64,
    pub frames: AtomicU64,
    pub gaps: AtomicU64,
    pub files_open: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
    /// Frames of a track a file header cannot describe (H.264 without parameter sets).
    pub unplaceable: AtomicU64,
}

/// The workers' end of the queue (cheap to clone).
#[derive(Clone)]
pub struct MediaSink {
    tx: std_mpsc::SyncSender<MediaInput>,
    stats: Arc<MediaStats>,
    next_track: Arc<AtomicU64>,
}

impl std::fmt::Debug for MediaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaSink")
    }
}

impl MediaSink {
    pub fn new_track(&self) -> TrackId {
        self.next_track.fetch_add(1, Relaxed)
    }

    /// Hands `m` over without waiting; `false` (counted) when the writer is behind or gone.
    pub fn offer(&self, m: MediaInput) -> bool {
        match self.tx.try_send(m) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Hands `m` over, waiting for room (the recorder thread, never a worker).
    pub fn send(&self, m: MediaInput) -> bool {
        self.tx.send(m).is_ok()
    }

    pub fn stats(&self) -> &MediaStats {
        &self.stats
    }
}

/// Starts the writer thread; `note` writes an audit entry for a session (recording started).
pub fn start(
    note: impl Fn(&SessionId, &'static str, Value) + Send + 'static,
) -> std::io::Result<MediaSink> {
    let (tx, rx) = std_mpsc::sync_channel(QUEUE);
    let stats = Arc::new(MediaStats::default());
    let mut w = Writer {
        sessions: HashMap::new(),
        early: Vec::new(),
        tracks: HashMap::new(),
        stats: stats.clone(),
        note: Box::new(note),
        next_tick: Instant::now(),
    };
    let mut handled = 0u64;
    std::thread::Builder::new()
        .name("meridian-media-writer".into())
        // The writer drains the queue in turns and sleeps between them rather than waiting on
        // it: a receiver parked on the channel makes every packet a worker hands over a
        // thread wake-up (a futex call and a context switch each, measured as most of
        // recording's cost), where a sleeping one costs the workers nothing.
        .spawn(move || loop {
            match rx.try_recv() {
                Ok(m) => {
                    w.handle(m);
                    // A queue that never empties still gets its clock-driven turns.
                    handled += 1;
                    if handled % 256 == 0 && Instant::now() >= w.next_tick {
                        w.tick(Instant::now());
                    }
                }
                Err(std_mpsc::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= w.next_tick {
                        w.tick(now);
                    }
                    std::thread::sleep(TURN);
                }
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    w.finish_all();
                    break;
                }
            }
        })?;
    Ok(MediaSink {
        tx,
        stats,
        next_track: Arc::new(AtomicU64::new(1)),
    })
}

/// How a layer's RTP clock maps to the session clock.
#[derive(Debug, Clone, Copy)]
enum LayerClock {
    /// Waiting for a sender report since this time.
    Waiting,
    /// Sender clock (ms) at an extended RTP time.
    Sender { ntp_ms: f64, rtp: i64 },
    /// Session clock (ms) at an extended RTP time.
    Session { ms: f64, rtp: i64 },
}

struct Layer {
    clock: LayerClock,
    /// Last extended RTP timestamp seen, for unwrapping.
    last: Option<i64>,
    /// First sender report, kept until a frame needs it.
    report: Option<(f64, u32)>,
}

impl Layer {
    fn new() -> Self {
        Self {
            clock: LayerClock::Waiting,
            last: None,
            report: None,
        }
    }

    fn extend(&mut self, ts: u32) -> i64 {
        let ext = match self.last {
            None => ts as i64,
            Some(l) => l + (ts.wrapping_sub(l as u32) as i32) as i64,
        };
        self.last = Some(self.last.map_or(ext, |l| l.max(ext)));
        ext
    }
}

struct Track {
    open: TrackOpen,
    clock_rate: f64,
    layer: u8,
    assembler: FrameAssembler,
    layers: Vec<Layer>,
    /// Frames waiting for their layer's clock, with the layer.
    held: VecDeque<(u8, Frame)>,
    held_since: Option<Instant>,
    /// Number in the participant's current file (0: not in it).
    number: u64,
    /// Has produced a frame: it belongs in the next file started.
    ready: bool,
    closed: bool,
    frames: u64,
}

struct Queued {
    ms: u64,
    order: u64,
    track: TrackId,
    keyframe: bool,
    data: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.ms, self.order) == (o.ms, o.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.ms, self.order).cmp(&(o.ms, o.order))
    }
}

struct Participant {
    user: UserId,
    role: Role,
    tracks: Vec<TrackId>,
    queue: BinaryHeap<Reverse<Queued>>,
    file: Option<MediaFile>,
    /// Session-clock ms minus sender-clock ms, fixed at the first frame mapped through a
    /// sender report.
    offset: Option<f64>,
    gaps_at_start: u64,
    /// When the participant's first frame was queued: its first file waits for all of its
    /// tracks until [`FILE_WAIT`] after this.
    first_queued: Option<Instant>,
}

struct SessionMedia {
    dir: PathBuf,
    started: Instant,
    wall: SystemTime,
    participants: HashMap<ParticipantId, Participant>,
    done: Vec<RecordedFile>,
    order: u64,
    /// Files started per name (role and user): a participant whose tracks change, or a user
    /// who comes back, continues in `<name>.part2`, `.part3`, …
    parts: HashMap<String, u32>,
    geotag: Option<String>,
    /// A file could not be created or written: nothing more is recorded, and the session
    /// is ended (it may not run unrecorded).
    failed: bool,
}

/// Writes an audit entry for a session.
type NoteFn = Box<dyn Fn(&SessionId, &'static str, Value) + Send>;

struct Writer {
    sessions: HashMap<SessionId, SessionMedia>,
    /// Tracks opened before their session's folder (a producer piped in before the first
    /// recorded join was written down), opened when it comes.
    early: Vec<(Instant, TrackOpen)>,
    tracks: HashMap<TrackId, Track>,
    stats: Arc<MediaStats>,
    note: NoteFn,
    next_tick: Instant,
}

/// NTP 32.32 fixed point to milliseconds.
fn ntp_ms(ntp: u64) -> f64 {
    (ntp >> 32) as f64 * 1000.0 + (ntp & 0xffff_ffff) as f64 * 1000.0 / 4_294_967_296.0
}

fn safe_name(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "participant".into()
    } else {
        cleaned
    }
}

impl Writer {
    fn handle(&mut self, m: MediaInput) {
        match m {
            MediaInput::Begin {
                session,
                dir,
                started,
            } => {
                self.sessions.insert(
                    session.clone(),
                    SessionMedia {
                        dir,
                        started: Instant::now(),
                        wall: started,
                        participants: HashMap::new(),
                        done: Vec::new(),
                        order: 0,
                        parts: HashMap::new(),
                        geotag: None,
                        failed: false,
                    },
                );
                let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
                    .into_iter()
                    .partition(|(_, o)| o.session == session);
                self.early = later;
                for (_, open) in now {
                    self.open(open);
                }
            }
            MediaInput::Open(open) => self.open(open),
            MediaInput::Packet {
                track,
                layer,
                seq,
                timestamp,
                marker,
                payload,
                at,
            } => {
                self.stats.packets.fetch_add(1, Relaxed);
                let Some(t) = self.tracks.get_mut(&track) else {
                    return;
                };
                if layer != t.layer {
                    // A simulcast switch (made on a keyframe): a new sequence space.
                    t.layer = layer;
                    t.assembler = FrameAssembler::new(t.open.codec);
                }
                t.assembler.push(seq, timestamp, marker, payload, at);
                self.drain_track(track, Instant::now());
            }
            MediaInput::SenderReport {
                track,
                layer,
                ntp,
                rtp,
            } => {
                if let Some(t) = self.tracks.get_mut(&track) {
                    if let Some(l) = t.layers.get_mut(layer as usize) {
                        if l.report.is_none() {
                            l.report = Some((ntp_ms(ntp), rtp));
                        }
                    }
                }
            }
            MediaInput::Geotag { session, geotag } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.geotag = Some(geotag);
                }
            }
            MediaInput::Close { track } => {
                if let Some(t) = self.tracks.get_mut(&track) {
                    t.closed = true;
                }
            }
            MediaInput::Finish { session, reply } => {
                let files = self.finish(&session);
                let _ = reply.send(files);
            }
        }
    }

    fn open(&mut self, open: TrackOpen) {
        let Some(s) = self.sessions.get_mut(&open.session) else {
            if self.early.len() < EARLY_TRACKS {
                self.early.push((Instant::now(), open));
            }
            return;
        };
        let p = s
            .participants
            .entry(open.participant.clone())
            .or_insert_with(|| Participant {
                user: open.user.clone(),
                role: open.role,
                tracks: Vec::new(),
                queue: BinaryHeap::new(),
                file: None,
                offset: None,
                gaps_at_start: 0,
                first_queued: None,
            });
        p.tracks.push(open.track);
        self.tracks.insert(
            open.track,
            Track {
                clock_rate: open.codec.clock_rate() as f64,
                layer: 0,
                assembler: FrameAssembler::new(open.codec),
                layers: (0..4).map(|_| Layer::new()).collect(),
                held: VecDeque::new(),
                held_since: None,
                number: 0,
                ready: false,
                closed: false,
                frames: 0,
                open,
            },
        );
    }

    /// Frames the track's assembler completed, placed on the session clock or held for it.
    fn drain_track(&mut self, id: TrackId, now: Instant) {
        let Some(t) = self.tracks.get_mut(&id) else {
            return;
        };
        let layer = t.layer;
        while let Some(f) = t.assembler.pop(now) {
            if t.held.is_empty() {
                t.held_since = Some(now);
            }
            t.held.push_back((layer, f));
        }
        if t.assembler.take_keyframe_request() {
            t.open.wants_keyframe.store(true, Relaxed);
        }
        self.place(id, now);
    }

    /// Moves the track's held frames whose layer clock is known (or waited long enough) to
    /// the participant's queue.
    fn place(&mut self, id: TrackId, now: Instant) {
        let Some(t) = self.tracks.get_mut(&id) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&t.open.session) else {
            t.held.clear();
            return;
        };
        let Some(p) = s.participants.get_mut(&t.open.participant) else {
            return;
        };
        while let Some((layer, f)) = t.held.front() {
            let l = &mut t.layers[(*layer as usize).min(3)];
            let arrival_ms = f.arrived.saturating_duration_since(s.started).as_secs_f64() * 1000.0;
            let rtp = l.extend(f.rtp_timestamp);
            if matches!(l.clock, LayerClock::Waiting) {
                if let Some((ntp, sr_rtp)) = l.report {
                    let sr_ext = rtp + (sr_rtp.wrapping_sub(f.rtp_timestamp) as i32) as i64;
                    l.clock = LayerClock::Sender {
                        ntp_ms: ntp,
                        rtp: sr_ext,
                    };
                } else if t
                    .held_since
                    .is_some_and(|h| now.saturating_duration_since(h) >= SENDER_REPORT_WAIT)
                {
                    l.clock = LayerClock::Session {
                        ms: arrival_ms,
                        rtp,
                    };
                } else {
                    return; // (unwrapping the same timestamp again gives the same result)
                }
            }
            let ms = match l.clock {
                LayerClock::Sender { ntp_ms, rtp: at } => {
                    let sender = ntp_ms + (rtp - at) as f64 * 1000.0 / t.clock_rate;
                    let offset = *p.offset.get_or_insert(arrival_ms - sender);
                    sender + offset
                }
                LayerClock::Session { ms, rtp: at } => {
                    ms + (rtp - at) as f64 * 1000.0 / t.clock_rate
                }
                LayerClock::Waiting => unreachable!("resolved above"),
            };
            let (_, f) = t.held.pop_front().expect("front exists");
            t.ready = true;
            t.frames += 1;
            self.stats.frames.fetch_add(1, Relaxed);
            s.order += 1;
            p.first_queued.get_or_insert(now);
            p.queue.push(Reverse(Queued {
                ms: ms.max(0.0) as u64,
                order: s.order,
                track: id,
                keyframe: f.keyframe,
                data: f.data,
            }));
        }
        t.held_since = None;
    }

    fn tick(&mut self, now: Instant) {
        self.next_tick = now + TICK;
        // A session whose folder never came is not recorded here.
        self.early
            .retain(|(t, _)| now.saturating_duration_since(*t) < EARLY_WAIT);
        let ids: Vec<TrackId> = self.tracks.keys().copied().collect();
        for id in ids {
            if let Some(t) = self.tracks.get_mut(&id) {
                // Frames whose last packets never came are given up by the clock too.
                while let Some(f) = t.assembler.pop(now) {
                    if t.held.is_empty() {
                        t.held_since = Some(now);
                    }
                    let layer = t.layer;
                    t.held.push_back((layer, f));
                }
                if t.assembler.take_keyframe_request() {
                    t.open.wants_keyframe.store(true, Relaxed);
                }
            }
            self.place(id, now);
        }
        let sessions: Vec<SessionId> = self.sessions.keys().cloned().collect();
        for session in sessions {
            self.flush_session(&session, now, false);
        }
    }

    /// Writes what is due (everything, when `all`), starting and ending files as tracks come
    /// and go.
    fn flush_session(&mut self, session: &SessionId, now: Instant, all: bool) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let watermark = if all {
            u64::MAX
        } else {
            now.saturating_duration_since(s.started)
                .saturating_sub(REORDER)
                .as_millis() as u64
        };
        let pids: Vec<ParticipantId> = s.participants.keys().cloned().collect();
        for pid in pids {
            if let Some(p) = self
                .sessions
                .get_mut(session)
                .filter(|s| s.failed)
                .and_then(|s| s.participants.get_mut(&pid))
            {
                p.queue.clear();
            }
            if !all && self.waits_for_tracks(session, &pid, now) {
                continue;
            }
            while let Some(q) = self.pop_due(session, &pid, watermark) {
                let number = self.tracks.get(&q.track).map_or(0, |t| t.number);
                if number == 0 {
                    if !self.describable(q.track) {
                        // An H.264 track whose parameter sets never came cannot be put in
                        // a file header: its frame is dropped, counted, and does not cut
                        // the open file into a new part (it would, frame after frame).
                        self.stats.unplaceable.fetch_add(1, Relaxed);
                        continue;
                    }
                    // A track not in the open file (or no file yet): start a new part.
                    self.start_part(session, &pid);
                }
                let Some(s) = self.sessions.get_mut(session) else {
                    return;
                };
                let Some(p) = s.participants.get_mut(&pid) else {
                    break;
                };
                let number = self.tracks.get(&q.track).map_or(0, |t| t.number);
                if let (Some(f), true) = (p.file.as_mut(), number != 0) {
                    if let Err(e) = f.write(number, q.ms, q.keyframe, &q.data) {
                        tracing::error!(%session, error = %e, "recording write failed");
                        let file = p.file.take();
                        let rel = file.as_ref().map(|f| f.path().to_path_buf());
                        self.end_part(session, &pid, file, Some(e.to_string()));
                        self.fail(session, &pid, rel.as_deref(), &e.to_string());
                    } else {
                        self.stats.bytes.fetch_add(q.data.len() as u64, Relaxed);
                    }
                }
            }
            let Some(s) = self.sessions.get_mut(session) else {
                return;
            };
            // A participant whose tracks all closed and whose frames are all written.
            let finished = s.participants.get(&pid).is_some_and(|p| {
                p.queue.is_empty()
                    && p.tracks.iter().all(|id| {
                        self.tracks
                            .get(id)
                            .is_none_or(|t| t.closed && t.held.is_empty())
                    })
            });
            if finished {
                let p = s.participants.get_mut(&pid).expect("checked");
                let file = p.file.take();
                let ids = std::mem::take(&mut p.tracks);
                self.end_part(session, &pid, file, None);
                for id in ids {
                    self.tracks.remove(&id);
                }
                if let Some(s) = self.sessions.get_mut(session) {
                    s.participants.remove(&pid);
                }
            }
        }
        if !all {
            self.sync_files(session, now);
        }
    }

    /// A participant's first file waits until every one of its tracks has frames (a file's
    /// tracks are fixed when it starts), or [`FILE_WAIT`] has passed.
    fn waits_for_tracks(&self, session: &SessionId, pid: &ParticipantId, now: Instant) -> bool {
        let Some(p) = self
            .sessions
            .get(session)
            .and_then(|s| s.participants.get(pid))
        else {
            return false;
        };
        p.file.is_none()
            && p.first_queued
                .is_some_and(|t| now.saturating_duration_since(t) < FILE_WAIT)
            && p.tracks
                .iter()
                .filter_map(|id| self.tracks.get(id))
                .any(|t| !t.ready && !t.closed)
    }

    /// Whether a file header can describe the track (H.264 needs its parameter sets).
    fn describable(&self, track: TrackId) -> bool {
        self.tracks.get(&track).is_some_and(|t| {
            let info = t.assembler.info();
            t.open.codec != Codec::H264 || (info.sps.is_some() && info.pps.is_some())
        })
    }

    /// The participant's next frame, if it is due by `watermark`.
    fn pop_due(
        &mut self,
        session: &SessionId,
        pid: &ParticipantId,
        watermark: u64,
    ) -> Option<Queued> {
        let p = self.sessions.get_mut(session)?.participants.get_mut(pid)?;
        match p.queue.peek() {
            Some(Reverse(q)) if q.ms <= watermark => p.queue.pop().map(|q| q.0),
            _ => None,
        }
    }

    /// What was written reaches the disk about once a second.
    fn sync_files(&mut self, session: &SessionId, now: Instant) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        for p in s.participants.values_mut() {
            if let Some(f) = p.file.as_mut() {
                if f.unsynced_since()
                    .is_some_and(|t| now.saturating_duration_since(t) >= SYNC_EVERY)
                {
                    if let Err(e) = f.sync() {
                        tracing::error!(%session, error = %e, "recording sync failed");
                        self.stats.failures.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    }

    /// Closes the participant's open file (if any) and opens the next part with every track
    /// that has produced frames.
    fn start_part(&mut self, session: &SessionId, pid: &ParticipantId) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let Some(p) = s.participants.get_mut(pid) else {
            return;
        };
        let old = p.file.take();
        for id in &p.tracks {
            if let Some(t) = self.tracks.get_mut(id) {
                t.number = 0;
            }
        }
        if old.is_some() {
            self.end_part(session, pid, old, None);
        }
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let Some(p) = s.participants.get_mut(pid) else {
            return;
        };
        let mut specs = Vec::new();
        let mut ids = Vec::new();
        for id in &p.tracks {
            let Some(t) = self.tracks.get(id) else {
                continue;
            };
            if !t.ready {
                continue;
            }
            let info = t.assembler.info();
            let codec_private = match t.open.codec {
                Codec::H264 => match (&info.sps, &info.pps) {
                    (Some(sps), Some(pps)) => avc_decoder_configuration(sps, pps),
                    _ => None,
                },
                _ => None,
            };
            if t.open.codec == Codec::H264 && codec_private.is_none() {
                continue; // no parameter sets seen: cannot be described, waits for them
            }
            let kind = if t.open.codec.is_video() {
                "video"
            } else {
                "audio"
            };
            specs.push(TrackSpec {
                number: specs.len() as u64 + 1,
                codec: t.open.codec,
                name: format!("{kind} {}", t.open.producer),
                size: info.size.unwrap_or((640, 480)),
                channels: t.open.channels,
                codec_private,
            });
            ids.push(*id);
        }
        if specs.is_empty() {
            return;
        }
        let base = format!("{}-{}", p.role.as_str(), safe_name(&p.user.to_string()));
        let part = s.parts.entry(base.clone()).or_insert(0);
        *part += 1;
        let name = if *part == 1 {
            format!("{base}.{}", extension(&specs))
        } else {
            format!("{base}.part{part}.{}", extension(&specs))
        };
        let rel = format!("{MEDIA_DIR}/{name}");
        // The session, its UTC start and, once captured, where the customer is.
        let mut title = format!("{session} {}", super::utc_rfc3339(s.wall));
        if let Some(g) = &s.geotag {
            title.push(' ');
            title.push_str(g);
        }
        let dir = s.dir.join(MEDIA_DIR);
        let created = std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                MediaFile::create(&dir.join(&name), specs.clone(), s.wall, &title)
                    .map_err(|e| e.to_string())
            });
        match created {
            Ok(f) => {
                for (i, id) in ids.iter().enumerate() {
                    if let Some(t) = self.tracks.get_mut(id) {
                        t.number = i as u64 + 1;
                    }
                }
                p.gaps_at_start = ids
                    .iter()
                    .filter_map(|id| self.tracks.get(id))
                    .map(|t| t.assembler.stats().gaps)
                    .sum();
                p.file = Some(f);
                self.stats.files_open.fetch_add(1, Relaxed);
                (self.note)(
                    session,
                    "recording_started",
                    json!({
                        "file": rel,
                        "participant": pid.to_string(),
                        "user": p.user.to_string(),
                        "role": p.role.as_str(),
                        "tracks": specs.iter().map(|t| format!("{:?}", t.codec).to_lowercase()).collect::<Vec<_>>(),
                    }),
                );
            }
            Err(e) => {
                tracing::error!(%session, file = %rel, error = %e, "recording file not created");
                let path = dir.join(&name);
                self.fail(session, pid, Some(&path), &e);
            }
        }
    }

    /// A file of the session could not be created or written: the first failure is counted
    /// and written to the audit log at once (`recording_failed`), which ends the session;
    /// nothing more of it is recorded.
    fn fail(&mut self, session: &SessionId, pid: &ParticipantId, file: Option<&Path>, error: &str) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        if std::mem::replace(&mut s.failed, true) {
            return;
        }
        self.stats.failures.fetch_add(1, Relaxed);
        let (user, role) = s
            .participants
            .get(pid)
            .map(|p| (p.user.to_string(), p.role.as_str()))
            .unwrap_or_default();
        let file = file
            .and_then(|f| f.file_name())
            .map(|n| format!("{MEDIA_DIR}/{}", n.to_string_lossy()));
        (self.note)(
            session,
            "recording_failed",
            json!({
                "file": file,
                "participant": pid.to_string(),
                "user": user,
                "role": role,
                "error": error,
            }),
        );
    }

    fn end_part(
        &mut self,
        session: &SessionId,
        pid: &ParticipantId,
        file: Option<MediaFile>,
        error: Option<String>,
    ) {
        let Some(f) = file else { return };
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let Some(p) = s.participants.get(pid) else {
            return;
        };
        self.stats.files_open.fetch_sub(1, Relaxed);
        let name = f
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tracks: Vec<String> = f
            .tracks()
            .iter()
            .map(|t| format!("{:?}", t.codec).to_lowercase())
            .collect();
        let gaps: u64 = p
            .tracks
            .iter()
            .filter_map(|id| self.tracks.get(id))
            .map(|t| t.assembler.stats().gaps)
            .sum::<u64>()
            .saturating_sub(p.gaps_at_start);
        self.stats.gaps.fetch_add(gaps, Relaxed);
        let (summary, error) = match f.finish() {
            Ok(sm) => (sm, error),
            Err(e) => {
                self.stats.failures.fetch_add(1, Relaxed);
                (
                    FileSummary {
                        bytes: 0,
                        duration_ms: 0,
                        frames: 0,
                    },
                    Some(error.unwrap_or_else(|| e.to_string())),
                )
            }
        };
        s.done.push(RecordedFile {
            file: format!("{MEDIA_DIR}/{name}"),
            participant: pid.clone(),
            user: p.user.clone(),
            role: p.role,
            tracks,
            summary,
            gaps,
            error,
        });
    }

    /// Writes all of a session's frames, closes its files and forgets it.
    fn finish(&mut self, session: &SessionId) -> Vec<RecordedFile> {
        let now = Instant::now();
        let ids: Vec<TrackId> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.open.session == *session)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(t) = self.tracks.get_mut(id) {
                t.closed = true;
                // Whatever waits for a sender report is placed by arrival now.
                t.held_since = Some(now.checked_sub(SENDER_REPORT_WAIT).unwrap_or(now));
            }
            self.place(*id, now);
        }
        self.flush_session(session, now, true);
        let pids: Vec<ParticipantId> = self
            .sessions
            .get(session)
            .map(|s| s.participants.keys().cloned().collect())
            .unwrap_or_default();
        for pid in pids {
            let file = self
                .sessions
                .get_mut(session)
                .and_then(|s| s.participants.get_mut(&pid))
                .and_then(|p| p.file.take());
            self.end_part(session, &pid, file, None);
        }
        for id in ids {
            self.tracks.remove(&id);
        }
        self.sessions
            .remove(session)
            .map(|s| s.done)
            .unwrap_or_default()
    }

    fn finish_all(&mut self) {
        let sessions: Vec<SessionId> = self.sessions.keys().cloned().collect();
        for s in sessions {
            self.finish(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use webm_iterable::matroska_spec::{MatroskaSpec, SimpleBlock};
    use webm_iterable::WebmIterator;

    /// Starts the test session `kyc-sync` with its folder in `dir`.
    fn begin(sink: &MediaSink, dir: &std::path::Path) -> SessionId {
        let session: SessionId = "kyc-sync".parse().unwrap();
        sink.send(MediaInput::Begin {
            session: session.clone(),
            dir: dir.to_path_buf(),
            started: SystemTime::now(),
        });
        session
    }

    fn open(track: TrackId, codec: Codec) -> MediaInput {
        MediaInput::Open(TrackOpen {
            track,
            session: "kyc-sync".parse().unwrap(),
            participant: "pa-alice".parse().unwrap(),
            user: "alice".parse().unwrap(),
            role: Role::User,
            producer: format!("pr-{track}").parse().unwrap(),
            codec,
            channels: 2,
            wants_keyframe: Arc::new(AtomicBool::new(false)),
        })
    }

    fn vp8_frame(key: bool) -> Bytes {
        // Descriptor (S bit, partition 0), then a VP8 payload header.
        let mut p = vec![0x10];
        if key {
            p.extend_from_slice(&[0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xb4, 0x00]);
        } else {
            p.extend_from_slice(&[0x01, 0x00, 0x00]);
        }
        Bytes::from(p)
    }

    /// Audio and video of one participant, stamped by one sender clock: mapped through their
    /// sender reports, frames captured together land at the same time in the file, whatever
    /// their RTP clocks and offsets.
    #[test]
    fn audio_and_video_line_up_through_their_sender_reports() {
        let dir = tempfile::tempdir().unwrap();
        let notes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = notes.clone();
        let sink = start(move |_, event, fields| {
            seen.lock().unwrap().push((event, fields));
        })
        .unwrap();
        let session = begin(&sink, dir.path());
        sink.send(open(1, Codec::Vp8));
        sink.send(open(2, Codec::Opus));
        // Sender time 1000 s: video RTP 900 000, audio RTP 240 000 (random offsets, as
        // browsers pick them).
        let ntp = 1000u64 << 32;
        for (track, rtp) in [(1, 900_000), (2, 240_000)] {
            sink.send(MediaInput::SenderReport {
                track,
                layer: 0,
                ntp,
                rtp,
            });
        }
        let t0 = Instant::now();
        // Audio starts 100 ms (sender time) after video; a second of each.
        for i in 0..30u32 {
            sink.send(MediaInput::Packet {
                track: 1,
                layer: 0,
                seq: i as u16,
                timestamp: 900_000 + i * 3000,
                marker: true,
                payload: vp8_frame(i == 0),
                at: t0,
            });
        }
        for i in 0..50u32 {
            sink.send(MediaInput::Packet {
                track: 2,
                layer: 0,
                seq: 500 + i as u16,
                timestamp: 240_000 + 4800 + i * 960,
                marker: false,
                payload: Bytes::from_static(&[0xfc, 0xff, 0xfe]),
                at: t0,
            });
        }
        let (reply, rx) = std_mpsc::channel();
        sink.send(MediaInput::Finish { session, reply });
        let files = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(files.len(), 1);
        let f = &files[0];
        assert_eq!(f.file, "media/user-alice.webm");
        assert_eq!(f.summary.frames, 80);
        assert_eq!(f.error, None);
        assert_eq!(notes.lock().unwrap()[0].0, "recording_started");
        let file = std::fs::File::open(dir.path().join(&f.file)).unwrap();
        let mut cluster = 0i64;
        let mut first: HashMap<u64, i64> = HashMap::new();
        for tag in WebmIterator::new(file, &[]) {
            let tag = tag.unwrap();
            match &tag {
                MatroskaSpec::Timestamp(t) => cluster = *t as i64,
                MatroskaSpec::SimpleBlock(_) => {
                    let b = SimpleBlock::try_from(&tag).unwrap();
                    first.entry(b.track).or_insert(cluster + b.timestamp as i64);
                }
                _ => {}
            }
        }
        // Track numbers follow the order the tracks were opened: video 1, audio 2.
        let gap = first[&2] - first[&1];
        assert!(
            (99..=101).contains(&gap),
            "audio starts {gap} ms after video"
        );
    }

    /// An H.264 stream that never sends its parameter sets cannot be described in a file
    /// header: its frames are counted and dropped, and the participant's audio stays in one
    /// file (before, each such frame cut the file into a new part).
    #[test]
    fn an_h264_track_without_parameter_sets_neither_splits_the_file_nor_vanishes_uncounted() {
        let dir = tempfile::tempdir().unwrap();
        let sink = start(|_, _, _| {}).unwrap();
        let session = begin(&sink, dir.path());
        sink.send(open(1, Codec::H264));
        sink.send(open(2, Codec::Opus));
        let t0 = Instant::now();
        for i in 0..20u32 {
            // IDR slices only (NAL type 5), no SPS or PPS.
            sink.send(MediaInput::Packet {
                track: 1,
                layer: 0,
                seq: i as u16,
                timestamp: i * 3000,
                marker: true,
                payload: Bytes::from_static(&[0x65, 0x88, 0x84, 0x00]),
                at: t0,
            });
            sink.send(MediaInput::Packet {
                track: 2,
                layer: 0,
                seq: i as u16,
                timestamp: i * 960,
                marker: false,
                payload: Bytes::from_static(&[0xfc, 0xff, 0xfe]),
                at: t0,
            });
        }
        let (reply, rx) = std_mpsc::channel();
        sink.send(MediaInput::Finish { session, reply });
        let files = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(names, ["media/user-alice.webm"], "audio only, one part");
        assert_eq!(files[0].tracks, ["opus"]);
        assert_eq!(sink.stats().unplaceable.load(Relaxed), 20);
    }
}
