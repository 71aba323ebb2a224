//! infra/nginx/meridian.conf through Debian's NGINX: `nginx -t` accepts it, and a client in
//! Mumbai reaches the US node through it over TLS: `/v1/edge` still places the client by its
//! own address (the node trusts the proxy's X-Forwarded-For), and a WebSocket join over TLS
//! through the proxy is answered `joined`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use meridian::auth::Role;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const NAME: &str = "in-1.meridian.test";

fn nginx() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The shipped site, with the placeholders the deployment fills in, its listeners moved to
/// loopback ports and its certificate and ACME paths in `dir`, inside a minimal main config.
fn configure(dir: &Path, signaling: u16, https: u16, http: u16) -> PathBuf {
    let site = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/nginx/meridian.conf"),
    )
    .unwrap();
    let site = site
        .replace("@PUBLIC_NAME@", NAME)
        .replace("@SIGNALING_PORT@", &signaling.to_string())
        .replace("@ADMIN_PORT@", &free_port().to_string())
        .replace(
            "listen 443 ssl http2;",
            &format!("listen 127.0.0.1:{https} ssl http2;"),
        )
        .replace("listen [::]:443 ssl http2;", "")
        .replace("listen 80;", &format!("listen 127.0.0.1:{http};"))
        .replace("listen [::]:80;", "")
        .replace("/etc/meridian/tls/", &format!("{}/", dir.display()))
        .replace("/var/www/acme", &dir.join("acme").display().to_string());
    assert!(!site.contains('@'), "every placeholder filled: {site}");
    std::fs::write(dir.join("meridian.conf"), site).unwrap();
    let main = format!(
        "pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/meridian.conf;\n}}\n",
        d = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, main).unwrap();
    path
}

/// A self-signed certificate for NAME in `dir` (fullchain.pem, privkey.pem); its DER.
fn certificate(dir: &Path) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![NAME.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("fullchain.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("privkey.pem"), key.serialize_pem()).unwrap();
    cert.der().to_vec()
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (a SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// A TLS connection to `addr` for NAME from source address `from`, trusting only `cert`.
async fn tls_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    cert: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(cert.to_vec()))
        .unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_mumbai_is_placed_and_joins_through_nginx_over_tls() {
    let Some(nginx) = nginx() else {
        panic!("nginx is not installed (tests/run.sh installs Debian's nginx)");
    };
    let dir = tempfile::tempdir().unwrap();
    // India, Europe and US; the US node trusts a proxy on loopback.
    let nodes = routed_mesh(dir.path(), |cfg| {
        if cfg.node.region.as_str() == "us" {
            cfg.routing.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        }
    })
    .await;
    let us = &nodes[2];
    let cert = certificate(dir.path());
    std::fs::create_dir_all(dir.path().join("acme")).unwrap();
    let (https, http) = (free_port(), free_port());
    let conf = configure(dir.path(), us.signaling_addr.port(), https, http);
    let check = Command::new(&nginx)
        .args(["-t", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _proxy = Nginx(
        Command::new(&nginx)
            .args(["-c"])
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .spawn()
            .unwrap(),
    );
    let https_addr: SocketAddr = format!("127.0.0.1:{https}").parse().unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(https_addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mumbai: std::net::IpAddr = "127.1.0.9".parse().unwrap();

    // Routing through the proxy: Mumbai is sent to India, not to the proxy's own place.
    let mut tls = tls_from(mumbai, https_addr, &cert).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(
        // HTTP/1.0: the answer comes whole, not chunked.
        format!("GET /v1/edge HTTP/1.0\r\nHost: {NAME}\r\nX-Forwarded-For: 192.0.2.100\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(
        body["edge"]["node"], "india-1",
        "placed by its own address (not the forged header, not the proxy's): {answer}"
    );

    // A WebSocket join through the proxy, over TLS.
    let tls = tls_from(mumbai, https_addr, &cert).await;
    let url = format!("wss://{NAME}/v1/ws");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let t = token("kyc-nginx", "cust-1", Role::User, Duration::from_secs(60));
    ws.send(Message::Text(
        json!({"type":"join","version":1,"token":t})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let joined = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no joined: {other:?}"),
        }
    };
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["node"], "us-1");
    let _ = ws.close(None).await;
}
