//! `meridian bench`: the load generator's command line (built with the `loadgen` feature).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use meridian::ids::NodeId;
use meridian::mesh::tls::write_cluster;

/// The load both benchmarks apply.
#[derive(clap::Args)]
pub struct LoadArgs {
    /// Numbers of subscribers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
    subscribers: Vec<usize>,
    /// Measurement window per step, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up before each window, seconds.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Publisher bitrate.
    #[arg(long, default_value_t = 1000)]
    bitrate_kbps: u64,
    /// RTP payload size in bytes (VP8-sized packets by default).
    #[arg(long, default_value_t = 1100)]
    payload: usize,
    /// Also write the results as JSON here (and a plot beside it, for fan-out).
    #[arg(long)]
    json: Option<PathBuf>,
}

impl LoadArgs {
    fn config(&self) -> meridian::bench::FanoutConfig {
        meridian::bench::FanoutConfig {
            subscribers: self.subscribers.clone(),
            seconds: self.seconds,
            warmup_seconds: self.warmup,
            bitrate_kbps: self.bitrate_kbps,
            payload_bytes: self.payload,
        }
    }
}

/// Which SFUs a benchmark measures, and how Janus is reached.
#[derive(clap::Args)]
pub struct SfuArgs {
    /// Which SFU to measure: meridian, janus, or both (same load, one run).
    #[arg(long, default_value = "meridian")]
    sfu: String,
    /// For Janus: the only interface it may gather ICE candidates on (it never offers
    /// loopback; tests/bench-janus.sh sets up a veth with 127.0.0.2/32 and passes it).
    #[arg(long, default_value = "mjanus0")]
    janus_interface: String,
    /// For Janus: the address the load generator's peers use (the veth's).
    #[arg(long, default_value = "127.0.0.2")]
    janus_client_ip: std::net::IpAddr,
    /// Fan-out: also measure Meridian with forwarded copies going through rtc's sender
    /// (`rtc.srtp_in_place = false`), in the same run, for a before/after comparison.
    #[arg(long)]
    with_rtc_sender: bool,
}

impl SfuArgs {
    /// Whether to measure Meridian and whether Janus.
    fn which(&self) -> anyhow::Result<(bool, bool)> {
        Ok(match self.sfu.as_str() {
            "meridian" => (true, false),
            "janus" => (false, true),
            "both" => (true, true),
            other => anyhow::bail!("unknown --sfu {other:?}: use meridian, janus or both"),
        })
    }

