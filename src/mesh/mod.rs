//! The mesh plane: QUIC pipe transports between nodes, and the control protocol that makes a
//! session span nodes. Pipes relay producers with the same ProducerId on both sides.
//!
//! One task (the core) owns the mesh state: which sessions this node hosts, its producers,
//! and for each pipe which sessions the far end hosts. It turns the worker's [`MeshEvent`]s
//! into control messages and the peers' control messages into worker commands. Media frames
//! bypass the core: the worker sends datagrams itself, and each pipe's datagram reader hands
//! received frames straight to the worker.

pub mod tls;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::ids::{NodeId, ProducerId, RegionId, SessionId};
use crate::sfu::{Command, MeshEvent, PipeCounters, PipeId, PipeLink, WorkerHandle};
use tls::{NodeTls, TlsError, CLUSTER_SERVER_NAME};
use wire::{Control, ProducerAnnouncement, MAX_CONTROL, WIRE_VERSION};

/// What the mesh of one node needs.
#[derive(Clone)]
pub struct MeshConfig {
    pub node: NodeId,
    pub region: RegionId,
    /// UDP address of this node's QUIC endpoint.
    pub listen: SocketAddr,
    pub tls: NodeTls,
    /// Nodes this node dials (each pair of nodes needs to be listed on one side only).
    pub peers: Vec<SocketAddr>,
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
}

/// Mesh-wide counters.
#[derive(Debug, Default)]
pub struct MeshStats {
    pub pipes_open: AtomicU64,
    /// Pipe handshakes that failed: a peer refused our certificate or we refused theirs.
    pub handshakes_refused: AtomicU64,
    /// Control messages that did not decode; the pipe carrying them is closed.
    pub control_errors: AtomicU64,
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
}

struct PipeEntry {
    node: NodeId,
    conn: quinn::Connection,
    counters: Arc<PipeCounters>,
}

/// A running mesh.
pub struct MeshHandle {
    pub local_addr: SocketAddr,
    pub stats: Arc<MeshStats>,
    registry: Arc<Mutex<HashMap<PipeId, PipeEntry>>>,
    endpoint: quinn::Endpoint,
}

impl MeshHandle {
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
        self.endpoint.close(0u32.into(), b"node shutting down");
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
        node: NodeId,
        conn: quinn::Connection,
        out: mpsc::UnboundedSender<Bytes>,
    },
    Control {
        pipe: PipeId,
        msg: Control,
    },
    Closed {
        pipe: PipeId,
    },
}

