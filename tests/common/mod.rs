//! Shared test harness: start a node on ephemeral ports, talk signaling over a real WebSocket,
//! and run in-process WebRTC peers built on webrtc-rs's sans-I/O core over real UDP.
#![allow(dead_code)]

pub mod browser;
pub mod cut;
pub mod dns;
pub mod socks;

pub use meridian::client::peer::*;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use meridian::auth::{Role, TokenSigner};
use meridian::config::NodeConfig;
use meridian::node::Node;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A region config on ephemeral ports with the test secret.
pub fn test_config(announced: &str, listen_ip: &str) -> NodeConfig {
    NodeConfig::from_toml_str(&format!(
        r#"
[node]
region = "test"
latitude = 19.0
longitude = 72.8
[signaling]
listen = "127.0.0.1:0"
max_message_bytes = 16384
join_timeout_secs = 2
# Tests end participants by dropping their connections and expect them gone at once; the
# resume tests set their own grace period.
resume_grace_secs = 0
[metrics]
listen = "127.0.0.1:0"
[rtc]
listen_ip = "{listen_ip}"
announced_ip = "{announced}"
port = 0
# Two workers whatever the machine, so every test crosses the worker placement.
workers = 2
[auth]
issuer = "meridian-test"
audience = "meridian"
algorithm = "HS256"
secret = "{SECRET}"
"#
    ))
    .expect("test config is valid")
}

/// [`test_config`] recording into `root/recordings`, with a signing key made at
/// `root/node.key` (its public half at `root/node.pub.pem`).
#[allow(dead_code)] // not every test file records
pub fn recording_config(root: &std::path::Path) -> NodeConfig {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.recording.enabled = true;
    cfg.recording.dir = root.join("recordings");
    cfg.recording.signing_key_file = Some(root.join("node.key"));
    cfg.recording.create_signing_key = true;
    cfg
}

/// Starts `regions.len()` nodes joined by pipes (each dials the ones started before it) and
/// waits until every pipe is up. `dir` receives the cluster's certificates.
pub async fn start_mesh(dir: &std::path::Path, regions: &[&str]) -> Vec<Node> {
    let ids: Vec<meridian::ids::NodeId> = regions
        .iter()
        .map(|r| format!("{r}-1").parse().unwrap())
        .collect();
    let files = meridian::mesh::tls::write_cluster(dir, &ids).unwrap();
    let mut nodes: Vec<Node> = Vec::new();
    for (region, f) in regions.iter().zip(files) {
        let peers = nodes
            .iter()
            .map(|n| n.mesh.as_ref().unwrap().local_addr)
            .collect();
        nodes.push(mesh_node(region, f, peers).await);
    }
    let want = regions.len() - 1;
    wait_for("every pipe up", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|n| n.mesh.as_ref().unwrap().pipes().len() == want)
    })
    .await;
    nodes
}

/// India and US nodes whose pipe runs through an impairment proxy; waits for the pipe.
pub async fn pair_over_link(
    dir: &std::path::Path,
    imp: meridian::netem::Impairment,
) -> (Node, meridian::netem::ImpairProxy, Node) {
    let ids = ["india-1".parse().unwrap(), "us-1".parse().unwrap()];
    let mut files = meridian::mesh::tls::write_cluster(dir, &ids).unwrap();
    let india = mesh_node("india", files.remove(0), vec![]).await;
    let link = meridian::netem::start(
        "127.0.0.1:0".parse().unwrap(),
        india.mesh.as_ref().unwrap().local_addr,
        imp,
    )
    .await
    .unwrap();
    let us = mesh_node("us", files.remove(0), vec![link.local_addr]).await;
    wait_for(
        "pipe up through the impaired link",
        Duration::from_secs(15),
        || us.mesh.as_ref().unwrap().pipes().len() == 1,
    )
    .await;
    (india, link, us)
}

/// The inter-region link of the tests: 100 ms one way, 5 ms jitter, 2% loss each way.
pub fn long_lossy_link() -> meridian::netem::Impairment {
    meridian::netem::Impairment {
        delay: Duration::from_millis(100),
        jitter: Duration::from_millis(5),
        loss: 0.02,
        seed: 42,
    }
}

