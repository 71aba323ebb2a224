//! The SFU: sessions (Routers), participants, Producers and Consumers on one node, built on the
//! media primitives in [`crate::media`] and webrtc-rs's sans-I/O `rtc` core.
//!
//! A node runs one worker thread per core ([`Workers`]). Each owns its own UDP media socket
//! (and ICE-TCP listener on the same port number) and every peer connection of the sessions
//! placed on it, so the forwarding path takes no locks and workers share nothing. Signaling
//! talks to a session's worker through its [`WorkerHandle`], a command channel; the worker
//! talks back through each participant's [`SfuEvent`] channel, and to the mesh through
//! [`WorkerEvent`]s tagged with its number.

pub mod batch;
pub mod bwe;
mod consumer;
#[cfg(test)]
mod core_tests;
mod driver;
mod egress;
pub mod engine;
mod forward;
mod keys;
mod pipes;
mod producer;
mod record;
mod router;
pub mod rtx;
mod tcp;
mod transport;
mod worker;
mod workers;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Role;
use crate::ids::{ConsumerId, ParticipantId, ProducerId, SessionId, UserId};
use crate::media::layers::Layer;
use crate::media::Codec;

pub use driver::spawn_worker;
pub use pipes::{PipeCounters, PipeLink};
pub use tcp::{MAX_TCP_CONNECTIONS, MAX_TCP_PER_SOURCE};
pub use worker::WorkerConfig;
pub use workers::{Seat, Workers};

pub use crate::ids::PipeId;

/// What the worker tells the mesh: which sessions it hosts, its producers, and what it wants
/// from other nodes' producers.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// The first participant of a session joined here.
    SessionActive(SessionId),
    /// The last participant of a session left.
    SessionInactive(SessionId),
    /// A participant joined or left a session here.
    ParticipantJoined {
        session: SessionId,
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        session: SessionId,
        participant: ParticipantInfo,
    },
    /// A local producer was created.
    ProducerOpened(crate::proto::pipe::ProducerAnnouncement),
    ProducerClosed {
        session: SessionId,
        producer: ProducerId,
    },
    ProducerPaused {
        session: SessionId,
        producer: ProducerId,
        paused: bool,
    },
    /// Ask the origin behind `pipe` to send these layers (bit mask) of its producer.
    Consume {
        pipe: PipeId,
        producer: ProducerId,
        layers: u32,
    },
    StopConsume {
        pipe: PipeId,
        producer: ProducerId,
    },
    KeyframeRequest {
        pipe: PipeId,
        producer: ProducerId,
        layer: u8,
    },
    LayerBitrates {
        pipe: PipeId,
        producer: ProducerId,
        bitrates: Vec<Option<u64>>,
    },
    /// A publisher's RTCP sender report for a layer the node behind `pipe` receives (its
    /// recording maps the stream's clock through it).
    SenderReport {
        pipe: PipeId,
        producer: ProducerId,
        layer: u8,
        ntp: u64,
        rtp: u32,
    },
}

/// A [`MeshEvent`] with the number of the worker that raised it, so the mesh sends what
/// concerns that session or producer back to the same worker.
#[derive(Debug)]
pub struct WorkerEvent {
    pub worker: usize,
    pub event: MeshEvent,
}

/// The worker that allocated a pipe stream number (its index is the number's top byte).
pub fn stream_worker(stream: u32) -> usize {
    (stream >> 24) as usize
}

/// Which of a participant's two peer connections: the one it publishes on (client offers,
/// node receives) or the one it receives consumers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Publish,
    Subscribe,
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Audio,
    Video,
}

/// A producer as other participants see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProducerInfo {
    pub producer_id: ProducerId,
    pub participant_id: ParticipantId,
    pub user_id: UserId,
    pub role: Role,
    pub kind: MediaKind,
    pub codec: Option<Codec>,
    /// Simulcast layers by RID, lowest first; empty without simulcast.
    pub layers: Vec<String>,
    pub paused: bool,
}

/// Another participant as one participant sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantInfo {
    pub participant_id: ParticipantId,
    pub user_id: UserId,
    pub role: Role,
}

/// One worker's part of a session, as operators see it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionView {
    pub participants: Vec<crate::proto::admin::ParticipantPart>,
    pub producers: Vec<crate::proto::admin::ProducerPart>,
    pub consumers: Vec<crate::proto::admin::ConsumerPart>,
    /// Its producers are recorded by this node.
    pub recorded: bool,
}