    /// Starts Janus in `dir` as these arguments say.
    fn start_janus(
        &self,
        dir: &std::path::Path,
    ) -> std::io::Result<meridian::bench::janus::JanusProcess> {
        meridian::bench::janus::JanusProcess::start(
            &dir.join("janus"),
            &self.janus_interface,
            self.janus_client_ip,
        )
    }
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One publisher fanned out to N subscribers, for each N given.
    Fanout {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        sfus: SfuArgs,
    },
    /// A publisher on one node relayed through a pipe to N subscribers on another.
    Cascade {
        #[command(flatten)]
        load: LoadArgs,
    },
    /// N concurrent verification sessions (a user publishing three-layer simulcast video and
    /// audio, an agent publishing video and audio, each subscribed to the other), for each N.
    Sessions {
        /// Numbers of concurrent sessions, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,25,50")]
        sessions: Vec<usize>,
        /// Meridian media workers to measure with, comma-separated (one node per value).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        workers: Vec<usize>,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        sfus: SfuArgs,
        /// Also write the results as JSON here (and a plot beside it).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// What recording costs: the sessions load on a node without and with recording (one
    /// node each per step), the extra CPU per recorded packet and the disk written per
    /// session minute.
    Recording {
        /// Numbers of concurrent sessions, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,25")]
        sessions: Vec<usize>,
        #[command(flatten)]
        window: Window,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Runs one benchmark command.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Fanout { load, sfus } => {
            bench_fanout(load.config(), &sfus, load.json).await?
        }
        BenchCommand::Cascade { load } => bench_cascade(load.config(), load.json).await?,
        BenchCommand::Sessions {
            sessions,
            workers,
            window,
            sfus,
            json,
        } => bench_sessions(window.load(sessions), &workers, &sfus, json).await?,
        BenchCommand::Recording {
            sessions,
            window,
            json,
        } => bench_recording(window.load(sessions), json).await?,
    }
    Ok(())
}

/// How long each step of a sessions benchmark warms up and measures.
#[derive(clap::Args)]
pub struct Window {
    /// Measurement window per step, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up before each window, seconds: long enough for subscribers to probe their way
    /// to the top layer.
    #[arg(long, default_value_t = 8)]
    warmup: u64,
}

impl Window {
    fn load(&self, sessions: Vec<usize>) -> meridian::bench::sessions::SessionsConfig {
        meridian::bench::sessions::SessionsConfig {
            sessions,
            seconds: self.seconds,
            warmup_seconds: self.warmup,
            ..Default::default()
        }
    }
}

/// One step of the recording benchmark.
#[derive(Debug, serde::Serialize)]
struct RecordingCost {
    sessions: usize,
    cpu_percent_plain: f64,
    cpu_percent_recording: f64,
    /// Packets copied to the recording per second (each session's top video layer and
    /// audio of both participants).
    recorded_packets_per_s: f64,
    /// Extra SFU CPU per recorded packet (tap, queue, reassembly, muxing, disk).
    extra_cpu_us_per_recorded_packet: f64,
    /// Bytes of media files per session minute (both participants).
    disk_bytes_per_session_minute: f64,
}

/// The recording node's own counters (frames, gaps, packets dropped, keyframe requests).
async fn recording_counters(metrics: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(metrics).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    [
        "meridian_recording_packets_total",
        "meridian_recording_frames_total",
        "meridian_recording_gaps_total",
        "meridian_recording_dropped_packets_total",
        "meridian_keyframe_requests_total",
    ]
    .iter()
    .filter_map(|name| {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| format!("{}={v}", name.trim_start_matches("meridian_")))
    })
    .collect::<Vec<_>>()
    .join(" ")
}