/// One node of a mesh, dialing `peers`.
pub async fn mesh_node(
    region: &str,
    files: meridian::mesh::tls::NodeFiles,
    peers: Vec<SocketAddr>,
) -> Node {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.node.region = region.parse().unwrap();
    cfg.mesh = Some(meridian::config::MeshSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        discovery: None,
        peers,
        ca_file: files.ca_file,
        cert_file: files.cert_file,
        key_file: files.key_file,
    });
    Node::start(cfg).await.expect("node starts")
}

/// Real sites of the three regions.
pub const SITES: [(&str, f64, f64); 3] = [
    ("india", 19.076, 72.8777),
    ("europe", 50.1109, 8.6821),
    ("us", 39.0438, -77.4874),
];

/// India, Europe and US joined by pipes, each configured by `tweak` as well.
pub async fn routed_mesh(dir: &std::path::Path, tweak: impl Fn(&mut NodeConfig)) -> Vec<Node> {
    let nodes: Vec<(String, (&str, f64, f64))> = SITES
        .iter()
        .map(|site| (format!("{}-1", site.0), *site))
        .collect();
    routed_mesh_of(dir, &nodes, tweak).await
}

/// Nodes (id, site) joined by pipes (each dials those before it), with Europe the default
/// region, each configured by `tweak` as well; waits until every node knows every other.
pub async fn routed_mesh_of(
    dir: &std::path::Path,
    sites: &[(String, (&str, f64, f64))],
    tweak: impl Fn(&mut NodeConfig),
) -> Vec<Node> {
    let ids: Vec<meridian::ids::NodeId> = sites.iter().map(|(id, _)| id.parse().unwrap()).collect();
    let files = meridian::mesh::tls::write_cluster(dir, &ids).unwrap();
    let mut nodes: Vec<Node> = Vec::new();
    for ((id, site), f) in ids.iter().zip(sites.iter().map(|s| s.1)).zip(files) {
        let peers = nodes
            .iter()
            .map(|n| n.mesh.as_ref().unwrap().local_addr)
            .collect();
        let mut cfg = mesh_config(id.as_str(), site, f, peers);
        tweak(&mut cfg);
        cfg.validate().unwrap();
        nodes.push(Node::start(cfg).await.unwrap());
    }
    let n = nodes.len();
    wait_for(
        "all members known everywhere",
        Duration::from_secs(10),
        || nodes.iter().all(|node| node.members().len() == n),
    )
    .await;
    nodes
}

/// A node `id` at `site` (region, latitude, longitude) of a mesh with the cluster files `f`,
/// dialing `peers`; Europe is the default region.
pub fn mesh_config(
    id: &str,
    (region, lat, lon): (&str, f64, f64),
    f: meridian::mesh::tls::NodeFiles,
    peers: Vec<SocketAddr>,
) -> NodeConfig {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.node.region = region.parse().unwrap();
    cfg.node.id = Some(id.parse().unwrap());
    cfg.node.latitude = lat;
    cfg.node.longitude = lon;
    cfg.routing.default_region = Some("europe".parse().unwrap());
    cfg.mesh = Some(meridian::config::MeshSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        discovery: None,
        peers,
        ca_file: f.ca_file,
        cert_file: f.cert_file,
        key_file: f.key_file,
    });
    cfg
}

/// The pipe of `from` that leads to the node of `to`.
pub fn pipe_to(from: &Node, to: &Node) -> meridian::mesh::PipeReport {
    from.mesh
        .as_ref()
        .unwrap()
        .pipes()
        .into_iter()
        .find(|p| p.node == to.id)
        .unwrap_or_else(|| panic!("no pipe from {} to {}", from.id, to.id))
}

/// A plain HTTP/1.0 GET against the node's signaling server; returns the body.
pub async fn http_get(node: &Node, path: &str) -> String {
    http_get_at(node.signaling_addr, path).await
}

