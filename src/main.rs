//! The `meridian` command: run a node, the local three-region dev mesh, or mint tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meridian::auth::{generate_ed25519_pem, Role, TokenSigner};
use meridian::compliance::seal::{parse_public_key, verify};
use meridian::config::MeshSection;
use meridian::config::NodeConfig;
use meridian::ids::{NodeId, RegionId, SessionId, UserId};
use meridian::mesh::geo::GeoDb;

/// Counts allocations for `/metrics` (see `meridian::alloc`).
#[global_allocator]
static ALLOCATOR: meridian::alloc::CountingAllocator = meridian::alloc::CountingAllocator;
use meridian::mesh::tls::{write_cluster, write_pem, ClusterCa};
use meridian::node::Node;

#[cfg(feature = "loadgen")]
mod bench_cli;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Edge-distributed WebRTC SFU for compliance video"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a region file (see regions/).
    Serve {
        /// Region configuration file; repeat to layer a node's own file over it (each file
        /// over the one before: tables merge, a later key wins).
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
    },
    /// Load a configuration as `serve` would (files layered in order, then MERIDIAN__
    /// overrides), say what it sets up, and exit: 0 when it loads, 1 with the reason if not.
    Check {
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
    },
    /// Run the India, Europe and US nodes on localhost with demo links.
    Dev,
    /// Operate a node through its admin API (`[admin]` in its region file).
    Ctl {
        /// The node's admin API (its `admin.listen`).
        #[arg(long, default_value = "http://127.0.0.1:9465")]
        admin: String,
        /// The admin token file (the node's `admin.token_file`).
        #[arg(long)]
        token_file: PathBuf,
        #[command(subcommand)]
        command: meridian::ctl::CtlCommand,
    },
    /// Mint a session access token.
    Token {
        /// Region file whose auth section (HS256 secret, issuer, audience) signs the token.
        #[arg(long, short, default_value = "regions/india.toml")]
        config: PathBuf,
        /// Sign with this Ed25519 private key (PEM) instead of the config's HS256 secret.
        #[arg(long)]
        eddsa_key: Option<PathBuf>,
        #[arg(long)]
        session: SessionId,
        #[arg(long)]
        user: UserId,
        #[arg(long, value_parser = parse_role, default_value = "user")]
        role: Role,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Whether the session is recorded (the `rec` claim); absent: the node decides.
        #[arg(long)]
        rec: Option<bool>,
        /// The region that keeps the session's records (the `residency` claim).
        #[arg(long)]
        residency: Option<String>,
        /// The compliance profile the session runs under (the `profile` claim), e.g. rbi-vcip.
        #[arg(long)]
        profile: Option<String>,
    },
    /// Measure a node: starts one as a separate process and loads it over real UDP.
    #[cfg(feature = "loadgen")]
    Bench {
        #[command(subcommand)]
        command: bench_cli::BenchCommand,
    },
    /// Manage the cluster CA that authenticates nodes to each other.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Look addresses up in a GeoIP City database, or write the development table as one.
    Geoip {
        #[command(subcommand)]
        command: GeoipCommand,
    },
    /// Check a sealed session folder: the manifest's signature, every file's hash and size,
    /// no file added, and the audit log's chain up to the sealed entry. Exits 1 naming every
    /// fault found.
    Verify {
        /// The session folder (holding manifest.json and manifest.sig); with --store-config,
        /// the stored run as `<session>/<run>`.
        dir: PathBuf,
        /// The recording node's public key: its PEM file or 64 hex digits. Without it the
        /// key the manifest names is used, which proves integrity only against that key.
        #[arg(long)]
        public_key: Option<String>,
        /// Verify the copy in the object store that this region file's
        /// `[recording.storage]` names, downloaded to a temporary folder.
        #[arg(long)]
        store_config: Option<PathBuf>,
    },
    /// Read the session database a node writes (`recording.database` of its region file).
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Forward UDP from --listen to --upstream with added delay, jitter and loss both ways:
    /// the impairment proxy the lab (infra/lab/mesh-lab.sh) puts between regions, since
    /// this kernel has no netem.
    Netem {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
        /// One-way delay in milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Extra delay drawn from 0..jitter milliseconds (order kept).
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
        /// Probability (0..1) that a datagram is dropped.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
    },
    /// Write a new Ed25519 key pair for EdDSA tokens.
    Keygen {
        /// Private key output (PEM, PKCS#8).
        #[arg(long)]
        private: PathBuf,
        /// Public key output (PEM, SPKI): point auth.public_key_file at it.
        #[arg(long)]
        public: PathBuf,
    },
}

