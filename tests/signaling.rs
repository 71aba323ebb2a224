//! Signaling auth and bad input: every refusal has its own error code and close code, is
//! counted, and leaves other participants of the session undisturbed.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use meridian::auth::Role;
use meridian::node::Node;
use serde_json::json;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn raw_token(claims: serde_json::Value, secret: &str) -> String {
    encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims(session: &str, exp: u64) -> serde_json::Value {
    json!({"sub":"mallory","sid":session,"role":"agent","exp":exp,"iat":now(),
           "iss":"meridian-test","aud":"meridian"})
}

/// Sends a join with `token` and returns (error code, close code).
async fn refused_join(node: &Node, join: serde_json::Value) -> (String, Option<u16>) {
    let mut s = Signal::connect(node).await;
    s.send_text(&join.to_string()).await;
    let (seen, close) = s.until_closed().await;
    let err = seen
        .iter()
        .find(|m| m["type"] == "error")
        .unwrap_or_else(|| panic!("an error message before the close, got {seen:?}"));
    (err["code"].as_str().unwrap().to_owned(), close)
}

fn join_with(token: &str) -> serde_json::Value {
    json!({"type":"join","version":1,"token":token})
}

#[tokio::test]
async fn bad_tokens_are_refused_with_specific_codes_and_counted() {
    let node = start_node().await;
    // A legitimate participant is in the session throughout.
    let (mut bystander, _) = Signal::join(&node, "kyc-auth", "carol", Role::Agent).await;

    let expired = raw_token(claims("kyc-auth", now() - 120), SECRET);
    let wrong_key = raw_token(
        claims("kyc-auth", now() + 600),
        "some-other-secret-some-other-secret!!",
    );
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims("kyc-auth", now() + 600).to_string())
    );
    let other_session = token(
        "kyc-other",
        "mallory",
        Role::Agent,
        Duration::from_secs(600),
    );

    let cases = [
        (join_with(""), "token_missing"),
        (join_with("not-a-jwt"), "token_malformed"),
        (join_with(&expired), "token_expired"),
        (join_with(&wrong_key), "token_bad_signature"),
        (join_with(&alg_none), "token_wrong_algorithm"),
        (
            json!({"type":"join","version":1,"token":other_session,"sessionId":"kyc-auth"}),
            "token_wrong_session",
        ),
    ];
    for (join, want) in cases {
        let (code, close) = refused_join(&node, join).await;
        assert_eq!(code, want);
        assert_eq!(close, Some(4401), "{want} closes with 4401");
        assert_eq!(node.metrics.errors(want), 1, "{want} is counted");
    }

    let pong = bystander.request(json!({"type":"ping"})).await;
    assert_eq!(pong["type"], "pong", "the bystander is undisturbed");
    assert!(
        bystander
            .events
            .iter()
            .all(|e| e["type"] != "participantJoined"),
        "refused joins never reach the session: {:?}",
        bystander.events
    );
}

