//! Node configuration: one TOML file per region (see `regions/`), layered with `MERIDIAN__*`
//! environment overrides (`MERIDIAN__RTC__ANNOUNCED_IP=203.0.113.7`).
//!
//! Every struct rejects unknown keys, and [`NodeConfig::validate`] rejects values that parse but
//! make no sense, naming the key so an operator can fix the file.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids::{NodeId, RegionId};

/// Everything one Meridian node needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Where this node sits in the mesh.
    pub node: NodeSection,
    /// HTTP + WebSocket signaling.
    pub signaling: SignalingSection,
    /// WebRTC media sockets.
    pub rtc: RtcSection,
    /// Token verification.
    pub auth: AuthSection,
    /// Admission limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Pipes to other nodes; without it the node runs alone.
    #[serde(default)]
    pub mesh: Option<MeshSection>,
    /// How clients are sent to the nearest edge (`GET /v1/edge`).
    #[serde(default)]
    pub routing: RoutingSection,
    /// The Prometheus endpoint, kept off the client-facing listener.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The operators' API (`meridian ctl`), off unless configured (see docs/operations.md).
    #[serde(default)]
    pub admin: Option<crate::admin::AdminSection>,
    /// Compliance records of the sessions this node holds (see docs/compliance.md).
    #[serde(default)]
    pub recording: RecordingSection,
    /// The region's TURN servers: participants get time-limited credentials for them in
    /// `joined` (see docs/deployment.md#turn). Off unless configured.
    #[serde(default)]
    pub turn: Option<TurnSection>,
}

/// `[turn]`: TURN REST credentials for the region's coturn (`use-auth-secret`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnSection {
    /// What clients are told, e.g. `turn:in-1.example.com:3478?transport=udp`,
    /// `turns:in-1.example.com:5349?transport=tcp`.
    pub urls: Vec<String>,
    /// coturn's `static-auth-secret` (development only; prefer `secret_file`).
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the secret (surrounding whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// How long a credential is good for.
    #[serde(default = "default_turn_ttl")]
    pub ttl_secs: u64,
}

fn default_turn_ttl() -> u64 {
    4 * 3600
}

impl TurnSection {
    /// The issuer of this section's credentials.
    pub fn issuer(&self) -> Result<crate::auth::turn::TurnIssuer, ConfigError> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(s), None) => s.trim().as_bytes().to_vec(),
            (None, Some(path)) => {
                let bytes = std::fs::read(path).map_err(|source| ConfigError::File {
                    key: "turn.secret_file",
                    path: path.clone(),
                    source,
                })?;
                String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec()
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "turn.secret",
                    "set `secret` or `secret_file`, not both",
                ))
            }
            (None, None) => return Err(invalid("turn.secret", "give `secret_file` (or `secret`)")),
        };
        crate::auth::turn::TurnIssuer::new(
            self.urls.clone(),
            &secret,
            std::time::Duration::from_secs(self.ttl_secs),
        )
        .map_err(|e| invalid("turn", e.to_string()))
    }
}

/// Compliance records: each session's audit log, sealed with the node's signing key when the
/// session ends. Off by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingSection {
    #[serde(default)]
    pub enabled: bool,
    /// Session folders go under `<dir>/<session>/<start>/`.
    #[serde(default = "default_recording_dir")]
    pub dir: std::path::PathBuf,
    /// The node's Ed25519 signing key (PKCS#8 PEM). Required when recording is enabled.
    #[serde(default)]
    pub signing_key_file: Option<std::path::PathBuf>,
    /// Create the signing key (and `<name>.pub.pem` beside it) when the file does not exist:
    /// for development; in production the key is provisioned and its absence is an error.
    #[serde(default)]
    pub create_signing_key: bool,
    /// The region whose node records a session when its token names none; absent: the
    /// region of the node the participant joins.
    #[serde(default)]
    pub default_residency: Option<RegionId>,
    /// The session database (sessions, participants, recordings, outcomes, audit index):
    /// `sqlite://<path>` or `postgres://user:password@host/db`. Absent: a SQLite file
    /// `sessions.db` in `dir`.
    #[serde(default)]
    pub database: Option<String>,
    /// Copy sealed folders to an S3-compatible object store (see docs/compliance.md).
    #[serde(default)]
    pub storage: Option<crate::compliance::storage::StorageSection>,
    /// The compliance profile of sessions whose token names none (for example `rbi-vcip`);
    /// absent: none.
    #[serde(default)]
    pub profile: Option<String>,
    /// Compliance profiles besides (or replacing) the built-in `rbi-vcip`
    /// (`[recording.profiles.<name>]`, see docs/compliance.md).
    #[serde(default)]
    pub profiles: std::collections::BTreeMap<String, crate::compliance::profile::ProfileRules>,
}

