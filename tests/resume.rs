//! A lost signaling connection is not a leave: the participant keeps its place (producers,
//! consumers, transports) for `signaling.resume_grace_secs`, its media goes on, the others see
//! nothing, and the client comes back with the `resumeKey` of its `joined`. Driven over real
//! WebSockets and real WebRTC (the rtc-based test client), with the TCP connection cut.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use serde_json::{json, Value};

async fn node_with_grace(secs: u64) -> meridian::node::Node {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.signaling.resume_grace_secs = secs;
    meridian::node::Node::start(cfg).await.expect("node starts")
}

/// Messages `s` receives within `d`.
async fn heard_within(s: &mut Signal, d: Duration) -> Vec<Value> {
    let mut out = std::mem::take(&mut s.events);
    let until = tokio::time::Instant::now() + d;
    while let Ok(Some(m)) = tokio::time::timeout_at(until, s.recv()).await {
        out.push(m);
    }
    out
}

fn received(s: &PeerState) -> usize {
    s.received.lock().unwrap().len()
}

/// Sends `join` with `resume` and returns the first answer.
async fn resume(node: &meridian::node::Node, token: &str, key: &str) -> (Signal, Value) {
    let mut s = Signal::connect(node).await;
    s.send_text(&json!({"type":"join","version":1,"token":token,"resume":key}).to_string())
        .await;
    let answer = s.recv().await.expect("an answer to the resume");
    (s, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_websocket_is_resumed_without_the_other_side_seeing_a_leave() {
    let node = node_with_grace(20).await;
    let user_token = token("kyc-resume", "alice", Role::User, Duration::from_secs(600));
    let (mut user, joined) = Signal::connect(&node).await.join_with(&user_token).await;
    let key = joined["resumeKey"]
        .as_str()
        .expect("a resume key")
        .to_owned();
    assert_eq!(joined["resumeWithinSecs"], 20);
    let (mut agent, _) = Signal::join(&node, "kyc-resume", "bob", Role::Agent).await;
    let (producer, _publisher, _p) = publish_as(&mut user, TestCodec::Vp8).await;
    let (seen, _s) =
        subscribe_as(&mut agent, &producer, TestCodec::Vp8, PeerState::default()).await;
    wait_for("media at the agent", Duration::from_secs(10), || {
        received(&seen) >= 50
    })
    .await;

    // The user's TCP connection goes away without a close handshake.
    drop(user);
    let before = received(&seen);
    let heard = heard_within(&mut agent, Duration::from_secs(2)).await;
    assert!(
        heard
            .iter()
            .all(|m| m["type"] != "participantLeft" && m["type"] != "producerClosed"),
        "the agent saw no leave: {heard:?}"
    );
    assert!(
        received(&seen) > before + 20,
        "media went on during the gap: {before} → {}",
        received(&seen)
    );
    let m = metrics(&node).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("meridian_signaling_parked{") && l.ends_with(" 1")),
        "one participant parked:\n{m}"
    );

    // Another identity cannot take the place, and the place stays.
    let agent_token = token("kyc-resume", "bob", Role::Agent, Duration::from_secs(600));
    let (_, refused) = resume(&node, &agent_token, &key).await;
    assert_eq!(refused["code"], "resume_expired", "{refused}");

    // The user comes back (a fresh token is fine) and finds everything as it was.
    let fresh = token("kyc-resume", "alice", Role::User, Duration::from_secs(900));
    let (mut user, answer) = resume(&node, &fresh, &key).await;
    assert_eq!(answer["type"], "resumed", "{answer}");
    assert_eq!(answer["participantId"], joined["participantId"]);
    let paused = user
        .request(json!({"type":"pauseProducer","producerId":producer}))
        .await;
    assert_eq!(
        paused["type"], "ok",
        "the producer is still the user's: {paused}"
    );
    let ev = agent.event("producerPaused").await;
    assert_eq!(ev["producerId"], producer.as_str());
    // The key is spent.
    let (_, again) = resume(&node, &fresh, &key).await;
    assert_eq!(again["code"], "resume_expired");
    let m = metrics(&node).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("meridian_signaling_resumes_total{")
                && l.contains("outcome=\"resumed\"")
                && l.ends_with(" 1")),
        "{m}"
    );
    assert_eq!(node.workers.stats().participants.load(Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_does_not_come_back_leaves_when_the_grace_period_ends() {
    let node = node_with_grace(1).await;
    let user_token = token("kyc-gone", "alice", Role::User, Duration::from_secs(600));
    let (mut user, joined) = Signal::connect(&node).await.join_with(&user_token).await;
    let key = joined["resumeKey"].as_str().unwrap().to_owned();
    let (mut agent, _) = Signal::join(&node, "kyc-gone", "bob", Role::Agent).await;
    let (_producer, _publisher, _p) = publish_as(&mut user, TestCodec::Vp8).await;
    drop(user);
    let started = std::time::Instant::now();
    let left = agent.event("participantLeft").await;
    let after = started.elapsed();
    assert_eq!(
        left["participant"]["participantId"],
        joined["participantId"]
    );
    assert!(
        after >= Duration::from_millis(800),
        "kept for the grace period, left after {after:?}"
    );
    let (mut s, refused) = resume(&node, &user_token, &key).await;
    assert_eq!(refused["code"], "resume_expired", "{refused}");
    let (_, code) = s.until_closed().await;
    assert_eq!(code, Some(4441));
    assert_eq!(node.workers.stats().participants.load(Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_websocket_leaves_at_once_and_a_node_without_grace_gives_no_key() {
    let node = node_with_grace(0).await;
    let (user, joined) = Signal::join(&node, "kyc-nograce", "alice", Role::User).await;
    assert!(joined.get("resumeKey").is_none(), "{joined}");
    let (mut agent, _) = Signal::join(&node, "kyc-nograce", "bob", Role::Agent).await;
    drop(user);
    let left = agent.event("participantLeft").await;
    assert_eq!(
        left["participant"]["participantId"],
        joined["participantId"]
    );
}
