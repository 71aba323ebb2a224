//! The operators' API and `meridian ctl` through their real interfaces: a mesh of two nodes,
//! the admin listener on one of them, requests without, with a wrong and with the right
//! token, and the `meridian` binary's `ctl status` and `ctl drain` / `undrain`.

mod common;

use meridian::auth::Role;
use serde_json::Value;
use std::time::Duration;

use common::*;

const TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

/// A mesh of `sites` whose nodes in `region` have the admin API on, and the token file.
async fn mesh_with_admin_in(
    dir: &std::path::Path,
    sites: &[(String, (&str, f64, f64))],
    region: &'static str,
) -> (Vec<meridian::node::Node>, std::path::PathBuf) {
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let tf = token_file.clone();
    let nodes = routed_mesh_of(dir, sites, move |cfg| {
        if cfg.node.region.as_str() == region {
            cfg.admin = Some(meridian::admin::AdminSection {
                listen: "127.0.0.1:0".parse().unwrap(),
                token_file: tf.clone(),
            });
        }
    })
    .await;
    (nodes, token_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_only_its_token_and_ctl_shows_and_drains_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, token_file) = mesh_with_admin_in(
        dir.path(),
        &[
            ("india-1".into(), ("india", 19.076, 72.8777)),
            ("us-1".into(), ("us", 39.0, -77.5)),
        ],
        "india",
    )
    .await;
    let (india, us) = (&nodes[0], &nodes[1]);
    assert!(us.admin_addr.is_none(), "off unless configured");
    let admin = india.admin_addr.expect("the admin listener");
    assert_ne!(admin, india.signaling_addr);
    assert_ne!(admin, india.metrics_addr);

    // Refused without a token and with a wrong one; never on the signaling port.
    let (status, body) = admin_request(admin, "GET", "/v1/admin/status", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("admin_token_missing"))
    );
    let wrong = "0123456789abcdef0123456789abcdef-wrong";
    let (status, body) = admin_request(admin, "POST", "/v1/admin/drain", Some(wrong)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("admin_token_wrong"))
    );
    assert!(
        !india.members()[0].draining,
        "a refused drain changes nothing"
    );
    let (status, _) =
        admin_request(india.signaling_addr, "GET", "/v1/admin/status", Some(TOKEN)).await;
    assert_eq!(status, 404, "not on the public listener");
    let refusals = metrics(india).await;
    assert!(
        refusals.contains(r#"code="admin_token_wrong"} 1"#),
        "refusals are counted: {refusals}"
    );

    // `ctl status`: both nodes with their load, the pipe with its figures.
    let (code, out, err) = ctl(admin, &token_file, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
    let mut names: Vec<String> = s.nodes.iter().map(|n| n.node.to_string()).collect();
    names.sort();
    assert_eq!(names, ["india-1", "us-1"]);
    assert_eq!(s.pipes.len(), 1);
    assert_eq!(s.pipes[0].node.to_string(), "us-1");
    assert!(
        s.pipes[0].rtt_ms > 0.0 && s.pipes[0].loss >= 0.0,
        "{:?}",
        s.pipes[0]
    );
    let (code, table, _) = ctl(admin, &token_file, &["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("india-1*") && table.contains("us-1") && table.contains("PIPE FROM"),
        "{table}"
    );

    // `ctl drain --wait`: an empty node drains at once; the peer learns; `undrain` undoes it.
    let (code, _, err) = ctl(admin, &token_file, &["drain", "--wait", "5", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("india-1 is empty"), "{err}");
    wait_for(
        "the US node to see India draining",
        Duration::from_secs(10),
        || {
            us.members()
                .iter()
                .any(|m| m.info.node.as_str() == "india-1" && m.draining)
        },
    )
    .await;
    let (code, out, _) = ctl(admin, &token_file, &["undrain", "--json"]);
    assert_eq!(code, 0);
    let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
    assert!(!s.draining);
    wait_for(
        "the US node to see India taking sessions again",
        Duration::from_secs(10),
        || {
            us.members()
                .iter()
                .any(|m| m.info.node.as_str() == "india-1" && !m.draining)
        },
    )
    .await;

    // A short or missing token file stops ctl with a clear error.
    let short = dir.path().join("short.token");
    std::fs::write(&short, "abc").unwrap();
    let (code, _, err) = ctl(admin, &short, &["status"]);
    assert_ne!(code, 0);
    assert!(err.contains("at least 32"), "{err}");
}

/// `GET path` on `node`'s signaling listener from source address `from`: status and body.
async fn get_from(addr: std::net::SocketAddr, from: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// The node `/v1/edge` on `asked` offers a client in Mumbai.
async fn edge_for_mumbai(asked: &meridian::node::Node) -> String {
    let (_, body) = get_from(asked.signaling_addr, "127.1.0.9", "/v1/edge").await;
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["edge"]["node"].as_str().unwrap_or_default().to_owned()
}

/// A media worker that stops answering makes its node unhealthy (`/healthz` and `/readyz`
/// 503) and takes it out of routing, on its own `/v1/edge` and on its peers'; once the worker
/// answers again, the node is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_media_worker_takes_its_node_out_of_routing_until_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = routed_mesh_of(
        dir.path(),
        &[
            ("india-1".into(), ("india", 19.076, 72.8777)),
            ("us-1".into(), ("us", 39.0, -77.5)),
        ],
        |_| {},
    )
    .await;
    let (india, us) = (&nodes[0], &nodes[1]);
    assert_eq!(edge_for_mumbai(us).await, "india-1");
    let status = |n: &meridian::node::Node, path: &'static str| {
        let addr = n.signaling_addr;
        async move { get_from(addr, "127.0.0.1", path).await.0 }
    };
    assert_eq!(status(india, "/readyz").await, 200);

    for w in india.workers.iter() {
        w.stall_for_fault_test(Duration::from_secs(8));
    }
    let started = std::time::Instant::now();
    let mut out = false;
    while started.elapsed() < Duration::from_secs(6) {
        if status(india, "/readyz").await == 503
            && us
                .members()
                .iter()
                .any(|m| m.info.node.as_str() == "india-1" && m.draining)
        {
            out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(out, "India out of routing while its workers are stuck");
    println!(
        "out of routing {:.1} s after the workers stopped",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(status(india, "/healthz").await, 503);
    assert_ne!(
        edge_for_mumbai(us).await,
        "india-1",
        "the US node offers another edge"
    );
    assert_ne!(
        edge_for_mumbai(india).await,
        "india-1",
        "and so does India itself"
    );

    wait_for(
        "India back once its workers answer",
        Duration::from_secs(15),
        || {
            us.members()
                .iter()
                .any(|m| m.info.node.as_str() == "india-1" && !m.draining)
        },
    )
    .await;
    assert_eq!(status(india, "/healthz").await, 200);
    assert_eq!(status(india, "/readyz").await, 200);
    assert_eq!(edge_for_mumbai(us).await, "india-1");
}

/// The node `/v1/edge` on `asked` offers a client at `from` (a loopback address the dev GeoIP
/// table places in a city).
async fn edge_for(asked: &meridian::node::Node, from: &str) -> String {
    let (_, body) = get_from(asked.signaling_addr, from, "/v1/edge").await;
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["edge"]["node"].as_str().unwrap_or_default().to_owned()
}

/// Polls `/v1/edge` on `asked` for a client at `from` until it offers `node` first.
async fn until_edge(asked: &meridian::node::Node, from: &str, node: &str, why: &str) {
    let mut seen = String::new();
    for _ in 0..100 {
        seen = edge_for(asked, from).await;
        if seen == node {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{why}: {asked_node} offers {seen}, not {node}",
        asked_node = asked.id
    );
}

/// `meridian ctl` talks to the US node only and reaches the whole mesh through it: every
/// node's report and pipes, a session's parts on two nodes, India's routing weight and
/// capacity, a rebalance that moves one of India's two sessions, and a region-wide drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reaches_every_node_of_the_mesh_through_one() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, token_file) = mesh_with_admin_in(
        dir.path(),
        &[
            ("india-1".into(), ("india", 19.076, 72.8777)),
            ("europe-1".into(), ("europe", 50.1109, 8.6821)),
            ("us-1".into(), ("us", 39.0, -77.5)),
        ],
        "us",
    )
    .await;
    let (india, europe, us) = (&nodes[0], &nodes[1], &nodes[2]);
    let admin = us.admin_addr.unwrap();
    let india_1: meridian::ids::NodeId = "india-1".parse().unwrap();

    // A call across the mesh: the user on India publishes, the agent on US watches.
    let (mut user, _) = Signal::join(india, "kyc-ctl", "cust-1", Role::User).await;
    let (producer, _publisher, _p) = publish_as(&mut user, TestCodec::Vp8).await;
    let (mut agent, _) = Signal::join(us, "kyc-ctl", "agent-1", Role::Agent).await;
    let (watched, _s) =
        subscribe_as(&mut agent, &producer, TestCodec::Vp8, PeerState::default()).await;
    wait_for("the agent receives video", Duration::from_secs(10), || {
        !watched.received.lock().unwrap().is_empty()
    })
    .await;

    // Status: every node's own report with its pipes, India's carrying the video out.
    let mut status = None;
    for _ in 0..50 {
        let (code, out, err) = ctl(admin, &token_file, &["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
        let flowing = s.report(&india_1).is_some_and(|r| {
            r.pipes
                .iter()
                .any(|p| p.node.as_str() == "us-1" && p.bitrate_out > 0 && p.bytes_out > 0)
        });
        if flowing {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status.expect("India's pipe to US carries the video, in India's own report");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let mut reported: Vec<&str> = s.reports.iter().map(|r| r.node.as_str()).collect();
    reported.sort();
    assert_eq!(reported, ["europe-1", "india-1", "us-1"]);
    for r in &s.reports {
        assert_eq!(r.pipes.len(), 2, "{} has a pipe to each other node", r.node);
    }
    assert_eq!(s.report(&india_1).unwrap().sessions, 1);
    let (_, table, _) = ctl(admin, &token_file, &["status"]);
    assert!(
        table.contains("PIPE FROM") && table.contains("india-1") && table.contains("europe-1"),
        "{table}"
    );

    // Session: the user's part on India, the agent's on US, the producer piped between.
    let (code, out, err) = ctl(admin, &token_file, &["session", "kyc-ctl", "--json"]);
    assert_eq!(code, 0, "{err}");
    let sess: meridian::admin::SessionStatus = serde_json::from_str(&out).unwrap();
    let part = |node: &str| {
        sess.parts
            .iter()
            .find(|p| p.node.as_str() == node)
            .unwrap_or_else(|| panic!("no part on {node}: {out}"))
    };
    assert_eq!(sess.parts.len(), 2, "Europe holds nothing of it: {out}");
    let on_india = part("india-1");
    assert_eq!(on_india.participants.len(), 1);
    assert_eq!(on_india.participants[0].user.as_str(), "cust-1");
    assert!(on_india.participants[0].publishing);
    let published = &on_india.producers[0];
    assert_eq!(published.producer.as_str(), producer);
    assert_eq!(
        (published.piped_from.as_ref(), published.piped_to.len()),
        (None, 1)
    );
    assert_eq!(published.piped_to[0].as_str(), "us-1");
    let on_us = part("us-1");
    assert_eq!(on_us.participants[0].user.as_str(), "agent-1");
    assert_eq!(
        on_us.producers[0].piped_from.as_ref().map(|n| n.as_str()),
        Some("india-1")
    );
    assert_eq!(on_us.consumers.len(), 1);
    assert_eq!(on_us.consumers[0].producer.as_str(), producer);
    let (_, table, _) = ctl(admin, &token_file, &["session", "kyc-ctl"]);
    assert!(
        table.contains("piped from india-1") && table.contains("piped to us-1"),
        "{table}"
    );

    // Weight: India at 0.2 loses Singapore to Europe, on every node's routing; back at 1 it wins.
    until_edge(europe, "127.4.0.9", "india-1", "Singapore's nearest region").await;
    let (code, out, err) = ctl(admin, &token_file, &["weight", "india", "0.2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
    assert_eq!(s.report(&india_1).unwrap().weight, 0.2);
    until_edge(europe, "127.4.0.9", "europe-1", "India weighted down").await;
    until_edge(us, "127.4.0.9", "europe-1", "India weighted down").await;
    let (code, _, err) = ctl(admin, &token_file, &["weight", "india", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("above 0"), "{err}");
    let (code, _, err) = ctl(admin, &token_file, &["weight", "india", "1"]);
    assert_eq!(code, 0, "{err}");
    until_edge(europe, "127.4.0.9", "india-1", "India's weight back to 1").await;

    // Capacity: two sessions on India at a capacity of two make it full; Mumbai goes elsewhere.
    let (mut other, _) = Signal::join(india, "kyc-two", "cust-2", Role::User).await;
    let (code, out, err) = ctl(
        admin,
        &token_file,
        &["capacity", "india", "--sessions", "2", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
    assert_eq!(s.report(&india_1).unwrap().max_sessions, 2);
    until_edge(us, "127.1.0.9", "europe-1", "India at capacity").await;

    // Rebalance India down to half its capacity: one whole session moves (of two sessions
    // with one participant each here, kyc-ctl comes first by name); its user is told where.
    let rebalance = {
        let tf = token_file.clone();
        tokio::task::spawn_blocking(move || {
            ctl(
                admin,
                &tf,
                &[
                    "rebalance",
                    "india",
                    "--below",
                    "0.5",
                    "--deadline",
                    "20s",
                    "--wait",
                    "--json",
                ],
            )
        })
    };
    let told = user.event("migrate").await;
    assert_eq!(told["edge"]["node"], "europe-1", "{told}");
    // The user goes (as the SDK does once it is up elsewhere); the other session stays.
    user.send_text(r#"{"type":"leave"}"#).await;
    let (code, _, err) = rebalance.await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("region india: 1 participants told to move, 1 moved, 0 stayed"),
        "{err}"
    );
    // kyc-two was not told: nothing but other kinds of message reach it in the second after
    // the order (the user of kyc-ctl had its `migrate` before the rebalance returned).
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(m)) = tokio::time::timeout_at(quiet_until, other.recv()).await {
        assert_ne!(m["type"], "migrate", "kyc-two was told to move: {m}");
    }
    let (code, _, _) = ctl(
        admin,
        &token_file,
        &["capacity", "india", "--sessions", "1000"],
    );
    assert_eq!(code, 0);

    // A region drain through the US node: India stops taking sessions; kyc-two stays there.
    let (code, _, err) = ctl(
        admin,
        &token_file,
        &["drain", "--region", "india", "--wait", "2"],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("region india still holds 1 sessions"), "{err}");
    assert!(india.members()[0].draining, "India itself is drained");
    let (code, out, err) = ctl(
        admin,
        &token_file,
        &["undrain", "--region", "india", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
    assert!(!s.report(&india_1).unwrap().draining);
    let (code, _, err) = ctl(admin, &token_file, &["drain", "nowhere-1"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown_node"), "{err}");
    let (status, body) = admin_request(admin, "GET", "/v1/admin/status?bogus=1", Some(TOKEN)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("admin_bad_query"))
    );
    other.send_text(r#"{"type":"leave"}"#).await;
}
