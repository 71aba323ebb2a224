//! Sessions spanning nodes: producers relayed over QUIC pipes with mutual TLS, one copy per
//! producer per remote node, torn down cleanly.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meridian::auth::Role;
use meridian::node::Node;
use serde_json::json;

/// A publisher on `node` in `session` (as a user); returns its producer id and running state.
async fn publish(
    node: &Node,
    session: &str,
) -> (Signal, String, Arc<PeerState>, tokio::task::JoinHandle<()>) {
    let (mut user, _) = Signal::join(node, session, "alice", Role::User).await;
    let (id, state, task) = publish_as(&mut user, TestCodec::Vp8).await;
    (user, id, state, task)
}

/// An agent on `node` that waits for `producer` to be announced and consumes it.
async fn consume(
    node: &Node,
    session: &str,
    name: &str,
    producer: &str,
) -> (Signal, Arc<PeerState>, tokio::task::JoinHandle<()>) {
    let (mut agent, joined) = Signal::join(node, session, name, Role::Agent).await;
    let known = joined["producers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["producerId"] == producer);
    if !known {
        loop {
            let ev = agent.event("producerAdded").await;
            if ev["producer"]["producerId"] == producer {
                break;
            }
        }
    }
    let (state, task) =
        subscribe_as(&mut agent, producer, TestCodec::Vp8, PeerState::default()).await;
    (agent, state, task)
}

fn received(s: &PeerState) -> usize {
    s.received.lock().unwrap().len()
}

/// Datagrams the pipe carried per packet the publisher sent, over `window`.
async fn pipe_copies(from: &Node, to: &Node, publisher: &PeerState, window: Duration) -> f64 {
    let p0 = pipe_to(from, to).datagrams_out;
    let s0 = publisher.packets_sent.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    let p1 = pipe_to(from, to).datagrams_out;
    let s1 = publisher.packets_sent.load(Ordering::Relaxed);
    (p1 - p0) as f64 / (s1 - s0).max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_subscribers_get_media_with_one_copy_per_remote_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_mesh(dir.path(), &["india", "us", "europe"]).await;
    let (india, us, europe) = (&nodes[0], &nodes[1], &nodes[2]);
    let session = "kyc-cascade";
    let (_user, producer, pub_state, pub_task) = publish(india, session).await;

    // One agent on Europe and one on US, both seeing the India producer under the same id.
    let mut subs = Vec::new();
    subs.push(consume(europe, session, "eve", &producer).await);
    subs.push(consume(us, session, "bob", &producer).await);
    wait_for(
        "media on both remote nodes",
        Duration::from_secs(20),
        || subs.iter().all(|(_, s, _)| received(s) >= 60),
    )
    .await;
    let one = pipe_copies(india, us, &pub_state, Duration::from_secs(2)).await;

    // Nine more agents on US: the India→US pipe still carries one copy.
    for i in 0..9 {
        subs.push(consume(us, session, &format!("agent{i}"), &producer).await);
    }
    wait_for(
        "media for all ten US agents",
        Duration::from_secs(30),
        || subs.iter().all(|(_, s, _)| received(s) >= 60),
    )
    .await;
    let ten = pipe_copies(india, us, &pub_state, Duration::from_secs(2)).await;
    println!("India→US pipe datagrams per published packet: 1 subscriber {one:.3}, 10 subscribers {ten:.3}");
    assert!(
        (0.95..=1.05).contains(&one),
        "1 subscriber: {one:.3} pipe datagrams per packet"
    );
    assert!(
        (0.95..=1.05).contains(&ten),
        "10 subscribers: {ten:.3} pipe datagrams per packet"
    );
    assert_eq!(us.workers.stats().consumers.load(Ordering::Relaxed), 10);
    // Per-pipe figures are exported.
    let metrics = metrics(india).await;
    for name in [
        "meridian_pipe_rtt_seconds",
        "meridian_pipe_bytes_out_total",
        "meridian_pipe_lost_packets_total",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name) && l.contains("peer=\"us-1\"")),
            "{name} for the US pipe in:\n{metrics}"
        );
    }

    // Keyframe requests from all ten US consumers at once reach the publisher aggregated.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let plis_before = pub_state.plis_received.load(Ordering::Relaxed);
    for (_, s, _) in &subs[1..] {
        s.send_plis.store(3, Ordering::Relaxed);
    }
    wait_for(
        "a keyframe request reaching India's publisher",
        Duration::from_secs(5),
        || pub_state.plis_received.load(Ordering::Relaxed) > plis_before,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let relayed = pub_state.plis_received.load(Ordering::Relaxed) - plis_before;
    assert!(
        relayed <= 2,
        "30 PLIs from 10 remote consumers became {relayed} at the publisher"
    );

    // Every remote subscriber's stream is continuous and starts on a keyframe.
    for (_, s, _) in &subs {
        let got = s.received.lock().unwrap().clone();
        assert!(got[0].keyframe);
        let mut seqs: Vec<u16> = got.iter().map(|r| r.seq).collect();
        seqs.dedup();
        assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
    }
    pub_state.stop.store(true, Ordering::Relaxed);
    for (_, s, _) in &subs {
        s.stop.store(true, Ordering::Relaxed);
    }
    let _ = pub_task.await;
    for (_, _, t) in subs {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_producers_participants_and_nodes_leaves_no_remote_state() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_mesh(dir.path(), &["india", "us"]).await;
    let (india, us) = (&nodes[0], &nodes[1]);
    let session = "kyc-teardown";
    let (mut user, producer, pub_state, _pub_task) = publish(india, session).await;
    let (agent, sub_state, _sub_task) = consume(us, session, "bob", &producer).await;
    wait_for("media across", Duration::from_secs(20), || {
        received(&sub_state) >= 30
    })
    .await;
    assert_eq!(us.workers.stats().producers.load(Ordering::Relaxed), 1);

    // The last remote consumer leaving stops the relay: nothing crosses any more.
    sub_state.stop.store(true, Ordering::Relaxed);
    drop(agent);
    wait_for("the remote consumer gone", Duration::from_secs(5), || {
        us.workers.stats().consumers.load(Ordering::Relaxed) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = pipe_to(india, us).datagrams_out;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pipe_to(india, us).datagrams_out,
        idle,
        "no remote consumer left: the producer no longer crosses"
    );
    let (mut agent, sub_state, _sub_task) = consume(us, session, "bob2", &producer).await;
    wait_for("media across again", Duration::from_secs(20), || {
        received(&sub_state) >= 30
    })
    .await;

    // Closing the producer on India closes it, and its consumer, on US.
    let reply = user
        .request(json!({"type":"closeProducer","producerId":producer}))
        .await;
    assert_eq!(reply["type"], "ok");
    assert_eq!(
        agent.event("producerClosed").await["producerId"],
        producer.as_str()
    );
    wait_for("remote producer gone", Duration::from_secs(5), || {
        us.workers.stats().producers.load(Ordering::Relaxed) == 0
            && us.workers.stats().consumers.load(Ordering::Relaxed) == 0
    })
    .await;
    let sent = pipe_to(india, us).datagrams_out;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pipe_to(india, us).datagrams_out,
        sent,
        "nothing crosses for a closed producer"
    );
    pub_state.stop.store(true, Ordering::Relaxed);

    // A new producer, then the whole US node goes away: India drops the pipe and everything
    // it was sending through it.
    let (_user2, producer2, pub2, _t2) = publish(india, session).await;
    let (_agent2, sub2, _ts2) = consume(us, session, "carol", &producer2).await;
    wait_for("media across again", Duration::from_secs(20), || {
        received(&sub2) >= 30
    })
    .await;
    let started = Instant::now();
    let mut nodes = nodes;
    let us = nodes.pop().unwrap();
    us.mesh.as_ref().unwrap().shutdown();
    drop(us);
    let india = &nodes[0];
    wait_for("India notices US is gone", Duration::from_secs(10), || {
        india.mesh.as_ref().unwrap().pipes().is_empty()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        india
            .mesh
            .as_ref()
            .unwrap()
            .stats
            .pipes_open
            .load(Ordering::Relaxed),
        0
    );
    pub2.stop.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_certificate_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_mesh(dir.path(), &["india"]).await;
    let india = &nodes[0];
    // Same node name, certificate from another CA.
    let foreign_dir = tempfile::tempdir().unwrap();
    let f = meridian::mesh::tls::write_cluster(foreign_dir.path(), &["mallory-1".parse().unwrap()])
        .unwrap()
        .remove(0);
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.node.region = "mallory".parse().unwrap();
    cfg.mesh = Some(meridian::config::MeshSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        discovery: None,
        peers: vec![india.mesh.as_ref().unwrap().local_addr],
        ca_file: f.ca_file,
        cert_file: f.cert_file,
        key_file: f.key_file,
    });
    let mallory = Node::start(cfg).await.unwrap();
    let refused = |n: &Node| {
        n.mesh
            .as_ref()
            .unwrap()
            .stats
            .handshakes_refused
            .load(Ordering::Relaxed)
    };
    wait_for(
        "both sides record the refusal",
        Duration::from_secs(10),
        || refused(india) >= 1 && refused(&mallory) >= 1,
    )
    .await;
    assert!(india.mesh.as_ref().unwrap().pipes().is_empty());
    assert!(mallory.mesh.as_ref().unwrap().pipes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_loss_is_repaired_hop_by_hop() {
    lossy_pipe_is_repaired(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_a_second_worker_cascades_and_repairs_pipe_loss() {
    lossy_pipe_is_repaired(true).await;
}

/// A producer on India consumed on US across a lossy pipe. With `second_worker`, another
/// session takes worker 0 on both nodes first, so this one lives on worker 1 at both ends:
/// its media frames, resend requests and keyframe requests must find that worker.
async fn lossy_pipe_is_repaired(second_worker: bool) {
    // India and US joined through a link with 100 ms one-way delay and 2% loss each way.
    let dir = tempfile::tempdir().unwrap();
    let (india, link, us) = pair_over_link(dir.path(), long_lossy_link()).await;

    let session = "kyc-lossy";
    let _fillers = if second_worker {
        let a = Signal::join(&india, "kyc-filler-a", "carol", Role::User).await;
        let b = Signal::join(&us, "kyc-filler-b", "dave", Role::User).await;
        Some((a, b))
    } else {
        None
    };
    let (_user, producer, pub_state, _pt) = publish(&india, session).await;
    let (_agent, sub_state, _st) = consume(&us, session, "bob", &producer).await;
    if second_worker {
        for node in [&india, &us] {
            assert_eq!(node.workers.worker_of(&session.parse().unwrap()), Some(1));
        }
    }
    wait_for(
        "600 packets across the lossy pipe",
        Duration::from_secs(40),
        || received(&sub_state) >= 600,
    )
    .await;
    // Let the last repairs arrive (a NACK round trip is ~200 ms here).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut seqs = sub_state.sequence_numbers();
    pub_state.stop.store(true, Ordering::Relaxed);
    sub_state.stop.store(true, Ordering::Relaxed);

    let pipe = pipe_to(&india, &us);
    let dropped = link.stats.dropped.load(Ordering::Relaxed);
    seqs.sort_unstable();
    seqs.dedup();
    let settled = &seqs[..seqs.len() - 40];
    let span = settled.last().unwrap().wrapping_sub(settled[0]) as usize + 1;
    let missing = span - settled.len();
    println!(
        "impaired pipe: {dropped} datagrams dropped by the link, {} nacked by US, {} resent by India, {missing} of {span} packets never reached the subscriber",
        pipe_to(&us, &india).nacked,
        pipe.retransmitted
    );
    assert!(dropped > 10, "the link dropped packets: {dropped}");
    assert!(
        pipe.retransmitted > 0,
        "India resent what US reported missing"
    );
    // Only packets lost twice (on the way and again when resent) may stay missing.
    assert!(
        missing * 200 <= span,
        "{missing} of {span} packets unrecovered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_on_other_nodes_are_announced_and_their_departure_too() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_mesh(dir.path(), &["india", "us"]).await;
    let (india, us) = (&nodes[0], &nodes[1]);
    let session = "kyc-presence";
    let (mut agent, joined) = Signal::join(us, session, "bob", Role::Agent).await;
    assert!(joined["participants"].as_array().unwrap().is_empty());
    let (user, _) = Signal::join(india, session, "alice", Role::User).await;
    let ev = agent.event("participantJoined").await;
    assert_eq!(ev["participant"]["userId"], "alice");
    assert_eq!(ev["participant"]["role"], "user");
    // Someone joining the US node later is told about alice in `joined`.
    let (_carol, joined) = Signal::join(us, session, "carol", Role::Observer).await;
    assert!(joined["participants"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["userId"] == "alice"));
    drop(user);
    let ev = agent.event("participantLeft").await;
    assert_eq!(ev["participant"]["userId"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_on_a_node_new_to_the_session_shows_the_whole_mesh_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_mesh(dir.path(), &["india", "us"]).await;
    let (india, us) = (&nodes[0], &nodes[1]);
    let session = "kyc-joined";
    let (mut user, producer, publisher, _task) = publish(india, session).await;
    wait_for("publisher connected", Duration::from_secs(10), || {
        publisher.connected.load(Ordering::Relaxed)
    })
    .await;
    // The US node hosts nothing of the session yet: its `joined` must still carry alice and
    // her producer, not leave them to events a few tens of milliseconds later.
    let (mut agent, joined) = Signal::join(us, session, "bob", Role::Agent).await;
    let participants = joined["participants"].as_array().unwrap();
    assert!(
        participants.iter().any(|p| p["userId"] == "alice"),
        "{joined}"
    );
    let producers = joined["producers"].as_array().unwrap();
    assert!(
        producers
            .iter()
            .any(|p| p["producerId"] == producer.as_str()),
        "{joined}"
    );
    // And what `joined` told is not told again as events.
    let r = agent.request(json!({"type":"ping"})).await;
    assert_eq!(r["type"], "pong");
    assert!(
        agent
            .events
            .iter()
            .all(|e| e["type"] != "producerAdded" && e["type"] != "participantJoined"),
        "{:?}",
        agent.events
    );
    // The agent's arrival reaches alice as usual.
    let ev = user.event("participantJoined").await;
    assert_eq!(ev["participant"]["userId"], "bob");
}
