//! The workload users run: N concurrent verification sessions, each a user publishing
//! simulcast video (three layers) and Opus audio and an agent publishing video and audio, each
//! subscribed to the other (the agent to the user's top layer). Measured on the SFU process
//! alone: CPU per session, sessions per core, CPU per packet, memory per session, latency and
//! loss. Run against Meridian (with a given number of workers) and Janus (one VideoRoom per
//! session) under the same load.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::{janus, mint, per, percentile, procfs, BenchError, Target};
use crate::auth::Role;
use crate::client::media::{Encoding, MediaPeer, MediaStats, PeerMedia};
use crate::client::signal::SignalClient;

/// The load of one session and how long to measure.
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// Numbers of concurrent sessions, one step each.
    pub sessions: Vec<usize>,
    pub seconds: u64,
    pub warmup_seconds: u64,
    /// The user's simulcast layers, lowest first.
    pub user_layers: Vec<Encoding>,
    pub agent_video: Encoding,
    pub audio: Encoding,
}

impl Default for SessionsConfig {
    /// Layers shaped like a browser's 180p/360p/720p simulcast at ~150/500/1200 kbit/s and
    /// an agent's 720p camera, with 20 ms Opus frames.
    fn default() -> Self {
        let v = |pps: f64| Encoding {
            packets_per_s: pps,
            payload_bytes: 1100,
        };
        Self {
            sessions: vec![10, 25, 50],
            seconds: 10,
            warmup_seconds: 8,
            user_layers: vec![v(17.0), v(57.0), v(136.0)],
            agent_video: v(136.0),
            audio: Encoding {
                packets_per_s: 50.0,
                payload_bytes: 120,
            },
        }
    }
}

/// Figures of one step (one number of sessions).
#[derive(Debug, Clone, Serialize)]
pub struct SessionsResult {
    /// `meridian` or `janus`.
    pub sfu: String,
    /// Meridian's media workers (`None` for Janus).
    pub workers: Option<usize>,
    pub sessions: usize,
    pub window_s: f64,
    /// Packets the publishers sent, and the subscribers received, per second.
    pub packets_in_per_s: f64,
    pub packets_out_per_s: f64,
    /// SFU CPU as a share of one core.
    pub cpu_percent_of_core: f64,
    /// SFU CPU per session, as a share of one core.
    pub cpu_percent_per_session: f64,
    /// Sessions one core would carry at this CPU per session.
    pub sessions_per_core: f64,
    /// SFU CPU per packet handled (in + out).
    pub cpu_us_per_packet: f64,
    pub rss_kib: u64,
    pub rss_kib_per_session: f64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub loss_percent: f64,
    /// CPU of everything other than the SFU and this load generator, share of one core.
    pub other_cpu_percent_of_core: f64,
    /// This load generator's CPU, share of one core (it shares the machine with the SFU).
    pub loadgen_cpu_percent_of_core: f64,
}

/// One running session's peers and signaling connections.
struct Session {
    peers: Vec<(Arc<MediaStats>, tokio::task::JoinHandle<()>)>,
    /// Keeps the participants joined (Meridian) or the Janus handles alive.
    _signals: Vec<SignalClient>,
    /// Janus: the room to destroy.
    room: Option<u64>,
}

impl Session {
    fn stats(&self) -> impl Iterator<Item = &Arc<MediaStats>> {
        self.peers.iter().map(|(s, _)| s)
    }

    async fn stop(self) {
        for (s, _) in &self.peers {
            s.stop.store(true, Ordering::Relaxed);
        }
        for (_, t) in self.peers {
            let _ = t.await;
        }
    }
}

fn run(peer: MediaPeer) -> (Arc<MediaStats>, tokio::task::JoinHandle<()>) {
    let stats = Arc::new(MediaStats::default());
    let task = peer.spawn(stats.clone());
    (stats, task)
}

const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Producer ids of a `published` reply, by kind.
fn producers(reply: &Value) -> Result<(String, String), BenchError> {
    let mut audio = None;
    let mut video = None;
    for p in reply["producers"].as_array().into_iter().flatten() {
        let id = p["producerId"].as_str().unwrap_or_default().to_owned();
        match p["kind"].as_str() {
            Some("audio") => audio = Some(id),
            Some("video") => video = Some(id),
            _ => {}
        }
    }
    match (audio, video) {
        (Some(a), Some(v)) => Ok((a, v)),
        _ => Err(BenchError::Sfu(format!(
            "publishing audio and video did not make two producers: {reply}"
        ))),
    }
}

