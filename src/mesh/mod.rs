//! The mesh plane: QUIC pipe transports between nodes, and the control protocol that makes a
//! session span nodes. Pipes relay producers with the same ProducerId on both sides.
//!
//! One task (the core) owns the mesh state: which sessions this node hosts, its producers,
//! and for each pipe which sessions the far end hosts. It turns the worker's [`MeshEvent`]s
//! into control messages and the peers' control messages into worker commands, sent to the
//! worker that hosts the session or producer concerned (a node has one worker per core).
//! Media frames bypass the core: workers send datagrams themselves, and each pipe's datagram
//! reader hands a received frame straight to the worker of its stream, by a table the core
//! keeps current (see [`StreamRoutes`]).

pub mod discovery;
pub mod geo;
pub mod load;
pub mod membership;
pub mod operators;
pub mod records;
pub mod selector;
pub mod tls;
/// The pipe wire formats, which live in [`crate::proto::pipe`].
pub use crate::proto::pipe as wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use discovery::{DnsDiscovery, PeerRecord, PeerResolver};
use load::{Capacity, LoadMeter, Tuning};
use membership::{Heartbeat, Load, MemberView, Membership, NodeInfo, HEARTBEAT_EVERY};

use crate::ids::{NodeId, PipeId, ProducerId, SessionId};
use crate::sfu::{Command, MeshEvent, PipeCounters, PipeLink, WorkerEvent, Workers};
use tls::{CertIdentity, NodeTls, TlsError, CLUSTER_SERVER_NAME};
use wire::{CloseCode, Control, ProducerAnnouncement, StreamRef, MAX_CONTROL, WIRE_VERSION};

/// What the mesh of one node needs.
#[derive(Clone)]
pub struct MeshConfig {
    /// This node as its peers see it. A `pipe_addr` of `None` means the bound address.
    pub info: NodeInfo,
    /// UDP address of this node's QUIC endpoint.
    pub listen: SocketAddr,
    pub tls: NodeTls,
    /// Static peers: all of them without discovery, the fallback until DNS answers with it.
    pub peers: Vec<SocketAddr>,
    pub discovery: Option<DnsDiscovery>,
    pub capacity: Capacity,
    /// Set by the operator: take no new sessions.
    pub draining: Arc<AtomicBool>,
    /// The operator's weight and capacity for this node.
    pub tuning: Arc<Tuning>,
    /// Where operators' calls relayed by other nodes go (`None`: refused).
    pub admin_inbox: Option<mpsc::UnboundedSender<operators::Inbound>>,
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot open the pipe endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
}

/// Mesh-wide counters.
#[derive(Debug, Default)]
pub struct MeshStats {
    pub pipes_open: AtomicU64,
    /// Pipe handshakes that failed: a peer refused our certificate or we refused theirs.
    pub handshakes_refused: AtomicU64,
    /// Control messages that did not decode (the pipe carrying them is closed), and values
    /// out of range in ones that did (ignored: a heartbeat's weight, counted once per pipe).
    pub control_errors: AtomicU64,
    /// DNS lookups that failed (the last good answer stays in force).
    pub discovery_errors: AtomicU64,
    /// Peers in the last DNS answer.
    pub peers_discovered: AtomicU64,
    /// Peers declared down for missing heartbeats.
    pub peers_silent: AtomicU64,
    /// Pipes refused because the peer's `Hello` named another node or region than its
    /// certificate (also counted in `handshakes_refused`).
    pub identity_mismatches: AtomicU64,
}

/// Which nodes host participants of which sessions: this node's own sessions and those its
/// peers declared with `interest`. Written by the mesh core on control messages, read by
/// `/v1/edge`; never touched per packet.
#[derive(Debug, Default)]
pub struct SessionHosts(Mutex<HashMap<SessionId, HashSet<NodeId>>>);

impl SessionHosts {
    /// Whether `node` hosts `session`.
    pub fn hosts(&self, session: &SessionId, node: &NodeId) -> bool {
        self.0
            .lock()
            .map(|m| m.get(session).is_some_and(|n| n.contains(node)))
            .unwrap_or(false)
    }

