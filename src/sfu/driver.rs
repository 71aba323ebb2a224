//! The media worker's driver: the thread, its UDP socket, the ICE-TCP writers, the pipes' QUIC
//! connections, the channels to signaling and the mesh, and the clock. It feeds the core
//! ([`Worker`]) inputs stamped with the time they were read and sends what the core left in
//! its output queues. Nothing here decides anything about media.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::tcp::TcpEvent;
use super::worker::Worker;
use super::{
    Command, PipeCounters, PipeId, WorkerConfig, WorkerEvent, WorkerHandle, WorkerStats,
    PIPE_MEDIA_QUEUE,
};

/// How often the core's periodic turn runs.
const TICK: Duration = Duration::from_millis(100);
const RECV_BATCH: usize = 16;
/// Pipe media datagrams handled per turn of the loop.
const PIPE_BATCH: usize = 64;

/// Binds the media socket (and the ICE-TCP listener on the same port number) and starts the
/// worker thread.
pub fn spawn_worker(cfg: WorkerConfig) -> io::Result<WorkerHandle> {
    let (socket, tcp_listener) = bind_media(&cfg)?;
    socket.set_nonblocking(true)?;
    let bound = socket.local_addr()?;
    let announced = SocketAddr::new(cfg.announced_ip, bound.port());
    let state = UdpSocketState::new((&socket).into())?;
    // Bursts of keyframes to many subscribers need room; failure only costs headroom.
    let _ = state.set_send_buffer_size((&socket).into(), 4 << 20);
    let _ = state.set_recv_buffer_size((&socket).into(), 4 << 20);
    let (tx, rx) = mpsc::unbounded_channel();
    let (pipe_media, pipe_rx) = mpsc::channel(PIPE_MEDIA_QUEUE);
    let stats = Arc::new(WorkerStats::default());
    let handle = WorkerHandle {
        tx,
        pipe_media,
        stats: stats.clone(),
        media_addr: announced,
    };
    std::thread::Builder::new()
        .name(format!("media-{}", cfg.index))
        .spawn(move || {
            crate::alloc::mark_worker_thread();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the media worker runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let fd = match tokio::net::UdpSocket::from_std(socket) {
                    Ok(fd) => fd,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot register the media socket");
                        return;
                    }
                };
                let (tcp_tx, tcp_rx) = mpsc::unbounded_channel();
                if let Some(l) = tcp_listener {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(super::tcp::accept_loop(l, tcp_tx, stats.clone()));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot register the ICE-TCP listener")
                        }
                    }
                }
                let mut driver = Driver {
                    index: usize::from(cfg.index),
                    mesh: cfg.mesh.clone(),
                    core: Worker::new(cfg, announced, stats.clone()),
                    socket: fd,
                    udp: state,
                    tcp_out: HashMap::new(),
                    pipes: HashMap::new(),
                    stats,
                };
                driver.run(rx, pipe_rx, tcp_rx).await;
            });
        })?;
    tracing::info!(bound = %bound, announced = %announced, "media worker started");
    Ok(handle)
}

