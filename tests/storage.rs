//! Sealed session folders copied to a real S3-compatible server (moto in server mode,
//! installed from PyPI by tests/run.sh into target/moto-venv), checked there, verified from
//! the store by `meridian verify --store-config`, and a tampered copy caught.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use meridian::compliance::db::SessionDb;
use meridian::compliance::seal::verify;
use meridian::node::Node;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A moto S3 server on a free port, stopped when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn moto() -> Moto {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/moto_server");
    assert!(
        bin.exists(),
        "{} missing: tests/run.sh installs moto[server] there",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let m = Moto { child, port };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("moto did not listen within 10 s");
}

/// Creates a bucket (moto takes an unsigned request).
async fn create_bucket(port: u16, bucket: &str) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

fn storage_section(root: &Path, port: u16) -> meridian::compliance::storage::StorageSection {
    let secret = root.join("s3.secret");
    std::fs::write(&secret, "test-secret\n").unwrap();
    meridian::compliance::storage::StorageSection {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: "kyc-archive".into(),
        region: "ap-south-1".into(),
        prefix: "india".into(),
        access_key_id: "test-key".into(),
        secret_access_key_file: secret,
        allow_http: true,
    }
}

#[tokio::test]
async fn a_sealed_session_is_stored_checked_and_verifies_from_the_store() {
    let server = moto().await;
    create_bucket(server.port, "kyc-archive").await;
    let root = tempfile::tempdir().unwrap();
    let mut cfg = recording_config(root.path());
    cfg.recording.storage = Some(storage_section(root.path(), server.port));
    let node = Node::start(cfg).await.expect("node starts");
    let (mut user, _) = Signal::join(&node, "kyc-stored", "alice", Role::User).await;
    let (mut agent, _) = Signal::join(&node, "kyc-stored", "bob", Role::Agent).await;
    let r = agent
        .request(json!({"type": "markChecklist", "step": "document shown", "checked": true}))
        .await;
    assert_eq!(r["type"], "ok", "{r}");
    for s in [&mut agent, &mut user] {
        s.send_text(&json!({"type": "leave"}).to_string()).await;
        s.until_closed().await;
    }

    // The database says where the run went once it was uploaded and checked.
    let db = SessionDb::open(&format!(
        "sqlite://{}",
        root.path().join("recordings/sessions.db").display()
    ))
    .await
    .unwrap();
    let mut run = None;
    for _ in 0..200 {
        run = db
            .show("kyc-stored")
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.stored_url.is_some());
        if run.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = run.expect("stored within 10 s");
    let name = &run.session.run;
    assert_eq!(
        run.stored_url.as_deref(),
        Some(format!("s3://kyc-archive/india/kyc-stored/{name}/").as_str())
    );
    let m = metrics(&node).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("meridian_storage_uploaded_total") && l.ends_with(" 1")),
        "{m}"
    );

    // `meridian verify` on the copy in the store.
    let region_file = root.path().join("region.toml");
    std::fs::write(
        &region_file,
        format!(
            r#"
[node]
region = "india"
latitude = 19.0
longitude = 72.8
{sections}[recording.storage]
endpoint = "http://127.0.0.1:{port}"
bucket = "kyc-archive"
region = "ap-south-1"
prefix = "india"
access_key_id = "test-key"
secret_access_key_file = "{secret}"
allow_http = true
"#,
            port = server.port,
            secret = root.path().join("s3.secret").display(),
            sections = serve_sections(0),
        ),
    )
    .unwrap();
    let verify_stored = || {
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .arg("verify")
            .arg(format!("kyc-stored/{name}"))
            .arg("--store-config")
            .arg(&region_file)
            .arg("--public-key")
            .arg(root.path().join("node.pub.pem"))
            .output()
            .unwrap()
    };
    let out = verify_stored();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The stored audit log altered in the bucket: caught, named.
    let store = AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{}", server.port))
        .with_bucket_name("kyc-archive")
        .with_region("ap-south-1")
        .with_access_key_id("test-key")
        .with_secret_access_key("test-secret")
        .with_allow_http(true)
        .build()
        .unwrap();
    let key = ObjectPath::from(format!("india/kyc-stored/{name}/audit.jsonl"));
    let log = store.get(&key).await.unwrap().bytes().await.unwrap();
    let forged = String::from_utf8_lossy(&log).replace("document shown", "document forged");
    store.put(&key, forged.into_bytes().into()).await.unwrap();
    let out = verify_stored();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("audit.jsonl"), "{said}");

    // The local folder stays as sealed.
    let local = PathBuf::from(&run.session.folder);
    assert_eq!(verify(&local, None).faults, vec![]);
}
