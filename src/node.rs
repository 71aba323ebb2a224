//! One Meridian node: media worker plus signaling server, started from a [`NodeConfig`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::admission::{Admission, Limits};
use crate::config::{ConfigError, NodeConfig};
use crate::ids::{NodeId, RegionId};
use crate::mesh::discovery::DnsDiscovery;
use crate::mesh::geo::{GeoDb, GeoError};
use crate::mesh::load::{Capacity, LoadMeter};
use crate::mesh::membership::{MemberView, NodeInfo, HEARTBEAT_EVERY};
use crate::mesh::{self, tls::NodeTls, MeshConfig, MeshHandle};
use crate::sfu::{spawn_worker, WorkerConfig, Workers};
use crate::signaling::server;
use crate::signaling::{self, AppState, SignalingMetrics};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind the media socket {addr}: {source} (is rtc.port in use?)")]
    Media {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the mesh: {0}")]
    Mesh(#[from] mesh::MeshError),
    #[error("cannot load the mesh certificates: {0}")]
    MeshTls(#[from] mesh::tls::TlsError),
    #[error(
        "mesh.cert_file is issued to node {cert_node}{cert_region}, but this node is {node} in \
         region {region}: peers would refuse its pipes. Issue it a certificate with \
         `meridian ca issue --node {node}` (or set node.id)"
    )]
    MeshIdentity {
        cert_node: String,
        cert_region: String,
        node: NodeId,
        region: RegionId,
    },
    #[error(transparent)]
    Geo(#[from] GeoError),
    #[error("recording.enabled needs recording.signing_key_file (the node's Ed25519 key that seals sessions)")]
    RecordingKeyMissing,
    #[error("cannot load the recording signing key: {0}")]
    RecordingKey(#[from] crate::compliance::seal::SealError),
    #[error("cannot start recording: {0}")]
    Recording(#[from] crate::compliance::recorder::RecordError),
    #[error(transparent)]
    Database(#[from] crate::compliance::db::DbError),
    #[error("the system's random source failed")]
    Random,
    #[error("cannot set up the object store: {0}")]
    Storage(#[from] crate::compliance::storage::StorageError),
    #[error("cannot bind signaling on {addr}: {source} (is signaling.listen in use?)")]
    Signaling {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind metrics on {addr}: {source} (is metrics.listen in use?)")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for the admin API on {addr}: {source} (check admin.listen)")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    AdminToken(#[from] crate::admin::AdminTokenError),
    #[error(
        "the open-file limit is {hard}, but signaling.max_connections plus ICE-TCP and the node's \
         own sockets need {needed}: raise the hard limit (LimitNOFILE= in the service unit, or \
         ulimit -Hn) or lower signaling.max_connections"
    )]
    FdLimit { needed: u64, hard: u64 },
    #[error("cannot read the open-file limit: {0}")]
    FdLimitUnreadable(std::io::Error),
}

/// A TCP listener on `addr` and the address it really bound (port 0 picks one).
async fn bind_tcp(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Descriptors the node needs beyond client connections: media, pipe and DNS sockets, files.
const FD_RESERVE: u64 = 1024;

/// Raises the soft open-file limit to `needed`, or says why it cannot be.
fn raise_fd_limit(needed: u64) -> Result<(), StartError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(StartError::FdLimitUnreadable(
            std::io::Error::last_os_error(),
        ));
    }
    if lim.rlim_max != libc::RLIM_INFINITY && lim.rlim_max < needed {
        return Err(StartError::FdLimit {
            needed,
            hard: lim.rlim_max,
        });
    }
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < needed {
        lim.rlim_cur = needed;
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(StartError::FdLimitUnreadable(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// A running node.
pub struct Node {
    pub region: RegionId,
    pub id: NodeId,
    /// Where signaling listens (the real port when the config said 0).
    pub signaling_addr: SocketAddr,
    /// Where `/metrics` is served (the real port when the config said 0).
    pub metrics_addr: SocketAddr,
    /// Where the admin API listens, when `[admin]` is configured.
    pub admin_addr: Option<SocketAddr>,
    /// The media workers, one per core unless `rtc.workers` says otherwise.
    pub workers: Workers,
    /// Pipes to other nodes, when `[mesh]` is configured.
    pub mesh: Option<MeshHandle>,
    pub metrics: std::sync::Arc<SignalingMetrics>,
    availability: Arc<crate::health::Availability>,
    health_watch: tokio::task::JoinHandle<()>,
    members: watch::Receiver<Arc<Vec<MemberView>>>,
    server: tokio::task::JoinHandle<()>,
    metrics_server: tokio::task::JoinHandle<()>,
    admin_server: Option<tokio::task::JoinHandle<()>>,
    /// Answers operators' calls other nodes relay here.
    relayed: Option<tokio::task::JoinHandle<()>>,
    /// Publishes the membership of a node without a mesh.
    solo: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    pub async fn start(cfg: NodeConfig) -> Result<Node, StartError> {
        raise_fd_limit(
            cfg.signaling.max_connections as u64
                + crate::sfu::MAX_TCP_CONNECTIONS as u64
                + FD_RESERVE,
        )?;
        let verifier = cfg.auth.verifier()?;
        let turn = cfg.turn.as_ref().map(|t| t.issuer()).transpose()?;
        let mesh_tls = match &cfg.mesh {
            Some(m) => {
                let tls = NodeTls::load(&m.ca_file, &m.cert_file, &m.key_file)?;
                let own = tls.own_identity()?;
                if !own.admits(&cfg.node_id(), &cfg.node.region) {
                    return Err(StartError::MeshIdentity {
                        cert_region: own
                            .region
                            .map(|r| format!(" in region {r}"))
                            .unwrap_or_default(),
                        cert_node: own.node,
                        node: cfg.node_id(),
                        region: cfg.node.region.clone(),
                    });
                }
                Some(tls)
            }
            None => None,
        };
        // Sessions whose recording failed: their connections close, here and (through the
        // mesh) on the nodes of their other participants.
        let (recording_ended, _) = tokio::sync::broadcast::channel(256);
        let recorder = if cfg.recording.enabled {
            use crate::compliance::{recorder, seal::SigningKey};
            let path = cfg
                .recording
                .signing_key_file
                .as_ref()
                .ok_or(StartError::RecordingKeyMissing)?;
            let key = if cfg.recording.create_signing_key {
                SigningKey::load_or_create(path)?
            } else {
                SigningKey::load(path)?
            };
            let url = cfg.recording.database_url();
            std::fs::create_dir_all(&cfg.recording.dir).map_err(|source| {
                recorder::RecordError::Folder {
                    path: cfg.recording.dir.clone(),
                    source,
                }
            })?;
            let db = crate::compliance::db::SessionDb::open(&url).await?;
            let uploads = match &cfg.recording.storage {
                Some(s) => {
                    use crate::compliance::storage;
                    let store = storage::Store::new(s)?;
                    let index = db.clone();
                    let uploads = storage::start(store, move |job, url| {
                        let (index, job) = (index.clone(), job.clone());
                        tokio::spawn(async move {
                            if let Err(e) = index.mark_stored(&job.session, &job.run, &url).await {
                                tracing::error!(error = %e, "session database not updated");
                            }
                        });
                    });
                    // Runs sealed before this start and never stored (the node stopped, or
                    // the store was down): queued again.
                    for (session, run, folder) in db.unstored().await? {
                        uploads.queue(storage::UploadJob {
                            folder: folder.into(),
                            session,
                            run,
                        });
                    }
                    Some(uploads)
                }
                None => None,
            };
            let (db_tx, mut db_rx) = tokio::sync::mpsc::unbounded_channel();
            let db_failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let failures = db_failures.clone();
            tokio::spawn(async move {
                while let Some(u) = db_rx.recv().await {
                    if let Err(e) = db.apply(&u).await {
                        failures.fetch_add(1, Relaxed);
                        tracing::error!(error = %e, "session database not updated");
                    }
                }
            });
            let (rec, recovered) = recorder::Recorder::start(recorder::RecorderSettings {
                ended: Some(recording_ended.clone()),
                dir: cfg.recording.dir.clone(),
                key,
                node: cfg.node_id(),
                region: cfg.node.region.clone(),
                db: Some(db_tx),
                uploads: uploads.clone(),
            })?;
            rec.stats().set_db_failures(db_failures);
            if let Some(u) = &uploads {
                rec.stats().set_storage(u.stats.clone());
            }
            for dir in &recovered.sealed {
                tracing::warn!(dir = %dir.display(), "sealed a session interrupted by the last stop");
            }
            for (dir, why) in &recovered.broken {
                tracing::error!(dir = %dir.display(), %why, "an interrupted session's audit log does not verify: left unsealed");
            }
            Some(rec)
        } else {
            None
        };
        let (mesh_tx, mesh_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut handles = Vec::new();
        for (index, port) in cfg.media_ports().into_iter().enumerate() {
            let listen = SocketAddr::new(cfg.rtc.listen_ip, port);
            let handle = spawn_worker(WorkerConfig {
                listen,
                announced_ip: cfg.rtc.announced_ip,
                limits: cfg.limits.worker(),
                max_datagram_bytes: cfg.rtc.max_datagram_bytes,
                udp: cfg.rtc.udp,
                tcp: cfg.rtc.tcp,
                // Config validation keeps the number of workers within a byte.
                index: index as u8,
                mesh: cfg.mesh.is_some().then(|| mesh_tx.clone()),
                send_side_bwe: cfg.rtc.send_side_bwe,
                srtp_in_place: cfg.rtc.srtp_in_place,
                recording: recorder.as_ref().map(|r| r.media().clone()),
            })
            .map_err(|source| StartError::Media {
                addr: listen,
                source,
            })?;
            handles.push(handle);
        }
        drop(mesh_tx);
        let workers = Workers::new(handles, cfg.limits.max_sessions);
        let (listener, signaling_addr) =
            bind_tcp(cfg.signaling.listen)
                .await
                .map_err(|source| StartError::Signaling {
                    addr: cfg.signaling.listen,
                    source,
                })?;
        let geo = Arc::new(match &cfg.routing.geoip_file {
            Some(path) => GeoDb::open(path)?,
            None => GeoDb::dev(),
        });
        let info = NodeInfo {
            node: cfg.node_id(),
            region: cfg.node.region.clone(),
            signaling_url: cfg.signaling_url(signaling_addr),
            latitude: cfg.node.latitude,
            longitude: cfg.node.longitude,
            pipe_addr: cfg.mesh.as_ref().and_then(|m| m.advertise),
        };
        let capacity = Capacity {
            max_sessions: cfg.limits.max_sessions,
            max_consumers: cfg.limits.max_consumers,
            max_cpu: cfg.limits.max_cpu,
        };
        // What the mesh announces as draining: an operator's drain, or workers not answering.
        let draining = Arc::new(AtomicBool::new(false));
        let availability = Arc::new(crate::health::Availability::new(draining.clone()));
        let health_watch = tokio::spawn(crate::health::watch_workers(
            workers.clone(),
            availability.clone(),
        ));
        let tuning = Arc::new(crate::mesh::load::Tuning::default());
        let (admin_inbox, admin_inbox_rx) = tokio::sync::mpsc::unbounded_channel();
        let (record_inbox, record_inbox_rx) = match &recorder {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let mesh = match (&cfg.mesh, mesh_tls) {
            (Some(m), Some(tls)) => Some(mesh::start(
                MeshConfig {
                    info: info.clone(),
                    listen: m.listen,
                    tls,
                    peers: m.peers.clone(),
                    discovery: m.discovery.as_ref().map(|d| DnsDiscovery {
                        name: d.srv_name.clone(),
                        servers: d.servers.clone(),
                        interval: Duration::from_secs(d.interval_secs),
                    }),
                    capacity,
                    draining: draining.clone(),
                    tuning: tuning.clone(),
                    admin_inbox: Some(admin_inbox),
                },
                workers.clone(),
                mesh_rx,
                mesh::records::Wiring {
                    inbox: record_inbox,
                    ended: Some(recording_ended.clone()),
                },
            )?),
            _ => None,
        };
        // Records other nodes relay for sessions recorded here.
        if let (Some(rec), Some(m), Some(inbox)) = (&recorder, &mesh, record_inbox_rx) {
            tokio::spawn(signaling::records::serve_relayed(
                inbox,
                rec.clone(),
                workers.clone(),
                m.records(),
                recording_ended.subscribe(),
            ));
        }
        let (members, solo) = match &mesh {
            Some(m) => (m.watch_members(), None),
            None => {
                let (tx, rx) = watch::channel(Arc::new(vec![mesh::local_view(
                    &info,
                    Default::default(),
                    false,
                    tuning.weight(),
                )]));
                let mut meter = LoadMeter::new(workers.shared_stats(), capacity, tuning.clone());
                let draining = draining.clone();
                let tuning = tuning.clone();
                // Alone, the node is its whole membership: the same cadence as the mesh core
                // (drain state each tick, load once per heartbeat interval), without peers.
                let task = tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(250));
                    let mut load = Default::default();
                    let mut sampled: Option<std::time::Instant> = None;
                    loop {
                        tick.tick().await;
                        let now = std::time::Instant::now();
                        if sampled.is_none_or(|t| now - t >= HEARTBEAT_EVERY) {
                            sampled = Some(now);
                            load = meter.sample(now);
                        }
                        let view = Arc::new(vec![mesh::local_view(
                            &info,
                            load,
                            draining.load(Relaxed),
                            tuning.weight(),
                        )]);
                        if tx.send(view).is_err() {
                            break;
                        }
                    }
                });
                (rx, Some(task))
            }
        };
        let (metrics_listener, metrics_addr) =
            bind_tcp(cfg.metrics.listen)
                .await
                .map_err(|source| StartError::Metrics {
                    addr: cfg.metrics.listen,
                    source,
                })?;
        let admission = Admission::new(Limits {
            max: cfg.signaling.max_connections,
            per_source: cfg.signaling.max_connections_per_source,
            exempt: cfg.routing.trusted_proxies.clone(),
        });
        let header_timeout = Duration::from_secs(cfg.signaling.header_timeout_secs);
        let metrics = std::sync::Arc::new(SignalingMetrics::default());
        let pipes = mesh.as_ref().map(|m| {
            let m = m.reports();
            std::sync::Arc::new(m)
                as std::sync::Arc<dyn Fn() -> Vec<mesh::PipeReport> + Send + Sync>
        });
        let recording_policy = crate::compliance::policy::RecordingPolicy {
            record_by_default: cfg.recording.enabled,
            default_residency: cfg.recording.default_residency.clone(),
            can_record: recorder.is_some(),
        };
        let profiles = crate::compliance::profile::Profiles::new(
            &cfg.recording.profiles,
            cfg.recording.profile.as_deref(),
        )
        .map_err(|e| {
            StartError::Config(ConfigError::Invalid {
                key: "recording.profiles",
                reason: e.to_string(),
            })
        })?;
        let state = AppState {
            availability: availability.clone(),
            recording_ended: recording_ended.clone(),
            recording_policy,
            profiles,
            recorder,
            workers: workers.clone(),
            verifier,
            metrics: metrics.clone(),
            max_message_bytes: cfg.signaling.max_message_bytes,
            join_timeout: Duration::from_secs(cfg.signaling.join_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.signaling.idle_timeout_secs),
            admission: admission.clone(),
            region: cfg.node.region.clone(),
            node: cfg.node_id(),
            pipes,
            edge: Arc::new(signaling::edge::EdgeRouting {
                geo,
                policy: cfg.routing_policy(),
                trusted_proxies: cfg.routing.trusted_proxies.clone(),
                client_address_header: cfg.routing.client_address_header,
                members: members.clone(),
                hosts: mesh.as_ref().map(|m| m.hosts.clone()),
                metrics: Default::default(),
            }),
            mesh_stats: mesh.as_ref().map(|m| m.stats.clone()),
            records: mesh.as_ref().map(|m| m.records()),
            review_key: ring::hmac::Key::generate(
                ring::hmac::HMAC_SHA256,
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|_| StartError::Random)?,
            parking: signaling::Parking::new(Duration::from_secs(cfg.signaling.resume_grace_secs)),
            migration: Arc::new(tokio::sync::watch::channel(None).0),
            turn,
        };
        // The metrics listener is for a local scraper: a small cap of its own.
        let metrics_admission = Admission::new(Limits {
            max: 64,
            per_source: 64,
            exempt: Vec::new(),
        });
        let metrics_server = tokio::spawn(server::serve(
            metrics_listener,
            signaling::metrics_router(state.clone()),
            metrics_admission,
            header_timeout,
        ));
        // What operators' calls act on: from this node's admin API, and relayed by peers.
        let operations = crate::admin::Operations {
            node: cfg.node_id(),
            region: cfg.node.region.clone(),
            availability: availability.clone(),
            members: members.clone(),
            pipes: state.pipes.clone(),
            metrics: metrics.clone(),
            migration: state.migration.clone(),
            workers: workers.clone(),
            tuning,
            max_sessions: cfg.limits.max_sessions.min(u32::MAX as usize) as u32,
        };
        let relayed = mesh.as_ref().map(|_| {
            tokio::spawn(crate::admin::serve_relayed(
                admin_inbox_rx,
                operations.clone(),
            ))
        });
        // The operators' API: its own listener and admission cap, never the public port.
        let (admin_addr, admin_server) = match &cfg.admin {
            None => (None, None),
            Some(a) => {
                let token = crate::admin::read_token(&a.token_file)?;
                let (l, addr) = bind_tcp(a.listen)
                    .await
                    .map_err(|source| StartError::Admin {
                        addr: a.listen,
                        source,
                    })?;
                let admin = crate::admin::AdminState {
                    token_digest: Arc::new(crate::admin::digest(&token)),
                    ops: operations,
                    relay: mesh.as_ref().map(|m| m.admin()),
                };
                let cap = Admission::new(Limits {
                    max: 16,
                    per_source: 16,
                    exempt: Vec::new(),
                });
                let task = tokio::spawn(server::serve(
                    l,
                    crate::admin::router(admin),
                    cap,
                    header_timeout,
                ));
                (Some(addr), Some(task))
            }
        };
        let server = tokio::spawn(server::serve(
            listener,
            signaling::router(state),
            admission,
            header_timeout,
        ));
        tracing::info!(region = %cfg.node.region, signaling = %signaling_addr, metrics = %metrics_addr, media = ?workers.media_addrs(), "node started");
        Ok(Node {
            region: cfg.node.region.clone(),
            id: cfg.node_id(),
            signaling_addr,
            metrics_addr,
            admin_addr,
            workers,
            mesh,
            metrics,
            availability,
            health_watch,
            members,
            server,
            metrics_server,
            admin_server,
            relayed,
            solo,
        })
    }

    /// Stops (or resumes) taking new sessions: routing skips a draining node, its peers learn
    /// within a heartbeat; sessions already here carry on.
    pub fn set_draining(&self, on: bool) {
        self.availability.set_drained(on);
    }

    /// The mesh as this node sees it, itself first.
    pub fn members(&self) -> Arc<Vec<MemberView>> {
        self.members.borrow().clone()
    }

    /// Base URL of the signaling server.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.signaling_addr)
    }

    /// Waits until the signaling server stops.
    pub async fn wait(mut self) {
        let _ = (&mut self.server).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.abort();
        self.metrics_server.abort();
        self.health_watch.abort();
        if let Some(t) = &self.relayed {
            t.abort();
        }
        if let Some(t) = &self.admin_server {
            t.abort();
        }
        if let Some(t) = &self.solo {
            t.abort();
        }
        if let Some(m) = &self.mesh {
            m.shutdown();
        }
    }
}
