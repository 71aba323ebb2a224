//! Nearest edge: `GET /v1/edge` on any node sends a client to the nearest healthy region by
//! GeoIP (the built-in development database), skipping drained and dead nodes, believing
//! forwarding headers only from trusted proxies.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use meridian::config::NodeConfig;
use meridian::node::Node;
use serde_json::Value;

fn trust_loopback(cfg: &mut NodeConfig) {
    cfg.routing.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Asks `node` for an edge, from `from`, with extra headers.
async fn edge(node: &Node, from: IpAddr, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let (status, body) = http_get_as(node.signaling_addr, from, path, headers).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, v)
}

/// The edge region chosen for a client behind a trusted proxy at `client`.
async fn region_for(node: &Node, client: &str) -> (String, Value) {
    let (status, v) = edge(node, LOCAL, "/v1/edge", &[("X-Forwarded-For", client)]).await;
    assert_eq!(status, 200, "{v}");
    (v["edge"]["region"].as_str().unwrap().to_owned(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_in_real_cities_are_sent_to_the_nearest_region_by_any_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = routed_mesh(dir.path(), trust_loopback).await;
    // Addresses the development database places in these cities (regions/geoip-dev.csv).
    let cases = [
        ("192.0.2.1", "Mumbai", "india"),
        ("192.0.2.17", "Bangalore", "india"),
        ("192.0.2.33", "Singapore", "india"),
        ("192.0.2.49", "Frankfurt", "europe"),
        ("192.0.2.65", "London", "europe"),
        ("192.0.2.81", "Madrid", "europe"),
        ("192.0.2.97", "New York", "us"),
        ("192.0.2.113", "Sao Paulo", "us"),
        ("192.0.2.129", "Toronto", "us"),
        ("2001:db8:4::77", "Frankfurt", "europe"),
    ];
    for node in &nodes {
        for (addr, city, want) in cases {
            let (region, v) = region_for(node, addr).await;
            assert_eq!(region, want, "{city} asked {}: {v}", node.id);
            assert_eq!(v["client"]["city"], city, "{v}");
            assert_eq!(v["reason"], "nearest");
            assert_eq!(v["answeredBy"], node.id.as_str());
            // The edge URL is where that node's signaling listens.
            let chosen = nodes.iter().find(|n| n.region.as_str() == want).unwrap();
            assert_eq!(
                v["edge"]["url"],
                format!("ws://{}/v1/ws", chosen.signaling_addr)
            );
            // Every other node is an alternate, nearest first.
            let alternates: Vec<&str> = v["alternates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["region"].as_str().unwrap())
                .collect();
            assert_eq!(alternates.len(), 2, "{v}");
            assert!(!alternates.contains(&want));
        }
    }
    // Mumbai's alternates: Europe (6,560 km) before US (12,900 km).
    let (_, v) = region_for(&nodes[2], "192.0.2.1").await;
    assert_eq!(v["alternates"][0]["region"], "europe");
    assert_eq!(v["alternates"][1]["region"], "us");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_or_dead_region_sends_its_clients_to_the_next_nearest() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = routed_mesh(dir.path(), trust_loopback).await;
    let mumbai = "192.0.2.1";
    assert_eq!(region_for(&nodes[1], mumbai).await.0, "india");

    // Draining India: every node learns it within a heartbeat and routes Mumbai to Europe.
    nodes[0].set_draining(true);
    for n in &nodes {
        wait_for("India seen draining", Duration::from_secs(3), || {
            n.members()
                .iter()
                .any(|m| m.info.node.as_str() == "india-1" && m.draining)
        })
        .await;
        let (region, v) = region_for(n, mumbai).await;
        assert_eq!(region, "europe", "{v}");
        let alternates = v["alternates"].as_array().unwrap();
        assert_eq!(alternates.len(), 1, "a draining node is no alternate: {v}");
        assert_eq!(alternates[0]["region"], "us");
    }
    let metrics = metrics(&nodes[1]).await;
    assert!(
        metrics.contains("member=\"india-1\",member_region=\"india\",draining=\"true\""),
        "{metrics}"
    );
    nodes[0].set_draining(false);
    wait_for("India back", Duration::from_secs(3), || {
        nodes[2]
            .members()
            .iter()
            .any(|m| m.info.node.as_str() == "india-1" && !m.draining)
    })
    .await;
    assert_eq!(region_for(&nodes[2], mumbai).await.0, "india");

    // India dies: its clients go to Europe.
    drop(nodes.remove(0));
    wait_for("India gone", Duration::from_secs(5), || {
        nodes.iter().all(|n| n.members().len() == 2)
    })
    .await;
    for n in &nodes {
        assert_eq!(region_for(n, mumbai).await.0, "europe");
        assert_eq!(region_for(n, "192.0.2.33").await.0, "europe", "Singapore");
    }

    // Everyone draining: no edge, a clear error.
    for n in &nodes {
        n.set_draining(true);
    }
    wait_for("all draining", Duration::from_secs(3), || {
        nodes[0].members().iter().all(|m| m.draining)
    })
    .await;
    let (status, v) = edge(&nodes[0], LOCAL, "/v1/edge", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(v["error"]["code"], "noEdge", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    // Only 10.0.0.0/8 is a trusted proxy; the test client on 127.0.0.1 is not.
    let nodes = routed_mesh(dir.path(), |cfg| {
        cfg.routing.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    for headers in [
        [("X-Forwarded-For", "192.0.2.1")],
        [("Forwarded", "for=192.0.2.1")],
    ] {
        let (status, v) = edge(&nodes[2], LOCAL, "/v1/edge", &headers).await;
        assert_eq!(status, 200);
        // 127.0.0.1 has no place: the default region, whatever the header claims.
        assert_eq!(v["reason"], "default", "{v}");
        assert_eq!(v["edge"]["region"], "europe");
        assert_eq!(v["client"], Value::Null);
    }
    let metrics = metrics(&nodes[2]).await;
    assert!(
        metrics.contains("meridian_edge_untrusted_forwarding_total{region=\"us\",node=\"us-1\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_place_itself_with_the_header_its_proxy_does_not_write() {
    // The proxy appends the client's real address (Mumbai) to X-Forwarded-For; the client
    // sent a Forwarded header of its own claiming New York.
    let headers = [
        ("Forwarded", "for=192.0.2.97"),
        ("X-Forwarded-For", "192.0.2.1"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let nodes = routed_mesh(dir.path(), trust_loopback).await;
    let (status, v) = edge(&nodes[1], LOCAL, "/v1/edge", &headers).await;
    assert_eq!(status, 200);
    assert_eq!(v["edge"]["region"], "india", "{v}");
    drop(nodes);
    // Behind a proxy that writes Forwarded, the operator says so, and only Forwarded counts.
    let dir = tempfile::tempdir().unwrap();
    let nodes = routed_mesh(dir.path(), |cfg| {
        trust_loopback(cfg);
        cfg.routing.client_address_header = meridian::config::ClientAddressHeader::Forwarded;
    })
    .await;
    let (_, v) = edge(&nodes[1], LOCAL, "/v1/edge", &headers).await;
    assert_eq!(v["edge"]["region"], "us", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_address_places_the_client_and_hints_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = routed_mesh(dir.path(), |cfg| {
        if cfg.node.region.as_str() == "us" {
            cfg.routing.allow_region_hint = true;
        }
    })
    .await;
    // Loopback test blocks of the development database: 127.1/16 Mumbai, 127.5/16 Sao Paulo.
    let (_, v) = edge(&nodes[1], "127.1.0.9".parse().unwrap(), "/v1/edge", &[]).await;
    assert_eq!(v["edge"]["region"], "india", "{v}");
    let (_, v) = edge(&nodes[0], "127.5.0.9".parse().unwrap(), "/v1/edge", &[]).await;
    assert_eq!(v["edge"]["region"], "us", "{v}");
    // An unplaced client's hint counts only where the operator allows hints.
    let (_, v) = edge(&nodes[0], LOCAL, "/v1/edge?region=us", &[]).await;
    assert_eq!(
        (v["reason"].as_str(), v["edge"]["region"].as_str()),
        (Some("default"), Some("europe"))
    );
    let (_, v) = edge(&nodes[2], LOCAL, "/v1/edge?region=india", &[]).await;
    assert_eq!(
        (v["reason"].as_str(), v["edge"]["region"].as_str()),
        (Some("hint"), Some("india"))
    );
    // A placed client's hint is ignored: geography wins.
    let (_, v) = edge(
        &nodes[2],
        "127.3.0.1".parse().unwrap(),
        "/v1/edge?region=india",
        &[],
    )
    .await;
    assert_eq!(v["edge"]["region"], "us", "{v}");
    let (status, v) = edge(&nodes[2], LOCAL, "/v1/edge?region=no%20such/region", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "badRegion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_city_database_file_written_by_the_cli_is_what_the_node_routes_by() {
    let dir = tempfile::tempdir().unwrap();
    // A table of our own: 198.51.100.0/24 placed in Madrid (the dev table says Chennai).
    let table = dir.path().join("table.csv");
    std::fs::write(
        &table,
        "198.51.100.0/24, Madrid, ES, EU, 40.4168, -3.7038\n",
    )
    .unwrap();
    let mmdb = dir.path().join("city.mmdb");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["geoip", "build", "--table"])
        .arg(&table)
        .arg("--out")
        .arg(&mmdb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["geoip", "lookup", "--file"])
        .arg(&mmdb)
        .args(["198.51.100.20", "192.0.2.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("198.51.100.20\tES\tEU\tMadrid"), "{text}");
    assert!(text.contains("192.0.2.1\tno place"), "{text}");

    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let nodes = routed_mesh(&certs, |cfg| {
        trust_loopback(cfg);
        cfg.routing.geoip_file = Some(mmdb.clone());
    })
    .await;
    assert_eq!(region_for(&nodes[0], "198.51.100.20").await.0, "europe");
    // Not in this file: no place, the default region.
    let (_, v) = region_for(&nodes[0], "192.0.2.1").await;
    assert_eq!(v["reason"], "default");

    // A file that is not a City database stops the node with a message naming the key.
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.routing.geoip_file = Some(table);
    let err = Node::start(cfg).await.err().unwrap().to_string();
    assert!(err.contains("routing.geoip_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_participant_is_sent_to_the_node_of_its_region_already_hosting_the_session() {
    // Two India nodes on one site, and the US; every node trusts loopback's forwarding headers.
    let dir = tempfile::tempdir().unwrap();
    let sites = [
        ("india-1".to_string(), SITES[0]),
        ("india-2".to_string(), SITES[0]),
        ("us-1".to_string(), SITES[2]),
    ];
    let nodes = routed_mesh_of(dir.path(), &sites, trust_loopback).await;
    let mumbai = [("X-Forwarded-For", "192.0.2.1")];
    let edge_of = |v: &Value| v["edge"]["node"].as_str().unwrap().to_owned();
    // Equal loads: a new session goes to india-1 (the tie is broken by id).
    let (_, v) = edge(&nodes[2], LOCAL, "/v1/edge?session=kyc-affinity", &mumbai).await;
    assert_eq!(edge_of(&v), "india-1", "{v}");
    // The session starts on india-2 (say the first participant was sent there earlier).
    let (_first, _) = Signal::join(&nodes[1], "kyc-affinity", "alice", Role::User).await;
    wait_for(
        "every node knows india-2 hosts the session",
        Duration::from_secs(5),
        || {
            nodes.iter().all(|n| {
                n.mesh.as_ref().unwrap().hosts.hosts(
                    &"kyc-affinity".parse().unwrap(),
                    &"india-2".parse().unwrap(),
                )
            })
        },
    )
    .await;
    // The next participant in India, asking any node, is sent to india-2.
    for n in &nodes {
        let (_, v) = edge(n, LOCAL, "/v1/edge?session=kyc-affinity", &mumbai).await;
        assert_eq!(edge_of(&v), "india-2", "asked {}: {v}", n.id);
    }
    // Another session, or none, is unaffected; a malformed session is refused.
    let (_, v) = edge(&nodes[0], LOCAL, "/v1/edge?session=kyc-other", &mumbai).await;
    assert_eq!(edge_of(&v), "india-1");
    let (status, v) = edge(&nodes[0], LOCAL, "/v1/edge?session=no%20spaces", &mumbai).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("badSession"))
    );
}