    /// The nodes hosting `session`.
    pub fn of(&self, session: &SessionId) -> HashSet<NodeId> {
        self.0
            .lock()
            .map(|m| m.get(session).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn set(&self, session: &SessionId, node: &NodeId, hosting: bool) {
        // A poisoned lock only means a reader panicked; the map stays usable.
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if hosting {
            m.entry(session.clone()).or_default().insert(node.clone());
        } else if let Some(nodes) = m.get_mut(session) {
            nodes.remove(node);
            if nodes.is_empty() {
                m.remove(session);
            }
        }
    }
}

/// A pipe's figures, for metrics and routing.
#[derive(Debug, Clone)]
pub struct PipeReport {
    pub pipe: PipeId,
    pub node: NodeId,
    pub rtt: Duration,
    /// QUIC packets the connection detected as lost, and sent in all.
    pub lost_packets: u64,
    pub sent_packets: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub nacked: u64,
    pub retransmitted: u64,
    pub send_failed: u64,
    /// Datagrams that displaced older ones in quinn's full send buffer.
    pub send_displaced: u64,
    /// Media bits per second each way over the last heartbeat interval.
    pub bitrate_in: u64,
    pub bitrate_out: u64,
}

struct PipeEntry {
    node: NodeId,
    conn: quinn::Connection,
    counters: Arc<PipeCounters>,
    /// Bytes in and out at the last sample, and the rates measured then (bits/s).
    sampled: Option<(Instant, u64, u64)>,
    rates: (u64, u64),
}

impl PipeEntry {
    fn sample_rates(&mut self, now: Instant) {
        let (bytes_in, bytes_out) = (
            self.counters.bytes_in.load(Relaxed),
            self.counters.bytes_out.load(Relaxed),
        );
        if let Some((t, i, o)) = self.sampled {
            let secs = now.saturating_duration_since(t).as_secs_f64();
            if secs > 0.0 {
                let rate =
                    |now: u64, then: u64| (now.saturating_sub(then) as f64 * 8.0 / secs) as u64;
                self.rates = (rate(bytes_in, i), rate(bytes_out, o));
            }
        }
        self.sampled = Some((now, bytes_in, bytes_out));
    }
}

/// A running mesh.
pub struct MeshHandle {
    pub local_addr: SocketAddr,
    pub stats: Arc<MeshStats>,
    /// Which nodes host which sessions, as this node knows it (for session affinity).
    pub hosts: Arc<SessionHosts>,
    registry: Arc<Mutex<HashMap<PipeId, PipeEntry>>>,
    endpoint: quinn::Endpoint,
    members: watch::Receiver<Arc<Vec<MemberView>>>,
    records: records::RecordRelay,
    admin: operators::AdminRelay,
}

impl MeshHandle {
    /// Carries operators' calls to other nodes.
    pub fn admin(&self) -> operators::AdminRelay {
        self.admin.clone()
    }

    /// Where audit records for other nodes go, and answers to theirs.
    pub fn records(&self) -> records::RecordRelay {
        self.records.clone()
    }

    /// A receiver of membership changes (for routing).
    pub fn watch_members(&self) -> watch::Receiver<Arc<Vec<MemberView>>> {
        self.members.clone()
    }

    /// Open pipes with their current figures.
    pub fn pipes(&self) -> Vec<PipeReport> {
        reports(&self.registry)
    }

    /// A function producing [`MeshHandle::pipes`], for holders that outlive no handle.
    pub fn reports(&self) -> impl Fn() -> Vec<PipeReport> + Send + Sync + 'static {
        let registry = self.registry.clone();
        move || reports(&registry)
    }

    /// Closes every pipe and the endpoint (a node leaving the mesh).
    pub fn shutdown(&self) {
        self.endpoint
            .close(CloseCode::Done.code().into(), b"node shutting down");
    }
}

fn reports(registry: &Mutex<HashMap<PipeId, PipeEntry>>) -> Vec<PipeReport> {
    {
        let Ok(reg) = registry.lock() else {
            return Vec::new();
        };
        let mut out: Vec<PipeReport> = reg
            .iter()
            .map(|(&pipe, e)| {
                let s = e.conn.stats();
                let c = &e.counters;
                PipeReport {
                    pipe,
                    node: e.node.clone(),
                    rtt: e.conn.rtt(),
                    lost_packets: s.path.lost_packets,
                    sent_packets: s.path.sent_packets,
                    datagrams_out: c.datagrams_out.load(Relaxed),
                    bytes_out: c.bytes_out.load(Relaxed),
                    datagrams_in: c.datagrams_in.load(Relaxed),
                    bytes_in: c.bytes_in.load(Relaxed),
                    nacked: c.nacked.load(Relaxed),
                    retransmitted: c.retransmitted.load(Relaxed),
                    send_failed: c.send_failed.load(Relaxed),
                    send_displaced: c.send_displaced.load(Relaxed),
                    bitrate_in: e.rates.0,
                    bitrate_out: e.rates.1,
                }
            })
            .collect();
        out.sort_by_key(|p| p.pipe);
        out
    }
}

enum Internal {
    Ready {
        pipe: PipeId,
        info: NodeInfo,
        /// This node dialed the pipe.
        dialer: bool,
        conn: quinn::Connection,
        out: mpsc::UnboundedSender<Bytes>,
        routes: mpsc::UnboundedSender<RouteUpdate>,
    },
    Control {
        pipe: PipeId,
        msg: Control,
    },
    Closed {
        pipe: PipeId,
    },
    /// A DNS answer: the peers this node should be connected to.
    Discovered(Vec<PeerRecord>),
    /// An audit record for the session's recording node.
    Record {
        node: NodeId,
        session: SessionId,
        entry: crate::proto::pipe::RecordEntry,
        reply: Option<tokio::sync::oneshot::Sender<Result<(), records::RelayError>>>,
    },
    /// An operator's call for `node`.
    Admin {
        node: NodeId,
        call: crate::proto::admin::AdminCall,
        reply: tokio::sync::oneshot::Sender<
            Result<crate::proto::admin::AdminReply, operators::AdminRelayError>,
        >,
    },
    /// The answer to a record received on `pipe`.
    RecordAck {
        pipe: PipeId,
        id: u64,
        error: Option<String>,
    },
    /// A session recorded here ended on a recording failure: `node` lets go of its
    /// participants.
    RecordingEnded {
        node: NodeId,
        session: SessionId,
        reason: String,
    },
}

/// A change to a pipe's stream table, from the core to the pipe's datagram reader.
#[derive(Debug)]
enum RouteUpdate {
    /// Media frames of the far end's `stream` go to `worker`.
    Add {
        stream: u32,
        worker: usize,
    },
    Remove(u32),
}

/// A pipe datagram reader's table of which worker each stream goes to. The core sends
/// changes on a channel, which the reader drains before each datagram: no lock is shared
/// on the per-packet path, and a stream is known to the reader before the worker that
/// hosts it asks the far end for its media.
struct StreamRoutes {
    updates: mpsc::UnboundedReceiver<RouteUpdate>,
    origin: HashMap<u32, usize>,
}

impl StreamRoutes {
    fn new(updates: mpsc::UnboundedReceiver<RouteUpdate>) -> Self {
        Self {
            updates,
            origin: HashMap::new(),
        }
    }