impl RecordingSection {
    /// The session database's URL (see `database`).
    pub fn database_url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.dir.join("sessions.db").display()))
    }
}

fn default_recording_dir() -> std::path::PathBuf {
    "recordings".into()
}

impl Default for RecordingSection {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: default_recording_dir(),
            signing_key_file: None,
            create_signing_key: false,
            default_residency: None,
            database: None,
            storage: None,
            profile: None,
            profiles: Default::default(),
        }
    }
}

/// Where `/metrics` is served. Loads, drain state and counts are operational data: they are
/// never on the signaling listener that clients reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the metrics listener; loopback by default, so only a local scraper (or an
    /// operator's tunnel) reads it.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}

pub use crate::signaling::edge::ClientAddressHeader;

/// Edge selection and client location (see docs/routing.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    /// `nearest` (region by distance and weight, then least loaded node) or `least_loaded`.
    #[serde(default)]
    pub selector: crate::mesh::selector::SelectorKind,
    /// A MaxMind DB City file (GeoLite2-City.mmdb, GeoIP2-City.mmdb). Unset: the built-in
    /// development table (`regions/geoip-dev.csv`), which places only reserved test addresses.
    #[serde(default)]
    pub geoip_file: Option<PathBuf>,
    /// Region for clients whose address has no location (private or unknown addresses).
    #[serde(default)]
    pub default_region: Option<RegionId>,
    /// Let a client without a known location ask for a region (`/v1/edge?region=`).
    #[serde(default)]
    pub allow_region_hint: bool,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` headers are believed, as networks
    /// (`10.0.0.0/8`). Headers from any other peer are ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::cidr::Cidr>,
    /// The one forwarding header read from trusted proxies: `x-forwarded-for` (default) or
    /// `forwarded`. The other is ignored, since a client can send it through a proxy that
    /// only appends to the configured one.
    #[serde(default)]
    pub client_address_header: ClientAddressHeader,
    /// Region weights (default 1): a region's distance is divided by its weight, so 2 makes
    /// it attract clients from twice as far.
    #[serde(default)]
    pub region_weights: HashMap<RegionId, f64>,
    /// Country code (ISO 3166-1 alpha-2, e.g. `KE`) to region, when network paths disagree
    /// with geography. Checked before continents.
    #[serde(default)]
    pub country_overrides: HashMap<String, RegionId>,
    /// Continent code (AF AN AS EU NA OC SA) to region.
    #[serde(default)]
    pub continent_overrides: HashMap<String, RegionId>,
}

/// Finding peers in DNS (see docs/membership.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySection {
    /// SRV name listing the mesh's nodes, e.g. `_meridian._udp.mesh.example.com.`.
    pub srv_name: String,
    /// Name servers (`ip:port`) to ask; empty uses the system's resolver configuration.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// Seconds between lookups; also the longest a DNS answer is cached.
    #[serde(default = "default_discovery_interval")]
    pub interval_secs: u64,
}

/// QUIC pipes between nodes, authenticated by a cluster CA (`meridian ca ...`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// UDP address of the pipe endpoint, e.g. `0.0.0.0:7100`.
    pub listen: SocketAddr,
    /// Pipe address other nodes reach this one on; defaults to `listen` (which must then not
    /// be a wildcard when discovery is on). Discovery matches it against DNS answers.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Static peers: the whole peer list without `discovery`, the fallback before DNS has
    /// answered with it. Listing a pair on both sides is fine: one pipe is kept.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// Find peers in DNS SRV/TXT records.
    #[serde(default)]
    pub discovery: Option<DiscoverySection>,
    /// The cluster CA certificate (PEM).
    pub ca_file: PathBuf,
    /// This node's certificate (PEM), issued by the cluster CA.
    pub cert_file: PathBuf,
    /// This node's private key (PEM).
    pub key_file: PathBuf,
}

/// Identity and position of the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Region this node serves, e.g. `india`.
    pub region: RegionId,
    /// Unique name of this node; defaults to `<region>-1`.
    #[serde(default)]
    pub id: Option<NodeId>,
    /// Latitude of the region's site in degrees, -90..=90.
    pub latitude: f64,
    /// Longitude of the region's site in degrees, -180..=180.
    pub longitude: f64,
}

/// Signaling endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalingSection {
    /// Address the HTTP/WebSocket server binds, e.g. `0.0.0.0:7001`.
    pub listen: SocketAddr,
    /// WebSocket URL clients use to reach this node from outside (`wss://in-1.example.com/v1/ws`),
    /// handed out by `/v1/edge`. Defaults to `ws://<listen>/v1/ws`, which needs a non-wildcard
    /// `listen`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Largest accepted signaling message in bytes; larger ones close the connection (1009).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Seconds a connection may stay open without sending `join`.
    #[serde(default = "default_join_timeout_secs")]
    pub join_timeout_secs: u64,
    /// Seconds to receive a complete HTTP request head, on a new connection or an idle
    /// kept-alive one; a silent connection is closed then.
    #[serde(default = "default_header_timeout_secs")]
    pub header_timeout_secs: u64,
    /// Seconds a joined WebSocket may go without a frame from the client (the node pings
    /// every 15 s, which browsers answer on their own) before it is closed (4410).
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Seconds a participant whose WebSocket was lost (not closed) keeps its place: its
    /// media goes on and the others see no leave; the SDK reconnects with `join.resume`.
    /// 0: a lost connection leaves at once. At most 300.
    #[serde(default = "default_resume_grace_secs")]
    pub resume_grace_secs: u64,
    /// Connections (HTTP and WebSocket) open at once. The node raises its file descriptor
    /// limit to fit this plus the ICE-TCP connections, or refuses to start.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one source address; trusted proxies
    /// (`routing.trusted_proxies`) count only against `max_connections`.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
}

