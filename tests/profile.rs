//! Compliance profiles through the real signaling, starting with India's video KYC
//! (`rbi-vcip`): a customer outside India is refused and the attempt audited; the customer's
//! media waits for consent and a live location; the agent draws questions from the pool; the
//! sealed folder holds the evidence of each rule, in the India node only.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::browser::*;
use common::*;
use meridian::auth::{RecordingClaims, Role};
use meridian::compliance::profile::{ProfileRules, RBI_VCIP};
use meridian::compliance::seal::{parse_public_key, verify, MANIFEST};
use meridian::node::Node;
use serde_json::{json, Value};

const MUMBAI: &str = "127.1.0.9";
const NEW_YORK: &str = "127.3.0.9";

/// A recording node in region `india` whose sessions run under `rbi-vcip` by default.
async fn india_node(root: &Path) -> Node {
    let mut cfg = recording_config(root);
    cfg.node.region = "india".parse().unwrap();
    cfg.recording.profile = Some(RBI_VCIP.into());
    Node::start(cfg).await.expect("node starts")
}

fn claims_token(session: &str, user: &str, role: Role, claims: RecordingClaims) -> String {
    signer()
        .mint_with(
            &session.parse().unwrap(),
            &user.parse().unwrap(),
            role,
            Duration::from_secs(600),
            claims,
        )
        .unwrap()
}

/// Joins from `from` with `token`: the client and the first answer (`joined` or an error).
async fn join_from(node: &Node, from: &str, token: &str) -> (Signal, Value) {
    let mut s = Signal::connect_from(node, from.parse().unwrap()).await;
    s.send_text(&json!({"type":"join","version":1,"token":token}).to_string())
        .await;
    let first = s.recv().await.expect("an answer to join");
    (s, first)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn under_rbi_vcip_a_customer_placed_outside_india_is_refused_and_the_attempt_audited() {
    let root = tempfile::tempdir().unwrap();
    let node = india_node(root.path()).await;
    let t = token("kyc-abroad", "alice", Role::User, Duration::from_secs(600));
    let (mut s, answer) = join_from(&node, NEW_YORK, &t).await;
    assert_eq!(answer["code"], "outside_allowed_countries", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("placed in US"),
        "{answer}"
    );
    let (_, close) = s.until_closed().await;
    assert_eq!(close, Some(4403));

    // The attempt is a sealed run of the session of its own: who, from where, and why.
    let run = sealed_run(root.path(), "kyc-abroad").await;
    let entries = audit(&run);
    let events: Vec<&str> = entries
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["session_created", "join_refused", "session_ended"]);
    assert_eq!(entries[0]["profile"], RBI_VCIP);
    let refused = &entries[1];
    assert_eq!(refused["user"], "alice");
    assert_eq!(refused["role"], "user");
    assert_eq!(refused["code"], "outside_allowed_countries");
    assert_eq!(refused["geoip_country"], "US");
    let key = parse_public_key(root.path().join("node.pub.pem").to_str().unwrap()).unwrap();
    assert_eq!(verify(&run, Some(&key)).faults, vec![]);

    // The rule is about the customer: an agent abroad is admitted, and so is a customer in
    // Mumbai.
    let agent = token("kyc-abroad", "bob", Role::Agent, Duration::from_secs(600));
    let (_agent, answer) = join_from(&node, NEW_YORK, &agent).await;
    assert_eq!(answer["type"], "joined", "{answer}");
    let (_user, answer) = join_from(&node, MUMBAI, &t).await;
    assert_eq!(answer["type"], "joined", "{answer}");
    assert_eq!(answer["recorded"], true);
    assert_eq!(answer["profile"]["name"], RBI_VCIP);

    // A token cannot talk its way out of the profile's rules.
    let unrecorded = claims_token(
        "kyc-abroad",
        "carol",
        Role::User,
        RecordingClaims {
            rec: Some(false),
            ..Default::default()
        },
    );
    let (_, answer) = join_from(&node, MUMBAI, &unrecorded).await;
    assert_eq!(answer["code"], "recording_required", "{answer}");
    let elsewhere = claims_token(
        "kyc-abroad",
        "carol",
        Role::User,
        RecordingClaims {
            residency: Some("test".into()),
            ..Default::default()
        },
    );
    let (_, answer) = join_from(&node, MUMBAI, &elsewhere).await;
    assert_eq!(answer["code"], "residency_conflict", "{answer}");
    let unknown = claims_token(
        "kyc-abroad",
        "carol",
        Role::User,
        RecordingClaims {
            profile: Some("gdpr-lite".into()),
            ..Default::default()
        },
    );
    let (_, answer) = join_from(&node, MUMBAI, &unknown).await;
    assert_eq!(answer["code"], "unknown_profile", "{answer}");
}

