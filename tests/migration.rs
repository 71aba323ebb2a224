//! Draining with a deadline moves the calls, make-before-break: `meridian ctl drain
//! --deadline` tells every participant of the node where routing would send it now; the
//! browser SDK joins there, publishes and subscribes there, and only then leaves. Driven with
//! the real binary's `ctl`, Chromium pages and raw WebSocket clients.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::browser::*;
use common::*;
use meridian::auth::Role;
use serde_json::{json, Value};

const TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

/// India, Europe and US, each with its admin API on (the first test talks to the US one
/// only: ctl reaches India through it).
async fn mesh_with_admin(dir: &Path) -> (Vec<meridian::node::Node>, PathBuf) {
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let tf = token_file.clone();
    let root = dir.to_path_buf();
    let nodes = routed_mesh(dir, move |cfg| {
        let region = cfg.node.region.to_string();
        cfg.admin = Some(meridian::admin::AdminSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            token_file: tf.clone(),
        });
        // Recorded where each participant is (no residency claim): a move is in the logs.
        cfg.recording.enabled = true;
        cfg.recording.dir = root.join(format!("rec-{region}")).join("recordings");
        cfg.recording.signing_key_file = Some(root.join(format!("{region}.key")));
        cfg.recording.create_signing_key = true;
    })
    .await;
    (nodes, token_file)
}

