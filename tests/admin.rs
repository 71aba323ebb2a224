//! The operators' API and `meridian ctl` through their real interfaces: a mesh of two nodes,
//! the admin listener on one of them, requests without, with a wrong and with the right
//! token, and the `meridian` binary's `ctl status` and `ctl drain` / `undrain`.

mod common;

use serde_json::Value;
use std::time::Duration;

use common::*;

const TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_only_its_token_and_ctl_shows_and_drains_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let tf = token_file.clone();
    let nodes = routed_mesh_of(
        dir.path(),
        &[
            ("india-1".into(), ("india", 19.076, 72.8777)),
            ("us-1".into(), ("us", 39.0, -77.5)),
        ],
        move |cfg| {
            if cfg.node.region.as_str() == "india" {
                cfg.admin = Some(meridian::admin::AdminSection {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    token_file: tf.clone(),
                });
            }
        },
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
        table.contains("india-1*") && table.contains("us-1") && table.contains("PIPE TO"),
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