#[tokio::test]
async fn under_rbi_vcip_the_customers_media_waits_for_consent_and_a_live_location() {
    let root = tempfile::tempdir().unwrap();
    let node = india_node(root.path()).await;
    let t = token("kyc-consent", "alice", Role::User, Duration::from_secs(600));
    let (mut user, joined) = join_from(&node, MUMBAI, &t).await;
    let profile = &joined["profile"];
    assert_eq!(profile["location"], true);
    assert_eq!(profile["questions"], true);
    let consent = profile["consent"].as_str().unwrap().to_owned();
    assert!(consent.contains("V-CIP"), "{consent}");

    // No media either way before the steps.
    let r = user.request(json!({"type":"publish","sdp":"v=0"})).await;
    assert_eq!(r["code"], "consent_required", "{r}");
    let r = user
        .request(json!({"type":"subscribe","producerId":"pr-0","sdp":"v=0"}))
        .await;
    assert_eq!(r["code"], "consent_required", "{r}");
    let r = user
        .request(json!({"type":"giveConsent","text":"I agree"}))
        .await;
    assert_eq!(
        r["code"], "invalid_field",
        "a text the customer was not shown: {r}"
    );
    let r = user
        .request(json!({"type":"giveConsent","text":consent}))
        .await;
    assert_eq!(r["type"], "ok", "{r}");
    let r = user.request(json!({"type":"publish","sdp":"v=0"})).await;
    assert_eq!(r["code"], "location_required", "{r}");
    let fix = |at: u64| json!({"type":"shareLocation","latitude":19.076,"longitude":72.8777,"accuracy":18.5,"capturedAt":at});
    let r = user.request(fix(now_ms() - 3_600_000)).await;
    assert_eq!(
        r["code"], "invalid_field",
        "an hour-old fix is not live: {r}"
    );
    let r = user.request(fix(now_ms())).await;
    assert_eq!(r["type"], "ok", "{r}");
    let r = user.request(json!({"type":"publish","sdp":"v=0"})).await;
    assert!(
        r["type"] == "error" && r["code"] != "consent_required" && r["code"] != "location_required",
        "past the profile's gate, the offer itself is judged: {r}"
    );

    // The agent draws the whole pool, each question once, in an order of the node's.
    let agent = token("kyc-consent", "bob", Role::Agent, Duration::from_secs(600));
    let (mut agent, _) = join_from(&node, NEW_YORK, &agent).await;
    let pool = ProfileRules::rbi_vcip().questions;
    let mut asked = Vec::new();
    loop {
        let r = agent.request(json!({"type":"drawQuestion"})).await;
        if r["type"] == "error" {
            assert_eq!(r["code"], "not_allowed", "{r}");
            break;
        }
        assert_eq!(r["type"], "question", "{r}");
        asked.push(r["question"].as_str().unwrap().to_owned());
        assert_eq!(r["remaining"], pool.len() - asked.len());
    }
    let mut sorted = asked.clone();
    sorted.sort();
    let mut expected = pool.clone();
    expected.sort();
    assert_eq!(sorted, expected);
    // Each step belongs to one role.
    let r = user.request(json!({"type":"drawQuestion"})).await;
    assert_eq!(r["code"], "not_allowed", "{r}");
    let r = agent
        .request(json!({"type":"giveConsent","text":consent}))
        .await;
    assert_eq!(r["code"], "not_allowed", "{r}");
    drop(user);
    drop(agent);

    let run = sealed_run(root.path(), "kyc-consent").await;
    let entries = audit(&run);
    let one = |event: &str| {
        let found: Vec<&Value> = entries.iter().filter(|e| e["event"] == event).collect();
        assert_eq!(found.len(), 1, "one {event}: {entries:?}");
        found[0].clone()
    };
    let consented = one("consent_given");
    assert_eq!(consented["user"], "alice");
    assert_eq!(consented["text"], consent.as_str());
    assert_eq!(
        consented["text_sha256"],
        meridian::compliance::sha256_hex(consent.as_bytes())
    );
    let located = one("location_captured");
    assert_eq!(
        (located["latitude"].as_f64(), located["longitude"].as_f64()),
        (Some(19.076), Some(72.8777))
    );
    assert_eq!(located["geoip_country"], "IN");
    assert!(located["captured_at"].as_str().unwrap().ends_with('Z'));
    let questions: Vec<&str> = entries
        .iter()
        .filter(|e| e["event"] == "question_asked")
        .map(|e| {
            assert_eq!(e["user"], "bob", "the official's identity: {e}");
            e["question"].as_str().unwrap()
        })
        .collect();
    assert_eq!(questions, asked);
    assert!(
        !entries.iter().any(|e| e["event"] == "producer_started"),
        "no media started"
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(run.join(MANIFEST)).unwrap()).unwrap();
    let metadata = &manifest["metadata"];
    assert_eq!(metadata["profile"], RBI_VCIP, "{manifest}");
    assert_eq!(metadata["location"]["latitude"], 19.076, "{manifest}");
    let key = parse_public_key(root.path().join("node.pub.pem").to_str().unwrap()).unwrap();
    assert_eq!(verify(&run, Some(&key)).faults, vec![]);
}