/// The media socket, and the ICE-TCP listener on the same port number when TCP is on. With
/// port 0 the system picks a free UDP port whose TCP twin may be taken; another is tried then.
fn bind_media(cfg: &WorkerConfig) -> io::Result<(UdpSocket, Option<std::net::TcpListener>)> {
    let attempts = if cfg.listen.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let socket = UdpSocket::bind(cfg.listen)?;
        if !cfg.tcp {
            return Ok((socket, None));
        }
        let port = socket.local_addr()?.port();
        match std::net::TcpListener::bind(SocketAddr::new(cfg.listen.ip(), port)) {
            Ok(l) => {
                l.set_nonblocking(true)?;
                return Ok((socket, Some(l)));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// Everything of a worker that touches the outside world.
struct Driver {
    core: Worker,
    index: usize,
    socket: tokio::net::UdpSocket,
    udp: UdpSocketState,
    /// Writers of the open ICE-TCP connections.
    tcp_out: HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    /// The pipes' QUIC connections, to send datagrams on.
    pipes: HashMap<PipeId, (quinn::Connection, Arc<PipeCounters>)>,
    mesh: Option<mpsc::UnboundedSender<WorkerEvent>>,
    stats: Arc<WorkerStats>,
}

impl Driver {
    async fn run(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut pipe_rx: mpsc::Receiver<(PipeId, Bytes)>,
        mut tcp_rx: mpsc::UnboundedReceiver<TcpEvent>,
    ) {
        let mut pipe_batch: Vec<(PipeId, Bytes)> = Vec::with_capacity(PIPE_BATCH);
        let seg = self.udp.gro_segments().max(1);
        let buf_len = seg * self.core.cfg.max_datagram_bytes.max(1500);
        let mut bufs: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; buf_len]).collect();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.core.poll_timeout();
            let sleep = tokio::time::sleep_until(
                next_timer
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                    .into(),
            );
            // No branch is preferred: under a flood on one input (pipe media, the UDP socket)
            // the others are still served every few turns, each input in bounded batches.
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                n = pipe_rx.recv_many(&mut pipe_batch, PIPE_BATCH) => {
                    if n == 0 { break }
                    let now = Instant::now();
                    for (pipe, data) in pipe_batch.drain(..) {
                        self.core.handle_pipe_datagram(now, pipe, data);
                    }
                }
                ready = self.socket.readable() => {
                    if ready.is_err() { break }
                    self.receive(&mut bufs);
                }
                Some(ev) = tcp_rx.recv() => self.on_tcp(ev),
                _ = sleep, if next_timer.is_some() => self.core.handle_timeout(Instant::now()),
                _ = tick.tick() => {
                    for (pipe, (conn, _)) in &self.pipes {
                        self.core.set_pipe_rtt(*pipe, conn.rtt());
                    }
                    self.core.handle_tick(Instant::now());
                }
            }
            self.core.flush(Instant::now());
            self.send_outputs();
        }
        tracing::info!("media worker stopped");
    }

    /// Reads what the socket has (up to a batch) into the core.
    fn receive(&mut self, bufs: &mut [Vec<u8>]) {
        let mut meta = [RecvMeta::default(); RECV_BATCH];
        let res = {
            let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            for (s, b) in slices.iter_mut().zip(bufs.iter_mut()) {
                *s = IoSliceMut::new(b);
            }
            let (udp, sock) = (&self.udp, &self.socket);
            sock.try_io(Interest::READABLE, || {
                udp.recv(sock.into(), &mut slices, &mut meta)
            })
        };
        match res {
            Ok(n) => {
                let now = Instant::now();
                for (m, b) in meta.iter().zip(bufs.iter()).take(n) {
                    let stride = m.stride.max(1);
                    for chunk in b[..m.len].chunks(stride) {
                        self.core.handle_datagram(now, m.addr, m.dst_ip, chunk);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Counted; logged at the first failure and then ever more rarely, so a
                // failing socket cannot flood the log.
                let n = self.stats.recv_errors.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(error = %e, failures = n, "media socket receive failed");
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        // The QUIC connection stays here; the core learns of the pipe's node and counters.
        match &cmd {
            Command::PipeUp { pipe, link } => {
                self.pipes
                    .insert(*pipe, (link.conn.clone(), link.counters.clone()));
            }
            Command::PipeDown { pipe } => {
                self.pipes.remove(pipe);
            }
            Command::Stall(d) => {
                std::thread::sleep(*d);
                return;
            }
            _ => {}
        }
        self.core.handle_command(Instant::now(), cmd);
    }

    fn on_tcp(&mut self, ev: TcpEvent) {
        match ev {
            TcpEvent::Opened { peer, out } => {
                self.tcp_out.insert(peer, out);
                self.core.handle_tcp_opened(peer);
            }
            TcpEvent::Closed { peer } => {
                self.tcp_out.remove(&peer);
                self.core.handle_tcp_closed(peer);
            }
            TcpEvent::Frame { peer, data } => {
                self.core.handle_tcp_frame(Instant::now(), peer, data);
            }
        }
    }

    /// Sends what the core produced this turn: UDP datagrams in as few system calls as
    /// possible, ICE-TCP frames, pipe datagrams, and news for the mesh.
    fn send_outputs(&mut self) {
        let core = &mut self.core;
        if !core.batch.is_empty() {
            let f = core.batch.flush(self.socket.as_raw_fd());
            self.stats.datagrams_out.fetch_add(f.sent as u64, Relaxed);
            self.stats.bytes_out.fetch_add(f.bytes as u64, Relaxed);
            self.stats.send_errors.fetch_add(f.failed as u64, Relaxed);
            self.stats
                .send_syscalls
                .fetch_add(f.syscalls as u64, Relaxed);
        }
        for (peer, frame) in core.tcp_frames.drain(..) {
            let sent = self
                .tcp_out
                .get(&peer)
                .is_some_and(|out| out.try_send(frame).is_ok());
            if !sent {
                self.stats.send_errors.fetch_add(1, Relaxed);
            }
        }
        for peer in core.tcp_cut.drain(..) {
            // Dropping the writer ends the connection's task, which closes it.
            self.tcp_out.remove(&peer);
        }
        for (pipe, frame) in core.pipe_out.drain(..) {
            let Some((conn, counters)) = self.pipes.get(&pipe) else {
                continue;
            };
            let size = frame.len();
            if conn.datagram_send_buffer_space() < size {
                // quinn makes room by dropping the oldest queued datagrams, silently.
                counters.send_displaced.fetch_add(1, Relaxed);
            }
            // The figures count media; resend requests are counted as `nacked` by the core.
            let media = matches!(
                crate::proto::pipe::StreamRef::of(&frame),
                Some(crate::proto::pipe::StreamRef::Origin(_))
            );
            match conn.send_datagram(frame) {
                Ok(()) if media => {
                    counters.datagrams_out.fetch_add(1, Relaxed);
                    counters.bytes_out.fetch_add(size as u64, Relaxed);
                }
                Ok(()) => {}
                Err(_) => {
                    counters.send_failed.fetch_add(1, Relaxed);
                }
            }
        }
        for event in core.mesh_out.drain(..) {
            if let Some(m) = &self.mesh {
                let _ = m.send(WorkerEvent {
                    worker: self.index,
                    event,
                });
            }
        }
    }
}