/// What the node tells a participant without being asked.
#[derive(Debug, Clone)]
pub enum SfuEvent {
    ParticipantJoined(ParticipantInfo),
    ParticipantLeft(ParticipantInfo),
    ProducerAdded(ProducerInfo),
    ProducerClosed(ProducerId),
    ProducerPaused(ProducerId),
    ProducerResumed(ProducerId),
    ConsumerClosed(ConsumerId),
    ConsumerLayerChanged {
        consumer_id: ConsumerId,
        layer: Layer,
        /// Why the layer was chosen, and the consumer's share of the bandwidth estimate
        /// (bits/s) when it was.
        reason: crate::media::layers::LayerReason,
        estimate_bps: Option<u64>,
    },
    TransportState {
        transport: TransportKind,
        state: String,
    },
    /// The node let this participant go; the last event it gets.
    Dismissed(Dismissal),
}

/// Why the node ended a participant's connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Dismissal {
    #[error("a newer connection joined this session as the same user; this one is closed")]
    Replaced,
    #[error("this connection did not read its events in time and was closed; rejoin to resume")]
    TooSlow,
}

impl Dismissal {
    /// Stable code sent in the signaling error and counted in metrics.
    pub fn code(self) -> &'static str {
        match self {
            Dismissal::Replaced => "replaced",
            Dismissal::TooSlow => "too_slow",
        }
    }
}

/// Events queued for one participant before its connection counts as not reading.
pub const EVENT_QUEUE: usize = 256;

/// The worker's end of a participant's event queue. The queue is bounded so that a client
/// that stops reading cannot grow the node: ordinary events use all slots but one, and the
/// last slot is kept for the single [`SfuEvent::Dismissed`] that tells the connection why it
/// is being let go. A participant whose queue fills is dismissed as too slow.
#[derive(Debug)]
pub struct EventSender {
    tx: mpsc::Sender<SfuEvent>,
    dismissed: std::sync::atomic::AtomicBool,
}

/// A new participant event queue: the worker's sender and the connection's receiver.
pub fn event_channel() -> (EventSender, mpsc::Receiver<SfuEvent>) {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    (
        EventSender {
            tx,
            dismissed: false.into(),
        },
        rx,
    )
}

impl EventSender {
    /// Queues an ordinary event. Returns false when this call found the queue full and
    /// dismissed the participant (the caller counts it).
    pub(crate) fn send(&self, ev: SfuEvent) -> bool {
        if self.dismissed.load(Ordering::Relaxed) {
            return true;
        }
        // Only the worker sends, so the capacity seen here is still free at `try_send`.
        if self.tx.capacity() > 1 {
            let _ = self.tx.try_send(ev);
            return true;
        }
        self.dismiss(Dismissal::TooSlow);
        false
    }

    /// Sends the last event; nothing is queued after it.
    pub(crate) fn dismiss(&self, why: Dismissal) {
        if !self.dismissed.swap(true, Ordering::Relaxed) {
            let _ = self.tx.try_send(SfuEvent::Dismissed(why));
        }
    }
}

/// Result of `join`.
#[derive(Debug, Clone)]
pub struct Joined {
    pub participant_id: ParticipantId,
    pub participants: Vec<ParticipantInfo>,
    pub producers: Vec<ProducerInfo>,
}

/// Result of `publish`.
#[derive(Debug, Clone)]
pub struct Published {
    pub answer: String,
    /// Producers created or already existing on this transport, by their m-line mid.
    pub producers: Vec<(String, ProducerInfo)>,
}

/// Result of `subscribe`.
#[derive(Debug, Clone)]
pub struct Subscribed {
    pub answer: String,
    pub consumer_id: ConsumerId,
    pub producer_id: ProducerId,
    pub mid: String,
}

macro_rules! op_error {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $var:ident $( ( $($field:ty),* ) )? => $code:literal ),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        pub enum $name { $($(#[$vdoc])* $var $( ( $($field),* ) )?),* }
        impl $name {
            /// Stable machine-readable code sent in signaling errors.
            pub fn code(&self) -> &'static str {
                match self { $(Self::$var { .. } => $code),* }
            }
        }
    };
}