/// The whole V-CIP in browsers, across regions: the customer's Chromium in Mumbai (through a
/// SOCKS proxy leaving from a Mumbai address) on the India node sees the consent text, clicks
/// "I agree" and shares its location (granted and placed through the DevTools protocol, as a
/// person allowing the prompt); the agent's console on the US node draws questions, marks the
/// checklist, takes an evidence still (posted to the India node) and approves. India alone
/// keeps the sealed folder: consent, geotag, questions, both participants' recordings (the
/// customer's titled with the geotag); the US and Europe nodes wrote nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vcip_call_across_regions_leaves_its_evidence_in_india_only() {
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let nodes = recording_mesh(&root).await;
    let (india, us) = (&nodes[0], &nodes[2]);
    let page = |node: &Node, role: &str, user: &str, r: Role, opts: &str| {
        let t = claims_token(
            "kyc-vcip",
            user,
            r,
            RecordingClaims {
                profile: Some(RBI_VCIP.into()),
                ..Default::default()
            },
        );
        format!("{}/demo/{role}.html#token={t}{opts}", node.http_url())
    };
    let mumbai = common::socks::SocksProxy::start(MUMBAI.parse().unwrap()).await;
    let user = Browser::debuggable(
        &page(india, "user", "alice", Role::User, ""),
        &[
            format!("--proxy-server=socks5://{}", mumbai.addr),
            "--proxy-bypass-list=<-loopback>".into(),
        ],
    );
    let agent = Browser::open(&page(
        us,
        "agent",
        "bob",
        Role::Agent,
        "&verifyAfterFrames=30",
    ));
    wait_until(
        "the customer asked for consent",
        Duration::from_secs(60),
        &[&user],
        || !user.reports("CONSENT_ASKED").is_empty(),
    )
    .await;
    assert!(
        user.reports("PUBLISHED").is_empty(),
        "nothing published before consent"
    );
    let mut cdp = Cdp::attach(&user).await;
    cdp.place(19.076, 72.8777, 30.0).await;
    cdp.click("consent-agree").await;
    both_decoding(
        "the customer and the agent decoding each other",
        90,
        &user,
        &agent,
    )
    .await;
    wait_until(
        "the agent's questions and outcome",
        Duration::from_secs(30),
        &[&agent],
        || agent.reports("QUESTION").len() == 2 && !agent.reports("OUTCOME").is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(cdp);
    drop(agent);
    drop(user);

    let run = sealed_run(&root.join("rec-india"), "kyc-vcip").await;
    let key = parse_public_key(root.join("india.pub.pem").to_str().unwrap()).unwrap();
    assert_eq!(verify(&run, Some(&key)).faults, vec![]);
    let entries = audit(&run);
    let events: Vec<&str> = entries
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let at = |e: &str| events.iter().position(|x| *x == e).unwrap_or(usize::MAX);
    let first_user_media = entries
        .iter()
        .position(|e| e["event"] == "producer_started" && e["user"] == "alice")
        .expect("the customer's media started");
    assert!(
        at("consent_given") < at("location_captured") && at("location_captured") < first_user_media,
        "consent, then location, then media: {events:?}"
    );
    let located = entries
        .iter()
        .find(|e| e["event"] == "location_captured")
        .unwrap();
    assert_eq!(located["latitude"], 19.076);
    assert_eq!(located["accuracy_m"], 30.0);
    assert_eq!(located["geoip_country"], "IN");
    let questions: Vec<&Value> = entries
        .iter()
        .filter(|e| e["event"] == "question_asked")
        .collect();
    assert_eq!(questions.len(), 2);
    assert!(questions.iter().all(|q| q["user"] == "bob"));
    assert!(entries
        .iter()
        .any(|e| e["event"] == "outcome_recorded" && e["outcome"] == "approved"));
    // The agent's still, taken on the US node, went to India (and only there).
    let still = entries
        .iter()
        .find(|e| e["event"] == "snapshot_taken")
        .expect("the agent's evidence still, stored in India");
    assert_eq!(still["user"], "bob");
    let file = run.join(still["file"].as_str().unwrap());
    assert_eq!(
        meridian::compliance::sha256_hex(&std::fs::read(&file).unwrap()),
        still["sha256"].as_str().unwrap()
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(run.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest["metadata"]["profile"], RBI_VCIP);
    assert_eq!(manifest["metadata"]["location"]["longitude"], 72.8777);
    let title = ffprobe_title(&run.join("media/user-alice.webm"));
    assert!(
        title.starts_with("kyc-vcip ") && title.ends_with("Z +19.0760+072.8777/"),
        "UTC start and geotag in the title: {title:?}"
    );
    assert!(run.join("media/agent-bob.webm").exists());
    for region in ["us", "europe"] {
        let written = written_besides_database(&root, region);
        assert_eq!(written, Vec::<PathBuf>::new(), "{region} wrote nothing");
    }
}

/// The container's title, as ffprobe reads it.
fn ffprobe_title(file: &Path) -> String {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format_tags=title",
            "-of",
            "default=noprint_wrappers=1:nokey=1",
        ])
        .arg(file)
        .output()
        .expect("ffprobe runs (tests/run.sh installs ffmpeg)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
