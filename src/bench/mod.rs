//! Benchmarks that drive a node over real UDP with DTLS-SRTP from a separate process and
//! measure the node process alone: CPU per forwarded packet, packet rates, memory per
//! subscriber, forwarding latency and loss. Results are printed and returned; nothing here
//! asserts a speed.

pub mod janus;
pub mod plot;
pub mod sessions;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::auth::{Role, TokenSigner};
use crate::client::peer::{PeerState, RtcPeer, TestCodec};
use crate::client::signal::{SignalClient, SignalError};
use crate::procfs;

/// Where the node under test is and how to get in.
pub struct Target {
    /// WebSocket signaling URL.
    pub ws_url: String,
    /// Signaling address.
    pub http_addr: std::net::SocketAddr,
    /// Metrics listener, for `/metrics`.
    pub metrics_addr: std::net::SocketAddr,
    /// The node's process, measured from /proc.
    pub pid: u32,
    pub signer: TokenSigner,
}

/// A node running as a child process of the benchmark, on free loopback ports.
pub struct SpawnedNode {
    child: std::process::Child,
    http_addr: std::net::SocketAddr,
    metrics_addr: std::net::SocketAddr,
    secret: String,
    log: std::path::PathBuf,
}

/// A spawned node's place in a mesh: its pipe listen address, the peers it dials, its
/// certificate files.
pub type MeshSetup = (
    std::net::SocketAddr,
    Vec<std::net::SocketAddr>,
    crate::mesh::tls::NodeFiles,
);

impl SpawnedNode {
    /// Writes a config into `dir` and starts `meridian serve` with it, with `workers` media
    /// workers (each on a free port), in a mesh when `mesh` says so.
    pub fn start(
        dir: &std::path::Path,
        name: &str,
        mesh: Option<MeshSetup>,
        workers: usize,
    ) -> std::io::Result<SpawnedNode> {
        Self::start_with(dir, name, mesh, workers, "")
    }

    /// [`SpawnedNode::start`] with more configuration (whole TOML tables) appended.
    pub fn start_with(
        dir: &std::path::Path,
        name: &str,
        mesh: Option<MeshSetup>,
        workers: usize,
        extra: &str,
    ) -> std::io::Result<SpawnedNode> {
        Self::start_with_env(dir, name, mesh, workers, extra, &[])
    }