fn bytes_under(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "webm" || x == "mkv") {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

/// The sessions load without and with recording, one fresh single-worker node per run.
async fn bench_recording(
    cfg: meridian::bench::sessions::SessionsConfig,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    use meridian::bench::sessions::run_sessions;
    let dir = std::env::temp_dir().join(format!("meridian-bench-{}", std::process::id()));
    let per_session = cfg.user_layers.last().map_or(0.0, |l| l.packets_per_s)
        + cfg.agent_video.packets_per_s
        + 2.0 * cfg.audio.packets_per_s;
    println!(
        "recording: {:?} concurrent sessions, {per_session:.0} recorded packets/s each (top user layer, agent video, two audio), {} s windows after {} s warm-up",
        cfg.sessions, cfg.seconds, cfg.warmup_seconds
    );
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>18} {:>20}",
        "sessions",
        "cpu plain",
        "cpu recorded",
        "recorded/s",
        "extra us/rec. pkt",
        "disk B/session-min"
    );
    let mut out = Vec::new();
    for &n in &cfg.sessions {
        let step = meridian::bench::sessions::SessionsConfig {
            sessions: vec![n],
            ..cfg.clone()
        };
        let plain = meridian::bench::SpawnedNode::start(&dir, &format!("plain-{n}"), None, 1)?;
        plain.wait_ready().await?;
        let p = run_sessions(&plain.target(), 1, &step).await;
        drop(plain);
        let p = p?.remove(0);
        let rec_dir = dir.join(format!("recordings-{n}"));
        let extra = format!(
            "[recording]\nenabled = true\ndir = {:?}\nsigning_key_file = {:?}\ncreate_signing_key = true\n",
            rec_dir,
            dir.join("recording.key")
        );
        let node =
            meridian::bench::SpawnedNode::start_with(&dir, &format!("rec-{n}"), None, 1, &extra)?;
        node.wait_ready().await?;
        let started = std::time::Instant::now();
        let r = run_sessions(&node.target(), 1, &step).await;
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        let counters = recording_counters(node.target().metrics_addr).await;
        drop(node);
        let r = r?.remove(0);
        let recorded = per_session * n as f64;
        let extra_us = (r.cpu_percent_of_core - p.cpu_percent_of_core) / 100.0 * 1e6 / recorded;
        let cost = RecordingCost {
            sessions: n,
            cpu_percent_plain: p.cpu_percent_of_core,
            cpu_percent_recording: r.cpu_percent_of_core,
            recorded_packets_per_s: recorded,
            extra_cpu_us_per_recorded_packet: extra_us,
            disk_bytes_per_session_minute: bytes_under(&rec_dir) as f64 / n as f64 / minutes,
        };
        println!(
            "{:>8} {:>9.1}% {:>11.1}% {:>12.0} {:>18.1} {:>20.0}",
            n,
            cost.cpu_percent_plain,
            cost.cpu_percent_recording,
            cost.recorded_packets_per_s,
            cost.extra_cpu_us_per_recorded_packet,
            cost.disk_bytes_per_session_minute
        );
        println!("         ({counters})");
        out.push(cost);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// Runs the fan-out benchmark against a node (and/or Janus) started as a child process, so
/// that /proc figures cover the SFU alone.
async fn bench_fanout(
    cfg: meridian::bench::FanoutConfig,
    sfus: &SfuArgs,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (with_meridian, with_janus) = sfus.which()?;
    let dir = std::env::temp_dir().join(format!("meridian-bench-{}", std::process::id()));
    println!(
        "fan-out: 1 publisher at {} kbit/s ({}-byte payloads) to {:?} subscribers, {} s windows",
        cfg.bitrate_kbps, cfg.payload_bytes, cfg.subscribers, cfg.seconds
    );
    let mut all: Vec<(&str, Vec<meridian::bench::FanoutResult>)> = Vec::new();
    // (label, node name, environment)
    type Variant<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let mut variants: Vec<Variant> = Vec::new();
    if with_meridian {
        variants.push(("meridian", "bench", &[]));
        if sfus.with_rtc_sender {
            variants.push((
                "meridian-rtc-sender",
                "bench-rtc",
                &[("MERIDIAN__RTC__SRTP_IN_PLACE", "false")],
            ));
        }
    }
    for (name, node_name, env) in variants {
        let node = meridian::bench::SpawnedNode::start_with_env(&dir, node_name, None, 1, "", env)?;
        node.wait_ready().await?;
        let results = meridian::bench::run_fanout(&node.target(), &cfg).await;
        drop(node);
        let results = results?;
        println!("{name} (pid measured from /proc):");
        print!("{}", meridian::bench::table(&results));
        all.push((name, results));
    }
    if with_janus {
        let janus = sfus.start_janus(&dir)?;
        let results = meridian::bench::run_fanout_janus(&janus, &cfg).await;
        drop(janus);
        let results = results
            .inspect_err(|_| print_janus_log(&dir))
            .context("janus run failed")?;
        println!("janus (VideoRoom, same load):");
        print!("{}", meridian::bench::table(&results));
        all.push(("janus", results));
    }
    let named = |n: &str| all.iter().find(|(name, _)| *name == n).map(|(_, r)| r);
    for (title, other) in [
        ("rtc's sender / in place", "meridian-rtc-sender"),
        ("janus / meridian", "janus"),
    ] {
        let (Some(m), Some(o)) = (named("meridian"), named(other)) else {
            continue;
        };
        println!("{title} CPU per forwarded packet:");
        for (a, b) in m.iter().zip(o) {
            if a.cpu_us_per_forwarded_packet > 0.0 {
                println!(
                    "{:>4} subscribers: {:.2}x",
                    a.subscribers,
                    b.cpu_us_per_forwarded_packet / a.cpu_us_per_forwarded_packet
                );
            }
        }
    }
    // Keep the directory (logs) when a run failed; it is removed on success.
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = json {
        let named: std::collections::BTreeMap<&str, &Vec<meridian::bench::FanoutResult>> =
            all.iter().map(|(n, r)| (*n, r)).collect();
        std::fs::write(&path, serde_json::to_string_pretty(&named)?)?;
        let svg = path.with_extension("svg");
        let series: Vec<(&str, &[meridian::bench::FanoutResult])> =
            all.iter().map(|(n, r)| (*n, r.as_slice())).collect();
        std::fs::write(&svg, meridian::bench::fanout_svg(&series))?;
        println!("wrote {} and {}", path.display(), svg.display());
    }
    Ok(())
}

/// Runs the cascade benchmark: publisher on one child node, subscribers on another, joined by
/// a pipe.
async fn bench_cascade(
    cfg: meridian::bench::FanoutConfig,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("meridian-bench-{}", std::process::id()));
    let ids: Vec<NodeId> = vec!["origin-1".parse()?, "edge-1".parse()?];
    let files = write_cluster(&dir, &ids)?;
    let origin_pipe = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let origin = meridian::bench::SpawnedNode::start(
        &dir,
        "origin",
        Some((origin_pipe, vec![], files[0].clone())),
        1,
    )?;
    let edge_pipe = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let edge = meridian::bench::SpawnedNode::start(
        &dir,
        "edge",
        Some((edge_pipe, vec![origin_pipe], files[1].clone())),
        1,
    )?;
    origin.wait_ready().await?;
    edge.wait_ready().await?;
    println!(
        "cascade: publisher on origin (pid {}), {:?} subscribers on edge (pid {}), {} kbit/s, {} s windows",
        origin.pid(), cfg.subscribers, edge.pid(), cfg.bitrate_kbps, cfg.seconds
    );
    let result = meridian::bench::run_cascade(&origin.target(), &edge.target(), &cfg).await;
    drop(edge);
    drop(origin);
    let _ = std::fs::remove_dir_all(&dir);
    let results = result?;
    print!("{}", meridian::bench::cascade_table(&results));
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}