op_error!(
    /// Why a participant could not join.
    JoinError {
        #[error("this node hosts its maximum number of sessions; try another node")]
        TooManySessions => "too_many_sessions",
        #[error("the session is full ({0} participants)")]
        SessionFull(usize) => "session_full",
        #[error("the media worker has stopped")]
        WorkerGone => "internal",
    }
);

op_error!(
    /// Why an offer to publish was refused.
    PublishError {
        #[error("observers may not publish")]
        NotAllowed => "not_allowed",
        #[error("unknown participant: join first")]
        UnknownParticipant => "not_joined",
        #[error("the offer could not be applied: {0}")]
        BadSdp(String) => "bad_sdp",
        #[error("at most {0} producers per participant")]
        TooManyProducers(usize) => "too_many_producers",
        #[error("the media worker has stopped")]
        WorkerGone => "internal",
    }
);

op_error!(
    /// Why a subscription was refused.
    SubscribeError {
        #[error("unknown participant: join first")]
        UnknownParticipant => "not_joined",
        #[error("no producer {0} in this session")]
        UnknownProducer(String) => "unknown_producer",
        #[error("your role may not see this producer")]
        NotAllowed => "not_allowed",
        #[error("the producer's codec is not known yet; retry once it has sent media")]
        CodecUnknown => "codec_unknown",
        #[error("the offer could not be applied: {0}")]
        BadSdp(String) => "bad_sdp",
        #[error("the offer has no new recvonly m-line of the producer's kind for this consumer")]
        NoMatchingMLine => "bad_sdp",
        #[error("at most {0} consumers per participant")]
        TooManyConsumers(usize) => "too_many_consumers",
        #[error("the media worker has stopped")]
        WorkerGone => "internal",
    }
);

op_error!(
    /// Why a request about an existing producer, consumer or transport failed.
    ControlError {
        #[error("unknown participant: join first")]
        UnknownParticipant => "not_joined",
        #[error("no producer {0} of yours")]
        UnknownProducer(String) => "unknown_producer",
        #[error("no consumer {0} of yours")]
        UnknownConsumer(String) => "unknown_consumer",
        #[error("no {0:?} transport yet: publish or subscribe first")]
        NoTransport(TransportKind) => "no_transport",
        #[error("bad ICE candidate: {0}")]
        BadCandidate(String) => "bad_candidate",
        #[error("the offer could not be applied: {0}")]
        BadSdp(String) => "bad_sdp",
        #[error("the media worker has stopped")]
        WorkerGone => "internal",
    }
);