    /// [`SpawnedNode::start_with`] with environment variables for the node (`MERIDIAN__…`
    /// overrides any configuration key).
    pub fn start_with_env(
        dir: &std::path::Path,
        name: &str,
        mesh: Option<MeshSetup>,
        workers: usize,
        extra: &str,
        env: &[(&str, &str)],
    ) -> std::io::Result<SpawnedNode> {
        std::fs::create_dir_all(dir)?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        // Free ports, found by binding (and released just before the node binds them).
        let ports = (0..workers.max(1))
            .map(|_| {
                let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
                let t = std::net::TcpListener::bind(s.local_addr()?)?;
                Ok((s, t))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let port_list: Vec<String> = ports
            .iter()
            .map(|(s, _)| s.local_addr().map(|a| a.port().to_string()))
            .collect::<std::io::Result<_>>()?;
        drop(ports);
        // All nodes of one run share the secret so one signer serves them all.
        let secret = std::fs::read_to_string(dir.join("secret")).unwrap_or_else(|_| {
            let s = format!(
                "{:032x}{:032x}",
                rand::random::<u128>(),
                rand::random::<u128>()
            );
            let _ = std::fs::write(dir.join("secret"), &s);
            s
        });
        let mut text = format!(
            "[node]\nregion = \"{name}\"\nlatitude = 0.0\nlongitude = 0.0\n\
             [signaling]\nlisten = \"{http}\"\n\
             # Every load-generator connection comes from one address.\n\
             max_connections_per_source = 8192\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [rtc]\nlisten_ip = \"127.0.0.1\"\nannounced_ip = \"127.0.0.1\"\nport = 0\nports = [{}]\n\
             [auth]\nissuer = \"bench\"\naudience = \"meridian\"\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\n\
             [limits]\nmax_participants_per_session = 1000\nmax_consumers_per_participant = 8\n",
            port_list.join(", ")
        );
        if let Some((listen, peers, files)) = mesh {
            let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
            text.push_str(&format!(
                "[mesh]\nlisten = \"{listen}\"\npeers = [{}]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                peers.join(", "),
                files.ca_file,
                files.cert_file,
                files.key_file
            ));
        }
        text.push_str(extra);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text)?;
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(SpawnedNode {
            child,
            http_addr: http,
            metrics_addr: metrics,
            secret,
            log,
        })
    }

    /// Waits until the node answers on its signaling port.
    pub async fn wait_ready(&self) -> Result<(), BenchError> {
        let started = Instant::now();
        while tokio::net::TcpStream::connect(self.http_addr)
            .await
            .is_err()
        {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(BenchError::Sfu(format!(
                    "the node did not start; see {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn target(&self) -> Target {
        Target {
            ws_url: format!("ws://{}/v1/ws", self.http_addr),
            http_addr: self.http_addr,
            metrics_addr: self.metrics_addr,
            pid: self.child.id(),
            signer: TokenSigner::hs256(self.secret.as_bytes(), "bench", "meridian"),
        }
    }
}

impl Drop for SpawnedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One fan-out run.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    pub subscribers: Vec<usize>,
    /// Measurement window per step.
    pub seconds: u64,
    pub warmup_seconds: u64,
    /// The publisher's video bitrate.
    pub bitrate_kbps: u64,
    /// RTP payload size; packets per second follow from the bitrate.
    pub payload_bytes: usize,
}

/// Figures of one step (one number of subscribers).
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub subscribers: usize,
    pub window_s: f64,
    pub packets_in_per_s: f64,
    pub packets_out_per_s: f64,
    /// Node CPU time divided by packets forwarded in the window.
    pub cpu_us_per_forwarded_packet: f64,
    /// The part of it spent in user space (the SFU's own code and libraries), from the
    /// process's user and system clock ticks; the rest is the kernel's (sockets, scheduling).
    #[serde(default)]
    pub user_us_per_forwarded_packet: Option<f64>,
    /// Node CPU as a share of one core.
    pub cpu_percent_of_core: f64,
    pub rss_kib: u64,
    pub rss_kib_per_subscriber: f64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
    pub loss_percent: f64,
    /// CPU used by everything other than the node and this load generator, share of one core.
    pub other_cpu_percent_of_core: f64,
    /// True when other processes used enough CPU to make the figures doubtful.
    pub disturbed: bool,
    /// Heap allocations on Meridian's media thread per forwarded packet, in Meridian's own
    /// code and inside the rtc crate (`None` for other SFUs).
    #[serde(default)]
    pub allocs_per_packet_meridian: Option<f64>,
    /// Of the same, those made while writing the copies themselves (Meridian's code and
    /// rtc's sender, `code="copy_path"`): the in-place path's target is zero.
    #[serde(default)]
    pub allocs_per_copy: Option<f64>,
    #[serde(default)]
    pub allocs_per_packet_rtc: Option<f64>,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("signaling: {0}")]
    Signal(#[from] SignalError),
    #[error("peer: {0}")]
    Client(#[from] crate::client::peer::ClientError),
    #[error("cannot mint a token: {0}")]
    Token(#[from] crate::auth::MintError),
    #[error("cannot read the node's figures: {0}")]
    Metrics(String),
    #[error("the SFU under test did not do its part: {0}")]
    Sfu(String),
}

/// The media thread's allocation counters (Meridian's code, rtc, the copy path) from
/// `/metrics`.
async fn media_allocations(addr: std::net::SocketAddr) -> Option<(u64, u64, u64)> {
    let body = metrics_text(addr).await.ok()?;
    let find = |code: &str| {
        body.lines()
            .find(|l| {
                l.starts_with("meridian_allocations_total{")
                    && l.contains("thread=\"media\"")
                    && l.contains(&format!("code=\"{code}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    Some((find("meridian")?, find("rtc")?, find("copy_path")?))
}

async fn metrics_text(addr: std::net::SocketAddr) -> Result<String, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| BenchError::Metrics(e.to_string()))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .map_err(|e| BenchError::Metrics(e.to_string()))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .await
        .map_err(|e| BenchError::Metrics(e.to_string()))?;
    Ok(body)
}

/// Scrapes one counter from the node's `/metrics`: the sum of its series (one per worker).
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> Result<u64, BenchError> {
    let body = metrics_text(addr).await?;
    let values: Vec<u64> = body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    if values.is_empty() {
        return Err(BenchError::Metrics(format!("{name} not found")));
    }
    Ok(values.iter().sum())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Peers running against some SFU: one publisher and its subscribers, and the signaling
/// connections that keep them in their session (none for Janus).
struct Load {
    publisher: Arc<PeerState>,
    publisher_task: tokio::task::JoinHandle<()>,
    subscribers: Vec<(Arc<PeerState>, tokio::task::JoinHandle<()>)>,
    signals: Vec<SignalClient>,
}

impl Load {
    fn new(publisher: Arc<PeerState>, publisher_task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            publisher,
            publisher_task,
            subscribers: Vec::new(),
            signals: Vec::new(),
        }
    }

    async fn stop(self) {
        for (s, _) in &self.subscribers {
            s.stop.store(true, Ordering::Relaxed);
        }
        for (_, t) in self.subscribers {
            let _ = t.await;
        }
        self.publisher.stop.store(true, Ordering::Relaxed);
        let _ = self.publisher_task.await;
        for s in self.signals {
            s.leave().await;
        }
    }

    /// One-way latencies (µs) of everything the subscribers received in [t0, t1), sorted.
    fn latencies(&self, t0: Instant, t1: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        for (s, _) in &self.subscribers {
            let got = s.received.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                got.iter()
                    .filter(|r| r.at >= t0 && r.at < t1)
                    .map(|r| r.latency.as_micros() as u64),
            );
        }
        out.sort_unstable();
        out
    }
}

fn publisher_state(cfg: &FanoutConfig) -> Arc<PeerState> {
    let state = Arc::new(PeerState::default());
    let pps = (cfg.bitrate_kbps * 1000 / 8) as f64 / cfg.payload_bytes as f64;
    state
        .packet_interval_us
        .store((1e6 / pps.max(1.0)) as u64, Ordering::Relaxed);
    state
        .payload_bytes
        .store(cfg.payload_bytes as u64, Ordering::Relaxed);
    state
}

/// CPU of the measured processes, of this load generator and of the machine over a window.
struct Window {
    t0: Instant,
    t1: Instant,
    /// CPU seconds of each measured process.
    cpu_s: Vec<f64>,
    /// Of that, the share spent in user space (the rest is the kernel's), per process.
    user_share: Vec<Option<f64>>,
    /// CPU of everything else, as a share of one core.
    other_percent: f64,
    /// Packets the publisher sent.
    sent: u64,
}

impl Window {
    async fn measure(pids: &[u32], publisher: &PeerState, seconds: u64) -> Window {
        let snap = || {
            (
                pids.iter()
                    .map(|&p| procfs::process_cpu_ns(p).unwrap_or(0))
                    .collect::<Vec<_>>(),
                procfs::process_cpu_ns(std::process::id()).unwrap_or(0),
                procfs::machine_cpu_ticks().unwrap_or((0, 0)).0,
                publisher.packets_sent.load(Ordering::Relaxed),
                pids.iter()
                    .map(|&p| procfs::user_system_ticks(p).unwrap_or((0, 0)))
                    .collect::<Vec<_>>(),
            )
        };
        let (c0, me0, m0, s0, us0) = snap();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let t1 = Instant::now();
        let (c1, me1, m1, s1, us1) = snap();
        let user_share = us0
            .iter()
            .zip(&us1)
            .map(|(&(u0, s0), &(u1, s1))| {
                let (u, s) = (u1.saturating_sub(u0), s1.saturating_sub(s0));
                (u + s > 0).then(|| u as f64 / (u + s) as f64)
            })
            .collect();
        let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
        let cpu_s: Vec<f64> = c0.iter().zip(&c1).map(|(a, b)| secs(*a, *b)).collect();
        let busy = m1.saturating_sub(m0) as f64 / procfs::ticks_per_second() as f64;
        let window = (t1 - t0).as_secs_f64();
        let other = (busy - cpu_s.iter().sum::<f64>() - secs(me0, me1)).max(0.0) / window * 100.0;
        Window {
            t0,
            t1,
            cpu_s,
            user_share,
            other_percent: other,
            sent: s1.saturating_sub(s0),
        }
    }

    fn seconds(&self) -> f64 {
        (self.t1 - self.t0).as_secs_f64()
    }
}

fn per(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

fn loss_percent(expected: usize, received: usize) -> f64 {
    if expected == 0 {
        return 0.0;
    }
    (1.0 - received as f64 / expected as f64).max(0.0) * 100.0
}

/// Measures one window the same way for any SFU: its process's CPU and memory from /proc,
/// packets from what the peers sent and received.
async fn measure(
    pid: u32,
    load: &Load,
    rss_base: u64,
    cfg: &FanoutConfig,
    metrics: Option<std::net::SocketAddr>,
) -> FanoutResult {
    let n = load.subscribers.len();
    let a0 = match metrics {
        Some(m) => media_allocations(m).await,
        None => None,
    };
    let w = Window::measure(&[pid], &load.publisher, cfg.seconds).await;
    let a1 = match metrics {
        Some(m) => media_allocations(m).await,
        None => None,
    };
    let rss = procfs::rss_kib(pid).unwrap_or(0);
    let latencies = load.latencies(w.t0, w.t1);
    // Packets forwarded = packets the subscribers received: the same definition for every SFU.
    let forwarded = latencies.len();
    FanoutResult {
        subscribers: n,
        window_s: w.seconds(),
        packets_in_per_s: w.sent as f64 / w.seconds(),
        packets_out_per_s: forwarded as f64 / w.seconds(),
        cpu_us_per_forwarded_packet: per(w.cpu_s[0] * 1e6, forwarded as f64),
        user_us_per_forwarded_packet: w.user_share[0]
            .map(|share| per(w.cpu_s[0] * share * 1e6, forwarded as f64)),
        cpu_percent_of_core: w.cpu_s[0] / w.seconds() * 100.0,
        rss_kib: rss,
        rss_kib_per_subscriber: rss.saturating_sub(rss_base) as f64 / n.max(1) as f64,
        latency_p50_us: percentile(&latencies, 0.50),
        latency_p99_us: percentile(&latencies, 0.99),
        latency_max_us: latencies.last().copied().unwrap_or(0),
        loss_percent: loss_percent(w.sent as usize * n, forwarded),
        other_cpu_percent_of_core: w.other_percent,
        disturbed: w.other_percent > 15.0,
        allocs_per_packet_meridian: a0
            .zip(a1)
            .map(|((m0, _, _), (m1, _, _))| per(m1.saturating_sub(m0) as f64, forwarded as f64)),
        allocs_per_packet_rtc: a0
            .zip(a1)
            .map(|((_, r0, _), (_, r1, _))| per(r1.saturating_sub(r0) as f64, forwarded as f64)),
        allocs_per_copy: a0
            .zip(a1)
            .map(|((_, _, c0), (_, _, c1))| per(c1.saturating_sub(c0) as f64, forwarded as f64)),
    }
}

fn session_for(kind: &str, step: usize) -> crate::ids::SessionId {
    format!("{kind}-{}-{step}", std::process::id())
        .parse()
        .expect("letters, digits and dashes make a valid session id")
}

fn mint(
    target: &Target,
    session: &crate::ids::SessionId,
    user: &str,
    role: Role,
) -> Result<String, BenchError> {
    let user = user
        .parse()
        .expect("the benchmark's user names are valid ids");
    Ok(target
        .signer
        .mint(session, &user, role, Duration::from_secs(3600))?)
}

/// Publishes from a new user on a Meridian node; returns the load (publisher running) and the
/// producer id.
async fn meridian_publisher(
    target: &Target,
    session: &crate::ids::SessionId,
    cfg: &FanoutConfig,
) -> Result<(Load, String), BenchError> {
    let (mut sig, _) =
        SignalClient::join(&target.ws_url, &mint(target, session, "pub", Role::User)?).await?;
    let mut publisher = RtcPeer::publisher_with(TestCodec::Vp8).await?;
    let reply = sig
        .request(json!({"type":"publish","sdp":publisher.offer()?}))
        .await?;
    publisher.answer(reply["sdp"].as_str().unwrap_or_default())?;
    let producer = reply["producers"][0]["producerId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let state = publisher_state(cfg);
    let task = publisher.spawn(state.clone());
    let mut load = Load::new(state, task);
    load.signals.push(sig);
    Ok((load, producer))
}

/// Subscribes an already joined participant to `producer` and adds it to the load.
async fn meridian_subscriber(
    load: &mut Load,
    mut sig: SignalClient,
    producer: &str,
) -> Result<(), BenchError> {
    let mut peer = RtcPeer::subscriber_with(TestCodec::Vp8).await?;
    let reply = sig
        .request(json!({"type":"subscribe","producerId":producer,"sdp":peer.offer()?}))
        .await?;
    peer.answer(reply["sdp"].as_str().unwrap_or_default())?;
    let state = Arc::new(PeerState::default());
    let task = peer.spawn(state.clone());
    load.subscribers.push((state, task));
    load.signals.push(sig);
    Ok(())
}

/// 1 publisher, N subscribers on one Meridian node, for each N in `cfg.subscribers`.
pub async fn run_fanout(
    target: &Target,
    cfg: &FanoutConfig,
) -> Result<Vec<FanoutResult>, BenchError> {
    let mut results = Vec::new();
    for (step, &n) in cfg.subscribers.iter().enumerate() {
        let session = session_for("bench", step);
        let (mut load, producer) = meridian_publisher(target, &session, cfg).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_base = procfs::rss_kib(target.pid).unwrap_or(0);
        for i in 0..n {
            let token = mint(target, &session, &format!("sub{i}"), Role::Agent)?;
            let (sig, _) = SignalClient::join(&target.ws_url, &token).await?;
            meridian_subscriber(&mut load, sig, &producer).await?;
        }
        tokio::time::sleep(Duration::from_secs(cfg.warmup_seconds)).await;
        results.push(measure(target.pid, &load, rss_base, cfg, Some(target.metrics_addr)).await);
        load.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(results)
}

/// The same fan-out against Janus's VideoRoom, a fresh room per step.
pub async fn run_fanout_janus(
    janus: &janus::JanusProcess,
    cfg: &FanoutConfig,
) -> Result<Vec<FanoutResult>, BenchError> {
    use janus::{jsep_event, JanusClient};
    janus.wait_ready().await?;
    let mut results = Vec::new();
    for (step, &n) in cfg.subscribers.iter().enumerate() {
        let client = JanusClient::connect(janus.http).await?;
        let room = 4000 + step as u64 + (std::process::id() as u64 % 1000) * 100;
        let (admin, _) = client.attach().await?;
        client
            .message(
                admin,
                json!({"request":"create","room":room,"publishers":4,"videocodec":"vp8","bitrate":0,"notify_joining":false}),
                None,
            )
            .await?;
        let (ph, mut pev) = client.attach().await?;
        let mut publisher = RtcPeer::on(janus.client_ip, true, TestCodec::Vp8).await?;
        let offer = publisher.offer()?;
        client
            .message(
                ph,
                json!({"request":"joinandconfigure","room":room,"ptype":"publisher","audio":false,"video":true}),
                Some(json!({"type":"offer","sdp":offer})),
            )
            .await?;
        client.trickle_done(ph).await?;
        let joined = jsep_event(&mut pev).await?;
        publisher.answer(joined["jsep"]["sdp"].as_str().unwrap_or_default())?;
        let feed = joined["plugindata"]["data"]["id"].clone();
        let pstate = publisher_state(cfg);
        let ptask = publisher.spawn(pstate.clone());
        // Janus lists a publisher as a feed only once its connection is up.
        let since = Instant::now();
        while !pstate.connected.load(Ordering::Relaxed) {
            if since.elapsed() > Duration::from_secs(10) {
                return Err(BenchError::Sfu(format!(
                    "the publisher never connected to janus; see {}",
                    janus.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_base = procfs::rss_kib(janus.pid()).unwrap_or(0);
        let mut load = Load::new(pstate, ptask);
        for _ in 0..n {
            let (sh, mut sev) = client.attach().await?;
            client
                .message(
                    sh,
                    json!({"request":"join","room":room,"ptype":"subscriber","streams":[{"feed":feed}]}),
                    None,
                )
                .await?;
            let offered = jsep_event(&mut sev).await?;
            let mut peer = RtcPeer::on(janus.client_ip, false, TestCodec::Vp8).await?;
            let answer = peer.answer_offer(offered["jsep"]["sdp"].as_str().unwrap_or_default())?;
            client
                .message(
                    sh,
                    json!({"request":"start","room":room}),
                    Some(json!({"type":"answer","sdp":answer})),
                )
                .await?;
            client.trickle_done(sh).await?;
            let state = Arc::new(PeerState::default());
            let task = peer.spawn(state.clone());
            load.subscribers.push((state, task));
        }
        tokio::time::sleep(Duration::from_secs(cfg.warmup_seconds)).await;
        results.push(measure(janus.pid(), &load, rss_base, cfg, None).await);
        load.stop().await;
        let _ = client
            .message(admin, json!({"request":"destroy","room":room}), None)
            .await;
        drop(client);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(results)
}

/// Figures of one cascade step.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeResult {
    pub subscribers: usize,
    pub window_s: f64,
    pub published_packets_per_s: f64,
    /// Media bytes the origin sent on the pipe per second, and per published packet.
    pub pipe_kbit_per_s: f64,
    pub pipe_datagrams_per_published_packet: f64,
    /// Origin CPU per packet relayed onto the pipe.
    pub origin_cpu_us_per_packet: f64,
    /// Edge CPU per packet forwarded to a subscriber.
    pub edge_cpu_us_per_forwarded_packet: f64,
    /// Publisher → origin → pipe → edge → subscriber.
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
    pub loss_percent: f64,
    pub other_cpu_percent_of_core: f64,
    pub disturbed: bool,
}

/// 1 publisher on `origin`, N subscribers on `edge`, for each N in `cfg.subscribers`.
pub async fn run_cascade(
    origin: &Target,
    edge: &Target,
    cfg: &FanoutConfig,
) -> Result<Vec<CascadeResult>, BenchError> {
    // Wait for the pipe.
    let started = Instant::now();
    while metric(origin.metrics_addr, "meridian_pipe_bytes_out_total")
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(BenchError::Sfu(
                "the pipe between the nodes did not come up".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut results = Vec::new();
    for (step, &n) in cfg.subscribers.iter().enumerate() {
        let session = session_for("cascade", step);
        // The edge hosts the session first, so the origin announces the producer to it.
        let mut edge_signals = Vec::new();
        for i in 0..n {
            let token = mint(edge, &session, &format!("sub{i}"), Role::Agent)?;
            edge_signals.push(SignalClient::join(&edge.ws_url, &token).await?.0);
        }
        let (mut load, producer) = meridian_publisher(origin, &session, cfg).await?;
        if let Some(first) = edge_signals.first_mut() {
            loop {
                let ev = first.event("producerAdded").await?;
                if ev["producer"]["producerId"] == producer.as_str() {
                    break;
                }
            }
        }
        for sig in edge_signals {
            meridian_subscriber(&mut load, sig, &producer).await?;
        }
        tokio::time::sleep(Duration::from_secs(cfg.warmup_seconds)).await;

        let pipe0 = metric(origin.metrics_addr, "meridian_pipe_bytes_out_total").await?;
        let w = Window::measure(&[origin.pid, edge.pid], &load.publisher, cfg.seconds).await;
        let pipe1 = metric(origin.metrics_addr, "meridian_pipe_bytes_out_total").await?;
        let latencies = load.latencies(w.t0, w.t1);
        let secs = w.seconds();
        let published = w.sent as f64;
        let pipe_bytes = pipe1.saturating_sub(pipe0) as f64;
        // One media frame per published packet: frame header + RTP header + payload.
        let frame_bytes = (cfg.payload_bytes + 12 + crate::proto::pipe::FRAME_HEADER) as f64;
        results.push(CascadeResult {
            subscribers: n,
            window_s: secs,
            published_packets_per_s: published / secs,
            pipe_kbit_per_s: pipe_bytes * 8.0 / secs / 1e3,
            pipe_datagrams_per_published_packet: per(pipe_bytes / frame_bytes, published),
            origin_cpu_us_per_packet: per(w.cpu_s[0] * 1e6, published),
            edge_cpu_us_per_forwarded_packet: per(w.cpu_s[1] * 1e6, latencies.len() as f64),
            latency_p50_us: percentile(&latencies, 0.50),
            latency_p99_us: percentile(&latencies, 0.99),
            latency_max_us: latencies.last().copied().unwrap_or(0),
            loss_percent: loss_percent(w.sent as usize * n, latencies.len()),
            other_cpu_percent_of_core: w.other_percent,
            disturbed: w.other_percent > 15.0,
        });
        load.stop().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(results)
}

pub fn cascade_table(results: &[CascadeResult]) -> String {
    let mut out = String::from(
        "subs  pub_pkts/s  pipe_kbit/s  pipe_copies/pkt  origin_us/pkt  edge_us/pkt  lat_p50_us  lat_p99_us  lat_max_us  loss%  other%core\n",
    );
    for r in results {
        out.push_str(&format!(
            "{:>4}  {:>10.0}  {:>11.0}  {:>15.3}  {:>13.2}  {:>11.2}  {:>10}  {:>10}  {:>10}  {:>5.2}  {:>8.1}{}\n",
            r.subscribers,
            r.published_packets_per_s,
            r.pipe_kbit_per_s,
            r.pipe_datagrams_per_published_packet,
            r.origin_cpu_us_per_packet,
            r.edge_cpu_us_per_forwarded_packet,
            r.latency_p50_us,
            r.latency_p99_us,
            r.latency_max_us,
            r.loss_percent,
            r.other_cpu_percent_of_core,
            if r.disturbed { "  DISTURBED" } else { "" },
        ));
    }
    out
}

/// CPU per forwarded packet and latency against subscribers, as SVG.
pub fn fanout_svg(series: &[(&str, &[FanoutResult])]) -> String {
    let line = |f: &dyn Fn(&FanoutResult) -> f64| -> Vec<plot::Series> {
        series
            .iter()
            .map(|(name, rs)| plot::Series {
                name: (*name).to_owned(),
                points: rs.iter().map(|r| (r.subscribers as f64, f(r))).collect(),
            })
            .collect()
    };
    plot::svg(
        "1 publisher fanned out to N subscribers on one node",
        "subscribers",
        &[
            plot::Panel {
                title: "CPU per forwarded packet",
                y_label: "µs",
                series: line(&|r| r.cpu_us_per_forwarded_packet),
            },
            plot::Panel {
                title: "Latency p50 / p99",
                y_label: "µs",
                series: series
                    .iter()
                    .flat_map(|(name, rs)| {
                        [
                            plot::Series {
                                name: format!("{name} p50"),
                                points: rs
                                    .iter()
                                    .map(|r| (r.subscribers as f64, r.latency_p50_us as f64))
                                    .collect(),
                            },
                            plot::Series {
                                name: format!("{name} p99"),
                                points: rs
                                    .iter()
                                    .map(|r| (r.subscribers as f64, r.latency_p99_us as f64))
                                    .collect(),
                            },
                        ]
                    })
                    .collect(),
            },
        ],
    )
}

/// A fixed-width table of results.
pub fn table(results: &[FanoutResult]) -> String {
    let mut out = String::from(
        "subs  pkts_in/s  pkts_out/s  cpu_us/pkt  user_us/pkt  cpu%core  rss_MiB  kib/sub  lat_p50_us  lat_p99_us  lat_max_us  loss%  other%core  allocs/pkt(own+rtc)  allocs/copy\n",
    );
    for r in results {
        out.push_str(&format!(
            "{:>4}  {:>9.0}  {:>10.0}  {:>10.2}  {:>11}  {:>8.1}  {:>7.1}  {:>7.0}  {:>10}  {:>10}  {:>10}  {:>5.2}  {:>10.1}  {:>19}  {:>11}{}\n",
            r.subscribers,
            r.packets_in_per_s,
            r.packets_out_per_s,
            r.cpu_us_per_forwarded_packet,
            r.user_us_per_forwarded_packet
                .map_or_else(|| "-".into(), |u| format!("{u:.2}")),
            r.cpu_percent_of_core,
            r.rss_kib as f64 / 1024.0,
            r.rss_kib_per_subscriber,
            r.latency_p50_us,
            r.latency_p99_us,
            r.latency_max_us,
            r.loss_percent,
            r.other_cpu_percent_of_core,
            match (r.allocs_per_packet_meridian, r.allocs_per_packet_rtc) {
                (Some(o), Some(t)) => format!("{o:.2}+{t:.2}"),
                _ => "-".into(),
            },
            r.allocs_per_copy
                .map_or_else(|| "-".into(), |c| format!("{c:.2}")),
            if r.disturbed { "  DISTURBED" } else { "" },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