    /// The worker a datagram goes to. A resend request names this node's own stream, whose
    /// top byte is the worker that allocated it; a media frame goes by the table. Whatever
    /// cannot be placed goes to worker 0, which refuses and counts it as one worker did.
    fn worker_for(&mut self, datagram: &[u8], workers: usize) -> usize {
        while let Ok(u) = self.updates.try_recv() {
            match u {
                RouteUpdate::Add { stream, worker } => {
                    self.origin.insert(stream, worker);
                }
                RouteUpdate::Remove(stream) => {
                    self.origin.remove(&stream);
                }
            }
        }
        if workers == 1 {
            return 0;
        }
        let w = match StreamRef::of(datagram) {
            Some(StreamRef::Local(stream)) => crate::sfu::stream_worker(stream),
            Some(StreamRef::Origin(stream)) => self.origin.get(&stream).copied().unwrap_or(0),
            None => 0,
        };
        if w < workers {
            w
        } else {
            0
        }
    }
}

/// The view of a node that is alone (no peers yet, or no mesh at all).
pub fn local_view(info: &NodeInfo, load: Load, draining: bool, weight: f32) -> MemberView {
    MemberView {
        info: info.clone(),
        load,
        draining,
        local: true,
        rtt: None,
        weight,
    }
}

/// Starts the endpoint, the dialers and the core.
pub fn start(
    cfg: MeshConfig,
    workers: Workers,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    records: records::Wiring,
) -> Result<MeshHandle, MeshError> {
    let server = cfg.tls.server_config()?;
    let client = cfg.tls.client_config()?;
    let mut endpoint =
        quinn::Endpoint::server(server, cfg.listen).map_err(|source| MeshError::Bind {
            addr: cfg.listen,
            source,
        })?;
    endpoint.set_default_client_config(client);
    let local_addr = endpoint.local_addr().map_err(|source| MeshError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let resolver = match &cfg.discovery {
        Some(d) => Some((PeerResolver::new(d)?, d.interval)),
        None => None,
    };
    let mut info = cfg.info.clone();
    if info.pipe_addr.is_none() && !local_addr.ip().is_unspecified() {
        info.pipe_addr = Some(local_addr);
    }
    let stats = Arc::new(MeshStats::default());
    let hosts = Arc::new(SessionHosts::default());
    let registry = Arc::new(Mutex::new(HashMap::new()));
    let (itx, irx) = mpsc::unbounded_channel();
    let next_pipe = Arc::new(AtomicU64::new(1));
    let connected = Arc::new(Mutex::new(HashSet::new()));
    let ctx = PipeCtx {
        hello: hello(&info),
        workers: workers.clone(),
        internal: itx.clone(),
        stats: stats.clone(),
        next_pipe,
        connected: connected.clone(),
    };
    // Incoming pipes.
    {
        let endpoint = endpoint.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => {
                            ctx.run_pipe(conn, false).await;
                        }
                        Err(e) => {
                            ctx.stats.handshakes_refused.fetch_add(1, Relaxed);
                            tracing::warn!(peer = %remote, error = %e, "refused a pipe handshake");
                        }
                    }
                });
            }
        });
    }
    let mut dialers = Dialers {
        endpoint: endpoint.clone(),
        ctx: ctx.clone(),
        running: HashMap::new(),
        wrong_version: HashSet::new(),
    };
    dialers.set_targets(
        &info,
        cfg.peers
            .iter()
            .map(|&addr| PeerRecord {
                addr,
                node: None,
                region: None,
                version: None,
            })
            .collect(),
    );
    if let Some((resolver, interval)) = resolver {
        let itx = itx.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match resolver.resolve().await {
                    Ok(peers) => {
                        stats.peers_discovered.store(peers.len() as u64, Relaxed);
                        if itx.send(Internal::Discovered(peers)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        stats.discovery_errors.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "peer discovery failed; keeping the last answer");
                    }
                }
            }
        });
    }
    let (views_tx, views_rx) = watch::channel(Arc::new(vec![local_view(
        &info,
        Load::default(),
        cfg.draining.load(Relaxed),
        cfg.tuning.weight(),
    )]));
    let core = Core {
        node: info.node.clone(),
        info: info.clone(),
        workers: workers.clone(),
        stats: stats.clone(),
        registry: registry.clone(),
        pipes: HashMap::new(),
        by_node: HashMap::new(),
        active: HashMap::new(),
        local_producers: HashMap::new(),
        hosts: hosts.clone(),
        replaying: HashMap::new(),
        producers: HashMap::new(),
        participants: HashMap::new(),
        membership: Membership::new(),
        load: LoadMeter::new(workers.shared_stats(), cfg.capacity, cfg.tuning.clone()),
        tuning: cfg.tuning.clone(),
        sent_weight: cfg.tuning.weight(),
        local_load: Load::default(),
        draining: cfg.draining.clone(),
        sent_draining: false,
        last_heartbeat: None,
        views: views_tx,
        discovered: None,
        dialers,
        connected,
        record_inbox: records.inbox,
        recording_ended: records.ended,
        pending_records: HashMap::new(),
        next_record: 1,
        admin_inbox: cfg.admin_inbox.clone(),
        pending_admin: HashMap::new(),
        admin_in_flight: Default::default(),
        next_admin: 1,
    };
    let records = records::RecordRelay { tx: itx.clone() };
    let admin = operators::AdminRelay { tx: itx.clone() };
    tokio::spawn(core.run(events, irx));
    tracing::info!(node = %info.node, addr = %local_addr, peers = cfg.peers.len(), dns = cfg.discovery.is_some(), "mesh started");
    Ok(MeshHandle {
        local_addr,
        stats,
        hosts,
        registry,
        endpoint,
        members: views_rx,
        records,
        admin,
    })
}

fn hello(info: &NodeInfo) -> Control {
    Control::Hello {
        version: WIRE_VERSION,
        node: info.node.clone(),
        region: info.region.clone(),
        signaling_url: info.signaling_url.clone(),
        latitude: info.latitude,
        longitude: info.longitude,
        pipe_addr: info.pipe_addr.map(|a| a.to_string()),
    }
}

/// Longest pause between dial attempts to an unreachable or refusing peer.
const MAX_REDIAL: Duration = Duration::from_secs(8);

/// The dialing side of the mesh: one task per peer address, re-dialing while the address is a
/// target. A dialer whose peer is already connected (it dialed us) waits instead of dialing.
struct Dialers {
    endpoint: quinn::Endpoint,
    ctx: PipeCtx,
    running: HashMap<SocketAddr, tokio::task::JoinHandle<()>>,
    /// Peers already reported as speaking another protocol version.
    wrong_version: HashSet<SocketAddr>,
}