/// Starts the endpoint, the dialers and the core.
pub fn start(
    cfg: MeshConfig,
    worker: WorkerHandle,
    events: mpsc::UnboundedReceiver<MeshEvent>,
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
    let stats = Arc::new(MeshStats::default());
    let registry = Arc::new(Mutex::new(HashMap::new()));
    let (itx, irx) = mpsc::unbounded_channel();
    let next_pipe = Arc::new(AtomicU64::new(1));
    let ctx = PipeCtx {
        node: cfg.node.clone(),
        region: cfg.region.clone(),
        worker: worker.clone(),
        internal: itx,
        stats: stats.clone(),
        next_pipe,
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
                        Ok(conn) => ctx.run_pipe(conn, false).await,
                        Err(e) => {
                            ctx.stats.handshakes_refused.fetch_add(1, Relaxed);
                            tracing::warn!(peer = %remote, error = %e, "refused a pipe handshake");
                        }
                    }
                });
            }
        });
    }
    // Outgoing pipes, re-dialed while the node runs.
    for addr in cfg.peers.clone() {
        let endpoint = endpoint.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                match endpoint.connect(addr, CLUSTER_SERVER_NAME) {
                    Ok(connecting) => match connecting.await {
                        Ok(conn) => ctx.run_pipe(conn, true).await,
                        Err(e) => {
                            ctx.stats.handshakes_refused.fetch_add(1, Relaxed);
                            tracing::warn!(peer = %addr, error = %e, "pipe handshake failed");
                        }
                    },
                    Err(e) => {
                        tracing::warn!(peer = %addr, error = %e, "cannot dial peer");
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let core = Core {
        node: cfg.node.clone(),
        worker,
        stats: stats.clone(),
        registry: registry.clone(),
        pipes: HashMap::new(),
        by_node: HashMap::new(),
        active: HashSet::new(),
        producers: HashMap::new(),
        participants: HashMap::new(),
    };
    tokio::spawn(core.run(events, irx));
    tracing::info!(node = %cfg.node, addr = %local_addr, peers = cfg.peers.len(), "mesh started");
    Ok(MeshHandle {
        local_addr,
        stats,
        registry,
        endpoint,
    })
}

/// What every pipe task shares.
#[derive(Clone)]
struct PipeCtx {
    node: NodeId,
    region: RegionId,
    worker: WorkerHandle,
    internal: mpsc::UnboundedSender<Internal>,
    stats: Arc<MeshStats>,
    next_pipe: Arc<AtomicU64>,
}

/// How long the `Hello` exchange may take before the pipe is given up.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

impl PipeCtx {
    fn hello(&self) -> Control {
        Control::Hello {
            version: WIRE_VERSION,
            node: self.node.clone(),
            region: self.region.clone(),
        }
    }

    /// Runs one established connection until it closes.
    async fn run_pipe(&self, conn: quinn::Connection, dialer: bool) {
        let peer = conn.remote_address();
        // quinn reports a successful handshake even when the server then refuses our client
        // certificate; only the Hello exchange proves the pipe is accepted on both sides.
        let setup = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (mut send, mut recv) = if dialer {
                conn.open_bi().await?
            } else {
                conn.accept_bi().await?
            };
            send.write_all(&self.hello().encode()).await?;
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
                return;
            }
            Err(_) => {
                self.stats.handshakes_refused.fetch_add(1, Relaxed);
                tracing::warn!(peer = %peer, "no Hello from peer in time");
                conn.close(1u32.into(), b"no hello");
                return;
            }
        };
        let Control::Hello { version, node, .. } = first else {
            self.stats.control_errors.fetch_add(1, Relaxed);
            conn.close(2u32.into(), b"first message must be hello");
            return;
        };
        if version != WIRE_VERSION {
            tracing::warn!(peer = %peer, version, "peer speaks another pipe protocol version");
            conn.close(3u32.into(), b"unsupported version");
            return;
        }
        let pipe = self.next_pipe.fetch_add(1, Relaxed);
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Bytes>();
        let _ = self.internal.send(Internal::Ready {
            pipe,
            node: node.clone(),
            conn: conn.clone(),
            out: out_tx,
        });
        tracing::info!(pipe, peer = %peer, node = %node, "pipe established");
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
            let worker = self.worker.clone();
            tokio::spawn(async move {
                while let Ok(data) = conn.read_datagram().await {
                    if !worker.mesh_command(Command::PipeDatagram { pipe, data }) {
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
                    tracing::warn!(pipe, node = %node, error = %e, "closing pipe after a bad control message");
                    conn.close(4u32.into(), b"malformed control message");
                    break;
                }
                Err(_) => break,
            }
        }
        conn.close(0u32.into(), b"done");
        writer.abort();
        datagrams.abort();
        let _ = self.internal.send(Internal::Closed { pipe });
    }
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
    out: mpsc::UnboundedSender<Bytes>,
    conn: quinn::Connection,
    /// Sessions the far end hosts.
    interests: HashSet<SessionId>,
}

struct Core {
    node: NodeId,
    worker: WorkerHandle,
    stats: Arc<MeshStats>,
    registry: Arc<Mutex<HashMap<PipeId, PipeEntry>>>,
    pipes: HashMap<PipeId, PipeState>,
    by_node: HashMap<NodeId, PipeId>,
    /// Sessions hosted here.
    active: HashSet<SessionId>,
    /// Local producers by session, to announce to nodes that become interested.
    producers: HashMap<SessionId, HashMap<ProducerId, ProducerAnnouncement>>,
    /// Local participants by session, likewise.
    participants:
        HashMap<SessionId, HashMap<crate::ids::ParticipantId, crate::sfu::ParticipantInfo>>,
}

impl Core {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<MeshEvent>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        loop {
            tokio::select! {
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

    fn send_interested(&self, session: &SessionId, msg: &Control) {
        let enc = msg.encode();
        for p in self.pipes.values() {
            if p.interests.contains(session) {
                let _ = p.out.send(enc.clone());
            }
        }
    }

    fn on_event(&mut self, ev: MeshEvent) {
        match ev {
            MeshEvent::SessionActive(session) => {
                let msg = Control::Interest {
                    session: session.clone(),
                };
                for &pipe in self.pipes.keys() {
                    self.send(pipe, &msg);
                }
                self.active.insert(session);
            }
            MeshEvent::SessionInactive(session) => {
                let msg = Control::InterestEnd {
                    session: session.clone(),
                };
                for &pipe in self.pipes.keys() {
                    self.send(pipe, &msg);
                }
                self.active.remove(&session);
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
                self.send_interested(&a.session, &Control::ProducerAnnounce(a.clone()));
                self.producers
                    .entry(a.session.clone())
                    .or_default()
                    .insert(a.producer.clone(), a);
            }
            MeshEvent::ProducerClosed { session, producer } => {
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
        }
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Ready {
                pipe,
                node,
                conn,
                out,
            } => {
                if node == self.node {
                    conn.close(5u32.into(), b"connected to itself");
                    return;
                }
                if self.by_node.contains_key(&node) {
                    // Both ends dialed: keep the pipe that exists.
                    conn.close(6u32.into(), b"duplicate pipe");
                    return;
                }
                let counters = Arc::new(PipeCounters::default());
                if let Ok(mut reg) = self.registry.lock() {
                    reg.insert(
                        pipe,
                        PipeEntry {
                            node: node.clone(),
                            conn: conn.clone(),
                            counters: counters.clone(),
                        },
                    );
                }
                self.worker.mesh_command(Command::PipeUp {
                    pipe,
                    link: PipeLink {
                        conn: conn.clone(),
                        node: node.clone(),
                        counters,
                    },
                });
                self.by_node.insert(node.clone(), pipe);
                self.pipes.insert(
                    pipe,
                    PipeState {
                        node,
                        out,
                        conn,
                        interests: HashSet::new(),
                    },
                );
                self.stats.pipes_open.fetch_add(1, Relaxed);
                for session in &self.active {
                    self.send(
                        pipe,
                        &Control::Interest {
                            session: session.clone(),
                        },
                    );
                }
            }
            Internal::Closed { pipe } => {
                if let Some(p) = self.pipes.remove(&pipe) {
                    self.by_node.remove(&p.node);
                    p.conn.close(0u32.into(), b"closed");
                    self.stats.pipes_open.fetch_sub(1, Relaxed);
                    if let Ok(mut reg) = self.registry.lock() {
                        reg.remove(&pipe);
                    }
                    self.worker.mesh_command(Command::PipeDown { pipe });
                    tracing::info!(pipe, node = %p.node, "pipe closed");
                }
            }
            Internal::Control { pipe, msg } => self.on_control(pipe, msg),
        }
    }

    fn on_control(&mut self, pipe: PipeId, msg: Control) {
        let Some(state) = self.pipes.get_mut(&pipe) else {
            return;
        };
        let w = &self.worker;
        match msg {
            Control::Hello { .. } => {}
            Control::Interest { session } => {
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
            }
            Control::InterestEnd { session } => {
                state.interests.remove(&session);
                w.mesh_command(Command::PipeSessionEnded { pipe, session });
            }
            Control::ParticipantJoined {
                session,
                participant,
                user,
                role,
            } => {
                if self.active.contains(&session) {
                    w.mesh_command(Command::RemoteParticipantJoined {
                        pipe,
                        session,
                        participant: crate::sfu::ParticipantInfo {
                            participant_id: participant,
                            user_id: user,
                            role,
                        },
                    });
                }
            }
            Control::ParticipantLeft {
                session,
                participant,
            } => {
                w.mesh_command(Command::RemoteParticipantLeft {
                    session,
                    participant,
                });
            }
            Control::ProducerAnnounce(announcement) => {
                if self.active.contains(&announcement.session) {
                    w.mesh_command(Command::RemoteProducer { pipe, announcement });
                }
            }
            Control::ProducerClosed { producer } => {
                w.mesh_command(Command::RemoteProducerClosed { pipe, producer });
            }
            Control::ProducerPaused { producer, paused } => {
                w.mesh_command(Command::RemoteProducerPaused {
                    pipe,
                    producer,
                    paused,
                });
            }
            Control::Consume { producer, layers } => {
                w.mesh_command(Command::PipeConsume {
                    pipe,
                    producer,
                    layers,
                });
            }
            Control::StopConsume { producer } => {
                w.mesh_command(Command::PipeConsume {
                    pipe,
                    producer,
                    layers: 0,
                });
            }
            Control::KeyframeRequest { producer, layer } => {
                w.mesh_command(Command::PipeKeyframe { producer, layer });
            }
            Control::LayerBitrates { producer, bitrates } => {
                w.mesh_command(Command::RemoteLayerBitrates {
                    pipe,
                    producer,
                    bitrates,
                });
            }
        }
    }
}
