//! The operators' API and `meridian ctl` through their real interfaces: a mesh of two nodes,
//! the admin listener on one of them, requests without, with a wrong and with the right
//! token, and the `meridian` binary's `ctl status` and `ctl drain` / `undrain`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

/// A raw HTTP request to the admin listener: status and body.
async fn admin_request(
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

fn ctl(addr: std::net::SocketAddr, token_file: &Path, args: &[&str]) -> (i32, String, String) {
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