impl Dialers {
    /// Dials exactly these peers from now on. Of two nodes that know each other's ids, the one
    /// with the lower id dials, so a pair makes one pipe, not two.
    fn set_targets(&mut self, me: &NodeInfo, peers: Vec<PeerRecord>) {
        let wanted: HashMap<SocketAddr, Option<NodeId>> = peers
            .into_iter()
            .filter(|p| Some(p.addr) != me.pipe_addr && p.node.as_ref() != Some(&me.node))
            .filter(|p| p.node.as_ref().is_none_or(|n| me.node < *n))
            .filter(|p| {
                let speaks = p.version.as_ref().is_none_or(|v| *v == WIRE_VERSION.to_string());
                // Said once per address, not at every lookup.
                if !speaks && self.wrong_version.insert(p.addr) {
                    tracing::warn!(peer = %p.addr, version = ?p.version, "not dialing a peer published with another pipe protocol version");
                }
                speaks
            })
            .map(|p| (p.addr, p.node))
            .collect();
        self.running.retain(|addr, task| {
            let keep = wanted.contains_key(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for (addr, node) in wanted {
            if self.running.contains_key(&addr) {
                continue;
            }
            let endpoint = self.endpoint.clone();
            let ctx = self.ctx.clone();
            let task = tokio::spawn(async move {
                let mut known = node;
                let mut pause = Duration::from_secs(1);
                loop {
                    let connected = known.as_ref().is_some_and(|n| {
                        ctx.connected.lock().map(|c| c.contains(n)).unwrap_or(false)
                    });
                    if !connected {
                        match endpoint.connect(addr, CLUSTER_SERVER_NAME) {
                            Ok(connecting) => match connecting.await {
                                Ok(conn) => {
                                    if let Some(n) = ctx.run_pipe(conn, true).await {
                                        known = Some(n);
                                        pause = Duration::from_secs(1);
                                    }
                                }
                                Err(e) => {
                                    ctx.stats.handshakes_refused.fetch_add(1, Relaxed);
                                    tracing::debug!(peer = %addr, error = %e, "pipe handshake failed");
                                }
                            },
                            Err(e) => {
                                tracing::warn!(peer = %addr, error = %e, "cannot dial peer");
                            }
                        }
                    }
                    tokio::time::sleep(pause).await;
                    if !connected {
                        pause = (pause * 2).min(MAX_REDIAL);
                    }
                }
            });
            self.running.insert(addr, task);
        }
    }
}

impl Drop for Dialers {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

/// What every pipe task shares.
#[derive(Clone)]
struct PipeCtx {
    hello: Control,
    workers: Workers,
    internal: mpsc::UnboundedSender<Internal>,
    stats: Arc<MeshStats>,
    next_pipe: Arc<AtomicU64>,
    /// Nodes with an open pipe (kept by the core), so dialers do not dial them again.
    connected: Arc<Mutex<HashSet<NodeId>>>,
}

/// How long the `Hello` exchange may take before the pipe is given up.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

impl PipeCtx {
    /// Runs one established connection until it closes. Returns the peer's node id when the
    /// Hello exchange succeeded.
    async fn run_pipe(&self, conn: quinn::Connection, dialer: bool) -> Option<NodeId> {
        let peer = conn.remote_address();
        // quinn reports a successful handshake even when the server then refuses our client
        // certificate; only the Hello exchange proves the pipe is accepted on both sides.
        let setup = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (mut send, mut recv) = if dialer {
                conn.open_bi().await?
            } else {
                conn.accept_bi().await?
            };
            send.write_all(&self.hello.encode()).await?;
            let first = read_control(&mut recv).await?;
            Ok::<_, PipeSetupError>((send, recv, first))
        })
        .await;
        let (mut send, mut recv, first) = match setup {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.stats.handshakes_refused.fetch_add(1, Relaxed);
                let reason = conn
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| e.to_string());
                tracing::warn!(peer = %peer, reason = %reason, "pipe refused or broken during setup");
                return None;
            }
            Err(_) => {
                self.stats.handshakes_refused.fetch_add(1, Relaxed);
                tracing::warn!(peer = %peer, "no Hello from peer in time");
                close(&conn, CloseCode::NoHello);
                return None;
            }
        };
        let Control::Hello {
            version,
            node,
            region,
            signaling_url,
            latitude,
            longitude,
            pipe_addr,
        } = first
        else {
            self.stats.control_errors.fetch_add(1, Relaxed);
            close(&conn, CloseCode::HelloNotFirst);
            return None;
        };
        if version != WIRE_VERSION {
            tracing::warn!(peer = %peer, version, "peer speaks another pipe protocol version");
            close(&conn, CloseCode::UnsupportedVersion);
            return None;
        }
        // The certificate, not the Hello, says who the peer is: any cluster certificate
        // proves membership, but only its own lets a node speak as itself.
        let proven = CertIdentity::of_peer(&conn);
        if !proven.as_ref().is_some_and(|id| id.admits(&node, &region)) {
            self.stats.identity_mismatches.fetch_add(1, Relaxed);
            self.stats.handshakes_refused.fetch_add(1, Relaxed);
            tracing::warn!(
                peer = %peer,
                claimed = %node,
                claimed_region = %region,
                certificate = ?proven,
                "refusing a pipe whose Hello does not match its certificate"
            );
            close(&conn, CloseCode::IdentityMismatch);
            return None;
        }
        let info = NodeInfo {
            node: node.clone(),
            region,
            signaling_url,
            latitude,
            longitude,
            pipe_addr: pipe_addr.and_then(|a| a.parse().ok()),
        };
        let pipe = PipeId(self.next_pipe.fetch_add(1, Relaxed));
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Bytes>();
        let (routes_tx, routes_rx) = mpsc::unbounded_channel();
        let _ = self.internal.send(Internal::Ready {
            pipe,
            info,
            dialer,
            conn: conn.clone(),
            out: out_tx,
            routes: routes_tx,
        });
        tracing::debug!(pipe = %pipe, peer = %peer, node = %node, "pipe handshake done");
        let writer = tokio::spawn(async move {
            while let Some(b) = out_rx.recv().await {
                if send.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        let datagrams = {
            let conn = conn.clone();
            let workers = self.workers.clone();
            tokio::spawn(async move {
                let mut routes = StreamRoutes::new(routes_rx);
                while let Ok(data) = conn.read_datagram().await {
                    let worker = routes.worker_for(&data, workers.len());
                    if !workers.get(worker).pipe_datagram(pipe, data) {
                        break;
                    }
                }
            })
        };
        loop {
            match read_control(&mut recv).await {
                Ok(msg) => {
                    if self.internal.send(Internal::Control { pipe, msg }).is_err() {
                        break;
                    }
                }
                Err(PipeSetupError::Control(e)) => {
                    self.stats.control_errors.fetch_add(1, Relaxed);
                    tracing::warn!(pipe = %pipe, node = %node, error = %e, "closing pipe after a bad control message");
                    close(&conn, CloseCode::MalformedControl);
                    break;
                }
                Err(_) => break,
            }
        }
        close(&conn, CloseCode::Done);
        writer.abort();
        datagrams.abort();
        let _ = self.internal.send(Internal::Closed { pipe });
        Some(node)
    }
}

/// Closes a pipe's connection with a code from the protocol.
fn close(conn: &quinn::Connection, why: CloseCode) {
    conn.close(why.code().into(), why.reason());
}

/// Whether a DNS answer lists this peer, by node id or by pipe address.
fn published(peers: &[PeerRecord], info: &NodeInfo) -> bool {
    peers
        .iter()
        .any(|r| r.node.as_ref() == Some(&info.node) || Some(r.addr) == info.pipe_addr)
}

#[derive(Debug, thiserror::Error)]
enum PipeSetupError {
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Read(#[from] quinn::ReadExactError),
    #[error(transparent)]
    Control(#[from] wire::ControlError),
}

fn joined_message(session: &SessionId, p: &crate::sfu::ParticipantInfo) -> Control {
    Control::ParticipantJoined {
        session: session.clone(),
        participant: p.participant_id.clone(),
        user: p.user_id.clone(),
        role: p.role,
    }
}

async fn read_control(recv: &mut quinn::RecvStream) -> Result<Control, PipeSetupError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CONTROL {
        return Err(wire::ControlError::TooLarge(len).into());
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Control::decode(&body)?)
}

struct PipeState {
    node: NodeId,
    info: NodeInfo,
    /// Which end dialed: of duplicate pipes, both ends keep the one the lower id dialed.
    dialed_by: NodeId,
    out: mpsc::UnboundedSender<Bytes>,
    /// Updates of the pipe's datagram reader's stream table.
    routes: mpsc::UnboundedSender<RouteUpdate>,
    conn: quinn::Connection,
    /// Sessions the far end hosts.
    interests: HashSet<SessionId>,
    /// The far end's producers handed to a worker here.
    remote_producers: HashMap<ProducerId, RemoteProducer>,
    /// A heartbeat with a weight out of range was reported (once per pipe).
    bad_weight_reported: bool,
}

/// Where a producer of another node went on this one.
struct RemoteProducer {
    worker: usize,
    /// The far end's stream number.
    stream: u32,
    session: SessionId,
}

struct Core {
    node: NodeId,
    workers: Workers,
    stats: Arc<MeshStats>,
    registry: Arc<Mutex<HashMap<PipeId, PipeEntry>>>,
    pipes: HashMap<PipeId, PipeState>,
    by_node: HashMap<NodeId, PipeId>,
    /// Sessions hosted here, with the worker hosting each.
    active: HashMap<SessionId, usize>,
    /// Local producers, with the worker that owns each.
    local_producers: HashMap<ProducerId, usize>,
    hosts: Arc<SessionHosts>,
    /// Sessions that just became active here, with the pipes whose replay of them is awaited.
    replaying: HashMap<SessionId, HashSet<PipeId>>,
    /// Local producers by session, to announce to nodes that become interested.
    producers: HashMap<SessionId, HashMap<ProducerId, ProducerAnnouncement>>,
    /// Local participants by session, likewise.
    participants:
        HashMap<SessionId, HashMap<crate::ids::ParticipantId, crate::sfu::ParticipantInfo>>,
    info: NodeInfo,
    membership: Membership,
    load: LoadMeter,
    local_load: Load,
    draining: Arc<AtomicBool>,
    /// Drain state in the last heartbeat sent.
    sent_draining: bool,
    tuning: Arc<Tuning>,
    /// Weight in the last heartbeat sent.
    sent_weight: f32,
    last_heartbeat: Option<Instant>,
    views: watch::Sender<Arc<Vec<MemberView>>>,
    /// The last DNS answer; `None` without discovery or before the first answer.
    discovered: Option<Vec<PeerRecord>>,
    dialers: Dialers,
    connected: Arc<Mutex<HashSet<NodeId>>>,
    /// Where records other nodes send for sessions recorded here go (`None`: this node
    /// does not record, and says so).
    record_inbox: Option<mpsc::UnboundedSender<records::Inbound>>,
    /// Where a recording node's "this session ended" goes (the signaling connections).
    recording_ended: Option<tokio::sync::broadcast::Sender<records::Ended>>,
    /// Records sent and awaiting their answer, by id.
    pending_records: HashMap<u64, PendingRecord>,
    next_record: u64,
    /// Where operators' calls from other nodes go.
    admin_inbox: Option<mpsc::UnboundedSender<operators::Inbound>>,
    /// Operators' calls sent and awaiting their answer, by id.
    pending_admin: HashMap<u64, PendingAdmin>,
    /// Calls from peers being carried out here.
    admin_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    next_admin: u64,
}

type PendingAdmin = (
    PipeId,
    tokio::sync::oneshot::Sender<
        Result<crate::proto::admin::AdminReply, operators::AdminRelayError>,
    >,
);

type PendingRecord = (
    PipeId,
    tokio::sync::oneshot::Sender<Result<(), records::RelayError>>,
);

/// How often the core checks heartbeats, drain state and silence.
const TICK: Duration = Duration::from_millis(250);

impl Core {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<WorkerEvent>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.on_tick(Instant::now()),
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                msg = internal.recv() => match msg {
                    Some(msg) => self.on_internal(msg),
                    None => break,
                },
            }
        }
    }

    fn send(&self, pipe: PipeId, msg: &Control) {
        if let Some(p) = self.pipes.get(&pipe) {
            let _ = p.out.send(msg.encode());
        }
    }

    /// Tells the worker of every session whose replay is complete: what the mesh knows of
    /// it is now known here.
    fn settle_replays(&mut self) {
        let done: Vec<SessionId> = self
            .replaying
            .iter()
            .filter(|(_, waiting)| waiting.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        for session in done {
            self.replaying.remove(&session);
            if let Some(&w) = self.active.get(&session) {
                self.workers
                    .get(w)
                    .mesh_command(Command::SessionReplayed { session });
            }
        }
    }

    fn send_interested(&self, session: &SessionId, msg: &Control) {
        let enc = msg.encode();
        for p in self.pipes.values() {
            if p.interests.contains(session) {
                let _ = p.out.send(enc.clone());
            }
        }
    }

    /// Sends a command to every worker (pipes come and go for all of them).
    fn to_all(&self, cmd: impl Fn() -> Command) {
        for w in self.workers.iter() {
            w.mesh_command(cmd());
        }
    }

    /// Sends a command to the worker hosting `session`, if one does.
    fn to_session(&self, session: &SessionId, cmd: Command) {
        if let Some(&w) = self.active.get(session) {
            self.workers.get(w).mesh_command(cmd);
        }
    }

    fn on_event(&mut self, ev: WorkerEvent) {
        let WorkerEvent { worker, event: ev } = ev;
        match ev {
            MeshEvent::SessionActive(session) => {
                let msg = Control::Interest {
                    session: session.clone(),
                };
                for &pipe in self.pipes.keys() {
                    self.send(pipe, &msg);
                }
                // The worker answers the first join once every pipe has replayed what it
                // knows of the session (or its own deadline passes).
                self.replaying
                    .insert(session.clone(), self.pipes.keys().copied().collect());
                self.settle_replays();
                self.hosts.set(&session, &self.node, true);
                self.active.insert(session, worker);
            }
            MeshEvent::SessionInactive(session) => {
                // A session can end on one worker and start again on another before the
                // first one's news arrives here: only the current host's end counts.
                if self.active.get(&session) != Some(&worker) {
                    return;
                }
                let msg = Control::InterestEnd {
                    session: session.clone(),
                };
                for &pipe in self.pipes.keys() {
                    self.send(pipe, &msg);
                }
                self.hosts.set(&session, &self.node, false);
                self.active.remove(&session);
                // The worker dropped the session's remote producers; so do the pipes' tables
                // (the far ends stop telling us about the session after `InterestEnd`).
                for p in self.pipes.values_mut() {
                    p.remote_producers.retain(|_, r| {
                        let keep = r.session != session;
                        if !keep {
                            let _ = p.routes.send(RouteUpdate::Remove(r.stream));
                        }
                        keep
                    });
                }
            }
            MeshEvent::ParticipantJoined {
                session,
                participant,
            } => {
                self.send_interested(&session, &joined_message(&session, &participant));
                self.participants
                    .entry(session)
                    .or_default()
                    .insert(participant.participant_id.clone(), participant);
            }
            MeshEvent::ParticipantLeft {
                session,
                participant,
            } => {
                if let Some(m) = self.participants.get_mut(&session) {
                    m.remove(&participant.participant_id);
                    if m.is_empty() {
                        self.participants.remove(&session);
                    }
                }
                self.send_interested(
                    &session,
                    &Control::ParticipantLeft {
                        session: session.clone(),
                        participant: participant.participant_id,
                    },
                );
            }
            MeshEvent::ProducerOpened(a) => {
                self.local_producers.insert(a.producer.clone(), worker);
                self.send_interested(&a.session, &Control::ProducerAnnounce(a.clone()));
                self.producers
                    .entry(a.session.clone())
                    .or_default()
                    .insert(a.producer.clone(), a);
            }
            MeshEvent::ProducerClosed { session, producer } => {
                self.local_producers.remove(&producer);
                if let Some(m) = self.producers.get_mut(&session) {
                    m.remove(&producer);
                    if m.is_empty() {
                        self.producers.remove(&session);
                    }
                }
                self.send_interested(&session, &Control::ProducerClosed { producer });
            }
            MeshEvent::ProducerPaused {
                session,
                producer,
                paused,
            } => {
                if let Some(a) = self
                    .producers
                    .get_mut(&session)
                    .and_then(|m| m.get_mut(&producer))
                {
                    a.paused = paused;
                }
                self.send_interested(&session, &Control::ProducerPaused { producer, paused });
            }
            MeshEvent::Consume {
                pipe,
                producer,
                layers,
            } => self.send(pipe, &Control::Consume { producer, layers }),
            MeshEvent::StopConsume { pipe, producer } => {
                self.send(pipe, &Control::StopConsume { producer })
            }
            MeshEvent::KeyframeRequest {
                pipe,
                producer,
                layer,
            } => self.send(pipe, &Control::KeyframeRequest { producer, layer }),
            MeshEvent::LayerBitrates {
                pipe,
                producer,
                bitrates,
            } => self.send(pipe, &Control::LayerBitrates { producer, bitrates }),
            MeshEvent::SenderReport {
                pipe,
                producer,
                layer,
                ntp,
                rtp,
            } => self.send(
                pipe,
                &Control::SenderReport {
                    producer,
                    layer,
                    ntp,
                    rtp,
                },
            ),
        }
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Ready {
                pipe,
                info,
                dialer,
                conn,
                out,
                routes,
            } => self.on_ready(pipe, info, dialer, conn, out, routes),
            Internal::Closed { pipe } => self.drop_pipe(pipe, CloseCode::Done),
            Internal::Discovered(peers) => self.on_discovered(peers),
            Internal::Control { pipe, msg } => self.on_control(pipe, msg),
            Internal::Record {
                node,
                session,
                entry,
                reply,
            } => {
                let Some(&pipe) = self.by_node.get(&node) else {
                    if let Some(r) = reply {
                        let _ = r.send(Err(records::RelayError::NoPipe(node)));
                    }
                    return;
                };
                let id = self.next_record;
                self.next_record += 1;
                if let Some(r) = reply {
                    self.pending_records.insert(id, (pipe, r));
                }
                self.send(pipe, &Control::Record { id, session, entry });
            }
            Internal::RecordAck { pipe, id, error } => {
                self.send(pipe, &Control::RecordAck { id, error });
            }
            Internal::Admin { node, call, reply } => {
                let Some(&pipe) = self.by_node.get(&node) else {
                    let _ = reply.send(Err(operators::AdminRelayError::NoPipe(node)));
                    return;
                };
                let id = self.next_admin;
                self.next_admin += 1;
                self.pending_admin.insert(id, (pipe, reply));
                self.send(pipe, &Control::AdminRequest { id, call });
            }

            Internal::RecordingEnded {
                node,
                session,
                reason,
            } => {
                if let Some(&pipe) = self.by_node.get(&node) {
                    self.send(pipe, &Control::RecordingEnded { session, reason });
                }
            }
        }
    }

    /// A pipe finished its Hello: admit it as a member, or refuse it.
    fn on_ready(
        &mut self,
        pipe: PipeId,
        info: NodeInfo,
        dialer: bool,
        conn: quinn::Connection,
        out: mpsc::UnboundedSender<Bytes>,
        routes: mpsc::UnboundedSender<RouteUpdate>,
    ) {
        let node = info.node.clone();
        if node == self.node {
            close(&conn, CloseCode::SelfConnection);
            return;
        }
        if let Some(peers) = &self.discovered {
            if !published(peers, &info) {
                tracing::info!(node = %node, "refusing a pipe from a node not published in DNS");
                close(&conn, CloseCode::NotDiscovered);
                return;
            }
        }
        let dialed_by = if dialer {
            self.node.clone()
        } else {
            node.clone()
        };
        if let Some(&old) = self.by_node.get(&node) {
            let old_alive = self.pipes[&old].conn.close_reason().is_none();
            if old_alive && self.pipes[&old].dialed_by <= dialed_by {
                close(&conn, CloseCode::Duplicate);
                return;
            }
            // Both ends keep the pipe the lower id dialed; the other one goes.
            self.drop_pipe(old, CloseCode::Duplicate);
        }
        let counters = Arc::new(PipeCounters::default());
        if let Ok(mut reg) = self.registry.lock() {
            reg.insert(
                pipe,
                PipeEntry {
                    node: node.clone(),
                    conn: conn.clone(),
                    counters: counters.clone(),
                    sampled: None,
                    rates: (0, 0),
                },
            );
        }
        self.to_all(|| Command::PipeUp {
            pipe,
            link: PipeLink {
                conn: conn.clone(),
                node: node.clone(),
                counters: counters.clone(),
            },
        });
        self.by_node.insert(node.clone(), pipe);
        if let Ok(mut c) = self.connected.lock() {
            c.insert(node.clone());
        }
        self.membership
            .handle_joined(Instant::now(), pipe, info.clone());
        // Tell the new member our load and drain state at once rather than within a second.
        let _ = out.send(
            Control::Heartbeat {
                load: self.local_load,
                draining: self.sent_draining,
                weight: self.sent_weight,
            }
            .encode(),
        );
        self.pipes.insert(
            pipe,
            PipeState {
                node: node.clone(),
                info,
                dialed_by,
                out,
                routes,
                conn,
                interests: HashSet::new(),
                remote_producers: HashMap::new(),
                bad_weight_reported: false,
            },
        );
        self.stats.pipes_open.fetch_add(1, Relaxed);
        tracing::info!(pipe = %pipe, node = %node, "pipe established");
        for session in self.active.keys() {
            self.send(
                pipe,
                &Control::Interest {
                    session: session.clone(),
                },
            );
        }
        self.publish_views();
    }

    /// Forgets a pipe: its remote producers and participants go from every session here.
    fn drop_pipe(&mut self, pipe: PipeId, why: CloseCode) {
        let Some(p) = self.pipes.remove(&pipe) else {
            return;
        };
        for session in &p.interests {
            self.hosts.set(session, &p.node, false);
        }
        if self.by_node.get(&p.node) == Some(&pipe) {
            self.by_node.remove(&p.node);
            if let Some(inbox) = &self.record_inbox {
                let _ = inbox.send(records::Inbound::NodeGone(p.node.clone()));
            }
            if let Ok(mut c) = self.connected.lock() {
                c.remove(&p.node);
            }
        }
        close(&p.conn, why);
        self.stats.pipes_open.fetch_sub(1, Relaxed);
        if let Ok(mut reg) = self.registry.lock() {
            reg.remove(&pipe);
        }
        self.membership.handle_pipe_closed(pipe);
        let lost: Vec<u64> = self
            .pending_records
            .iter()
            .filter(|(_, (p, _))| *p == pipe)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some((_, r)) = self.pending_records.remove(&id) {
                let _ = r.send(Err(records::RelayError::Lost));
            }
        }
        // Calls awaiting this pipe's node fail as lost (their senders dropped).
        self.pending_admin.retain(|_, (p, _)| *p != pipe);
        self.to_all(|| Command::PipeDown { pipe });
        for waiting in self.replaying.values_mut() {
            waiting.remove(&pipe);
        }
        self.settle_replays();
        tracing::info!(pipe = %pipe, node = %p.node, reason = %String::from_utf8_lossy(why.reason()), "pipe closed");
        self.publish_views();
    }