/// Media sockets. Like mediasoup's WebRtcServer, one UDP port serves every peer connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtcSection {
    /// Address the media socket binds; may be a wildcard or a private address.
    #[serde(default = "default_listen_ip")]
    pub listen_ip: IpAddr,
    /// Address put into ICE candidates: what clients must send to (public or NAT 1:1 address).
    pub announced_ip: IpAddr,
    /// UDP port of the first media worker; worker `i` uses `port + i` (all peer connections
    /// of the sessions a worker hosts share its port). 0 picks free ports.
    pub port: u16,
    /// Media workers (threads, each with its own port), as mediasoup runs one per core.
    /// Default: the cores available to the process.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Explicit media ports, one per worker, instead of `port + i`; their number sets the
    /// number of workers unless `workers` is also given (then they must agree).
    #[serde(default)]
    pub ports: Option<Vec<u16>>,
    /// Offer a UDP candidate (the preferred transport). Turning it off leaves only ICE-TCP,
    /// as mediasoup's `enableUdp: false` does.
    #[serde(default = "default_true")]
    pub udp: bool,
    /// Also accept ICE over TCP (RFC 6544, passive) on the same port number, for clients
    /// whose networks block UDP. UDP candidates keep the higher priority.
    #[serde(default = "default_true")]
    pub tcp: bool,
    /// Largest UDP datagram accepted; anything larger is counted and dropped.
    #[serde(default = "default_max_datagram")]
    pub max_datagram_bytes: usize,
    /// Send-side congestion control towards subscribers (transport-cc feedback, GCC, RTX
    /// probes) choosing their simulcast layers; off, layer choice follows the subscriber's REMB
    /// (also the fallback for a subscriber that does not negotiate transport-cc).
    #[serde(default = "default_true")]
    pub send_side_bwe: bool,
    /// Forwarded copies are written and SRTP-encrypted by Meridian in reused buffers (no
    /// allocation per copy). Off, every copy goes through rtc's sender (`write_rtp`), as a
    /// way back and for comparison; a connection whose keys cannot be taken falls back to it
    /// on its own, counted in `meridian_srtp_fallback_connections_total`.
    #[serde(default = "default_true")]
    pub srtp_in_place: bool,
}