/// Where `meridian sessions` reads: a region file's database, or a URL.
#[derive(clap::Args)]
struct DatabaseArgs {
    /// Region file whose `recording.database` (or default SQLite file) to read.
    #[arg(long, short, default_value = "regions/india.toml")]
    config: PathBuf,
    /// A database URL instead (`sqlite://…`, `postgres://…`); also MERIDIAN_DATABASE_URL.
    #[arg(long, env = "MERIDIAN_DATABASE_URL")]
    database: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// The latest session runs, newest first.
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One session: each run with its participants, files, outcome and audit entries.
    Show {
        session: SessionId,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum GeoipCommand {
    /// Where the database places each address (country, continent, city, coordinates).
    Lookup {
        /// A MaxMind DB City file; without it, the built-in development table.
        #[arg(long)]
        file: Option<PathBuf>,
        addresses: Vec<std::net::IpAddr>,
    },
    /// Build a MaxMind DB City file from a table (network,city,country,continent,lat,lon).
    Build {
        #[arg(long, default_value = "regions/geoip-dev.csv")]
        table: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new cluster CA: <dir>/ca.pem and <dir>/ca.key.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Issue a node certificate signed by the CA: <dir>/<node>.pem and <dir>/<node>.key.
    Issue {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long)]
        node: NodeId,
        /// Bind the certificate to this region too: peers refuse a Hello from the node that
        /// names another region.
        #[arg(long)]
        region: Option<RegionId>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "user" => Ok(Role::User),
        "agent" => Ok(Role::Agent),
        "observer" => Ok(Role::Observer),
        _ => Err(format!("unknown role {s:?}: use user, agent or observer")),
    }
}

const DEV_REGIONS: [&str; 3] = [
    include_str!("../regions/india.toml"),
    include_str!("../regions/europe.toml"),
    include_str!("../regions/us.toml"),
];

fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // Logs go to stderr, so what a command prints for people (links, figures) stays apart;
    // colour only on a terminal, and never with NO_COLOR set.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            meridian::logging::directives(std::env::var("RUST_LOG").ok().as_deref()),
        ))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve { config } => {
                let cfg = NodeConfig::load_layers(&config)?;
                let stop = StopSignals::install()?;
                let node = Node::start(cfg).await?;
                println!("meridian {} listening on {}", node.region, node.http_url());
                tokio::select! {
                    _ = node.wait() => {}
                    _ = stop.wait() => {}
                }
            }
            Command::Check { config } => {
                let cfg = NodeConfig::load_layers(&config)?;
                let ports = cfg.media_ports();
                println!(
                    "{} (region {}): signaling {}, metrics {}, media {} port(s) from {}{}, mesh {}, admin {}, recording {}",
                    cfg.node_id(),
                    cfg.node.region,
                    cfg.signaling.listen,
                    cfg.metrics.listen,
                    ports.len(),
                    ports.first().copied().unwrap_or(0),
                    if cfg.rtc.tcp { " (UDP and ICE-TCP)" } else { " (UDP)" },
                    cfg.mesh
                        .as_ref()
                        .map(|m| m.listen.to_string())
                        .unwrap_or_else(|| "off".into()),
                    cfg.admin
                        .as_ref()
                        .map(|a| a.listen.to_string())
                        .unwrap_or_else(|| "off".into()),
                    if cfg.recording.enabled { "on" } else { "off" },
                );
            }
            Command::Netem {
                listen,
                upstream,
                delay_ms,
                jitter_ms,
                loss,
            } => {
                if !(0.0..=1.0).contains(&loss) {
                    anyhow::bail!("--loss is a probability between 0 and 1, not {loss}");
                }
                let proxy = meridian::netem::start(
                    listen,
                    upstream,
                    meridian::netem::Impairment {
                        delay: Duration::from_millis(delay_ms),
                        jitter: Duration::from_millis(jitter_ms),
                        loss,
                        seed: rand::random(),
                    },
                )
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
                println!(
                    "impairing {} -> {upstream}: {delay_ms} ms (+0..{jitter_ms} ms), loss {loss}",
                    proxy.local_addr
                );
                StopSignals::install()?.wait().await;
            }
            Command::Dev => dev().await?,
            Command::Ctl {
                admin,
                token_file,
                command,
            } => {
                if let Err(e) = meridian::ctl::run(&admin, &token_file, command).await {
                    if let Some(o) = e.downcast_ref::<meridian::ctl::CtlOutcome>() {
                        eprintln!("{o}");
                        std::process::exit(o.exit_code());
                    }
                    return Err(e);
                }
            }
            Command::Token {
                config,
                eddsa_key,
                session,
                user,
                role,
                ttl,
                rec,
                residency,
                profile,
            } => {
                let cfg = NodeConfig::load(&config)?;
                let signer = match eddsa_key {
                    Some(path) => TokenSigner::eddsa_pem(
                        &std::fs::read(&path)?,
                        &cfg.auth.issuer,
                        &cfg.auth.audience,
                    )?,
                    None => cfg.auth.signer()?,
                };
                println!(
                    "{}",
                    signer.mint_with(
                        &session,
                        &user,
                        role,
                        Duration::from_secs(ttl),
                        meridian::auth::RecordingClaims {
                            rec,
                            residency,
                            profile,
                        },
                    )?
                );
            }
            #[cfg(feature = "loadgen")]
            Command::Bench { command } => bench_cli::run(command).await?,
            Command::Ca { command } => match command {
                CaCommand::Init { dir } => {
                    std::fs::create_dir_all(&dir)?;
                    let ca = ClusterCa::generate("Meridian cluster CA")?;
                    write_pem(&dir.join("ca.pem"), &ca.pair.cert_pem, false)?;
                    write_pem(&dir.join("ca.key"), &ca.pair.key_pem, true)?;
                    println!(
                        "wrote {0}/ca.pem and {0}/ca.key (keep ca.key offline)",
                        dir.display()
                    );
                }
                CaCommand::Issue { dir, node, region } => {
                    let ca = ClusterCa::load(&dir.join("ca.pem"), &dir.join("ca.key"))?;
                    let pair = ca.issue(&node, region.as_ref())?;
                    write_pem(&dir.join(format!("{node}.pem")), &pair.cert_pem, false)?;
                    write_pem(&dir.join(format!("{node}.key")), &pair.key_pem, true)?;
                    println!("wrote {0}/{node}.pem and {0}/{node}.key", dir.display());
                }
            },
            Command::Geoip { command } => match command {
                GeoipCommand::Lookup { file, addresses } => {
                    let db = match file {
                        Some(f) => GeoDb::open(&f)?,
                        None => GeoDb::dev(),
                    };
                    for ip in addresses {
                        match db.lookup(ip) {
                            Some(p) => println!(
                                "{ip}\t{}\t{}\t{}\t{:.4},{:.4}",
                                p.country.as_deref().unwrap_or("-"),
                                p.continent.as_deref().unwrap_or("-"),
                                p.city.as_deref().unwrap_or("-"),
                                p.latitude,
                                p.longitude
                            ),
                            None => println!("{ip}\tno place (routed to routing.default_region)"),
                        }
                    }
                }
                GeoipCommand::Build { table, out } => {
                    let text = std::fs::read_to_string(&table)?;
                    let rows = meridian::mesh::geo::parse_table(&text)?;
                    std::fs::write(&out, meridian::mesh::geo::build_city_db(&rows)?)?;
                    // Prove the file opens as a City database before saying so.
                    GeoDb::open(&out)?;
                    println!("wrote {} ({} networks)", out.display(), rows.len());
                }
            },
            Command::Sessions { command } => sessions(command).await?,
            Command::Verify {
                dir,
                public_key,
                store_config,
            } => {
                let trusted = match public_key.as_deref().map(parse_public_key).transpose() {
                    Ok(k) => k,
                    Err(e) => {
                        eprintln!("meridian verify: {e}");
                        std::process::exit(2);
                    }
                };
                let fetched = match &store_config {
                    Some(cfg) => match fetch_stored(cfg, &dir).await {
                        Ok(d) => Some(d),
                        Err(e) => {
                            eprintln!("meridian verify: {e:#}");
                            std::process::exit(2);
                        }
                    },
                    None => None,
                };
                let dir = fetched.clone().unwrap_or(dir);
                let v = verify(&dir, trusted.as_deref());
                if let Some(d) = &fetched {
                    let _ = std::fs::remove_dir_all(d);
                }
                if !v.ok() {
                    println!("NOT VERIFIED {}:", dir.display());
                    for f in &v.faults {
                        println!("  - {f}");
                    }
                    std::process::exit(1);
                }
                let m = v.manifest.expect("verified manifests were read");
                println!(
                    "verified {}: session {} ({:?}), {} files, {} audit entries ending in {}, signed by {}{}",
                    dir.display(),
                    m.session,
                    m.status,
                    m.files.len(),
                    m.audit.entries,
                    m.audit.final_hash,
                    m.signing_key,
                    if trusted.is_some() {
                        " (the trusted key)"
                    } else {
                        " (the key the manifest names: pass --public-key to check it is the node's)"
                    }
                );
            }
            Command::Keygen { private, public } => {
                let (sk, pk) = generate_ed25519_pem();
                std::fs::write(&private, sk)?;
                std::fs::write(&public, pk)?;
                println!("wrote {} and {}", private.display(), public.display());
            }
        }
        Ok(())
    })
}