/// Subscribes `sig`'s participant to a video and an audio producer on one peer connection,
/// one transceiver added per subscription (as the SDK does), with `max_layer` for video.
async fn subscribe_both(
    sig: &mut SignalClient,
    video: &str,
    audio: &str,
    max_layer: Option<usize>,
) -> Result<MediaPeer, BenchError> {
    let mut peer = MediaPeer::new(LOOPBACK, PeerMedia::default()).await?;
    peer.add_receiver(true)?;
    let mut req = json!({"type":"subscribe","producerId":video,"sdp":peer.offer()?});
    if let Some(l) = max_layer {
        req["maxLayer"] = json!(l);
    }
    let reply = sig.request(req).await?;
    peer.answer(reply["sdp"].as_str().unwrap_or_default())?;
    peer.add_receiver(false)?;
    let reply = sig
        .request(json!({"type":"subscribe","producerId":audio,"sdp":peer.offer()?}))
        .await?;
    peer.answer(reply["sdp"].as_str().unwrap_or_default())?;
    Ok(peer)
}

/// Starts one verification session on a Meridian node.
async fn meridian_session(
    target: &Target,
    cfg: &SessionsConfig,
    name: &str,
) -> Result<Session, BenchError> {
    let session = name
        .parse()
        .expect("the benchmark's session names are valid ids");
    let (mut user, _) =
        SignalClient::join(&target.ws_url, &mint(target, &session, "user", Role::User)?).await?;
    let (mut agent, _) = SignalClient::join(
        &target.ws_url,
        &mint(target, &session, "agent", Role::Agent)?,
    )
    .await?;
    let mut peers = Vec::new();
    let mut user_pub = MediaPeer::new(
        LOOPBACK,
        PeerMedia {
            audio: Some(cfg.audio),
            video: cfg.user_layers.clone(),
            high_first: false,
        },
    )
    .await?;
    let reply = user
        .request(json!({"type":"publish","sdp":user_pub.offer()?}))
        .await?;
    user_pub.answer(reply["sdp"].as_str().unwrap_or_default())?;
    let (user_audio, user_video) = producers(&reply)?;
    peers.push(run(user_pub));
    let mut agent_pub = MediaPeer::new(
        LOOPBACK,
        PeerMedia {
            audio: Some(cfg.audio),
            video: vec![cfg.agent_video],
            high_first: false,
        },
    )
    .await?;
    let reply = agent
        .request(json!({"type":"publish","sdp":agent_pub.offer()?}))
        .await?;
    agent_pub.answer(reply["sdp"].as_str().unwrap_or_default())?;
    let (agent_audio, agent_video) = producers(&reply)?;
    peers.push(run(agent_pub));
    // The agent reads documents: the user's top layer.
    let top = cfg.user_layers.len().clamp(1, 3) - 1;
    let agent_sub = subscribe_both(&mut agent, &user_video, &user_audio, Some(top)).await?;
    peers.push(run(agent_sub));
    let user_sub = subscribe_both(&mut user, &agent_video, &agent_audio, None).await?;
    peers.push(run(user_sub));
    Ok(Session {
        peers,
        _signals: vec![user, agent],
        room: None,
    })
}