/// Requests from signaling to the worker.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    /// Holds (or releases) a session recorded here whose participants are on other nodes:
    /// its producers are piped in and recorded as if someone here consumed them.
    RecordSeat {
        session: SessionId,
        on: bool,
    },
    /// Records `session` on this node from now on (its recording moved here while its
    /// participants were connected): every producer it has is tapped.
    Record {
        session: SessionId,
    },
    Join {
        session: SessionId,
        user: UserId,
        role: Role,
        /// The session is recorded on this node: its producers are tapped.
        recorded: bool,
        events: EventSender,
        reply: oneshot::Sender<Result<Joined, JoinError>>,
    },
    Publish {
        participant: ParticipantId,
        offer: String,
        reply: oneshot::Sender<Result<Published, PublishError>>,
    },
    Subscribe {
        participant: ParticipantId,
        producer: ProducerId,
        offer: String,
        max_layer: Option<Layer>,
        reply: oneshot::Sender<Result<Subscribed, SubscribeError>>,
    },
    SetConsumerLayer {
        participant: ParticipantId,
        consumer: ConsumerId,
        max_layer: Layer,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    SetProducerPaused {
        participant: ParticipantId,
        producer: ProducerId,
        paused: bool,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    SetConsumerPaused {
        participant: ParticipantId,
        consumer: ConsumerId,
        paused: bool,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    CloseProducer {
        participant: ParticipantId,
        producer: ProducerId,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    CloseConsumer {
        participant: ParticipantId,
        consumer: ConsumerId,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    AddCandidate {
        participant: ParticipantId,
        transport: TransportKind,
        candidate: String,
        sdp_mid: Option<String>,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    /// A new offer for an existing transport (an ICE restart): the answer.
    Renegotiate {
        participant: ParticipantId,
        transport: TransportKind,
        offer: String,
        reply: oneshot::Sender<Result<String, ControlError>>,
    },
    Leave {
        participant: ParticipantId,
    },
    /// Answered at once: proves the worker loop is turning.
    Ping {
        reply: oneshot::Sender<()>,
    },
    /// What the worker holds of a session (`meridian ctl session`).
    Describe {
        session: SessionId,
        reply: oneshot::Sender<Option<SessionView>>,
    },
    /// Fault injection for tests: the worker's thread stops turning for this long.
    Stall(std::time::Duration),
    /// The mesh opened a pipe to another node.
    PipeUp {
        pipe: PipeId,
        link: PipeLink,
    },
    /// A pipe closed: everything that came or went through it is torn down.
    PipeDown {
        pipe: PipeId,
    },
    RemoteProducer {
        pipe: PipeId,
        announcement: crate::proto::pipe::ProducerAnnouncement,
    },
    /// A participant of another node joined a session hosted here.
    RemoteParticipantJoined {
        pipe: PipeId,
        session: SessionId,
        participant: ParticipantInfo,
    },
    /// It left.
    RemoteParticipantLeft {
        session: SessionId,
        participant: ParticipantId,
    },
    RemoteProducerClosed {
        pipe: PipeId,
        producer: ProducerId,
    },
    RemoteProducerPaused {
        pipe: PipeId,
        producer: ProducerId,
        paused: bool,
    },
    RemoteLayerBitrates {
        pipe: PipeId,
        producer: ProducerId,
        bitrates: Vec<Option<u64>>,
    },
    /// The origin's sender report for a layer of a producer piped in through `pipe`.
    RemoteSenderReport {
        pipe: PipeId,
        producer: ProducerId,
        layer: u8,
        ntp: u64,
        rtp: u32,
    },
    /// The node behind `pipe` wants these layers of a local producer (0: none).
    PipeConsume {
        pipe: PipeId,
        producer: ProducerId,
        layers: u32,
    },
    PipeKeyframe {
        producer: ProducerId,
        layer: u8,
    },
    /// Every pipe has replayed what its node knows of `session` (participants, producers):
    /// joins waiting for the mesh can be answered.
    SessionReplayed {
        session: SessionId,
    },
    /// The node behind `pipe` no longer hosts `session`: stop sending it that session.
    PipeSessionEnded {
        pipe: PipeId,
        session: SessionId,
    },
}

/// What the worker admits; a request over a limit is refused with an error, never queued.
/// The node's configuration (`[limits]`) fills it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions (routers) at once.
    pub max_sessions: usize,
    pub max_participants_per_session: usize,
    pub max_producers_per_participant: usize,
    pub max_consumers_per_participant: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 1000,
            max_participants_per_session: 16,
            max_producers_per_participant: 4,
            max_consumers_per_participant: 32,
        }
    }
}

/// Pipe media datagrams queued for the worker before further ones are dropped (and counted):
/// a burst from other nodes waits here, on its own channel, so it can neither grow without
/// bound nor hold up control commands, socket reads or timers.
pub const PIPE_MEDIA_QUEUE: usize = 8192;

macro_rules! counters {
    ($(#[$doc:meta])* pub struct $name:ident {
        $($(#[$fdoc:meta])* pub $field:ident: AtomicU64,)*
    }
    histograms {
        $($(#[$hdoc:meta])* pub $hfield:ident: $hty:ty,)*
    }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: AtomicU64,)*
            $($(#[$hdoc])* pub $hfield: $hty,)*
        }
        impl $name {
            /// Adds `other`'s figures to these (node totals over workers).
            pub fn absorb(&self, other: &$name) {
                $(self.$field.fetch_add(other.$field.load(Ordering::Relaxed), Ordering::Relaxed);)*
                $(self.$hfield.absorb(&other.$hfield);)*
            }
        }
    };
}

counters! {
    /// One worker's counters, readable from any thread; [`Workers::stats`] adds them up.
    pub struct WorkerStats {
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    /// Bytes of the datagrams sent to clients.
    pub bytes_out: AtomicU64,
    pub datagrams_unroutable: AtomicU64,
    pub datagrams_oversized: AtomicU64,
    pub rtp_in: AtomicU64,
    pub rtp_forwarded: AtomicU64,
    pub rtp_dropped_layer: AtomicU64,
    pub rtp_retransmitted: AtomicU64,
    pub nack_unserved: AtomicU64,
    /// NACKs not served because the subscriber has no RTX while packets are numbered
    /// transport-wide (a copy on the primary SSRC would not be byte-identical).
    pub nack_unserved_no_rtx: AtomicU64,
    /// Repairs or probes dropped at the wire because their stream has no RTX on a connection
    /// numbered transport-wide (a copy on the primary SSRC would reuse an SRTP index).
    pub rtx_unsafe_dropped: AtomicU64,
    /// Subscribe connections whose copies Meridian encrypts in place (`sfu::egress`).
    pub srtp_in_place_connections: AtomicU64,
    /// Subscribe connections whose copies go through rtc's sender: keys not taken, or moved
    /// there after a key mismatch, or in-place encryption off.
    pub srtp_fallback_connections: AtomicU64,
    /// Keys taken from rtc that did not decrypt rtc's own SRTCP (an rtc upgrade changed how it
    /// derives them).
    pub srtp_key_mismatch: AtomicU64,
    /// Sender reports sent for streams encrypted in place.
    pub sender_reports: AtomicU64,
    /// Bandwidth probes towards subscribers: clusters started, confirmed and refused by the
    /// path, and the RTX packets they were made of.
    pub probe_clusters: AtomicU64,
    pub probes_confirmed: AtomicU64,
    pub probes_refused: AtomicU64,
    /// Probe clusters the path carried whole but this node sent slower than asked (busy).
    pub probes_unsaturated: AtomicU64,
    pub probe_packets: AtomicU64,
    pub send_errors: AtomicU64,
    /// Media socket receive failures.
    pub recv_errors: AtomicU64,
    /// System calls that sent the datagrams (several datagrams per call when batched).
    pub send_syscalls: AtomicU64,
    pub tcp_frames_in: AtomicU64,
    pub tcp_connections: AtomicU64,
    /// ICE-TCP connections refused at accept (node or source at its cap).
    pub tcp_refused: AtomicU64,
    /// ICE-TCP connections closed for sending no authenticated Binding in time, or going idle.
    pub tcp_timed_out: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// Of those, asked for because a publisher's lost packet stayed unrepaired.
    pub keyframe_requests_unrepaired_loss: AtomicU64,
    pub pipe_frames_in: AtomicU64,
    /// Pipe media datagrams dropped because the worker's queue was full.
    pub pipe_media_dropped: AtomicU64,
    pub pipe_frames_bad: AtomicU64,
    /// Pipe media frames of a stream no producer here is fed from (stopped, or misrouted).
    pub pipe_frames_unknown: AtomicU64,
    pub sessions: AtomicU64,
    pub participants: AtomicU64,
    pub producers: AtomicU64,
    pub consumers: AtomicU64,
    pub peer_connections: AtomicU64,
    /// Binding requests from unbound addresses whose MESSAGE-INTEGRITY did not verify.
    pub stun_unauthenticated: AtomicU64,
    /// Binding requests from unbound addresses dropped by the per-source rate limit.
    pub stun_rate_limited: AtomicU64,
    /// Participants dismissed because their connection stopped reading events.
    pub events_overflowed: AtomicU64,
    /// Participants replaced by a newer connection of the same user.
    pub participants_replaced: AtomicU64,
    /// Bytes of the datagrams received on the media port.
    pub bytes_in: AtomicU64,
    /// Packets subscribers asked for again (NACKed sequence numbers).
    pub nacks_received: AtomicU64,
    /// PLIs and FIRs from subscribers.
    pub keyframe_requests_received: AtomicU64,
    /// Keyframes that arrived from publishers (first packet of each).
    pub keyframes_in: AtomicU64,
    /// Simulcast consumers moved from one layer to another.
    pub layer_switches: AtomicU64,
}
histograms {
    /// Round-trip time to subscribers, from their receiver reports (LSR/DLSR).
    pub rtt_downstream: crate::metrics::AtomicHistogram<crate::metrics::Seconds>,
    /// Interarrival jitter subscribers report.
    pub jitter_downstream: crate::metrics::AtomicHistogram<crate::metrics::Seconds>,
    /// Fraction lost subscribers report.
    pub loss_downstream: crate::metrics::AtomicHistogram<crate::metrics::Ratio>,
    /// Interarrival jitter of what publishers send here (RFC 3550), each second per layer.
    pub jitter_upstream: crate::metrics::AtomicHistogram<crate::metrics::Seconds>,
    /// Share of publishers' packets that did not arrive, each second per layer.
    pub loss_upstream: crate::metrics::AtomicHistogram<crate::metrics::Ratio>,
    /// From a video consumer's creation to its first forwarded packet (a keyframe).
    pub first_frame: crate::metrics::AtomicHistogram<crate::metrics::Seconds>,
}
}

impl WorkerStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Cheap, cloneable access to a node's media worker.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::UnboundedSender<Command>,
    pipe_media: mpsc::Sender<(PipeId, bytes::Bytes)>,
    stats: Arc<WorkerStats>,
    media_addr: SocketAddr,
}

impl WorkerHandle {
    /// Address announced in ICE candidates.
    pub fn media_addr(&self) -> SocketAddr {
        self.media_addr
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// The counters, shared, for holders that outlive a borrow (the load meter).
    pub fn shared_stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    async fn call<T, E>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, E>>) -> Command,
        gone: E,
    ) -> Result<T, E> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(make(tx)).is_err() {
            return Err(gone);
        }
        rx.await.unwrap_or(Err(gone))
    }

    pub async fn join(
        &self,
        session: SessionId,
        user: UserId,
        role: Role,
        recorded: bool,
        events: EventSender,
    ) -> Result<Joined, JoinError> {
        self.call(
            |reply| Command::Join {
                session,
                user,
                role,
                recorded,
                events,
                reply,
            },
            JoinError::WorkerGone,
        )
        .await
    }

    /// See [`Command::RecordSeat`].
    pub fn record_seat(&self, session: SessionId, on: bool) {
        self.mesh_command(Command::RecordSeat { session, on });
    }

    /// See [`Command::Record`].
    pub fn record(&self, session: SessionId) {
        self.mesh_command(Command::Record { session });
    }

    pub async fn publish(
        &self,
        participant: ParticipantId,
        offer: String,
    ) -> Result<Published, PublishError> {
        self.call(
            |reply| Command::Publish {
                participant,
                offer,
                reply,
            },
            PublishError::WorkerGone,
        )
        .await
    }

    pub async fn subscribe(
        &self,
        participant: ParticipantId,
        producer: ProducerId,
        offer: String,
        max_layer: Option<Layer>,
    ) -> Result<Subscribed, SubscribeError> {
        self.call(
            |reply| Command::Subscribe {
                participant,
                producer,
                offer,
                max_layer,
                reply,
            },
            SubscribeError::WorkerGone,
        )
        .await
    }

    pub async fn set_consumer_layer(
        &self,
        participant: ParticipantId,
        consumer: ConsumerId,
        max_layer: Layer,
    ) -> Result<(), ControlError> {
        self.call(
            |reply| Command::SetConsumerLayer {
                participant,
                consumer,
                max_layer,
                reply,
            },
            ControlError::WorkerGone,
        )
        .await
    }

    pub async fn set_producer_paused(
        &self,
        participant: ParticipantId,
        producer: ProducerId,
        paused: bool,
    ) -> Result<(), ControlError> {
        self.call(
            |reply| Command::SetProducerPaused {
                participant,
                producer,
                paused,
                reply,
            },
            ControlError::WorkerGone,
        )
        .await
    }

    pub async fn set_consumer_paused(
        &self,
        participant: ParticipantId,
        consumer: ConsumerId,
        paused: bool,
    ) -> Result<(), ControlError> {
        self.call(
            |reply| Command::SetConsumerPaused {
                participant,
                consumer,
                paused,
                reply,
            },
            ControlError::WorkerGone,
        )
        .await
    }

    pub async fn close_producer(
        &self,
        participant: ParticipantId,
        producer: ProducerId,
    ) -> Result<(), ControlError> {
        self.call(
            |reply| Command::CloseProducer {
                participant,
                producer,
                reply,
            },
            ControlError::WorkerGone,
        )
        .await
    }

    pub async fn close_consumer(
        &self,
        participant: ParticipantId,
        consumer: ConsumerId,
    ) -> Result<(), ControlError> {
        self.call(
            |reply| Command::CloseConsumer {
                participant,
                consumer,
                reply,
            },
            ControlError::WorkerGone,
        )
        .await
    }

    /// Applies a new offer to one of the participant's transports (an ICE restart after a
    /// path change) and returns the answer; its producers and consumers stay as they are.
    pub async fn renegotiate(
        &self,
        participant: ParticipantId,
        transport: TransportKind,
        offer: String,
    ) -> Result<String, ControlError> {
        self.call(
            |reply| Command::Renegotiate {
                participant,
                transport,
                offer,
                reply,
            },
            ControlError::WorkerGone,
        )
        .await
    }

    pub async fn add_candidate(
        &self,
        participant: ParticipantId,
        transport: TransportKind,
        candidate: String,
        sdp_mid: Option<String>,
    ) -> Result<(), ControlError> {
        self.call(
            |reply| Command::AddCandidate {
                participant,
                transport,
                candidate,
                sdp_mid,
                reply,
            },
            ControlError::WorkerGone,
        )
        .await
    }

    /// Sends a mesh-originated command (pipes, remote producers, sessions).
    pub(crate) fn mesh_command(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// Hands one media datagram from a pipe to the worker. A full queue drops it (counted;
    /// the far end's repair asks for it again); false once the worker has stopped.
    pub(crate) fn pipe_datagram(&self, pipe: PipeId, data: bytes::Bytes) -> bool {
        match self.pipe_media.try_send((pipe, data)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats
                    .pipe_media_dropped
                    .fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Fault injection for tests of health and routing: the worker's thread stops turning
    /// for `d`, as a stuck worker would.
    #[doc(hidden)]
    pub fn stall_for_fault_test(&self, d: std::time::Duration) {
        let _ = self.tx.send(Command::Stall(d));
    }

    /// Whether the worker answers a command within `within` (for `/healthz`).
    pub async fn responds(&self, within: std::time::Duration) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Ping { reply }).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }

    /// What the worker holds of `session` (`None`: nothing, or the worker is gone).
    pub async fn describe(&self, session: SessionId) -> Option<SessionView> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Describe { session, reply }).ok()?;
        rx.await.ok().flatten()
    }

    /// Removes the participant with everything it published and consumed.
    pub fn leave(&self, participant: ParticipantId) {
        let _ = self.tx.send(Command::Leave { participant });
    }
}

/// A worker on a free loopback port, UDP only, alone (tests).
#[cfg(test)]
pub(crate) fn test_worker_config(index: u8) -> WorkerConfig {
    WorkerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        announced_ip: "127.0.0.1".parse().unwrap(),
        limits: Default::default(),
        max_datagram_bytes: 1500,
        udp: true,
        tcp: false,
        index,
        mesh: None,
        send_side_bwe: false,
        srtp_in_place: true,
        recording: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> WorkerHandle {
        spawn_worker(test_worker_config(0)).unwrap()
    }

    #[tokio::test]
    async fn a_burst_of_pipe_media_is_bounded_counted_and_does_not_hold_up_control() {
        let w = worker();
        // Undecodable frames from a pipe, far more than the queue holds, as fast as possible.
        let burst = 200_000u64;
        let frame = bytes::Bytes::from_static(&[0xff; 64]);
        for _ in 0..burst {
            assert!(w.pipe_datagram(PipeId(7), frame.clone()));
        }
        // Control is answered while the burst is worked off.
        let (events, _rx) = event_channel();
        let joined = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            w.join(
                "kyc-burst".parse().unwrap(),
                "alice".parse().unwrap(),
                Role::Agent,
                false,
                events,
            ),
        )
        .await
        .expect("join answered during the burst");
        assert!(joined.is_ok());
        // Every datagram is accounted for: handled (and refused as bad) or dropped, counted.
        let s = w.shared_stats();
        let settled = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let seen =
                    WorkerStats::get(&s.pipe_frames_bad) + WorkerStats::get(&s.pipe_media_dropped);
                if seen == burst {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            settled.is_ok(),
            "bad {} + dropped {} != {burst}",
            WorkerStats::get(&s.pipe_frames_bad),
            WorkerStats::get(&s.pipe_media_dropped)
        );
    }

    #[tokio::test]
    async fn a_worker_that_turns_answers_the_health_check_and_a_stuck_one_does_not() {
        assert!(worker().responds(std::time::Duration::from_secs(5)).await);
        // A worker whose loop never reads its commands.
        let (tx, _stuck) = mpsc::unbounded_channel();
        let (pipe_media, _also_stuck) = mpsc::channel(1);
        let stuck = WorkerHandle {
            tx,
            pipe_media,
            stats: Default::default(),
            media_addr: "127.0.0.1:9".parse().unwrap(),
        };
        assert!(!stuck.responds(std::time::Duration::from_millis(100)).await);
    }
}