#[tokio::test]
async fn malformed_oversized_and_unknown_messages_get_their_own_answers() {
    let node = start_node().await;
    let (mut bystander, _) = Signal::join(&node, "kyc-bad", "carol", Role::Agent).await;

    // Unknown type: an error, and the connection stays usable.
    let (mut s, _) = Signal::join(&node, "kyc-bad", "dave", Role::User).await;
    let reply = s.request(json!({"type":"teleport"})).await;
    assert_eq!(reply["code"], "unknown_type");
    assert_eq!(s.request(json!({"type":"ping"})).await["type"], "pong");

    // Bad SDP: an error for that request only.
    let reply = s
        .request(json!({"type":"publish","sdp":"v=0 this is not sdp"}))
        .await;
    assert_eq!(reply["code"], "bad_sdp", "{reply}");
    assert_eq!(s.request(json!({"type":"ping"})).await["type"], "pong");

    // Subscribing to a producer that does not exist.
    let reply = s
        .request(json!({"type":"subscribe","producerId":"pr-nope","sdp":"v=0"}))
        .await;
    assert_eq!(reply["code"], "unknown_producer");

    // Malformed JSON closes with 4400.
    s.send_text("{\"type\": \"publish\", ").await;
    let (seen, close) = s.until_closed().await;
    assert_eq!(seen.last().unwrap()["code"], "malformed");
    assert_eq!(close, Some(4400));

    // Oversized (limit is 16384 in the test config) closes with 1009.
    let (mut s, _) = Signal::join(&node, "kyc-bad", "erin", Role::User).await;
    let big = json!({"type":"publish","requestId":1,"sdp":"x".repeat(20_000)}).to_string();
    s.send_text(&big).await;
    let (seen, close) = s.until_closed().await;
    assert_eq!(seen.last().unwrap()["code"], "too_big");
    assert_eq!(close, Some(1009));
    // So does one far over it (past the transport's own limit), and a join without a token
    // is `token_missing`, as documented.
    let (mut s, _) = Signal::join(&node, "kyc-bad", "frank", Role::User).await;
    let huge = json!({"type":"publish","requestId":1,"sdp":"x".repeat(100_000)}).to_string();
    s.send_text(&huge).await;
    let (seen, close) = s.until_closed().await;
    assert_eq!(seen.last().unwrap()["code"], "too_big", "{seen:?}");
    assert_eq!(close, Some(1009));
    let (code, close) = refused_join(&node, json!({"type":"join","version":1})).await;
    assert_eq!((code.as_str(), close), ("token_missing", Some(4401)));

    // A binary frame closes with 1003.
    let mut s = Signal::connect(&node).await;
    s.send_binary(vec![0, 1, 2]).await;
    let (_, close) = s.until_closed().await;
    assert_eq!(close, Some(1003));

    // A message other than join first closes with 4400.
    let (code, close) = refused_join(&node, json!({"type":"ping"})).await;
    assert_eq!((code.as_str(), close), ("not_joined", Some(4400)));

    // Nothing at all: join timeout (2 s in the test config) closes with 4408.
    let mut s = Signal::connect(&node).await;
    let (_, close) = s.until_closed().await;
    assert_eq!(close, Some(4408));

    for code in [
        "unknown_type",
        "bad_sdp",
        "malformed",
        "too_big",
        "unsupported_data",
        "join_timeout",
    ] {
        assert!(node.metrics.errors(code) >= 1, "{code} is counted");
    }
    assert_eq!(
        bystander.request(json!({"type":"ping"})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn roles_decide_who_may_publish_and_whom_they_see() {
    let node = start_node().await;
    let (mut observer, _) = Signal::join(&node, "kyc-roles", "olga", Role::Observer).await;
    let mut peer = RtcPeer::publisher().await.unwrap();
    let reply = observer
        .request(json!({"type":"publish","sdp":peer.offer().unwrap()}))
        .await;
    assert_eq!(reply["code"], "not_allowed");

    // Two users in one session never see each other's media.
    let (mut u1, _) = Signal::join(&node, "kyc-roles", "u1", Role::User).await;
    let (mut u2, _) = Signal::join(&node, "kyc-roles", "u2", Role::User).await;
    let (producer, _publisher, _task) = publish_as(&mut u1, TestCodec::Vp8).await;
    let mut s = RtcPeer::subscriber().await.unwrap();
    let reply = u2
        .request(json!({"type":"subscribe","producerId":producer,"sdp":s.offer().unwrap()}))
        .await;
    assert_eq!(reply["code"], "not_allowed");
    // The observer was told about the producer; the other user was not.
    assert_eq!(
        observer.event("producerAdded").await["producer"]["producerId"],
        producer.as_str()
    );
    assert!(u2.events.iter().all(|e| e["type"] != "producerAdded"));
}

#[tokio::test]
async fn token_expiring_during_the_session_ends_access() {
    let node = start_node().await;
    let (mut agent, _) = Signal::join(&node, "kyc-exp", "agent", Role::Agent).await;
    let mut user = Signal::connect(&node).await;
    let short = token("kyc-exp", "user", Role::User, Duration::from_secs(2));
    user.send_text(&join_with(&short).to_string()).await;
    assert_eq!(user.recv().await.unwrap()["type"], "joined");
    let (producer, _publisher, _task) = publish_as(&mut user, TestCodec::Vp8).await;
    assert_eq!(
        agent.event("producerAdded").await["producer"]["producerId"],
        producer.as_str()
    );

    let (seen, close) = user.until_closed().await;
    assert!(
        seen.iter().any(|m| m["type"] == "sessionExpired"),
        "{seen:?}"
    );
    assert_eq!(close, Some(4440));
    // The agent sees the user's media end and the user leave.
    assert_eq!(
        agent.event("producerClosed").await["producerId"],
        producer.as_str()
    );
    assert_eq!(
        agent.event("participantLeft").await["participant"]["userId"],
        "user"
    );
    assert_eq!(
        node.workers
            .stats()
            .producers
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// `offer` with its video section repeated under mid `mid` (no SSRCs): one more track.
fn with_extra_video(offer: &str, mid: &str) -> String {
    let start = offer.find("m=video").expect("a video section");
    let end = offer[start + 1..]
        .find("\r\nm=")
        .map(|i| start + 1 + i + 2)
        .unwrap_or(offer.len());
    let section: String = offer[start..end]
        .lines()
        .filter(|l| !l.starts_with("a=ssrc") && !l.starts_with("a=msid"))
        .map(|l| {
            if l.starts_with("a=mid:") {
                format!("a=mid:{mid}\r\n")
            } else {
                format!("{l}\r\n")
            }
        })
        .collect();
    let group = offer
        .lines()
        .find(|l| l.starts_with("a=group:BUNDLE"))
        .unwrap_or("");
    let mut out = offer.replacen(group, &format!("{group} {mid}"), 1);
    if !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out.push_str(&section);
    out
}

#[tokio::test]
async fn a_publish_over_the_producer_limit_leaves_the_transport_as_it_was() {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.limits.max_producers_per_participant = 1;
    let node = Node::start(cfg).await.unwrap();
    let (mut s, _) = Signal::join(&node, "kyc-limit", "alice", Role::User).await;
    let mut publisher = RtcPeer::publisher_with(TestCodec::Vp8).await.unwrap();
    let offer = publisher.offer().unwrap();
    let first = s.request(json!({"type":"publish","sdp":offer})).await;
    assert_eq!(first["type"], "published", "{first}");
    let refused = s
        .request(json!({"type":"publish","sdp":with_extra_video(&offer, "7")}))
        .await;
    assert_eq!(refused["code"], "too_many_producers", "{refused}");
    // The client rolls back and renegotiates what it had: the node must still agree.
    let again = s.request(json!({"type":"publish","sdp":offer})).await;
    assert_eq!(again["type"], "published", "{again}");
    assert_eq!(again["producers"], first["producers"]);
}

/// The Python that runs tests/aiortc/peer.py: tests/run.sh makes a virtual environment with
/// aiortc from PyPI and names it here.
fn aiortc_python() -> String {
    std::env::var("MERIDIAN_AIORTC_PYTHON").unwrap_or_else(|_| {
        panic!("MERIDIAN_AIORTC_PYTHON is not set: run tests/run.sh, which installs aiortc")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_max_bundle_client_written_from_the_document_publishes_and_subscribes() {
    let node = start_node().await;
    let day = Duration::from_secs(3600);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aiortc/peer.py");
    let out = tokio::process::Command::new(aiortc_python())
        .arg(script)
        .arg(format!("ws://{}/v1/ws", node.signaling_addr))
        .arg(token("kyc-aiortc", "alice", Role::User, day))
        .arg(token("kyc-aiortc", "bob", Role::Agent, day))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the aiortc client finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no result from the aiortc client: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(last["result"], "ok", "{stdout}");
    assert!(
        stdout.contains("\"producers\": 1"),
        "joined listed the producer: {stdout}"
    );
}