    /// A new DNS answer: dial what is new, drop what is gone.
    fn on_discovered(&mut self, peers: Vec<PeerRecord>) {
        let gone: Vec<PipeId> = self
            .pipes
            .iter()
            .filter(|(_, p)| !published(&peers, &p.info))
            .map(|(&id, _)| id)
            .collect();
        for pipe in gone {
            self.drop_pipe(pipe, CloseCode::RemovedFromDiscovery);
        }
        self.dialers.set_targets(&self.info, peers.clone());
        self.discovered = Some(peers);
    }

    /// Heartbeats out, silent peers down, membership published.
    fn on_tick(&mut self, now: Instant) {
        let draining = self.draining.load(Relaxed);
        let weight = self.tuning.weight();
        let due = self
            .last_heartbeat
            .is_none_or(|t| now.saturating_duration_since(t) >= HEARTBEAT_EVERY);
        if due || draining != self.sent_draining || weight != self.sent_weight {
            self.local_load = self.load.sample(now);
            self.sent_draining = draining;
            self.sent_weight = weight;
            self.last_heartbeat = Some(now);
            if due {
                if let Ok(mut reg) = self.registry.lock() {
                    for e in reg.values_mut() {
                        e.sample_rates(now);
                    }
                }
            }
            let msg = Control::Heartbeat {
                load: self.local_load,
                draining,
                weight,
            }
            .encode();
            for p in self.pipes.values() {
                let _ = p.out.send(msg.clone());
            }
        }
        // Calls whose caller gave up waiting are forgotten (an answer would find no one).
        self.pending_admin.retain(|_, (_, r)| !r.is_closed());
        for (node, pipe) in self.membership.poll_silent(now) {
            self.stats.peers_silent.fetch_add(1, Relaxed);
            tracing::warn!(node = %node, pipe = %pipe, "peer silent for 3 s: declaring it down");
            self.drop_pipe(pipe, CloseCode::HeartbeatTimeout);
        }
        self.publish_views();
    }

