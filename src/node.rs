//! One Meridian node: media worker plus signaling server, started from a [`NodeConfig`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::TokenVerifier;
use crate::config::{ConfigError, NodeConfig};
use crate::ids::{NodeId, RegionId};
use crate::mesh::{self, tls::NodeTls, MeshConfig, MeshHandle};
use crate::sfu::{spawn_worker, WorkerConfig, WorkerHandle};
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
    #[error("cannot bind signaling on {addr}: {source} (is signaling.listen in use?)")]
    Signaling {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running node.
pub struct Node {
    pub region: RegionId,
    pub id: NodeId,
    /// Where signaling listens (the real port when the config said 0).
    pub signaling_addr: SocketAddr,
    pub worker: WorkerHandle,
    /// Pipes to other nodes, when `[mesh]` is configured.
    pub mesh: Option<MeshHandle>,
    pub metrics: std::sync::Arc<SignalingMetrics>,
    server: tokio::task::JoinHandle<()>,
}

impl Node {
    pub async fn start(cfg: NodeConfig) -> Result<Node, StartError> {
        let verifier = TokenVerifier::from_config(&cfg.auth)?;
        let listen = SocketAddr::new(cfg.rtc.listen_ip, cfg.rtc.port);
        let mesh_tls = match &cfg.mesh {
            Some(m) => Some(NodeTls::load(&m.ca_file, &m.cert_file, &m.key_file)?),
            None => None,
        };
        let (mesh_tx, mesh_rx) = tokio::sync::mpsc::unbounded_channel();
        let worker = spawn_worker(WorkerConfig {
            listen,
            announced_ip: cfg.rtc.announced_ip,
            limits: cfg.limits.clone(),
            max_datagram_bytes: cfg.rtc.max_datagram_bytes,
            udp: cfg.rtc.udp,
            tcp: cfg.rtc.tcp,
            mesh: cfg.mesh.is_some().then_some(mesh_tx),
        })
        .map_err(|source| StartError::Media {
            addr: listen,
            source,
        })?;
        let mesh = match (&cfg.mesh, mesh_tls) {
            (Some(m), Some(tls)) => Some(mesh::start(
                MeshConfig {
                    node: cfg.node_id(),
                    region: cfg.node.region.clone(),
                    listen: m.listen,
                    tls,
                    peers: m.peers.clone(),
                },
                worker.clone(),
                mesh_rx,
            )?),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(cfg.signaling.listen)
            .await
            .map_err(|source| StartError::Signaling {
                addr: cfg.signaling.listen,
                source,
            })?;
        let signaling_addr = listener
            .local_addr()
            .map_err(|source| StartError::Signaling {
                addr: cfg.signaling.listen,
                source,
            })?;
        let metrics = std::sync::Arc::new(SignalingMetrics::default());
        let pipes = mesh.as_ref().map(|m| {
            let m = m.reports();
            std::sync::Arc::new(m)
                as std::sync::Arc<dyn Fn() -> Vec<mesh::PipeReport> + Send + Sync>
        });
        let state = AppState {
            worker: worker.clone(),
            verifier,
            metrics: metrics.clone(),
            max_message_bytes: cfg.signaling.max_message_bytes,
            join_timeout: Duration::from_secs(cfg.signaling.join_timeout_secs),
            region: cfg.node.region.clone(),
            node: cfg.node_id(),
            pipes,
        };
        let app = signaling::router(state).into_make_service_with_connect_info::<SocketAddr>();
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "signaling server stopped");
            }
        });
        tracing::info!(region = %cfg.node.region, signaling = %signaling_addr, media = %worker.media_addr(), "node started");
        Ok(Node {
            region: cfg.node.region.clone(),
            id: cfg.node_id(),
            signaling_addr,
            worker,
            mesh,
            metrics,
            server,
        })
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
        if let Some(m) = &self.mesh {
            m.shutdown();
        }
    }
}