/// JWT verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Signature algorithm tokens must use.
    pub algorithm: AuthAlgorithm,
    /// Shared secret for HS256 (at least 32 bytes). Prefer `secret_file` outside development.
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the HS256 secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// PEM file with the Ed25519 public key, for EdDSA.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Clock skew tolerated on `nbf`, in seconds (at most 300). Never applied to `exp`: a token
    /// is refused from its expiry second on.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

pub use crate::auth::AuthAlgorithm;
use crate::auth::{MintError, TokenSigner, TokenVerifier, VerifyingKey};

impl AuthSection {
    /// The node's token verifier: reads the key file the section names.
    pub fn verifier(&self) -> Result<TokenVerifier, ConfigError> {
        let (material, key) = match self.algorithm {
            AuthAlgorithm::HS256 => (self.hs256_secret()?, "auth.secret"),
            AuthAlgorithm::EdDSA => {
                // validate() guarantees the key file is set for EdDSA.
                let path = self.public_key_file.clone().unwrap_or_default();
                let pem = std::fs::read(&path).map_err(|source| ConfigError::File {
                    key: "auth.public_key_file",
                    path,
                    source,
                })?;
                (pem, "auth.public_key_file")
            }
        };
        let verifying = match self.algorithm {
            AuthAlgorithm::HS256 => VerifyingKey::Hs256Secret(&material),
            AuthAlgorithm::EdDSA => VerifyingKey::Ed25519PublicPem(&material),
        };
        TokenVerifier::with_key(verifying, &self.issuer, &self.audience, self.leeway_secs)
            .map_err(|e| invalid(key, e.to_string()))
    }

    /// A signer matching the node's verification (HS256 only: an EdDSA node holds no
    /// private key).
    pub fn signer(&self) -> Result<TokenSigner, MintError> {
        match self.algorithm {
            AuthAlgorithm::HS256 => Ok(TokenSigner::hs256(
                &self
                    .hs256_secret()
                    .map_err(|e| MintError::Key(e.to_string()))?,
                &self.issuer,
                &self.audience,
            )),
            AuthAlgorithm::EdDSA => Err(MintError::Key(
                "this node verifies EdDSA tokens and holds no private key: use `meridian token --eddsa-key <private.pem>`".into(),
            )),
        }
    }

    fn hs256_secret(&self) -> Result<Vec<u8>, ConfigError> {
        if let Some(s) = &self.secret {
            return Ok(s.as_bytes().to_vec());
        }
        let path = self.secret_file.clone().unwrap_or_default();
        let bytes = std::fs::read(&path).map_err(|source| ConfigError::File {
            key: "auth.secret_file",
            path,
            source,
        })?;
        let trimmed = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
        if trimmed.len() < 32 {
            return Err(invalid(
                "auth.secret_file",
                "the secret must be at least 32 bytes long",
            ));
        }
        Ok(trimmed)
    }
}

/// Admission limits; a request over a limit is refused with an error, never queued.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Sessions this node hosts at once.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Participants in one session.
    #[serde(default = "default_max_participants")]
    pub max_participants_per_session: usize,
    /// Producers one participant may publish.
    #[serde(default = "default_max_producers")]
    pub max_producers_per_participant: usize,
    /// Consumers one participant may hold.
    #[serde(default = "default_max_consumers")]
    pub max_consumers_per_participant: usize,
    /// Consumers on the whole node at which it counts as full for routing.
    #[serde(default = "default_node_consumers")]
    pub max_consumers: usize,
    /// Fraction of the machine's CPU (0..=1) at which the node counts as full for routing.
    #[serde(default = "default_max_cpu")]
    pub max_cpu: f64,
}