/// Whether any video consumer advanced between two STATS reports (a consumer that appeared
/// counts when it has decoded frames).
fn advanced(prev: &Value, next: &Value) -> bool {
    let Some(now) = next["consumers"].as_object() else {
        return false;
    };
    now.iter().any(|(id, c)| {
        c["kind"] == "video"
            && c["framesDecoded"].as_u64().unwrap_or(0)
                > prev["consumers"][id]["framesDecoded"].as_u64().unwrap_or(0)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_india_moves_the_chromium_user_to_europe_while_the_agent_keeps_watching() {
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let (nodes, token_file) = mesh_with_admin(dir.path()).await;
    let us = &nodes[2];
    // The operator reaches India through the US node.
    let admin = us.admin_addr.unwrap();
    let india_1: meridian::ids::NodeId = "india-1".parse().unwrap();
    let (_mumbai, user, agent) =
        mumbai_user_and_agent(us, us, "kyc-drain", "127.1.0.11".parse().unwrap()).await;
    assert_eq!(user.reports("EDGE")[0]["node"], "india-1");

    let reports_before = agent.reports("STATS").len();
    let drained = {
        let tf = token_file.clone();
        tokio::task::spawn_blocking(move || {
            ctl(
                admin,
                &tf,
                &["drain", "india-1", "--deadline", "30s", "--json"],
            )
        })
    };
    wait_until(
        "the user page moved",
        Duration::from_secs(40),
        &[&user, &agent],
        || {
            user.reports("SIGNALING")
                .iter()
                .any(|r| r["state"] == "migrated")
        },
    )
    .await;
    let (code, out, err) = drained.await.unwrap();
    assert_eq!(code, 0, "ctl drain: {err}");
    assert!(
        err.contains("1 participants moved, 0 closed at the deadline"),
        "{err}"
    );
    let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
    let india = s.report(&india_1).expect("India's report");
    assert!(
        india.draining && india.participants == 0 && india.sessions == 0,
        "{out}"
    );
    assert!(err.contains("india-1: 1 participants moved"), "{err}");
    let moved = user
        .reports("SIGNALING")
        .into_iter()
        .find(|r| r["state"] == "migrated")
        .unwrap();
    assert_eq!(moved["node"], "europe-1", "the next nearest edge to Mumbai");

    // The agent's picture: the longest run of one-second reports without a decoded frame.
    both_decoding("both decoding after the move", 30, &user, &agent).await;
    let stats = agent.reports("STATS");
    let (mut run, mut longest) = (0u32, 0u32);
    for w in stats[reports_before.saturating_sub(1)..].windows(2) {
        if advanced(&w[0], &w[1]) {
            run = 0;
        } else {
            run += 1;
            longest = longest.max(run);
        }
    }
    println!("drain: the agent's video paused for at most {longest} s while the user moved from India to Europe");
    assert!(
        longest <= 3,
        "the agent's picture paused {longest} s:\n{}",
        agent.transcript()
    );
    assert!(
        user.reports("CLOSED").is_empty(),
        "the session never ended: {}",
        user.transcript()
    );

    // `undrain` makes India eligible again: routing offers it to Mumbai once more.
    let (code, out, err) = ctl(admin, &token_file, &["undrain", "india-1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let s: meridian::admin::Status = serde_json::from_str(&out).unwrap();
    let india = s.report(&india_1).expect("India's report");
    assert!(
        !india.draining && india.move_deadline_secs.is_none(),
        "{out}"
    );
    let mut edge = String::new();
    for _ in 0..100 {
        let (_, body) = http_get_as(
            us.signaling_addr,
            "127.1.0.11".parse().unwrap(),
            "/v1/edge",
            &[],
        )
        .await;
        edge = body;
        if edge.contains("\"node\":\"india-1\"") && edge.find("india-1") < edge.find("europe-1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer: Value = serde_json::from_str(&edge).unwrap();
    assert_eq!(answer["edge"]["node"], "india-1", "{edge}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_does_not_move_is_closed_at_the_deadline_and_an_undrain_lets_others_stay(
) {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, _) = mesh_with_admin(dir.path()).await;
    let india = &nodes[0];
    let admin = india.admin_addr.unwrap();
    let from_mumbai: std::net::IpAddr = "127.1.0.12".parse().unwrap();
    let join = |user: &'static str| async move {
        Signal::connect_from(india, from_mumbai)
            .await
            .join_with(&token(
                "kyc-stay",
                user,
                Role::User,
                Duration::from_secs(600),
            ))
            .await
            .0
    };

    // Told where to go (Europe is nearest to Mumbai once India drains), never back here.
    let mut ignores = join("alice").await;
    let (status, s) = admin_request(
        admin,
        "POST",
        "/v1/admin/drain?deadline_secs=2",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        s["move_deadline_secs"].as_u64().map(|d| d <= 2),
        Some(true),
        "{s}"
    );
    let m = ignores.event("migrate").await;
    assert_eq!(m["edge"]["node"], "europe-1", "{m}");
    assert!(
        m["alternates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["node"] != "india-1"),
        "{m}"
    );
    // Not moving: closed at the deadline.
    let (seen, code) = ignores.until_closed().await;
    assert_eq!(code, Some(4503), "{seen:?}");
    assert!(seen.iter().any(|m| m["code"] == "drained"), "{seen:?}");
    let (_, s) = admin_request(admin, "GET", "/v1/admin/status", Some(TOKEN)).await;
    assert_eq!(s["closed_at_deadline"], 1, "{s}");

    // An undrain before the deadline: the participant is told to stay, and stays.
    admin_request(admin, "POST", "/v1/admin/undrain", Some(TOKEN)).await;
    let mut stays = join("bob").await;
    admin_request(
        admin,
        "POST",
        "/v1/admin/drain?deadline_secs=3",
        Some(TOKEN),
    )
    .await;
    stays.event("migrate").await;
    let (_, s) = admin_request(admin, "POST", "/v1/admin/undrain", Some(TOKEN)).await;
    assert_eq!(s["draining"], false, "{s}");
    stays.event("migrateCancelled").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pong = stays.request(json!({"type":"ping"})).await;
    assert_eq!(pong["type"], "pong", "still here after the old deadline");
}

/// The same move with an independent client (the rtc-based test peer over a raw WebSocket),
/// following only the protocol: on `migrate` it joins the named edge, publishes there, and
/// leaves the old node once the new stream is watched on the US node. The gap between the old
/// stream's last packet (at the agent) and the new one's first (at a supervisor on the same
/// node) is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_client_moves_make_before_break_without_a_silence_on_the_other_side() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, _) = mesh_with_admin(dir.path()).await;
    let (india, us) = (&nodes[0], &nodes[2]);
    let admin = india.admin_addr.unwrap();
    let alice = token("kyc-move", "alice", Role::User, Duration::from_secs(600));
    let (mut user, _) = Signal::connect_from(india, "127.1.0.13".parse().unwrap())
        .await
        .join_with(&alice)
        .await;
    let (mut agent, _) = Signal::join(us, "kyc-move", "bob", Role::Agent).await;
    let (old_producer, _old_pub, _t1) = publish_as(&mut user, TestCodec::Vp8).await;
    agent.event("producerAdded").await;
    let (old_seen, _t2) = subscribe_as(
        &mut agent,
        &old_producer,
        TestCodec::Vp8,
        PeerState::default(),
    )
    .await;
    wait_for("media at the agent", Duration::from_secs(10), || {
        old_seen.received.lock().unwrap().len() >= 50
    })
    .await;

    admin_request(
        admin,
        "POST",
        "/v1/admin/drain?deadline_secs=20",
        Some(TOKEN),
    )
    .await;
    let m = user.event("migrate").await;
    let url = m["edge"]["url"].as_str().unwrap().to_owned();
    assert_eq!(m["edge"]["node"], "europe-1", "{m}");
    // Make: the same user joins the named edge and publishes there.
    let (mut moved, _) = Signal::connect_url(&url).await.join_with(&alice).await;
    let (new_producer, _new_pub, _t3) = publish_as(&mut moved, TestCodec::Vp8).await;
    let added = loop {
        let e = agent.event("producerAdded").await;
        if e["producer"]["producerId"] == new_producer.as_str() {
            break e;
        }
    };
    assert_eq!(added["producer"]["userId"], "alice");
    // The test peer negotiates one subscription per connection: a second watcher on the US
    // node (a supervisor) takes the new stream, on the same clock as the agent's.
    let (mut supervisor, _) = Signal::join(us, "kyc-move", "carol", Role::Observer).await;
    let (new_seen, _t4) = subscribe_as(
        &mut supervisor,
        &new_producer,
        TestCodec::Vp8,
        PeerState::default(),
    )
    .await;
    wait_for("media from the new node", Duration::from_secs(10), || {
        !new_seen.received.lock().unwrap().is_empty()
    })
    .await;
    // Break: only once the new stream is established (as the SDK waits for its subscriptions)
    // leave the drained node.
    wait_for(
        "the new stream established",
        Duration::from_secs(10),
        || new_seen.received.lock().unwrap().len() >= 10,
    )
    .await;
    user.send_text(&json!({"type":"leave"}).to_string()).await;
    let closed = loop {
        let e = agent.event("producerClosed").await;
        if e["producerId"] == old_producer.as_str() {
            break e;
        }
    };
    assert_eq!(closed["producerId"], old_producer.as_str());
    // The watchers' merged timeline: the longest silence while the user moved.
    let mut at: Vec<std::time::Instant> = old_seen
        .received
        .lock()
        .unwrap()
        .iter()
        .chain(new_seen.received.lock().unwrap().iter())
        .map(|r| r.at)
        .collect();
    at.sort();
    let longest = at
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    println!(
        "protocol client moved India → Europe: longest silence of the user's video on the US node {} ms (the publisher sends every 20 ms or so)",
        longest.as_millis()
    );
    assert!(
        longest < Duration::from_millis(500),
        "the move left the US node without the user's video for {longest:?}"
    );
    // India's record of the session says the user moved; Europe's that she arrived.
    let india_run = sealed_run(&dir.path().join("rec-india"), "kyc-move").await;
    let left: Vec<Value> = audit(&india_run)
        .into_iter()
        .filter(|e| e["event"] == "participant_left")
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["reason"], "migrated", "{left:?}");
    wait_for("India empty", Duration::from_secs(5), || {
        india
            .workers
            .stats()
            .participants
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
}
