//! Attacks from outside testing, each through the listener it targets: pipe identity over
//! QUIC, signaling exhaustion and token abuse over HTTP/WebSocket, forged STUN over UDP,
//! silent ICE-TCP, and what the node tells about itself (metrics, logs, page headers).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use meridian::auth::Role;
use meridian::mesh::tls::{write_cluster, NodeFiles, NodeTls};
use meridian::node::Node;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A node process an attacker controls: genuine cluster certificate `files`, but a `Hello`
/// naming `claims` (in region `us`) and a signaling URL of its own.
fn impostor(
    files: &NodeFiles,
    claims: &str,
    peers: Vec<SocketAddr>,
) -> (meridian::sfu::Workers, meridian::mesh::MeshHandle) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = meridian::sfu::spawn_worker(meridian::sfu::WorkerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        announced_ip: ip("127.0.0.1"),
        limits: Default::default(),
        max_datagram_bytes: 1500,
        udp: true,
        tcp: false,
        index: 0,
        mesh: Some(tx),
        send_side_bwe: false,
        srtp_in_place: true,
        recording: None,
    })
    .unwrap();
    let worker = meridian::sfu::Workers::new(vec![worker], 10);
    let mesh = meridian::mesh::start(
        meridian::mesh::MeshConfig {
            info: meridian::mesh::membership::NodeInfo {
                node: claims.parse().unwrap(),
                region: "us".parse().unwrap(),
                signaling_url: "ws://attacker.invalid/v1/ws".into(),
                latitude: 39.0,
                longitude: -77.5,
                pipe_addr: None,
            },
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: NodeTls::load(&files.ca_file, &files.cert_file, &files.key_file).unwrap(),
            peers,
            discovery: None,
            capacity: meridian::mesh::load::Capacity {
                max_sessions: 10,
                max_consumers: 10,
                max_cpu: 1.0,
            },
            draining: Arc::new(AtomicBool::new(false)),
            tuning: Default::default(),
            admin_inbox: None,
        },
        worker.clone(),
        rx,
        Default::default(),
    )
    .unwrap();
    (worker, mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_another_node_than_its_certificate_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ["india-1", "us-1", "mallory-1"].map(|s| s.parse().unwrap());
    let mut files = write_cluster(dir.path(), &ids).unwrap();
    let mallory = files.remove(2);
    let us_files = files.remove(1);
    let india_files = files.remove(0);
    // Mallory holds a genuine cluster certificate, issued to mallory-1, and says it is us-1.
    let (_w1, dialed) = impostor(&mallory, "us-1", vec![]);
    // India dials the impostor: the dialing side checks the server's certificate...
    let india = mesh_node("india", india_files, vec![dialed.local_addr]).await;
    let india_mesh = india.mesh.as_ref().unwrap();
    // ...and the accepting side checks the dialer's.
    let (_w2, dialer) = impostor(&mallory, "us-1", vec![india_mesh.local_addr]);
    wait_for(
        "India refuses both impostors",
        Duration::from_secs(10),
        || india_mesh.stats.identity_mismatches.load(Relaxed) >= 2,
    )
    .await;
    // The real us-1 still joins, and India's view of us-1 is the real one.
    let us = mesh_node("us", us_files, vec![india_mesh.local_addr]).await;
    wait_for("the real us-1 pipe", Duration::from_secs(10), || {
        india_mesh.pipes().iter().any(|p| p.node == us.id)
    })
    .await;
    assert_eq!(
        india_mesh.pipes().len(),
        1,
        "only the real us-1 is connected"
    );
    assert!(dialed.pipes().is_empty() && dialer.pipes().is_empty());
    wait_for("us-1 in India's membership", Duration::from_secs(5), || {
        india
            .members()
            .iter()
            .any(|m| m.info.node == us.id && !m.local)
    })
    .await;
    let member = india
        .members()
        .iter()
        .find(|m| m.info.node == us.id)
        .cloned()
        .unwrap();
    assert_eq!(
        member.info.signaling_url,
        format!("ws://{}/v1/ws", us.signaling_addr)
    );
    let m = metrics(&india).await;
    assert!(
        m.lines().any(
            |l| l.starts_with("meridian_pipe_identity_mismatches_total{") && !l.ends_with(" 0")
        ),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_certificate_names_another_node_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_cluster(dir.path(), &["mallory-1".parse().unwrap()])
        .unwrap()
        .remove(0);
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.node.region = "us".parse().unwrap();
    cfg.mesh = Some(meridian::config::MeshSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        discovery: None,
        peers: vec![],
        ca_file: f.ca_file,
        cert_file: f.cert_file,
        key_file: f.key_file,
    });
    let err = Node::start(cfg).await.err().expect("refused").to_string();
    assert!(
        err.contains("issued to node mallory-1") && err.contains("us-1"),
        "{err}"
    );
}