/// Runs the sessions benchmark against a node per worker count (and/or Janus), each a child
/// process measured from /proc.
async fn bench_sessions(
    cfg: meridian::bench::sessions::SessionsConfig,
    workers: &[usize],
    sfus: &SfuArgs,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    use meridian::bench::sessions::{run_sessions, run_sessions_janus, table, SessionsResult};
    let (with_meridian, with_janus) = sfus.which()?;
    let dir = std::env::temp_dir().join(format!("meridian-bench-{}", std::process::id()));
    let layers: Vec<String> = cfg
        .user_layers
        .iter()
        .map(|l| format!("{:.0}", l.packets_per_s))
        .collect();
    println!(
        "sessions: {:?} concurrent; per session a user publishing simulcast at {} packets/s per layer plus audio at {:.0}/s, an agent publishing video at {:.0}/s plus audio, each subscribed to the other; {} s windows",
        cfg.sessions,
        layers.join("/"),
        cfg.audio.packets_per_s,
        cfg.agent_video.packets_per_s,
        cfg.seconds
    );
    let mut all: Vec<SessionsResult> = Vec::new();
    if with_meridian {
        for &w in workers {
            let node = meridian::bench::SpawnedNode::start(&dir, &format!("bench-w{w}"), None, w)?;
            node.wait_ready().await?;
            let results = run_sessions(&node.target(), w, &cfg).await;
            drop(node);
            let results = results?;
            println!("meridian, {w} worker(s):");
            print!("{}", table(&results));
            all.extend(results);
        }
    }
    if with_janus {
        let janus = sfus.start_janus(&dir)?;
        let results = run_sessions_janus(&janus, &cfg).await;
        drop(janus);
        let results = results
            .inspect_err(|_| print_janus_log(&dir))
            .context("janus run failed")?;
        println!("janus (one VideoRoom per session, same load):");
        print!("{}", table(&results));
        all.extend(results);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
        let svg = path.with_extension("svg");
        std::fs::write(&svg, meridian::bench::sessions::svg(&all))?;
        println!("wrote {} and {}", path.display(), svg.display());
    }
    Ok(())
}

/// The end of Janus's log, after a failed run.
fn print_janus_log(dir: &std::path::Path) {
    let log = std::fs::read_to_string(dir.join("janus/janus.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(25).collect();
    eprintln!("janus log (last lines):");
    for l in tail.iter().rev() {
        eprintln!("  {l}");
    }
}
