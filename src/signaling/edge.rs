//! `GET /v1/edge`: which node a client should join. Any node answers, from its membership
//! view and its GeoIP database; the client then opens its WebSocket to the chosen node.
//!
//! The client's address is the socket peer's, unless the peer is a configured trusted proxy:
//! then the configured header's chain (`X-Forwarded-For` by default, or RFC 7239 `Forwarded`)
//! is walked from the right, past trusted proxies, to the first address that is not one. The
//! other header is never read: a proxy appends to one of them, and a client could fill in the
//! other itself. Headers from anyone else are ignored, so a client cannot choose where it
//! appears to be.
//!
//! The endpoint needs no token (a client asks before it joins) and so tells nothing a client
//! does not need: node ids, regions and public signaling URLs, never loads or addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::AppState;
use crate::cidr::{normalize, Cidr};
use crate::ids::{NodeId, RegionId, SessionId};
use crate::mesh::geo::GeoDb;
use crate::mesh::membership::MemberView;
use crate::mesh::selector::{self, Reason, RoutingPolicy};

/// Which forwarding header a trusted proxy's client address is read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddressHeader {
    /// `X-Forwarded-For`, as the documented NGINX configuration appends it.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded`.
    Forwarded,
}

/// What `/v1/edge` needs.
pub struct EdgeRouting {
    pub geo: Arc<GeoDb>,
    pub policy: RoutingPolicy,
    pub trusted_proxies: Vec<Cidr>,
    pub client_address_header: ClientAddressHeader,
    pub members: watch::Receiver<Arc<Vec<MemberView>>>,
    /// Which nodes host which sessions, when the node is part of a mesh.
    pub hosts: Option<Arc<crate::mesh::SessionHosts>>,
    pub metrics: EdgeMetrics,
}

/// Routing counters for `/metrics`.
#[derive(Default)]
pub struct EdgeMetrics {
    pub nearest: AtomicU64,
    pub overridden: AtomicU64,
    pub hinted: AtomicU64,
    pub defaulted: AtomicU64,
    pub unlocated: AtomicU64,
    pub least_loaded: AtomicU64,
    /// Requests refused because no node could take a session.
    pub no_edge: AtomicU64,
    /// Forwarding headers ignored because the peer is not a trusted proxy.
    pub untrusted_forwarding: AtomicU64,
}

impl EdgeMetrics {
    fn count(&self, reason: Reason) {
        match reason {
            Reason::Nearest => &self.nearest,
            Reason::Override => &self.overridden,
            Reason::Hint => &self.hinted,
            Reason::Default => &self.defaulted,
            Reason::Unlocated => &self.unlocated,
            Reason::LeastLoaded => &self.least_loaded,
        }
        .fetch_add(1, Relaxed);
    }
}