/// Reads until the peer closes; true if it closed within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn tcp_from(from: IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    sock.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_http_connections_are_closed_and_one_source_cannot_take_every_place() {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.signaling.header_timeout_secs = 1;
    cfg.signaling.max_connections_per_source = 4;
    let node = Node::start(cfg.clone()).await.unwrap();

    // A connection that never sends a request is closed by the header timeout.
    let mut silent = tcp_from(ip("127.0.0.5"), node.signaling_addr).await;
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);

    // Four joined WebSockets from one address hold all of that address's places.
    let mut held = Vec::new();
    for i in 0..4 {
        let s = Signal::connect_from(&node, ip("127.0.0.6")).await;
        let t = token(
            "kyc-fd",
            &format!("u{i}"),
            Role::Agent,
            Duration::from_secs(60),
        );
        held.push(s.join_with(&t).await.0);
    }
    let mut fifth = tcp_from(ip("127.0.0.6"), node.signaling_addr).await;
    assert!(
        closed_within(&mut fifth, Duration::from_millis(500)).await,
        "a fifth connection from the same address is refused at once"
    );
    // Everyone else is served: a join and the health check from other addresses.
    let other = Signal::connect_from(&node, ip("127.0.0.7")).await;
    let t = token("kyc-fd", "other", Role::User, Duration::from_secs(60));
    let (_other, _) = other.join_with(&t).await;
    let (status, body) = http_get_as(node.signaling_addr, ip("127.0.0.8"), "/healthz", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let m = metrics(&node).await;
    assert!(
        m.contains("meridian_signaling_refused_total{region=\"test\",node=\"test-1\",reason=\"source_full\"} 1"),
        "{m}"
    );

    // The open-file limit was raised to fit the configured connections.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    assert!(
        lim.rlim_cur >= cfg.signaling.max_connections as u64 + 4096,
        "soft limit {}",
        lim.rlim_cur
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dismissed_instead_of_buffered() {
    let node = start_node().await;
    let (mut agent, _) = Signal::join(&node, "kyc-slow", "agent", Role::Agent).await;
    let (producer, publisher, _task) = publish_as(&mut agent, TestCodec::Vp8).await;
    // The user joins from a socket with the smallest receive buffer and never reads again.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(1024).unwrap();
    let stream = sock.connect(node.signaling_addr).await.unwrap();
    let url = format!("ws://{}/v1/ws", node.signaling_addr);
    let (mut ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    use futures_util::{SinkExt, StreamExt};
    let t = token("kyc-slow", "user", Role::User, Duration::from_secs(600));
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"type":"join","version":1,"token":t})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let joined = ws.next().await.unwrap().unwrap();
    assert!(joined.to_text().unwrap().contains("\"joined\""));
    wait_for("both joined", Duration::from_secs(5), || {
        node.workers.stats().participants.load(Relaxed) == 2
    })
    .await;
    // The agent toggles its producer: each toggle is an event for the user.
    for i in 0..20_000 {
        let ty = if i % 2 == 0 {
            "pauseProducer"
        } else {
            "resumeProducer"
        };
        let r = agent
            .request(json!({"type": ty, "producerId": producer}))
            .await;
        assert_eq!(r["type"], "ok", "{r}");
        if node.workers.stats().events_overflowed.load(Relaxed) > 0 {
            break;
        }
    }
    assert_eq!(
        node.workers.stats().events_overflowed.load(Relaxed),
        1,
        "the user's queue filled once"
    );
    // Its seat is given back; the agent hears that the user left and keeps publishing.
    wait_for("the slow user is gone", Duration::from_secs(20), || {
        node.workers.stats().participants.load(Relaxed) == 1
    })
    .await;
    let left = agent.event("participantLeft").await;
    assert_eq!(left["participant"]["userId"], "user", "{left}");
    assert!(publisher.connected.load(Relaxed));
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_token_replaces_the_first() {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.limits.max_participants_per_session = 2;
    let node = Node::start(cfg).await.unwrap();
    let t = token("kyc-seat", "alice", Role::User, Duration::from_secs(600));
    let (mut first, _) = Signal::connect(&node).await.join_with(&t).await;
    let (_second, _) = Signal::connect(&node).await.join_with(&t).await;
    let (seen, code) = first.until_closed().await;
    assert_eq!(code, Some(4409), "{seen:?}");
    assert!(
        seen.iter()
            .any(|m| m["type"] == "error" && m["code"] == "replaced"),
        "{seen:?}"
    );
    // One seat for alice, so the agent still fits in a session of two.
    let (_agent, joined) = Signal::join(&node, "kyc-seat", "bob", Role::Agent).await;
    let users: Vec<&Value> = joined["participants"].as_array().unwrap().iter().collect();
    assert_eq!(users.len(), 1, "{joined}");
    assert_eq!(users[0]["userId"], "alice");
}

/// An HS256 token with these claims, signed with the test secret.
fn raw_token(exp: u64) -> String {
    let claims = json!({
        "sub": "mallory", "sid": "kyc-exp", "role": "user", "exp": exp,
        "iss": "meridian-test", "aud": "meridian",
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn join_refusal(node: &Node, token: &str) -> (Value, Option<u16>) {
    let mut s = Signal::connect(node).await;
    s.send_text(&json!({"type":"join","version":1,"token":token}).to_string())
        .await;
    let (seen, code) = s.until_closed().await;
    (seen[0].clone(), code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_expiry_is_refused_even_within_the_clock_leeway() {
    let node = start_node().await; // auth.leeway_secs = 5 by default
    let (err, code) = join_refusal(&node, &raw_token(unix_now() - 1)).await;
    assert_eq!(err["code"], "token_expired", "{err}");
    assert_eq!(code, Some(4401));
    assert_eq!(node.workers.stats().participants.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_after_the_expiry_is_not_served() {
    let node = start_node().await;
    let exp = unix_now() + 2;
    let (mut s, _) = Signal::connect(&node)
        .await
        .join_with(&raw_token(exp))
        .await;
    let mut p = RtcPeer::publisher_with(TestCodec::Vp8).await.unwrap();
    let publish = json!({"type":"publish","requestId":1,"sdp":p.offer().unwrap()}).to_string();
    // Sent the instant the token runs out, racing the node's own expiry timer.
    let until = UNIX_EPOCH + Duration::from_secs(exp);
    tokio::time::sleep(until.duration_since(SystemTime::now()).unwrap_or_default()).await;
    s.send_text(&publish).await;
    let (seen, code) = s.until_closed().await;
    assert_eq!(code, Some(4440), "{seen:?}");
    assert!(seen.iter().all(|m| m["type"] != "published"), "{seen:?}");
    assert!(
        seen.iter().any(|m| m["type"] == "sessionExpired"),
        "{seen:?}"
    );
    wait_for("no participant left behind", Duration::from_secs(2), || {
        node.workers.stats().participants.load(Relaxed) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_absurd_expiry_is_refused_and_leaves_no_seat() {
    let node = start_node().await;
    for exp in [1u64 << 63, u64::MAX] {
        let (err, code) = join_refusal(&node, &raw_token(exp)).await;
        assert_eq!(err["code"], "token_malformed", "{err}");
        assert_eq!(code, Some(4401));
    }
    let (_s, _) = Signal::join(&node, "kyc-exp", "someone", Role::Agent).await;
    assert_eq!(node.workers.stats().participants.load(Relaxed), 1);
}

/// Sends a ping and returns the events that arrived before its pong.
async fn events_until_pong(s: &mut Signal) -> Vec<Value> {
    let r = s.request(json!({"type":"ping"})).await;
    assert_eq!(r["type"], "pong");
    std::mem::take(&mut s.events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_in_one_session_never_see_each_other() {
    let node = start_node().await;
    let (mut agent, _) = Signal::join(&node, "kyc-vis", "agent", Role::Agent).await;
    let (mut alice, joined) = Signal::join(&node, "kyc-vis", "alice", Role::User).await;
    assert_eq!(joined["participants"].as_array().unwrap().len(), 1);
    let (bob, joined) = Signal::join(&node, "kyc-vis", "bob", Role::User).await;
    let seen: Vec<&Value> = joined["participants"].as_array().unwrap().iter().collect();
    assert_eq!(seen.len(), 1, "{joined}");
    assert_eq!(seen[0]["userId"], "agent");
    drop(bob);
    // The agent sees bob come and go; alice sees nothing of him.
    let came = agent.event("participantJoined").await;
    assert_eq!(came["participant"]["userId"], "alice");
    let came = agent.event("participantJoined").await;
    assert_eq!(came["participant"]["userId"], "bob");
    let went = agent.event("participantLeft").await;
    assert_eq!(went["participant"]["userId"], "bob");
    let events = events_until_pong(&mut alice).await;
    assert!(
        events.iter().all(|e| e["participant"]["userId"] != "bob"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_only_on_their_own_listener() {
    let node = start_node().await;
    let (status, _) = http_get_as(node.signaling_addr, ip("127.0.0.1"), "/metrics", &[]).await;
    assert_eq!(status, 404, "no metrics on the client-facing port");
    let m = metrics(&node).await;
    assert!(m.contains("meridian_sessions{"), "{m}");
    // Unless told otherwise, the metrics listener is on loopback.
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.metrics = Default::default();
    assert!(cfg.metrics.listen.ip().is_loopback());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_pages_and_the_sdk_carry_security_headers() {
    let node = start_node().await;
    for path in ["/demo/user.html", "/demo/agent.html", "/sdk/meridian.js"] {
        let mut s = tokio::net::TcpStream::connect(node.signaling_addr)
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let head = out.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        for want in [
            "x-content-type-options: nosniff",
            "x-frame-options: deny",
            "referrer-policy: no-referrer",
            "frame-ancestors 'none'",
            "script-src 'self'",
        ] {
            assert!(head.contains(want), "{path} lacks {want}: {head}");
        }
    }
}

/// A STUN Binding request with USERNAME `username` and a MESSAGE-INTEGRITY that is not made
/// with the server's password (the attacker does not know it).
fn forged_binding(username: &str, txid: u8) -> Vec<u8> {
    let mut attrs = vec![0x00, 0x06];
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    attrs.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    attrs.extend_from_slice(&[0xab; 20]);
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&[txid; 12]);
    m.extend_from_slice(&attrs);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_binding_requests_cannot_lock_a_client_out() {
    let node = start_node().await;
    let (mut agent, _) = Signal::join(&node, "kyc-stun", "agent", Role::Agent).await;
    let mut publisher = RtcPeer::publisher_with(TestCodec::Vp8).await.unwrap();
    let reply = agent
        .request(json!({"type":"publish","sdp":publisher.offer().unwrap()}))
        .await;
    assert_eq!(reply["type"], "published", "{reply}");
    let answer = reply["sdp"].as_str().unwrap();
    let ufrag = answer
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        .unwrap();
    // The server's ufrag travels in clear; an attacker who saw it floods forged checks from
    // many addresses before the client's own checks arrive.
    let media = media_addr_of(&node, "kyc-stun");
    let mut forgers = Vec::new();
    for i in 0..16u8 {
        let s = tokio::net::UdpSocket::bind((ip(&format!("127.0.0.{}", 20 + i)), 0))
            .await
            .unwrap();
        s.send_to(&forged_binding(&format!("{ufrag}:evil"), i), media)
            .await
            .unwrap();
        forgers.push(s);
    }
    wait_for("forgeries counted", Duration::from_secs(5), || {
        node.workers.stats().stun_unauthenticated.load(Relaxed) >= 16
    })
    .await;
    publisher.answer(answer).unwrap();
    let state = Arc::new(PeerState::default());
    let _task = publisher.spawn(state.clone());
    wait_for("the real client connects", Duration::from_secs(10), || {
        state.connected.load(Relaxed) && node.workers.stats().rtp_in.load(Relaxed) > 10
    })
    .await;
    // No forged address was ever answered.
    for s in &forgers {
        let mut buf = [0u8; 1500];
        assert!(
            tokio::time::timeout(Duration::from_millis(50), s.recv(&mut buf))
                .await
                .is_err(),
            "a forger got a reply"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_crowding_ice_tcp_connections_are_closed() {
    let node = start_node().await;
    // Each worker's ICE-TCP listener has its own caps; these go to the first one.
    let media = node.workers.get(0).media_addr();
    // Silent, and one that announced a full-size frame and stalled: both cut at the
    // authentication deadline (5 s).
    let mut silent = tcp_from(ip("127.0.0.30"), media).await;
    let mut stalled = tcp_from(ip("127.0.0.31"), media).await;
    stalled.write_all(&[0xff, 0xff, 0x00, 0x01]).await.unwrap();
    // One address may hold MAX_TCP_PER_SOURCE connections; one more is refused at once.
    let mut crowd = Vec::new();
    for _ in 0..meridian::sfu::MAX_TCP_PER_SOURCE {
        crowd.push(tcp_from(ip("127.0.0.32"), media).await);
    }
    let mut extra = tcp_from(ip("127.0.0.32"), media).await;
    assert!(closed_within(&mut extra, Duration::from_secs(1)).await);
    assert_eq!(node.workers.stats().tcp_refused.load(Relaxed), 1);
    assert!(closed_within(&mut silent, Duration::from_secs(8)).await);
    assert!(closed_within(&mut stalled, Duration::from_secs(8)).await);
    for c in &mut crowd {
        assert!(closed_within(c, Duration::from_secs(8)).await);
    }
    // Their places are free again.
    let mut again = tcp_from(ip("127.0.0.32"), media).await;
    assert!(!closed_within(&mut again, Duration::from_millis(500)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_carry_no_ice_passwords_or_client_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nregion = \"logs\"\nlatitude = 0.0\nlongitude = 0.0\n\
             [signaling]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [rtc]\nlisten_ip = \"127.0.0.1\"\nannounced_ip = \"127.0.0.1\"\nport = 0\n\
             [auth]\nissuer = \"meridian-test\"\naudience = \"meridian\"\n\
             algorithm = \"HS256\"\nsecret = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("node.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut addr: Option<SocketAddr> = None;
    wait_for(
        "the node says where it listens",
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            addr = text
                .lines()
                .find(|l| l.contains("listening on http://"))
                .and_then(|l| l.rsplit("http://").next())
                .and_then(|a| a.trim().parse().ok());
            addr.is_some()
        },
    )
    .await;
    let addr = addr.unwrap();
    let t = token("kyc-logs", "agent", Role::Agent, Duration::from_secs(60));
    let (mut s, _) = Signal::connect_url(&format!("ws://{addr}/v1/ws"))
        .await
        .join_with(&t)
        .await;
    let mut publisher = RtcPeer::publisher_with(TestCodec::Vp8).await.unwrap();
    let offer = publisher.offer().unwrap();
    let reply = s.request(json!({"type":"publish","sdp":offer})).await;
    assert_eq!(reply["type"], "published", "{reply}");
    let answer = reply["sdp"].as_str().unwrap().to_owned();
    publisher.answer(&answer).unwrap();
    let client = publisher.local;
    let state = Arc::new(PeerState::default());
    let task = publisher.spawn(state.clone());
    wait_for("connected", Duration::from_secs(10), || {
        state.connected.load(Relaxed) && state.packets_sent.load(Relaxed) > 20
    })
    .await;
    state.stop.store(true, Relaxed);
    let _ = task.await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("DEBUG"), "the node did log at debug");
    let pwd = |sdp: &str| {
        sdp.lines()
            .find_map(|l| l.trim_end().strip_prefix("a=ice-pwd:"))
            .unwrap()
            .to_owned()
    };
    for secret in [pwd(&offer), pwd(&answer)] {
        assert!(!logs.contains(&secret), "an ICE password is in the logs");
    }
    assert!(
        !logs.contains(&client.to_string()),
        "the client's address {client} is in the logs"
    );
}