impl LimitsSection {
    /// What the media worker admits.
    pub fn worker(&self) -> crate::sfu::Limits {
        crate::sfu::Limits {
            max_sessions: self.max_sessions,
            max_participants_per_session: self.max_participants_per_session,
            max_producers_per_participant: self.max_producers_per_participant,
            max_consumers_per_participant: self.max_consumers_per_participant,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_sessions: default_max_sessions(),
            max_participants_per_session: default_max_participants(),
            max_producers_per_participant: default_max_producers(),
            max_consumers_per_participant: default_max_consumers(),
            max_consumers: default_node_consumers(),
            max_cpu: default_max_cpu(),
        }
    }
}

fn default_max_message_bytes() -> usize {
    64 * 1024
}
fn default_join_timeout_secs() -> u64 {
    10
}
fn default_header_timeout_secs() -> u64 {
    10
}
fn default_idle_timeout_secs() -> u64 {
    60
}
fn default_resume_grace_secs() -> u64 {
    20
}
fn default_max_connections() -> usize {
    8192
}
fn default_max_connections_per_source() -> usize {
    64
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_listen_ip() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}
fn default_max_datagram() -> usize {
    1500
}
fn default_true() -> bool {
    true
}
fn default_leeway() -> u64 {
    5
}
fn default_max_sessions() -> usize {
    crate::sfu::Limits::default().max_sessions
}
fn default_max_participants() -> usize {
    crate::sfu::Limits::default().max_participants_per_session
}
fn default_max_producers() -> usize {
    crate::sfu::Limits::default().max_producers_per_participant
}
fn default_max_consumers() -> usize {
    crate::sfu::Limits::default().max_consumers_per_participant
}
fn default_node_consumers() -> usize {
    20_000
}
fn default_max_cpu() -> f64 {
    0.85
}
fn default_discovery_interval() -> u64 {
    5
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("cannot read `{key}` file {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Most media workers a node runs: a worker's number is one byte of its pipe stream numbers.
pub const MAX_WORKERS: usize = 128;

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl NodeConfig {
    /// Loads a TOML file, applies `MERIDIAN__SECTION__KEY` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_layers(&[path])
    }

    /// Reads several TOML files, each over the one before (tables merge, a later key wins),
    /// then the environment overrides, and validates the result. A deployment keeps the
    /// region's file as written and puts what is particular to one node (its id, address,
    /// certificates) in a file of its own (see terraform/ and docs/deployment.md).
    pub fn load_layers<P: AsRef<Path>>(paths: &[P]) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        for path in paths {
            builder = builder
                .add_source(config::File::from(path.as_ref()).format(config::FileFormat::Toml));
        }
        let built = builder.add_source(env_source()).build()?;
        Self::from_built(built)
    }

    /// Parses TOML text (an embedded region file), with environment overrides, and validates.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(env_source())
            .build()?;
        Self::from_built(built)
    }

    fn from_built(built: config::Config) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = built.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Each media worker's port, by worker number (0 where the system picks a free one).
    pub fn media_ports(&self) -> Vec<u16> {
        if let Some(ports) = &self.rtc.ports {
            return ports.clone();
        }
        let n = self.rtc.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(MAX_WORKERS)
        });
        (0..n)
            .map(|i| {
                if self.rtc.port == 0 {
                    0
                } else {
                    self.rtc.port.saturating_add(i as u16)
                }
            })
            .collect()
    }

    /// The node's id, defaulting to `<region>-1`.
    pub fn node_id(&self) -> NodeId {
        self.node.id.clone().unwrap_or_else(|| {
            // A valid region id plus "-1" stays within the id alphabet and length (64 + 2 is
            // only reached by a 63+ char region, which validate() refuses).
            format!("{}-1", self.node.region)
                .parse()
                .expect("region id plus suffix is a valid node id")
        })
    }

    /// Rejects values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.region.as_str().len() > 60 {
            return Err(invalid("node.region", "at most 60 characters"));
        }
        crate::compliance::profile::Profiles::new(
            &self.recording.profiles,
            self.recording.profile.as_deref(),
        )
        .map_err(|e| invalid("recording.profiles", e.to_string()))?;
        if !(-90.0..=90.0).contains(&self.node.latitude) {
            return Err(invalid("node.latitude", "must be within -90..=90 degrees"));
        }
        if !(-180.0..=180.0).contains(&self.node.longitude) {
            return Err(invalid(
                "node.longitude",
                "must be within -180..=180 degrees",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.signaling.max_message_bytes) {
            return Err(invalid(
                "signaling.max_message_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        for (key, v) in [
            (
                "signaling.join_timeout_secs",
                self.signaling.join_timeout_secs,
            ),
            (
                "signaling.header_timeout_secs",
                self.signaling.header_timeout_secs,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.signaling.idle_timeout_secs < 20 {
            return Err(invalid(
                "signaling.idle_timeout_secs",
                "must be at least 20 (the node pings every 15 s)",
            ));
        }
        if self.signaling.resume_grace_secs > 300 {
            return Err(invalid(
                "signaling.resume_grace_secs",
                "must be at most 300 (a lost participant's media keeps flowing meanwhile)",
            ));
        }
        if self.signaling.max_connections == 0 {
            return Err(invalid("signaling.max_connections", "must be at least 1"));
        }
        if self.signaling.max_connections_per_source == 0 {
            return Err(invalid(
                "signaling.max_connections_per_source",
                "must be at least 1",
            ));
        }
        if self.auth.leeway_secs > 300 {
            return Err(invalid(
                "auth.leeway_secs",
                "at most 300: it tolerates clock skew, it must not extend access",
            ));
        }
        if self.rtc.announced_ip.is_unspecified() {
            return Err(invalid(
                "rtc.announced_ip",
                "must be an address clients can reach, not a wildcard such as 0.0.0.0",
            ));
        }
        if !self.rtc.udp && !self.rtc.tcp {
            return Err(invalid(
                "rtc.udp",
                "at least one of `rtc.udp` and `rtc.tcp` must be on",
            ));
        }
        if let Some(n) = self.rtc.workers {
            if !(1..=MAX_WORKERS).contains(&n) {
                return Err(invalid(
                    "rtc.workers",
                    format!("must be between 1 and {MAX_WORKERS}"),
                ));
            }
        }
        if let Some(ports) = &self.rtc.ports {
            if ports.is_empty() || ports.len() > MAX_WORKERS {
                return Err(invalid(
                    "rtc.ports",
                    format!("must list between 1 and {MAX_WORKERS} ports"),
                ));
            }
            if self.rtc.workers.is_some_and(|n| n != ports.len()) {
                return Err(invalid(
                    "rtc.ports",
                    "must list one port per worker (`rtc.workers`), or leave `workers` out",
                ));
            }
            let distinct: std::collections::HashSet<_> = ports.iter().collect();
            if distinct.len() != ports.len() || ports.contains(&0) {
                return Err(invalid(
                    "rtc.ports",
                    "ports must be distinct and not 0 (leave `ports` out and set `port = 0` for free ports)",
                ));
            }
        } else if self.rtc.port != 0
            && usize::from(self.rtc.port) + self.media_ports().len() - 1 > usize::from(u16::MAX)
        {
            return Err(invalid(
                "rtc.port",
                "the workers' ports (port + worker number) run past 65535",
            ));
        }
        if !(576..=9000).contains(&self.rtc.max_datagram_bytes) {
            return Err(invalid(
                "rtc.max_datagram_bytes",
                "must be between 576 and 9000",
            ));
        }
        if self.auth.issuer.is_empty() {
            return Err(invalid("auth.issuer", "must not be empty"));
        }
        if self.auth.audience.is_empty() {
            return Err(invalid("auth.audience", "must not be empty"));
        }
        match self.auth.algorithm {
            AuthAlgorithm::HS256 => match (&self.auth.secret, &self.auth.secret_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "auth.secret",
                        "set `secret` or `secret_file`, not both",
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        "auth.secret",
                        "HS256 needs `secret` or `secret_file`",
                    ))
                }
                (Some(s), None) if s.len() < 32 => {
                    return Err(invalid("auth.secret", "must be at least 32 bytes long"))
                }
                _ => {}
            },
            AuthAlgorithm::EdDSA => {
                if self.auth.public_key_file.is_none() {
                    return Err(invalid(
                        "auth.public_key_file",
                        "EdDSA needs the PEM file of the Ed25519 public key",
                    ));
                }
            }
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_sessions", l.max_sessions),
            (
                "limits.max_participants_per_session",
                l.max_participants_per_session,
            ),
            (
                "limits.max_producers_per_participant",
                l.max_producers_per_participant,
            ),
            (
                "limits.max_consumers_per_participant",
                l.max_consumers_per_participant,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if l.max_consumers == 0 {
            return Err(invalid("limits.max_consumers", "must be at least 1"));
        }
        if !(l.max_cpu > 0.0 && l.max_cpu <= 1.0) {
            return Err(invalid(
                "limits.max_cpu",
                "must be a fraction of the machine in (0, 1]",
            ));
        }
        match &self.signaling.public_url {
            Some(u) if !(u.starts_with("ws://") || u.starts_with("wss://")) => {
                return Err(invalid(
                    "signaling.public_url",
                    "must be a ws:// or wss:// URL, e.g. wss://in-1.example.com/v1/ws",
                ))
            }
            None if self.signaling.listen.ip().is_unspecified() => {
                return Err(invalid(
                    "signaling.public_url",
                    "must be set when signaling.listen is a wildcard address",
                ))
            }
            _ => {}
        }
        if let Some(m) = &self.mesh {
            if let Some(d) = &m.discovery {
                if d.srv_name.trim().is_empty() {
                    return Err(invalid("mesh.discovery.srv_name", "must not be empty"));
                }
                if d.interval_secs == 0 {
                    return Err(invalid(
                        "mesh.discovery.interval_secs",
                        "must be at least 1",
                    ));
                }
                if m.advertise.is_none() && m.listen.ip().is_unspecified() {
                    return Err(invalid(
                        "mesh.advertise",
                        "must be set when mesh.listen is a wildcard and discovery is on",
                    ));
                }
            }
        }
        let r = &self.routing;
        for (region, w) in &r.region_weights {
            if !(w.is_finite() && *w > 0.0) {
                return Err(invalid(
                    "routing.region_weights",
                    format!("weight of {region} must be a positive number"),
                ));
            }
        }
        for code in r.country_overrides.keys() {
            if code.len() != 2 || !code.chars().all(|c| c.is_ascii_alphabetic()) {
                return Err(invalid(
                    "routing.country_overrides",
                    format!("{code:?} is not an ISO 3166-1 alpha-2 country code"),
                ));
            }
        }
        for code in r.continent_overrides.keys() {
            if !CONTINENTS.contains(&code.to_ascii_uppercase().as_str()) {
                return Err(invalid(
                    "routing.continent_overrides",
                    format!("{code:?} is not one of {}", CONTINENTS.join(" ")),
                ));
            }
        }
        Ok(())
    }

    /// The WebSocket URL clients use to join this node.
    pub fn signaling_url(&self, bound: SocketAddr) -> String {
        self.signaling
            .public_url
            .clone()
            .unwrap_or_else(|| format!("ws://{bound}/v1/ws"))
    }

    /// The routing policy, with override codes in upper case.
    pub fn routing_policy(&self) -> crate::mesh::selector::RoutingPolicy {
        let r = &self.routing;
        let upper = |m: &HashMap<String, RegionId>| {
            m.iter()
                .map(|(k, v)| (k.to_ascii_uppercase(), v.clone()))
                .collect()
        };
        crate::mesh::selector::RoutingPolicy {
            selector: r.selector,
            default_region: r.default_region.clone(),
            allow_region_hint: r.allow_region_hint,
            region_weights: r.region_weights.clone(),
            country_overrides: upper(&r.country_overrides),
            continent_overrides: upper(&r.continent_overrides),
        }
    }
}

/// MaxMind continent codes.
const CONTINENTS: [&str; 7] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA"];

fn env_source() -> config::Environment {
    config::Environment::with_prefix("MERIDIAN")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDIA: &str = include_str!("../regions/india.toml");

    #[test]
    fn embedded_region_parses() {
        let cfg = NodeConfig::from_toml_str(INDIA).unwrap();
        assert_eq!(cfg.node.region.as_str(), "india");
        assert_eq!(cfg.node_id().as_str(), "india-1");
    }

    #[test]
    fn every_region_file_loads() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/regions");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                NodeConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "india, europe and us at least");
    }

    #[test]
    fn media_ports_follow_the_first_port_or_an_explicit_list() {
        let two = NodeConfig::from_toml_str(&INDIA.replace("[rtc]", "[rtc]\nworkers = 2")).unwrap();
        let base = two.rtc.port;
        assert_eq!(two.media_ports(), vec![base, base + 1]);
        let listed =
            NodeConfig::from_toml_str(&INDIA.replace("[rtc]", "[rtc]\nports = [41000, 41007]"))
                .unwrap();
        assert_eq!(listed.media_ports(), vec![41000, 41007]);
        for (extra, key) in [
            ("workers = 0", "rtc.workers"),
            ("workers = 129", "rtc.workers"),
            ("ports = []", "rtc.ports"),
            ("ports = [41000, 41000]", "rtc.ports"),
            ("workers = 3\nports = [41000, 41001]", "rtc.ports"),
        ] {
            let err =
                NodeConfig::from_toml_str(&INDIA.replace("[rtc]", &format!("[rtc]\n{extra}")))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_rejected_naming_it() {
        let text = INDIA.replace("[rtc]", "[rtc]\nanounced_ip = \"1.2.3.4\"");
        let err = NodeConfig::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("anounced_ip"), "{err}");
    }

    #[test]
    fn wildcard_announced_ip_is_rejected() {
        let text = INDIA.replace("announced_ip = \"127.0.0.1\"", "announced_ip = \"0.0.0.0\"");
        let err = NodeConfig::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("rtc.announced_ip"), "{err}");
    }

    #[test]
    fn short_hs256_secret_is_rejected() {
        let cfg = NodeConfig::from_toml_str(INDIA).unwrap();
        let mut bad = cfg.clone();
        bad.auth.secret = Some("short".into());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("auth.secret"));
        let mut bad = cfg;
        bad.node.latitude = 91.0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("node.latitude"));
    }

    #[test]
    fn routing_section_parses_overrides_weights_and_proxies() {
        let text = format!(
            "{INDIA}\ntrusted_proxies = [\"10.0.0.0/8\", \"2001:db8::/32\"]\ncountry_overrides = {{ KE = \"europe\" }}\ncontinent_overrides = {{ AF = \"europe\" }}\nregion_weights = {{ europe = 2.0 }}\n"
        );
        let cfg = NodeConfig::from_toml_str(&text).unwrap();
        let p = cfg.routing_policy();
        assert_eq!(p.country_overrides["KE"].as_str(), "europe");
        assert_eq!(p.continent_overrides["AF"].as_str(), "europe");
        assert_eq!(p.default_region.unwrap().as_str(), "europe");
        assert_eq!(cfg.routing.trusted_proxies.len(), 2);
    }

    #[test]
    fn bad_routing_values_are_rejected_naming_the_key() {
        for (extra, key) in [
            (
                "continent_overrides = { XX = \"europe\" }",
                "routing.continent_overrides",
            ),
            (
                "country_overrides = { KEN = \"europe\" }",
                "routing.country_overrides",
            ),
            (
                "region_weights = { europe = 0.0 }",
                "routing.region_weights",
            ),
            ("trusted_proxies = [\"10.0.0.0/40\"]", "prefix"),
            ("selektor = \"nearest\"", "selektor"),
        ] {
            let err = NodeConfig::from_toml_str(&format!("{INDIA}\n{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }
}