/// The address a request comes from: the peer's, or from forwarding headers when the peer is
/// a trusted proxy.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[Cidr],
    from: ClientAddressHeader,
) -> IpAddr {
    let peer = normalize(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let chain = forwarded_chain(headers, from);
    let mut client = peer;
    // Right to left: each hop was appended by the proxy in front of it.
    for hop in chain.iter().rev() {
        let Some(ip) = hop else {
            // An obfuscated or malformed hop: nothing left of it can be trusted.
            break;
        };
        client = normalize(*ip);
        if !is_trusted(client) {
            break;
        }
    }
    client
}

/// Whether the request carries forwarding headers at all.
fn has_forwarding(headers: &HeaderMap) -> bool {
    headers.contains_key(header::FORWARDED) || headers.contains_key("x-forwarded-for")
}

/// Hops of the configured header, left to right; `None` for a hop that is not an IP address
/// (`unknown`, `_hidden`, garbage).
fn forwarded_chain(headers: &HeaderMap, from: ClientAddressHeader) -> Vec<Option<IpAddr>> {
    if from == ClientAddressHeader::Forwarded {
        return headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.trim().split_once('='))
                    .find(|(k, _)| k.eq_ignore_ascii_case("for"))
                    .and_then(|(_, v)| parse_node(v.trim().trim_matches('"')))
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .map(|s| parse_node(s.trim()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711`, `2001:db8::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

#[derive(Deserialize)]
pub(super) struct EdgeQuery {
    region: Option<String>,
    /// The session the client will join: a node already hosting it in the chosen region is
    /// preferred.
    session: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNode {
    pub node: NodeId,
    pub region: RegionId,
    pub url: String,
}

/// Where routing sends a client: the first node and the ones to try after it.
#[derive(Debug, Clone)]
pub struct Route {
    pub edge: EdgeNode,
    pub alternates: Vec<EdgeNode>,
    pub reason: Reason,
}

impl EdgeRouting {
    /// The nodes for a client at `place` (routing policy, drain, health, load, the session's
    /// hosts first), counted by reason; `Err` with a message when no node can take sessions.
    pub fn route(
        &self,
        place: Option<&crate::mesh::geo::Place>,
        hint: Option<&RegionId>,
        hosting: &std::collections::HashSet<NodeId>,
    ) -> Result<Route, String> {
        let members = self.members.borrow().clone();
        let chosen =
            match selector::select_with_affinity(&self.policy, place, hint, &members, &|n| {
                hosting.contains(n)
            }) {
                Ok(c) => c,
                Err(e) => {
                    self.metrics.no_edge.fetch_add(1, Relaxed);
                    return Err(e.to_string());
                }
            };
        let node = |i: usize| {
            let m = &members[i];
            EdgeNode {
                node: m.info.node.clone(),
                region: m.info.region.clone(),
                url: m.info.signaling_url.clone(),
            }
        };
        let mut order = chosen.order.into_iter();
        // select() never returns an empty order; answer as if no edge rather than panic.
        let first = order.next().ok_or("no node can take new sessions")?;
        self.metrics.count(chosen.reason);
        Ok(Route {
            edge: node(first),
            alternates: order.map(node).collect(),
            reason: chosen.reason,
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientPlace {
    country: Option<String>,
    continent: Option<String>,
    city: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EdgeAnswer {
    edge: EdgeNode,
    alternates: Vec<EdgeNode>,
    reason: Reason,
    /// Where GeoIP placed the client; `null` when unknown. Coordinates are not echoed.
    client: Option<ClientPlace>,
    /// The node that answered.
    answered_by: NodeId,
}

fn error(status: StatusCode, code: &'static str, message: String) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// An optional identifier from the query string (absent or empty: none); a malformed one is
/// answered `400 <code>` naming the parameter.
fn optional_id<T: std::str::FromStr>(
    value: Option<&str>,
    name: &str,
    code: &'static str,
) -> Result<Option<T>, Box<Response>>
where
    T::Err: std::fmt::Display,
{
    match value {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|e| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                code,
                format!("`{name}` query parameter: {e}"),
            ))
        }),
    }
}

pub(super) async fn edge(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<EdgeQuery>,
    headers: HeaderMap,
) -> Response {
    let r = &s.edge;
    let hint = match optional_id::<RegionId>(q.region.as_deref(), "region", "badRegion") {
        Ok(h) => h,
        Err(refused) => return *refused,
    };
    let session = match optional_id::<SessionId>(q.session.as_deref(), "session", "badSession") {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let hosting = match (&session, &r.hosts) {
        (Some(s), Some(h)) => h.of(s),
        _ => Default::default(),
    };
    let ip = client_ip(
        peer.ip(),
        &headers,
        &r.trusted_proxies,
        r.client_address_header,
    );
    let peer_trusted = r
        .trusted_proxies
        .iter()
        .any(|c| c.contains(normalize(peer.ip())));
    if !peer_trusted && has_forwarding(&headers) {
        r.metrics.untrusted_forwarding.fetch_add(1, Relaxed);
    }
    let place = r.geo.lookup(ip);
    let route = match r.route(place.as_ref(), hint.as_ref(), &hosting) {
        Ok(route) => route,
        Err(message) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "noEdge", message);
        }
    };
    let answer = EdgeAnswer {
        edge: route.edge,
        alternates: route.alternates,
        reason: route.reason,
        client: place.map(|p| ClientPlace {
            country: p.country,
            continent: p.continent,
            city: p.city,
        }),
        answered_by: s.node.clone(),
    };
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        Json(answer),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const XFF: ClientAddressHeader = ClientAddressHeader::XForwardedFor;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarding_headers_from_untrusted_peers_are_ignored() {
        let h = headers(&[("x-forwarded-for", "192.0.2.1")]);
        assert_eq!(
            client_ip(ip("198.51.100.7"), &h, &[], XFF),
            ip("198.51.100.7")
        );
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_ip(ip("198.51.100.7"), &h, &trusted, XFF),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn trusted_proxy_chain_is_walked_from_the_right() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        // The client forged the first entry; the proxies appended the real one.
        let h = headers(&[("x-forwarded-for", "192.0.2.1, 203.0.113.5, 10.1.1.1")]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("203.0.113.5")
        );
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.1;proto=https, for=\"[2001:db8:4::9]:4711\"",
        )]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, ClientAddressHeader::Forwarded),
            ip("2001:db8:4::9")
        );
        // A garbage hop stops the walk at the last trusted address.
        let h = headers(&[("x-forwarded-for", "192.0.2.1, not-an-ip")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted, XFF), ip("10.0.0.2"));
        // Dual-stack sockets report IPv4 peers as mapped IPv6.
        let h = headers(&[("x-forwarded-for", "192.0.2.1:5000")]);
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), &h, &trusted, XFF),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn only_the_configured_forwarding_header_is_read() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        // The proxy appends X-Forwarded-For; the client sent its own Forwarded.
        let h = headers(&[
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-for", "203.0.113.5"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, ClientAddressHeader::Forwarded),
            ip("192.0.2.1")
        );
    }
}
