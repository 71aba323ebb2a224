//! Discovery: the set of peers a node should have pipes to, from DNS.
//!
//! The mesh domain publishes one SRV record per node under `_meridian._udp.<domain>` whose
//! target and port are the node's pipe endpoint, and a TXT record at the target carrying
//! `node=<id>`, `region=<region>` and `version=<pipe protocol>`:
//!
//! ```text
//! _meridian._udp.mesh.example.com. 30 IN SRV 10 10 7100 in-1.mesh.example.com.
//! in-1.mesh.example.com.           30 IN A   10.20.0.5
//! in-1.mesh.example.com.           30 IN TXT "node=india-1" "region=india" "version=4"
//! ```
//!
//! A peer whose TXT names another pipe protocol version is not dialed (it would refuse the
//! Hello anyway); upgrade the mesh node by node with both versions published meanwhile.
//!
//! The name is re-resolved every `interval`; answers are cached for at most that long, so a
//! record added or removed takes effect within two intervals. A failed lookup (timeout,
//! SERVFAIL) keeps the last good answer, and before any answer the static seeds stand in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::Resolver;

use crate::ids::{NodeId, RegionId};

/// One peer as discovery knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRecord {
    /// Pipe endpoint to dial.
    pub addr: SocketAddr,
    /// Node id from the TXT record, when published.
    pub node: Option<NodeId>,
    pub region: Option<RegionId>,
    /// Pipe protocol version the node speaks, when published.
    pub version: Option<String>,
}

/// How to find peers in DNS.
#[derive(Debug, Clone)]
pub struct DnsDiscovery {
    /// SRV name, e.g. `_meridian._udp.mesh.example.com.`.
    pub name: String,
    /// Name servers to ask; empty means the system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    pub interval: Duration,
}

/// Why DNS could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "cannot set up the DNS resolver: {0} (check mesh.discovery.servers or /etc/resolv.conf)"
    )]
    Resolver(String),
    #[error("DNS lookup of {name} failed: {reason}")]
    Lookup { name: String, reason: String },
}

/// Fields of a node's TXT record (`key=value` strings; unknown keys are ignored).
#[derive(Debug, Default, PartialEq)]
pub struct TxtMeta {
    pub node: Option<NodeId>,
    pub region: Option<RegionId>,
    pub version: Option<String>,
}

/// Reads `node=`, `region=` and `version=` out of TXT strings, one attribute per string as
/// RFC 1464 has it. Values that are not valid ids are dropped rather than trusted.
pub fn parse_txt<'a>(strings: impl IntoIterator<Item = &'a [u8]>) -> TxtMeta {
    let mut meta = TxtMeta::default();
    for s in strings {
        let Ok(s) = std::str::from_utf8(s) else {
            continue;
        };
        match s.split_once('=') {
            Some(("node", v)) => meta.node = v.parse().ok(),
            Some(("region", v)) => meta.region = v.parse().ok(),
            Some(("version", v)) if !v.is_empty() && v.len() <= 16 => {
                meta.version = Some(v.to_string())
            }
            _ => {}
        }
    }
    meta
}

/// A resolver for the mesh name.
pub struct PeerResolver {
    resolver: Resolver<TokioRuntimeProvider>,
    name: String,
}

impl PeerResolver {
    pub fn new(cfg: &DnsDiscovery) -> Result<PeerResolver, DiscoveryError> {
        let mut builder = if cfg.servers.is_empty() {
            Resolver::builder_tokio().map_err(|e| DiscoveryError::Resolver(e.to_string()))?
        } else {
            let servers = cfg
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        // Never serve an answer older than one interval: removals must converge.
        opts.positive_max_ttl = Some(cfg.interval);
        opts.negative_max_ttl = Some(cfg.interval);
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        let resolver = builder
            .build()
            .map_err(|e| DiscoveryError::Resolver(e.to_string()))?;
        Ok(PeerResolver {
            resolver,
            name: cfg.name.clone(),
        })
    }

    /// The peers DNS publishes now. A name that does not exist or has no SRV records means no
    /// peers (every record was removed); other failures are errors.
    pub async fn resolve(&self) -> Result<Vec<PeerRecord>, DiscoveryError> {
        let lookup_err = |name: &str, e: &dyn std::fmt::Display| DiscoveryError::Lookup {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let srv = match self.resolver.srv_lookup(self.name.as_str()).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => return Err(lookup_err(&self.name, &e)),
        };
        let mut targets: BTreeMap<String, u16> = BTreeMap::new();
        for record in srv.answers() {
            if let hickory_resolver::proto::rr::RData::SRV(s) = &record.data {
                targets.insert(s.target.to_ascii(), s.port);
            }
        }
        let mut out = Vec::new();
        for (target, port) in targets {
            let ips = match self.resolver.lookup_ip(target.as_str()).await {
                Ok(ips) => ips,
                // A target without an address is skipped: its node is not reachable yet.
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => continue,
                Err(e) => return Err(lookup_err(&target, &e)),
            };
            let meta = match self.resolver.txt_lookup(target.as_str()).await {
                Ok(txt) => parse_txt(txt.answers().iter().flat_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::TXT(t) => {
                        t.txt_data.iter().map(|b| &b[..]).collect::<Vec<_>>()
                    }
                    _ => Vec::new(),
                })),
                Err(_) => TxtMeta::default(),
            };
            for ip in ips.iter() {
                out.push(PeerRecord {
                    addr: SocketAddr::new(ip, port),
                    node: meta.node.clone(),
                    region: meta.region.clone(),
                    version: meta.version.clone(),
                });
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_fields_are_read_and_garbage_ignored() {
        let m = parse_txt([
            &b"node=india-1"[..],
            b"region=india",
            b"version=1",
            b"colour=blue",
            b"\xff\xfe",
        ]);
        assert_eq!(m.node.unwrap().as_str(), "india-1");
        assert_eq!(m.region.unwrap().as_str(), "india");
        assert_eq!(m.version.as_deref(), Some("1"));
        let m = parse_txt([&b"node=has space but/slash"[..]]);
        assert_eq!(m.node, None);
    }
}
