//! Membership: nodes that know only a DNS server find each other, follow record changes, and
//! declare a silent peer down with its remote state cleaned up.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::dns::{node_records, zone, DnsServer};
use common::*;
use meridian::auth::Role;
use meridian::config::{DiscoverySection, MeshSection};
use meridian::node::Node;

const ORIGIN: &str = "mesh.test.";
const SRV: &str = "_meridian._udp.mesh.test.";

fn free_udp_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A node whose only knowledge of the mesh is the DNS server.
async fn dns_node(
    region: &str,
    files: meridian::mesh::tls::NodeFiles,
    pipe: SocketAddr,
    dns: SocketAddr,
) -> Node {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.node.region = region.parse().unwrap();
    cfg.mesh = Some(MeshSection {
        listen: pipe,
        advertise: None,
        peers: vec![],
        discovery: Some(DiscoverySection {
            srv_name: SRV.into(),
            servers: vec![dns],
            interval_secs: 1,
        }),
        ca_file: files.ca_file,
        cert_file: files.cert_file,
        key_file: files.key_file,
    });
    Node::start(cfg).await.expect("node starts")
}

fn member_ids(n: &Node) -> Vec<String> {
    let mut ids: Vec<String> = n
        .members()
        .iter()
        .map(|m| m.info.node.to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_knowing_only_a_dns_server_form_a_full_mesh_and_follow_record_changes() {
    let dir = tempfile::tempdir().unwrap();
    let regions = ["europe", "india", "us"];
    let ids: Vec<meridian::ids::NodeId> = regions
        .iter()
        .map(|r| format!("{r}-1").parse().unwrap())
        .collect();
    let files = meridian::mesh::tls::write_cluster(dir.path(), &ids).unwrap();
    let pipes: Vec<SocketAddr> = regions.iter().map(|_| free_udp_port()).collect();
    let records = |which: &[usize]| {
        which
            .iter()
            .map(|&i| node_records(&format!("{}-1", regions[i]), regions[i], pipes[i]))
            .collect::<String>()
    };
    let mut dns = DnsServer::start(ORIGIN, &zone(ORIGIN, &records(&[0, 1, 2]))).await;

    let t0 = Instant::now();
    let mut nodes = Vec::new();
    for ((region, f), pipe) in regions.iter().zip(files).zip(&pipes) {
        nodes.push(dns_node(region, f, *pipe, dns.addr).await);
    }
    let all = ["europe-1", "india-1", "us-1"];
    // Bound: the first lookup happens at start, a pipe handshake takes milliseconds.
    wait_for("a full mesh from DNS alone", Duration::from_secs(5), || {
        nodes.iter().all(|n| member_ids(n) == all)
    })
    .await;
    println!("full mesh of 3 after {:?}", t0.elapsed());
    // One pipe per pair, not two.
    for n in &nodes {
        assert_eq!(n.mesh.as_ref().unwrap().pipes().len(), 2);
    }
    // Members carry where their clients go and the site of their region.
    let view = nodes[0].members();
    let us = view
        .iter()
        .find(|m| m.info.node.as_str() == "us-1")
        .unwrap();
    assert_eq!(us.info.region.as_str(), "us");
    assert_eq!(
        us.info.signaling_url,
        format!("ws://{}/v1/ws", nodes[2].signaling_addr)
    );

    // Remove US from DNS: Europe and India drop it within two lookup intervals, and US, which
    // no one dials or accepts any more, is left alone.
    let t1 = Instant::now();
    dns.replace(&zone(ORIGIN, &records(&[0, 1]))).await;
    wait_for("the mesh without US", Duration::from_secs(4), || {
        member_ids(&nodes[0]) == ["europe-1", "india-1"]
            && member_ids(&nodes[1]) == ["europe-1", "india-1"]
            && member_ids(&nodes[2]) == ["us-1"]
    })
    .await;
    println!("record removal converged after {:?}", t1.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(member_ids(&nodes[2]), ["us-1"], "US stays out");

    // Put it back: the full mesh returns.
    dns.replace(&zone(ORIGIN, &records(&[0, 1, 2]))).await;
    wait_for("US back in the mesh", Duration::from_secs(4), || {
        nodes.iter().all(|n| member_ids(n) == all)
    })
    .await;

    // Kill India: the others see it go at once (the QUIC close reaches them).
    let india = nodes.remove(1);
    drop(india);
    wait_for("India gone from membership", Duration::from_secs(4), || {
        nodes.iter().all(|n| member_ids(n) == ["europe-1", "us-1"])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_keeps_the_static_seeds_working() {
    // Discovery points at a port where no DNS server answers; the static seed still links
    // the two nodes.
    let dir = tempfile::tempdir().unwrap();
    let ids = ["europe-1".parse().unwrap(), "us-1".parse().unwrap()];
    let mut files = meridian::mesh::tls::write_cluster(dir.path(), &ids).unwrap();
    let europe = mesh_node("europe", files.remove(0), vec![]).await;
    let silent_dns = free_udp_port();
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.node.region = "us".parse().unwrap();
    let f = files.remove(0);
    cfg.mesh = Some(MeshSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        peers: vec![europe.mesh.as_ref().unwrap().local_addr],
        discovery: Some(DiscoverySection {
            srv_name: SRV.into(),
            servers: vec![silent_dns],
            interval_secs: 1,
        }),
        ca_file: f.ca_file,
        cert_file: f.cert_file,
        key_file: f.key_file,
    });
    let us = Node::start(cfg).await.unwrap();
    wait_for("the seeded pipe", Duration::from_secs(5), || {
        member_ids(&us) == ["europe-1", "us-1"]
    })
    .await;
    let errors = || {
        us.mesh
            .as_ref()
            .unwrap()
            .stats
            .discovery_errors
            .load(Ordering::Relaxed)
    };
    wait_for("a failed lookup counted", Duration::from_secs(10), || {
        errors() >= 1
    })
    .await;
    assert_eq!(member_ids(&us), ["europe-1", "us-1"]);
    let metrics = metrics(&us).await;
    assert!(
        metrics.contains("meridian_discovery_errors_total{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_declared_down_and_its_producers_leave_remote_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (india, link, us) = pair_over_link(dir.path(), meridian::netem::Impairment::none()).await;
    let session = "kyc-silence";
    let (mut user, _) = Signal::join(&india, session, "alice", Role::User).await;
    let (producer, _pub_state, _pub_task) = publish_as(&mut user, TestCodec::Vp8).await;
    let (mut agent, joined) = Signal::join(&us, session, "bob", Role::Agent).await;
    let announced = joined["producers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["producerId"] == producer.as_str());
    if !announced {
        agent.event("producerAdded").await;
    }
    assert_eq!(us.workers.stats().producers.load(Ordering::Relaxed), 1);
    assert_eq!(us.members().len(), 2);

    // The link goes dark: no close frame, no packets. Heartbeats stop arriving.
    let t0 = Instant::now();
    drop(link);
    let closed = agent.event("producerClosed").await;
    assert_eq!(closed["producerId"], producer.as_str());
    wait_for("India declared down on US", Duration::from_secs(6), || {
        us.members().len() == 1 && us.workers.stats().producers.load(Ordering::Relaxed) == 0
    })
    .await;
    let took = t0.elapsed();
    println!("silent peer declared down after {took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "down only after missed heartbeats, not at once ({took:?})"
    );
    wait_for("US declared down on India", Duration::from_secs(6), || {
        india.members().len() == 1
    })
    .await;
}