/// The sum of a metric's series in a node's `/metrics` (0 when absent).
pub async fn metric_sum(node: &Node, name: &str) -> f64 {
    metrics(node)
        .await
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The node's `/metrics`, from its own listener.
pub async fn metrics(node: &Node) -> String {
    http_get_at(node.metrics_addr, "/metrics").await
}

/// A plain HTTP/1.0 GET to `addr`; returns the body.
pub async fn http_get_at(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// An HTTP/1.0 GET to `addr` from source address `from` (any loopback address works as a
/// source on `lo`), with extra headers; returns the status code and the body.
pub async fn http_get_as(
    addr: SocketAddr,
    from: std::net::IpAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (status, body) = http_get_bytes(addr, from, path, headers).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// [`http_get_as`] with the body as bytes.
#[allow(dead_code)] // not every test file reads binary bodies
pub async fn http_get_bytes(
    addr: SocketAddr,
    from: std::net::IpAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: x\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out.get(split + 4..).unwrap_or_default().to_vec())
}

pub async fn start_node() -> Node {
    Node::start(test_config("127.0.0.1", "127.0.0.1"))
        .await
        .expect("node starts")
}

pub fn signer() -> TokenSigner {
    TokenSigner::hs256(SECRET.as_bytes(), "meridian-test", "meridian")
}

pub fn token(session: &str, user: &str, role: Role, ttl: Duration) -> String {
    signer()
        .mint(&session.parse().unwrap(), &user.parse().unwrap(), role, ttl)
        .unwrap()
}

/// A signaling client over a real WebSocket.
pub struct Signal {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Unsolicited messages seen while waiting for replies.
    pub events: Vec<Value>,
}

impl Signal {
    pub async fn connect(node: &Node) -> Signal {
        Self::connect_url(&format!("ws://{}/v1/ws", node.signaling_addr)).await
    }

    pub async fn connect_url(url: &str) -> Signal {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connects");
        Self::from_ws(ws)
    }

    /// A client over an already open WebSocket.
    pub fn from_ws(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Signal {
        Signal {
            ws,
            next_id: 1,
            events: Vec::new(),
        }
    }

    /// A WebSocket to `node` from source address `from` (any 127/8 address works on `lo`).
    pub async fn connect_from(node: &Node, from: std::net::IpAddr) -> Signal {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = sock.connect(node.signaling_addr).await.unwrap();
        let url = format!("ws://{}/v1/ws", node.signaling_addr);
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("ws connects");
        Self::from_ws(ws)
    }

    pub async fn join(node: &Node, session: &str, user: &str, role: Role) -> (Signal, Value) {
        let s = Signal::connect(node).await;
        let t = token(session, user, role, Duration::from_secs(600));
        s.join_with(&t).await
    }

    /// Sends `join` with `token` and expects `joined`.
    pub async fn join_with(mut self, token: &str) -> (Signal, Value) {
        self.send_text(&json!({"type":"join","version":1,"token":token}).to_string())
            .await;
        let joined = self.recv().await.expect("joined");
        assert_eq!(joined["type"], "joined", "{joined}");
        (self, joined)
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("ws send");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws
            .send(Message::Binary(data.into()))
            .await
            .expect("ws send");
    }

    /// Next JSON message, or None when the socket closed (close frame returned via `closed`).
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("signaling reply within 10 s")?
            {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Reads until the socket closes; returns (messages seen, close code).
    pub async fn until_closed(&mut self) -> (Vec<Value>, Option<u16>) {
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("socket closes within 10 s")
            {
                Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(frame))) => return (seen, frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return (seen, None),
            }
        }
    }

    pub async fn request(&mut self, mut body: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        body["requestId"] = json!(id);
        self.send_text(&body.to_string()).await;
        loop {
            let m = self.recv().await.expect("reply before close");
            if m["requestId"] == json!(id) {
                return m;
            }
            self.events.push(m);
        }
    }

    /// Waits for an unsolicited message of `ty`.
    pub async fn event(&mut self, ty: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["type"] == ty) {
            return self.events.remove(i);
        }
        loop {
            let m = self.recv().await.expect("event before close");
            if m["type"] == ty {
                return m;
            }
            self.events.push(m);
        }
    }
}

/// Publishes one video track of `codec` on `signal`'s publish transport and starts sending;
/// returns the producer id and the running publisher.
pub async fn publish_as(
    signal: &mut Signal,
    codec: TestCodec,
) -> (String, Arc<PeerState>, tokio::task::JoinHandle<()>) {
    let mut publisher = RtcPeer::publisher_with(codec).await.unwrap();
    let reply = signal
        .request(json!({"type":"publish","sdp":publisher.offer().unwrap()}))
        .await;
    assert_eq!(reply["type"], "published", "{reply}");
    publisher.answer(reply["sdp"].as_str().unwrap()).unwrap();
    let id = reply["producers"][0]["producerId"]
        .as_str()
        .unwrap()
        .to_owned();
    let state = Arc::new(PeerState::default());
    let task = publisher.spawn(state.clone());
    (id, state, task)
}

/// Subscribes `signal`'s participant to `producer` and starts receiving into `state`.
pub async fn subscribe_as(
    signal: &mut Signal,
    producer: &str,
    codec: TestCodec,
    state: PeerState,
) -> (Arc<PeerState>, tokio::task::JoinHandle<()>) {
    let mut sub = RtcPeer::subscriber_with(codec).await.unwrap();
    let reply = signal
        .request(json!({"type":"subscribe","producerId":producer,"sdp":sub.offer().unwrap()}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    sub.answer(reply["sdp"].as_str().unwrap()).unwrap();
    let state = Arc::new(state);
    let task = sub.spawn(state.clone());
    (state, task)
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The media address of the worker hosting `session` on `node` (it must have joined).
pub fn media_addr_of(node: &Node, session: &str) -> SocketAddr {
    let worker = node
        .workers
        .worker_of(&session.parse().unwrap())
        .expect("the session is placed on a worker");
    node.workers.get(worker).media_addr()
}

/// The session's run folders.
pub fn runs(root: &std::path::Path, session: &str) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(root.join("recordings").join(session)) else {
        return Vec::new();
    };
    let mut v: Vec<std::path::PathBuf> = rd.flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

pub async fn sealed_run(root: &std::path::Path, session: &str) -> std::path::PathBuf {
    for _ in 0..100 {
        if let Some(r) = runs(root, session)
            .into_iter()
            .find(|r| r.join(meridian::compliance::seal::MANIFEST).exists())
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "session {session} not sealed within 5 s: {:?}",
        runs(root, session)
    );
}

pub fn audit(run: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// India, Europe and US joined by pipes, each recording under `root/rec-<region>/recordings`
/// with its signing key at `root/<region>.key` (public half `root/<region>.pub.pem`).
pub async fn recording_mesh(root: &std::path::Path) -> Vec<Node> {
    let keys = root.to_path_buf();
    routed_mesh(root, move |cfg| {
        let region = cfg.node.region.to_string();
        cfg.recording.enabled = true;
        cfg.recording.dir = keys.join(format!("rec-{region}")).join("recordings");
        cfg.recording.signing_key_file = Some(keys.join(format!("{region}.key")));
        cfg.recording.create_signing_key = true;
    })
    .await
}

/// Every file a node of [`recording_mesh`] wrote under `root/rec-<region>` but its own
/// session database.
pub fn written_besides_database(root: &std::path::Path, region: &str) -> Vec<std::path::PathBuf> {
    files_under(&root.join(format!("rec-{region}")))
        .into_iter()
        .filter(|f| {
            !f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("sessions.db")
        })
        .collect()
}

/// A raw HTTP request to the admin listener: status and body.
pub async fn admin_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

pub fn ctl(
    addr: std::net::SocketAddr,
    token_file: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["ctl", "--admin", &format!("http://{addr}"), "--token-file"])
        .arg(token_file)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The sections every `meridian serve` process of the tests has: signaling on `port` (0: any),
/// metrics anywhere on loopback, one media worker on loopback, the test token secret. The
/// caller writes `[node]` and whatever else it needs around them.
pub fn serve_sections(port: u16) -> String {
    format!(
        r#"
[signaling]
listen = "127.0.0.1:{port}"
[metrics]
listen = "127.0.0.1:0"
[rtc]
listen_ip = "127.0.0.1"
announced_ip = "127.0.0.1"
port = 0
workers = 1
[auth]
issuer = "meridian-test"
audience = "meridian"
algorithm = "HS256"
secret = "{SECRET}"
"#
    )
}

/// A TCP port free on loopback now (for a process the test starts, which binds it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `meridian serve --config <config>` as a process of its own, its log in `log`.
pub fn serve_process(config: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}
