//! TURN through the product and Debian's coturn, configured from infra/coturn/turnserver.conf
//! (loopback listeners, and loopback allowed as a peer, are the only changes): the node hands
//! each participant time-limited credentials in `joined`; coturn grants an allocation for them
//! and refuses an expired one; and a Chromium call forced to relay-only
//! (`iceTransportPolicy: "relay"`) completes through coturn.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use common::browser::*;
use common::*;
use meridian::auth::Role;

const SECRET: &str = "test-turn-secret-0123456789abcdef";

fn turnserver() -> PathBuf {
    let p = PathBuf::from("/usr/bin/turnserver");
    assert!(
        p.exists(),
        "coturn is not installed (tests/run.sh installs Debian's coturn)"
    );
    p
}

fn free_udp_and_tcp_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Coturn {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// coturn from the shipped configuration: placeholders filled in, listening on loopback
/// without TLS, relaying on loopback (the node under test is there), everything else as
/// shipped (the denied private ranges stay; loopback is allowed explicitly).
async fn coturn(dir: &Path) -> Coturn {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/coturn/turnserver.conf"),
    )
    .unwrap();
    let port = free_udp_and_tcp_port();
    let log = dir.join("turn.log");
    let mut conf: String = shipped
        .lines()
        .filter(|l| {
            ![
                "tls-listening-port=",
                "cert=",
                "pkey=",
                "log-file=",
                "relay-ip=",
                "listening-port=",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(|l| {
            l.replace("@TURN_SECRET@", SECRET)
                .replace("@REALM@", "meridian.test")
                .replace("@EXTERNAL_IP@", "127.0.0.1")
                + "\n"
        })
        .collect();
    assert!(!conf.contains('@'), "every placeholder filled");
    conf.push_str(&format!(
        "listening-port={port}\nlistening-ip=127.0.0.1\nrelay-ip=127.0.0.1\nno-tls\nno-dtls\nallow-loopback-peers\nallowed-peer-ip=127.0.0.1\nlog-file={}\npidfile={}\n",
        log.display(),
        dir.join("turn.pid").display()
    ));
    let path = dir.join("turnserver.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(turnserver())
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Coturn { child, port, log }
}

fn turn_config(cfg: &mut meridian::config::NodeConfig, port: u16) {
    cfg.turn = Some(meridian::config::TurnSection {
        urls: vec![format!("turn:127.0.0.1:{port}?transport=udp")],
        secret: Some(SECRET.into()),
        secret_file: None,
        ttl_secs: 3600,
    });
}

/// An allocation (and relayed traffic between two of them) with these credentials, by
/// coturn's own test client: whether coturn granted it.
fn allocates(port: u16, username: &str, credential: &str) -> bool {
    let out = Command::new("/usr/bin/turnutils_uclient")
        .args(["-y", "-n", "2", "-u", username, "-w", credential, "-p"])
        .arg(port.to_string())
        .arg("127.0.0.1")
        .output()
        .unwrap();
    out.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_hands_out_turn_credentials_that_coturn_takes_until_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let turn = coturn(dir.path()).await;
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    turn_config(&mut cfg, turn.port);
    let node = meridian::node::Node::start(cfg).await.unwrap();
    let (_s, joined) = Signal::join(&node, "kyc-turn", "cust-1", Role::User).await;
    let servers = joined["iceServers"]
        .as_array()
        .expect("iceServers in joined");
    assert_eq!(servers.len(), 1, "{joined}");
    let s = &servers[0];
    assert_eq!(
        s["urls"][0],
        format!("turn:127.0.0.1:{}?transport=udp", turn.port)
    );
    let username = s["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "cust-1");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!((now + 3590..=now + 3610).contains(&expiry), "{username}");
    let credential = s["credential"].as_str().unwrap();
    assert!(
        allocates(turn.port, username, credential),
        "coturn grants the node's credential: {}",
        std::fs::read_to_string(&turn.log).unwrap_or_default()
    );
    // The same derivation, for a minute ago: refused; and a wrong password: refused.
    let issuer = meridian::auth::turn::TurnIssuer::new(
        vec!["turn:127.0.0.1".into()],
        SECRET.as_bytes(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let expired = issuer.issue_until("cust-1", now - 60);
    assert!(!allocates(
        turn.port,
        &expired.username,
        &expired.credential
    ));
    assert!(!allocates(
        turn.port,
        username,
        "AAAAAAAAAAAAAAAAAAAAAAAAAAA="
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_chromium_call_completes_through_coturn() {
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let turn = coturn(dir.path()).await;
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    turn_config(&mut cfg, turn.port);
    let node = meridian::node::Node::start(cfg).await.unwrap();
    let page = |role: &str, user: &str, r: Role| {
        let t = token("kyc-relay", user, r, Duration::from_secs(600));
        format!("{}/demo/{role}.html#token={t}&relay=1", node.http_url())
    };
    let user = Browser::open(&page("user", "alice", Role::User));
    let agent = Browser::open(&page("agent", "bob", Role::Agent));
    both_decoding("both sides decoding through TURN only", 60, &user, &agent).await;
    for b in [&user, &agent] {
        let last = b.reports("STATS").pop().unwrap();
        assert_eq!(last["paths"]["publish"], "relay", "{last}");
        assert_eq!(last["paths"]["subscribe"], "relay", "{last}");
    }
}