    fn publish_views(&self) {
        let local = local_view(
            &self.info,
            self.local_load,
            self.sent_draining,
            self.sent_weight,
        );
        let views = self
            .membership
            .views(local, |pipe| self.pipes.get(&pipe).map(|p| p.conn.rtt()));
        self.views.send_if_modified(|v| {
            if **v == views {
                false
            } else {
                *v = Arc::new(views);
                true
            }
        });
    }

    fn on_control(&mut self, pipe: PipeId, msg: Control) {
        let Some(state) = self.pipes.get_mut(&pipe) else {
            return;
        };
        match msg {
            Control::Hello { .. } => {}
            Control::Record { id, session, entry } => {
                let from = (state.node.clone(), state.info.region.clone());
                let delivered = self.record_inbox.as_ref().is_some_and(|inbox| {
                    inbox
                        .send(records::Inbound::Record(records::RelayedRecord {
                            from_node: from.0,
                            from_region: from.1,
                            session,
                            entry,
                            pipe,
                            id,
                        }))
                        .is_ok()
                });
                if !delivered {
                    let error = Some("this node does not record sessions".to_owned());
                    let _ = state.out.send(Control::RecordAck { id, error }.encode());
                }
            }
            Control::RecordingEnded { session, reason } => {
                if let Some(tx) = &self.recording_ended {
                    let _ = tx.send(records::Ended {
                        by: Some(state.node.clone()),
                        session,
                        reason: reason.chars().take(500).collect(),
                    });
                }
            }
            Control::RecordAck { id, error } => {
                if let Some((_, r)) = self.pending_records.remove(&id) {
                    let _ = r.send(match error {
                        None => Ok(()),
                        Some(e) => Err(records::RelayError::Refused(e)),
                    });
                }
            }
            Control::Heartbeat {
                load,
                draining,
                weight,
            } => {
                // A weight out of range counts as neutral rather than steering routing; it is
                // said once per pipe (heartbeats come every second).
                let weight = if weight > 0.0 && weight <= load::MAX_WEIGHT {
                    weight
                } else {
                    if !state.bad_weight_reported {
                        state.bad_weight_reported = true;
                        self.stats.control_errors.fetch_add(1, Relaxed);
                        tracing::warn!(node = %state.node, weight, "peer announced a routing weight outside (0, {}]; counting it as 1", load::MAX_WEIGHT);
                    }
                    1.0
                };
                self.membership.handle_heartbeat(
                    Instant::now(),
                    pipe,
                    Heartbeat {
                        load,
                        draining,
                        weight,
                    },
                );
            }
            Control::AdminRequest { id, call } => {
                // Operators' calls are rare: a peer sending more at once than an operator
                // could is answered at once, without work.
                if self.admin_in_flight.load(Relaxed) >= operators::MAX_IN_FLIGHT {
                    let reply = crate::proto::admin::AdminReply::Refused {
                        reason: "too many operators' calls at once; try again".into(),
                    };
                    let _ = state.out.send(Control::AdminAnswer { id, reply }.encode());
                    return;
                }
                let (reply, answer) = tokio::sync::oneshot::channel();
                let inbound = operators::Inbound {
                    from: state.node.clone(),
                    call,
                    reply,
                };
                let delivered = self
                    .admin_inbox
                    .as_ref()
                    .is_some_and(|inbox| inbox.send(inbound).is_ok());
                if !delivered {
                    let reply = crate::proto::admin::AdminReply::Refused {
                        reason: "this node serves no operators' calls".into(),
                    };
                    let _ = state.out.send(Control::AdminAnswer { id, reply }.encode());
                    return;
                }
                let out = state.out.clone();
                let in_flight = self.admin_in_flight.clone();
                in_flight.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let reply = match tokio::time::timeout(operators::ADMIN_WAIT, answer).await {
                        Ok(Ok(r)) => r,
                        _ => crate::proto::admin::AdminReply::Refused {
                            reason: "the node did not carry out the call in time".into(),
                        },
                    };
                    let _ = out.send(Control::AdminAnswer { id, reply }.encode());
                    in_flight.fetch_sub(1, Relaxed);
                });
            }
            Control::AdminAnswer { id, reply } => {
                // Only an answer on the pipe the call went out on counts.
                if self.pending_admin.get(&id).is_some_and(|(p, _)| *p == pipe) {
                    if let Some((_, r)) = self.pending_admin.remove(&id) {
                        let _ = r.send(Ok(reply));
                    }
                }
            }
            Control::Interest { session } => {
                self.hosts.set(&session, &state.node, true);
                state.interests.insert(session.clone());
                if let Some(m) = self.participants.get(&session) {
                    for p in m.values() {
                        let _ = state.out.send(joined_message(&session, p).encode());
                    }
                }
                if let Some(m) = self.producers.get(&session) {
                    for a in m.values() {
                        let _ = state
                            .out
                            .send(Control::ProducerAnnounce(a.clone()).encode());
                    }
                }
                let _ = state
                    .out
                    .send(Control::InterestReplayed { session }.encode());
            }
            Control::InterestReplayed { session } => {
                if let Some(waiting) = self.replaying.get_mut(&session) {
                    waiting.remove(&pipe);
                }
                self.settle_replays();
            }
            Control::InterestEnd { session } => {
                self.hosts.set(&session, &state.node, false);
                state.interests.remove(&session);
                // The worker hosting it now, or any that may still send it: a session that
                // just left one worker is not in `active` any more.
                match self.active.get(&session) {
                    Some(&w) => {
                        self.workers
                            .get(w)
                            .mesh_command(Command::PipeSessionEnded { pipe, session });
                    }
                    None => self.to_all(|| Command::PipeSessionEnded {
                        pipe,
                        session: session.clone(),
                    }),
                }
            }
            Control::ParticipantJoined {
                session,
                participant,
                user,
                role,
            } => {
                let cmd = Command::RemoteParticipantJoined {
                    pipe,
                    session: session.clone(),
                    participant: crate::sfu::ParticipantInfo {
                        participant_id: participant,
                        user_id: user,
                        role,
                    },
                };
                self.to_session(&session, cmd);
            }
            Control::ParticipantLeft {
                session,
                participant,
            } => {
                let cmd = Command::RemoteParticipantLeft {
                    session: session.clone(),
                    participant,
                };
                self.to_session(&session, cmd);
            }
            Control::ProducerAnnounce(announcement) => {
                if let Some(&w) = self.active.get(&announcement.session) {
                    let stream = announcement.stream;
                    // The reader learns the stream before the worker can ask for its media.
                    let _ = state.routes.send(RouteUpdate::Add { stream, worker: w });
                    let entry = RemoteProducer {
                        worker: w,
                        stream,
                        session: announcement.session.clone(),
                    };
                    if let Some(old) = state
                        .remote_producers
                        .insert(announcement.producer.clone(), entry)
                    {
                        if old.stream != stream {
                            let _ = state.routes.send(RouteUpdate::Remove(old.stream));
                        }
                        if old.worker != w {
                            // Re-announced for a session that moved: the old worker drops
                            // its copy.
                            self.workers.get(old.worker).mesh_command(
                                Command::RemoteProducerClosed {
                                    pipe,
                                    producer: announcement.producer.clone(),
                                },
                            );
                        }
                    }
                    self.workers
                        .get(w)
                        .mesh_command(Command::RemoteProducer { pipe, announcement });
                }
            }
            Control::ProducerClosed { producer } => {
                if let Some(r) = state.remote_producers.remove(&producer) {
                    let _ = state.routes.send(RouteUpdate::Remove(r.stream));
                    self.workers
                        .get(r.worker)
                        .mesh_command(Command::RemoteProducerClosed { pipe, producer });
                }
            }
            Control::ProducerPaused { producer, paused } => {
                if let Some(r) = state.remote_producers.get(&producer) {
                    self.workers
                        .get(r.worker)
                        .mesh_command(Command::RemoteProducerPaused {
                            pipe,
                            producer,
                            paused,
                        });
                }
            }
            Control::SenderReport {
                producer,
                layer,
                ntp,
                rtp,
            } => {
                if let Some(r) = state.remote_producers.get(&producer) {
                    self.workers
                        .get(r.worker)
                        .mesh_command(Command::RemoteSenderReport {
                            pipe,
                            producer,
                            layer,
                            ntp,
                            rtp,
                        });
                }
            }
            Control::LayerBitrates { producer, bitrates } => {
                if let Some(r) = state.remote_producers.get(&producer) {
                    self.workers
                        .get(r.worker)
                        .mesh_command(Command::RemoteLayerBitrates {
                            pipe,
                            producer,
                            bitrates,
                        });
                }
            }
            Control::Consume { producer, layers } => {
                self.to_producer(
                    &producer,
                    Command::PipeConsume {
                        pipe,
                        producer: producer.clone(),
                        layers,
                    },
                );
            }
            Control::StopConsume { producer } => {
                self.to_producer(
                    &producer,
                    Command::PipeConsume {
                        pipe,
                        producer: producer.clone(),
                        layers: 0,
                    },
                );
            }
            Control::KeyframeRequest { producer, layer } => {
                self.to_producer(
                    &producer,
                    Command::PipeKeyframe {
                        producer: producer.clone(),
                        layer,
                    },
                );
            }
        }
    }

    /// Sends a command to the worker owning local producer `producer`, if it still exists.
    fn to_producer(&self, producer: &ProducerId, cmd: Command) {
        if let Some(&w) = self.local_producers.get(producer) {
            self.workers.get(w).mesh_command(cmd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use wire::{MediaFrame, NackFrame};

    fn media(stream: u32) -> BytesMut {
        let mut b = BytesMut::new();
        MediaFrame::put_header(&mut b, stream, 0);
        b
    }

    #[test]
    fn pipe_datagrams_go_to_the_worker_of_their_stream() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut routes = StreamRoutes::new(rx);
        // Before the core says where a stream lives, frames go to worker 0 (which drops them).
        assert_eq!(routes.worker_for(&media(0x0300_0001), 4), 0);
        tx.send(RouteUpdate::Add {
            stream: 0x0300_0001,
            worker: 2,
        })
        .unwrap();
        assert_eq!(routes.worker_for(&media(0x0300_0001), 4), 2);
        // A resend request names our own stream: its top byte is our worker.
        let nack = NackFrame {
            stream: 0x0300_0009,
            layer: 0,
            seqs: vec![1],
        }
        .encode();
        assert_eq!(routes.worker_for(&nack, 4), 3);
        // A worker number past the node's workers (a confused peer) goes to worker 0.
        assert_eq!(routes.worker_for(&nack, 2), 0);
        tx.send(RouteUpdate::Remove(0x0300_0001)).unwrap();
        assert_eq!(routes.worker_for(&media(0x0300_0001), 4), 0);
        assert_eq!(routes.worker_for(&[0xff; 3], 4), 0);
    }
}
