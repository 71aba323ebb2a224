//! The node binds a wildcard address yet hands out, and answers from, its announced address.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use meridian::node::Node;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_carry_the_announced_ip_and_clients_connect_through_it() {
    let node = Node::start(test_config("127.0.0.2", "0.0.0.0"))
        .await
        .unwrap();
    let (mut user, _) = Signal::join(&node, "kyc-nat", "alice", Role::User).await;
    let port = media_addr_of(&node, "kyc-nat").port();
    let mut publisher = RtcPeer::publisher().await.unwrap();
    let reply = user
        .request(json!({"type":"publish","sdp":publisher.offer().unwrap()}))
        .await;
    let answer = reply["sdp"].as_str().unwrap();
    let candidates: Vec<&str> = answer
        .lines()
        .filter(|l| l.starts_with("a=candidate:"))
        .collect();
    assert!(!candidates.is_empty(), "{answer}");
    for c in &candidates {
        assert!(c.contains(&format!("127.0.0.2 {port} typ host")), "{c}");
    }
    assert!(answer.contains("a=ice-lite"));
    publisher.answer(answer).unwrap();
    let state = Arc::new(PeerState::default());
    let task = publisher.spawn(state.clone());
    wait_for(
        "connected through the announced address",
        Duration::from_secs(10),
        || state.connected.load(Ordering::Relaxed),
    )
    .await;
    wait_for("media reaching the node", Duration::from_secs(10), || {
        node.workers.stats().rtp_in.load(Ordering::Relaxed) > 10
    })
    .await;
    state.stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    let from: Vec<_> = state.remote_addrs.lock().unwrap().clone();
    assert_eq!(
        from,
        vec![std::net::SocketAddr::from(([127, 0, 0, 2], port))],
        "every reply comes from the announced address, never the wildcard-bound one"
    );
}
