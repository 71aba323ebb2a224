//! A real authoritative DNS server in-process (hickory-server serving a BIND zone file on an
//! ephemeral UDP+TCP port), whose zone a test can replace.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::rr::{LowerName, Name};
use hickory_server::store::file::{FileConfig, FileZoneHandler};
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

pub struct DnsServer {
    pub addr: SocketAddr,
    origin: String,
    dir: tempfile::TempDir,
    server: Server<Catalog>,
}

/// A zone with SOA and NS around `records`; TTLs of 1 s so caches never hide a change long.
pub fn zone(origin: &str, records: &str) -> String {
    format!(
        "$ORIGIN {origin}\n$TTL 1\n@ IN SOA ns.{origin} admin.{origin} 1 60 60 60 1\n@ IN NS ns.{origin}\nns IN A 127.0.0.1\n{records}"
    )
}

/// SRV, A and TXT records for one node's pipe endpoint.
pub fn node_records(node: &str, region: &str, pipe: SocketAddr) -> String {
    format!(
        "_meridian._udp IN SRV 10 10 {port} {node}\n{node} IN A {ip}\n{node} IN TXT \"node={node}\" \"region={region}\" \"version={version}\"\n",
        port = pipe.port(),
        ip = pipe.ip(),
        version = meridian::proto::pipe::WIRE_VERSION,
    )
}

impl DnsServer {
    pub async fn start(origin: &str, zone_text: &str) -> DnsServer {
        let dir = tempfile::tempdir().unwrap();
        // Find a port free for UDP and TCP alike.
        let addr = loop {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let a = udp.local_addr().unwrap();
            if std::net::TcpListener::bind(a).is_ok() {
                break a;
            }
        };
        let server = serve(addr, origin, dir.path(), zone_text).await;
        DnsServer {
            addr,
            origin: origin.to_string(),
            dir,
            server,
        }
    }

    /// Serves a new zone on the same address (the old server is shut down first).
    pub async fn replace(&mut self, zone_text: &str) {
        let _ = self.server.shutdown_gracefully().await;
        self.server = serve(self.addr, &self.origin, self.dir.path(), zone_text).await;
    }
}

async fn serve(
    addr: SocketAddr,
    origin: &str,
    dir: &std::path::Path,
    zone_text: &str,
) -> Server<Catalog> {
    let path = dir.join("zone.db");
    std::fs::write(&path, zone_text).unwrap();
    let name = Name::from_str(origin).unwrap();
    let handler = FileZoneHandler::try_from_config(
        name.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
        None,
        &FileConfig { zone_path: path },
    )
    .expect("zone file loads");
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(name), vec![Arc::new(handler)]);
    let mut server = Server::new(catalog);
    // Rebinding right after a shutdown may race the old sockets' release: retry briefly.
    let mut tries = 0;
    let (udp, tcp) = loop {
        match (
            tokio::net::UdpSocket::bind(addr).await,
            tokio::net::TcpListener::bind(addr).await,
        ) {
            (Ok(u), Ok(t)) => break (u, t),
            _ if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (u, t) => panic!("cannot bind the test DNS server on {addr}: {u:?} {t:?}"),
        }
    };
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 16);
    server
}