/// Pipe ports of the dev mesh, by region index; each node dials the ones before it.
const DEV_PIPE_PORTS: [u16; 3] = [7101, 7102, 7103];

async fn dev() -> anyhow::Result<()> {
    let configs: Vec<NodeConfig> = DEV_REGIONS
        .iter()
        .map(|t| NodeConfig::from_toml_str(t))
        .collect::<Result<_, _>>()?;
    let ids: Vec<NodeId> = configs.iter().map(|c| c.node_id()).collect();
    let stop = StopSignals::install()?;
    let dir = std::env::temp_dir().join(format!("meridian-dev-{}", std::process::id()));
    // The throwaway cluster CA and node keys of this run go with it, however it ends.
    let _cleanup = RemoveOnDrop(dir.clone());
    let files = write_cluster(&dir, &ids)?;
    let mut nodes = Vec::new();
    for (i, (mut cfg, f)) in configs.into_iter().zip(files).enumerate() {
        cfg.mesh = Some(MeshSection {
            listen: ([127, 0, 0, 1], DEV_PIPE_PORTS[i]).into(),
            advertise: None,
            discovery: None,
            peers: DEV_PIPE_PORTS[..i]
                .iter()
                .map(|&p| ([127, 0, 0, 1], p).into())
                .collect(),
            ca_file: f.ca_file,
            cert_file: f.cert_file,
            key_file: f.key_file,
        });
        let signer = cfg.auth.signer()?;
        let node = Node::start(cfg).await?;
        nodes.push((node, signer));
    }
    // Let start-up settle (every pipe up) before printing the links, so log lines do not
    // land in the middle of them.
    let want = nodes.len() - 1;
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while !nodes
            .iter()
            .all(|(n, _)| n.mesh.as_ref().is_some_and(|m| m.pipes().len() == want))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if settled.is_err() {
        eprintln!("warning: not every pipe came up within 10 s; the links work on their own node");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let session: SessionId = "demo-kyc".parse()?;
    let day = Duration::from_secs(24 * 3600);
    println!("\nMeridian dev mesh is up: India, Europe and US nodes joined by QUIC pipes.\n");
    for (node, signer) in &nodes {
        let user = signer.mint(&session, &"demo-user".parse()?, Role::User, day)?;
        let agent = signer.mint(&session, &"demo-agent".parse()?, Role::Agent, day)?;
        println!(
            "  {:<7} {}   (metrics: http://{}/metrics)",
            node.region,
            node.http_url(),
            node.metrics_addr
        );
        println!(
            "          user page:  {}/demo/user.html#token={user}",
            node.http_url()
        );
        println!(
            "          agent page: {}/demo/agent.html#token={agent}",
            node.http_url()
        );
    }
    println!("\nOpen a user page and an agent page in two browser windows, for example the user");
    println!("page of India and the agent page of US: each sees the other through the pipe.");
    println!("Add &route=1 to a link and the page asks that node's /v1/edge where to join first;");
    println!("localhost has no GeoIP place, so it lands on the default region (Europe).");
    println!("Press Ctrl-C to stop.");
    stop.wait().await;
    drop(nodes);
    Ok(())
}

/// Removes a directory when dropped: on return, on error, on a stop signal.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ctrl-C, SIGTERM (systemd, `kill`, container stop) and SIGHUP (terminal closed), caught from
/// the moment this is made: made before the command says it is up, so a signal sent as soon
/// as it says so is not met by the default action (death without clean-up).
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the first of them.
    async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

async fn open_sessions_db(a: &DatabaseArgs) -> anyhow::Result<meridian::compliance::db::SessionDb> {
    let url = match &a.database {
        Some(u) => u.clone(),
        None => NodeConfig::load(&a.config)?.recording.database_url(),
    };
    Ok(meridian::compliance::db::SessionDb::open(&url).await?)
}

async fn sessions(command: SessionsCommand) -> anyhow::Result<()> {
    match command {
        SessionsCommand::List { db, limit } => {
            let rows = open_sessions_db(&db).await?.list(limit).await?;
            if db.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<27} {:<10} {:<12} {:<9} {:>3}  {:<27} OUTCOME",
                "SESSION", "STARTED", "REGION", "NODE", "STATUS", "PPL", "ENDED"
            );
            for r in rows {
                println!(
                    "{:<24} {:<27} {:<10} {:<12} {:<9} {:>3}  {:<27} {}",
                    r.session_id,
                    r.started_at,
                    r.region,
                    r.node,
                    r.status,
                    r.participants,
                    r.ended_at.unwrap_or_else(|| "-".into()),
                    r.outcome.unwrap_or_else(|| "-".into())
                );
            }
        }
        SessionsCommand::Show { session, db } => {
            let runs = open_sessions_db(&db)
                .await?
                .show(&session.to_string())
                .await?;
            if runs.is_empty() {
                anyhow::bail!("no session {session} in the database");
            }
            if db.json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
                return Ok(());
            }
            for d in runs {
                let s = &d.session;
                println!("session {} run {} ({})", s.session_id, s.run, s.status);
                println!("  folder   {}", s.folder);
                println!("  node     {} in {}", s.node, s.region);
                println!(
                    "  time     {} .. {}",
                    s.started_at,
                    s.ended_at.as_deref().unwrap_or("-")
                );
                if let Some(o) = &s.outcome {
                    println!(
                        "  outcome  {o} by {} {}",
                        d.outcome_by.as_deref().unwrap_or("?"),
                        d.outcome_note.as_deref().unwrap_or("")
                    );
                }
                if let Some(m) = &d.manifest_sha256 {
                    println!("  manifest sha256 {m}");
                }
                println!("  participants:");
                for p in &d.participant_list {
                    println!(
                        "    {:<8} {:<20} {:<16} {} .. {} ({})",
                        p.role,
                        p.user_id,
                        format!("{}/{}", p.region, p.node),
                        p.joined_at,
                        p.left_at.as_deref().unwrap_or("-"),
                        p.left_reason.as_deref().unwrap_or("-")
                    );
                }
                println!("  recordings:");
                for f in &d.recordings {
                    println!(
                        "    {:<36} {:<10} {:>10} bytes {:>8} ms{}",
                        f.file,
                        f.tracks,
                        f.bytes,
                        f.duration_ms,
                        f.error
                            .as_ref()
                            .map(|e| format!(" ERROR {e}"))
                            .unwrap_or_default()
                    );
                }
                println!("  audit entries: {}", d.entries.len());
                for e in &d.entries {
                    println!(
                        "    {:>4} {} {:<22} {}",
                        e.seq,
                        e.at,
                        e.event,
                        e.user_id.as_deref().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

/// Downloads the stored run `<session>/<run>` named by a region file's `[recording.storage]`
/// into a fresh temporary folder.
async fn fetch_stored(config: &std::path::Path, run: &std::path::Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let cfg = NodeConfig::load(config)?;
    let storage = cfg
        .recording
        .storage
        .as_ref()
        .context("the region file has no [recording.storage]")?;
    let key = run.to_string_lossy();
    let (session, run) = key
        .trim_matches('/')
        .split_once('/')
        .context("a stored run is named <session>/<run>")?;
    let store = meridian::compliance::storage::Store::new(storage)?;
    let dir = std::env::temp_dir().join(format!(
        "meridian-verify-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    let n = store.fetch(session, run, &dir).await?;
    anyhow::ensure!(
        n > 0,
        "nothing stored under {}",
        store.run_url(session, run)
    );
    Ok(dir)
}
