//! Benchmarks that drive a node over real UDP with DTLS-SRTP from a separate process and
//! measure the node process alone: CPU per forwarded packet, packet rates, memory per
//! subscriber, forwarding latency and loss. Results are printed and returned; nothing here
//! asserts a speed.

pub mod procfs;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::auth::{Role, TokenSigner};
use crate::client::peer::{PeerState, RtcPeer, TestCodec};
use crate::client::signal::{SignalClient, SignalError};

/// Where the node under test is and how to get in.
pub struct Target {
    /// WebSocket signaling URL.
    pub ws_url: String,
    /// Signaling address, for `/metrics`.
    pub http_addr: std::net::SocketAddr,
    /// The node's process, measured from /proc.
    pub pid: u32,
    pub signer: TokenSigner,
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
}

/// Scrapes one counter from the node's `/metrics`.
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> Result<u64, BenchError> {
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
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| BenchError::Metrics(format!("{name} not found")))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Running {
    state: Arc<PeerState>,
    task: tokio::task::JoinHandle<()>,
    signal: SignalClient,
}

impl Running {
    async fn stop(self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.signal.leave().await;
    }
}

/// 1 publisher, N subscribers on one node, for each N in `cfg.subscribers`.
pub async fn run_fanout(
    target: &Target,
    cfg: &FanoutConfig,
) -> Result<Vec<FanoutResult>, BenchError> {
    let mut results = Vec::new();
    for (step, &n) in cfg.subscribers.iter().enumerate() {
        let session: crate::ids::SessionId = format!("bench-{}-{step}", std::process::id())
            .parse()
            .map_err(|e| BenchError::Metrics(format!("{e}")))?;
        let ttl = Duration::from_secs(3600);
        let token = |user: &str, role| {
            target.signer.mint(
                &session,
                &user.parse().expect("bench user ids are valid"),
                role,
                ttl,
            )
        };

        // Publisher.
        let (mut psig, _) = SignalClient::join(&target.ws_url, &token("pub", Role::User)?).await?;
        let mut publisher = RtcPeer::publisher_with(TestCodec::Vp8).await?;
        let reply = psig
            .request(json!({"type":"publish","sdp":publisher.offer()?}))
            .await?;
        publisher.answer(reply["sdp"].as_str().unwrap_or_default())?;
        let producer = reply["producers"][0]["producerId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let pstate = Arc::new(PeerState::default());
        let pps = (cfg.bitrate_kbps * 1000 / 8) as f64 / cfg.payload_bytes as f64;
        pstate
            .packet_interval_us
            .store((1e6 / pps.max(1.0)) as u64, Ordering::Relaxed);
        pstate
            .payload_bytes
            .store(cfg.payload_bytes as u64, Ordering::Relaxed);
        let ptask = publisher.spawn(pstate.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_base = procfs::rss_kib(target.pid).unwrap_or(0);

        // Subscribers.
        let mut subs = Vec::new();
        for i in 0..n {
            let (mut sig, _) =
                SignalClient::join(&target.ws_url, &token(&format!("sub{i}"), Role::Agent)?)
                    .await?;
            let mut peer = RtcPeer::subscriber_with(TestCodec::Vp8).await?;
            let reply = sig
                .request(json!({"type":"subscribe","producerId":producer,"sdp":peer.offer()?}))
                .await?;
            peer.answer(reply["sdp"].as_str().unwrap_or_default())?;
            let state = Arc::new(PeerState::default());
            let task = peer.spawn(state.clone());
            subs.push(Running {
                state,
                task,
                signal: sig,
            });
        }
        tokio::time::sleep(Duration::from_secs(cfg.warmup_seconds)).await;

        // Measurement window.
        let forwarded0 = metric(target.http_addr, "meridian_rtp_forwarded_total").await?;
        let in0 = metric(target.http_addr, "meridian_rtp_in_total").await?;
        let cpu0 = procfs::process_cpu_ns(target.pid).unwrap_or(0);
        let me0 = procfs::process_cpu_ns(std::process::id()).unwrap_or(0);
        let machine0 = procfs::machine_cpu_ticks().unwrap_or((0, 0));
        let sent0 = pstate.packets_sent.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(cfg.seconds)).await;
        let t1 = Instant::now();
        let forwarded1 = metric(target.http_addr, "meridian_rtp_forwarded_total").await?;
        let in1 = metric(target.http_addr, "meridian_rtp_in_total").await?;
        let cpu1 = procfs::process_cpu_ns(target.pid).unwrap_or(0);
        let me1 = procfs::process_cpu_ns(std::process::id()).unwrap_or(0);
        let machine1 = procfs::machine_cpu_ticks().unwrap_or((0, 0));
        let sent1 = pstate.packets_sent.load(Ordering::Relaxed);
        let rss = procfs::rss_kib(target.pid).unwrap_or(0);

        let window = (t1 - t0).as_secs_f64();
        let forwarded = forwarded1.saturating_sub(forwarded0);
        let node_cpu_s = cpu1.saturating_sub(cpu0) as f64 / 1e9;
        let me_cpu_s = me1.saturating_sub(me0) as f64 / 1e9;
        let machine_busy_s =
            machine1.0.saturating_sub(machine0.0) as f64 / procfs::ticks_per_second() as f64;
        let other = (machine_busy_s - node_cpu_s - me_cpu_s).max(0.0) / window * 100.0;
        let mut latencies: Vec<u64> = Vec::new();
        let mut received = 0usize;
        for s in &subs {
            let got = s.state.received.lock().unwrap_or_else(|e| e.into_inner());
            for r in got.iter().filter(|r| r.at >= t0 && r.at < t1) {
                received += 1;
                latencies.push(r.latency.as_micros() as u64);
            }
        }
        latencies.sort_unstable();
        let expected = sent1.saturating_sub(sent0) as usize * n;
        let result = FanoutResult {
            subscribers: n,
            window_s: window,
            packets_in_per_s: in1.saturating_sub(in0) as f64 / window,
            packets_out_per_s: forwarded as f64 / window,
            cpu_us_per_forwarded_packet: if forwarded > 0 {
                node_cpu_s * 1e6 / forwarded as f64
            } else {
                0.0
            },
            cpu_percent_of_core: node_cpu_s / window * 100.0,
            rss_kib: rss,
            rss_kib_per_subscriber: rss.saturating_sub(rss_base) as f64 / n.max(1) as f64,
            latency_p50_us: percentile(&latencies, 0.50),
            latency_p99_us: percentile(&latencies, 0.99),
            latency_max_us: latencies.last().copied().unwrap_or(0),
            loss_percent: if expected > 0 {
                (1.0 - received as f64 / expected as f64).max(0.0) * 100.0
            } else {
                0.0
            },
            other_cpu_percent_of_core: other,
            disturbed: other > 15.0,
        };
        results.push(result);

        for s in subs {
            s.stop().await;
        }
        pstate.stop.store(true, Ordering::Relaxed);
        let _ = ptask.await;
        psig.leave().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(results)
}

/// A fixed-width table of results.
pub fn table(results: &[FanoutResult]) -> String {
    let mut out = String::from(
        "subs  pkts_in/s  pkts_out/s  cpu_us/pkt  cpu%core  rss_MiB  kib/sub  lat_p50_us  lat_p99_us  lat_max_us  loss%  other%core\n",
    );
    for r in results {
        out.push_str(&format!(
            "{:>4}  {:>9.0}  {:>10.0}  {:>10.2}  {:>8.1}  {:>7.1}  {:>7.0}  {:>10}  {:>10}  {:>10}  {:>5.2}  {:>8.1}{}\n",
            r.subscribers,
            r.packets_in_per_s,
            r.packets_out_per_s,
            r.cpu_us_per_forwarded_packet,
            r.cpu_percent_of_core,
            r.rss_kib as f64 / 1024.0,
            r.rss_kib_per_subscriber,
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