/// Starts one verification session as a Janus VideoRoom: both participants publish into it
/// and each subscribes to the other's feed (the agent to the top simulcast substream).
async fn janus_session(
    client: &janus::JanusClient,
    admin: u64,
    ip: std::net::IpAddr,
    cfg: &SessionsConfig,
    room: u64,
) -> Result<Session, BenchError> {
    use janus::jsep_event;
    client
        .message(
            admin,
            json!({"request":"create","room":room,"publishers":4,"videocodec":"vp8","audiocodec":"opus","bitrate":0,"notify_joining":false}),
            None,
        )
        .await?;
    let mut peers = Vec::new();
    let mut feeds = Vec::new();
    for media in [
        PeerMedia {
            audio: Some(cfg.audio),
            video: cfg.user_layers.clone(),
            high_first: true,
        },
        PeerMedia {
            audio: Some(cfg.audio),
            video: vec![cfg.agent_video],
            high_first: true,
        },
    ] {
        let (handle, mut events) = client.attach().await?;
        let mut peer = MediaPeer::new(ip, media).await?;
        let offer = peer.offer()?;
        client
            .message(
                handle,
                json!({"request":"joinandconfigure","room":room,"ptype":"publisher","audio":true,"video":true}),
                Some(json!({"type":"offer","sdp":offer})),
            )
            .await?;
        client.trickle_done(handle).await?;
        let joined = jsep_event(&mut events).await?;
        peer.answer(joined["jsep"]["sdp"].as_str().unwrap_or_default())?;
        feeds.push(joined["plugindata"]["data"]["id"].clone());
        peers.push(run(peer));
    }
    // Janus lists a publisher as a feed only once its connection is up.
    let since = Instant::now();
    while !peers
        .iter()
        .all(|(s, _)| s.connected.load(Ordering::Relaxed))
    {
        if since.elapsed() > Duration::from_secs(15) {
            return Err(BenchError::Sfu(
                "a publisher never connected to janus".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The agent watches the user's feed (top substream), the user the agent's.
    for (feed, substream) in [
        (&feeds[0], Some(cfg.user_layers.len().max(1) - 1)),
        (&feeds[1], None),
    ] {
        let (handle, mut events) = client.attach().await?;
        let mut stream = json!({"feed": feed});
        if let Some(s) = substream {
            stream["substream"] = json!(s);
        }
        client
            .message(
                handle,
                json!({"request":"join","room":room,"ptype":"subscriber","streams":[stream]}),
                None,
            )
            .await?;
        let offered = jsep_event(&mut events).await?;
        let mut peer = MediaPeer::new(ip, PeerMedia::default()).await?;
        let answer = peer.answer_offer(offered["jsep"]["sdp"].as_str().unwrap_or_default())?;
        client
            .message(
                handle,
                json!({"request":"start","room":room}),
                Some(json!({"type":"answer","sdp":answer})),
            )
            .await?;
        client.trickle_done(handle).await?;
        peers.push(run(peer));
    }
    Ok(Session {
        peers,
        _signals: Vec::new(),
        room: Some(room),
    })
}

/// Measures one window over all running sessions.
async fn measure(
    sfu: &str,
    workers: Option<usize>,
    pid: u32,
    sessions: &[Session],
    rss_base: u64,
    seconds: u64,
) -> SessionsResult {
    let all = || sessions.iter().flat_map(Session::stats);
    let totals = || {
        all().fold((0u64, 0u64, 0u64), |(s, r, l), p| {
            (
                s + p.packets_sent.load(Ordering::Relaxed),
                r + p.packets_received.load(Ordering::Relaxed),
                l + p.packets_lost.load(Ordering::Relaxed),
            )
        })
    };
    for p in all() {
        p.take_latencies();
    }
    let snap = || {
        (
            procfs::process_cpu_ns(pid).unwrap_or(0),
            procfs::process_cpu_ns(std::process::id()).unwrap_or(0),
            procfs::machine_cpu_ticks().unwrap_or((0, 0)).0,
        )
    };
    let (c0, me0, m0) = snap();
    let (s0, r0, l0) = totals();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let window = t0.elapsed().as_secs_f64();
    let (c1, me1, m1) = snap();
    let (s1, r1, l1) = totals();
    let mut latencies: Vec<u64> = all()
        .flat_map(|p| p.take_latencies())
        .map(u64::from)
        .collect();
    latencies.sort_unstable();
    let rss = procfs::rss_kib(pid).unwrap_or(0);
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
    let cpu = secs(c0, c1);
    let me = secs(me0, me1);
    let busy = m1.saturating_sub(m0) as f64 / procfs::ticks_per_second() as f64;
    let (sent, received, lost) = (s1 - s0, r1 - r0, l1 - l0);
    let n = sessions.len();
    let cpu_percent = cpu / window * 100.0;
    let per_session = per(cpu_percent, n as f64);
    SessionsResult {
        sfu: sfu.to_owned(),
        workers,
        sessions: n,
        window_s: window,
        packets_in_per_s: sent as f64 / window,
        packets_out_per_s: received as f64 / window,
        cpu_percent_of_core: cpu_percent,
        cpu_percent_per_session: per_session,
        sessions_per_core: per(100.0, per_session),
        cpu_us_per_packet: per(cpu * 1e6, (sent + received) as f64),
        rss_kib: rss,
        rss_kib_per_session: rss.saturating_sub(rss_base) as f64 / n.max(1) as f64,
        latency_p50_us: percentile(&latencies, 0.50),
        latency_p99_us: percentile(&latencies, 0.99),
        loss_percent: per(lost as f64 * 100.0, (received + lost) as f64),
        other_cpu_percent_of_core: ((busy - cpu - me).max(0.0) / window * 100.0),
        loadgen_cpu_percent_of_core: me / window * 100.0,
    }
}

/// Sessions step by step against a Meridian node (`workers` is what it was started with).
pub async fn run_sessions(
    target: &Target,
    workers: usize,
    cfg: &SessionsConfig,
) -> Result<Vec<SessionsResult>, BenchError> {
    let mut results = Vec::new();
    for (step, &n) in cfg.sessions.iter().enumerate() {
        let rss_base = procfs::rss_kib(target.pid).unwrap_or(0);
        let mut sessions = Vec::new();
        for i in 0..n {
            let name = format!("kyc-{}-{step}-{i}", std::process::id());
            sessions.push(meridian_session(target, cfg, &name).await?);
        }
        connected(&sessions).await?;
        tokio::time::sleep(Duration::from_secs(cfg.warmup_seconds)).await;
        results.push(
            measure(
                "meridian",
                Some(workers),
                target.pid,
                &sessions,
                rss_base,
                cfg.seconds,
            )
            .await,
        );
        for s in sessions {
            s.stop().await;
        }
        // Let the node tear the sessions down before the next step's memory baseline.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(results)
}

/// The same steps against Janus, one VideoRoom per session.
pub async fn run_sessions_janus(
    process: &janus::JanusProcess,
    cfg: &SessionsConfig,
) -> Result<Vec<SessionsResult>, BenchError> {
    process.wait_ready().await?;
    let mut results = Vec::new();
    for (step, &n) in cfg.sessions.iter().enumerate() {
        let client = janus::JanusClient::connect(process.http).await?;
        let (admin, _) = client.attach().await?;
        let rss_base = procfs::rss_kib(process.pid()).unwrap_or(0);
        let mut sessions = Vec::new();
        for i in 0..n {
            let room = 10_000 + (step * 1000 + i) as u64;
            sessions.push(janus_session(&client, admin, process.client_ip, cfg, room).await?);
        }
        connected(&sessions).await?;
        tokio::time::sleep(Duration::from_secs(cfg.warmup_seconds)).await;
        results.push(
            measure(
                "janus",
                None,
                process.pid(),
                &sessions,
                rss_base,
                cfg.seconds,
            )
            .await,
        );
        for s in sessions {
            if let Some(room) = s.room {
                let _ = client
                    .message(admin, json!({"request":"destroy","room":room}), None)
                    .await;
            }
            s.stop().await;
        }
        drop(client);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(results)
}

/// Waits until every peer of every session is connected.
async fn connected(sessions: &[Session]) -> Result<(), BenchError> {
    let since = Instant::now();
    loop {
        let waiting = sessions
            .iter()
            .flat_map(Session::stats)
            .filter(|s| !s.connected.load(Ordering::Relaxed))
            .count();
        if waiting == 0 {
            return Ok(());
        }
        if since.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Sfu(format!(
                "{waiting} peer connections never connected"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The results as a Markdown table.
pub fn table(results: &[SessionsResult]) -> String {
    let mut out = String::from(
        "| sfu | workers | sessions | pkts in/s | pkts out/s | CPU % of core | CPU %/session | sessions/core | CPU µs/pkt | RSS MiB | KiB/session | p50 ms | p99 ms | loss % |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} | {:.2} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            r.sfu,
            r.workers.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
            r.sessions,
            r.packets_in_per_s,
            r.packets_out_per_s,
            r.cpu_percent_of_core,
            r.cpu_percent_per_session,
            r.sessions_per_core,
            r.cpu_us_per_packet,
            r.rss_kib as f64 / 1024.0,
            r.rss_kib_per_session,
            r.latency_p50_us as f64 / 1000.0,
            r.latency_p99_us as f64 / 1000.0,
            r.loss_percent,
        ));
    }
    out
}

/// CPU and memory per session against sessions, one line per SFU and worker count, as SVG.
pub fn svg(results: &[SessionsResult]) -> String {
    let mut names: Vec<String> = Vec::new();
    let name = |r: &SessionsResult| match r.workers {
        Some(w) => format!("{} ×{w}", r.sfu),
        None => r.sfu.clone(),
    };
    for r in results {
        let n = name(r);
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let line = |f: &dyn Fn(&SessionsResult) -> f64| -> Vec<super::plot::Series> {
        names
            .iter()
            .map(|n| super::plot::Series {
                name: n.clone(),
                points: results
                    .iter()
                    .filter(|r| &name(r) == n)
                    .map(|r| (r.sessions as f64, f(r)))
                    .collect(),
            })
            .collect()
    };
    super::plot::svg(
        "N concurrent verification sessions on one node",
        "sessions",
        &[
            super::plot::Panel {
                title: "SFU CPU (share of one core)",
                y_label: "%",
                series: line(&|r| r.cpu_percent_of_core),
            },
            super::plot::Panel {
                title: "CPU per session",
                y_label: "% of a core",
                series: line(&|r| r.cpu_percent_per_session),
            },
            super::plot::Panel {
                title: "Latency p99",
                y_label: "ms",
                series: line(&|r| r.latency_p99_us as f64 / 1000.0),
            },
        ],
    )
}
