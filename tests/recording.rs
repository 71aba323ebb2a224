//! Compliance records through the real signaling: participants joining and leaving a node
//! with `recording.enabled` leave a sealed session folder that verifies against the node's
//! key; a join that cannot be recorded is refused.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::browser::*;
use common::*;
use meridian::auth::Role;
use meridian::compliance::seal::{parse_public_key, verify, SealStatus, MANIFEST};
use meridian::node::Node;
use serde_json::{json, Value};

async fn recording_node(root: &Path) -> Node {
    Node::start(recording_config(root))
        .await
        .expect("node starts")
}

#[tokio::test]
async fn a_session_leaves_a_sealed_audit_of_who_joined_and_left() {
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let (mut user, joined) = Signal::join(&node, "kyc-rec", "user-1", Role::User).await;
    assert_eq!(
        joined["recorded"], true,
        "the participant is told: {joined}"
    );
    let (mut agent, _) = Signal::join(&node, "kyc-rec", "agent-7", Role::Agent).await;
    let (producer, _publisher, _task) = publish_as(&mut agent, TestCodec::Vp8).await;
    for ty in ["pauseProducer", "resumeProducer"] {
        let r = agent
            .request(json!({"type": ty, "producerId": producer}))
            .await;
        assert_eq!(r["type"], "ok", "{r}");
    }
    // A request that fails is not in the log.
    let r = agent
        .request(json!({"type": "pauseProducer", "producerId": "pr-nosuchproducer"}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    agent.send_text(&json!({"type": "leave"}).to_string()).await;
    agent.until_closed().await;
    assert!(
        runs(root.path(), "kyc-rec")
            .iter()
            .all(|r| !r.join(MANIFEST).exists()),
        "not sealed while the user is still in"
    );
    user.send_text(&json!({"type": "leave"}).to_string()).await;
    user.until_closed().await;

    let run = sealed_run(root.path(), "kyc-rec").await;
    let key = parse_public_key(root.path().join("node.pub.pem").to_str().unwrap()).unwrap();
    let v = verify(&run, Some(&key));
    assert_eq!(v.faults, vec![], "{}", run.display());
    let m = v.manifest.unwrap();
    assert_eq!(m.status, SealStatus::Complete);
    assert_eq!(m.session, "kyc-rec");
    let entries = audit(&run);
    let events: Vec<&str> = entries
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "session_created",
            "participant_joined",
            "participant_joined",
            "producer_started",
            "producer_paused",
            "producer_resumed",
            "producer_stopped",
            "participant_left",
            "participant_left",
            "session_ended"
        ]
    );
    assert_eq!(entries[3]["producer"], producer.as_str());
    assert_eq!(entries[3]["kind"], "video");
    assert_eq!(entries[3]["user"], "agent-7");
    assert_eq!(entries[6]["reason"], "left", "stopped as its owner left");
    assert_eq!(entries[1]["user"], "user-1");
    assert_eq!(entries[1]["role"], "user");
    assert_eq!(entries[1]["participant"], joined["participantId"]);
    assert_eq!(entries[1]["region"], "test");
    assert_eq!(entries[2]["user"], "agent-7");
    assert_eq!(entries[2]["role"], "agent");
    assert_eq!(entries[7]["user"], "agent-7");
    assert_eq!(entries[7]["reason"], "left");
    assert!(entries
        .iter()
        .all(|e| e["at"].as_str().unwrap().ends_with('Z')));
    // The count follows the manifest on disk by a moment.
    let sealed = |m: &str| {
        m.lines()
            .any(|l| l.starts_with("meridian_recording_sessions_sealed_total") && l.ends_with(" 1"))
    };
    let mut m = metrics(&node).await;
    for _ in 0..50 {
        if sealed(&m) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = metrics(&node).await;
    }
    assert!(sealed(&m), "{m}");
}

#[tokio::test]
async fn an_expired_token_is_in_the_audit() {
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let short = token("kyc-rec-exp", "user-2", Role::User, Duration::from_secs(2));
    let (mut user, _) = Signal::connect(&node).await.join_with(&short).await;
    user.until_closed().await;
    let run = sealed_run(root.path(), "kyc-rec-exp").await;
    let left = audit(&run)
        .into_iter()
        .find(|e| e["event"] == "participant_left")
        .unwrap();
    assert_eq!(left["reason"], "token_expired", "{left}");
}

/// A join refused for its token goes to the session's audit log when the token is this
/// mesh's (signed by its key, but expired): who, and why. A forged token names no session
/// reliably and writes nothing anywhere.
#[tokio::test]
async fn a_refused_token_of_a_recorded_session_is_in_its_audit() {
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let expired = token("kyc-auth", "mallory", Role::Agent, Duration::ZERO);
    let mut s = Signal::connect(&node).await;
    s.send_text(&json!({"type":"join","version":1,"token":expired}).to_string())
        .await;
    let (seen, close) = s.until_closed().await;
    assert_eq!(seen[0]["code"], "token_expired", "{seen:?}");
    assert_eq!(close, Some(4401));
    let run = sealed_run(root.path(), "kyc-auth").await;
    let refused = audit(&run)
        .into_iter()
        .find(|e| e["event"] == "join_refused")
        .expect("the refusal in the session's log");
    assert_eq!(refused["code"], "token_expired");
    assert_eq!(refused["user"], "mallory");
    assert_eq!(refused["role"], "agent");

    let forged = meridian::auth::TokenSigner::hs256(
        b"not the mesh's secret, not the mesh's",
        "meridian-test",
        "meridian",
    )
    .mint(
        &"kyc-forged".parse().unwrap(),
        &"mallory".parse().unwrap(),
        Role::Agent,
        Duration::from_secs(60),
    )
    .unwrap();
    let mut s = Signal::connect(&node).await;
    s.send_text(&json!({"type":"join","version":1,"token":forged}).to_string())
        .await;
    let (seen, _) = s.until_closed().await;
    assert_eq!(seen[0]["code"], "token_bad_signature", "{seen:?}");
    // The refusal was decided (and any record of it asked for) before the socket closed.
    assert_eq!(runs(root.path(), "kyc-forged"), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn a_join_that_cannot_be_recorded_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    // A file where the session's folder must go: its records cannot be written.
    std::fs::write(root.path().join("recordings/kyc-unrecordable"), b"").unwrap();
    let mut s = Signal::connect(&node).await;
    let t = token(
        "kyc-unrecordable",
        "user-3",
        Role::User,
        Duration::from_secs(60),
    );
    s.send_text(&json!({"type":"join","version":1,"token":t}).to_string())
        .await;
    let (seen, _) = s.until_closed().await;
    assert!(
        seen.iter()
            .any(|m| m["type"] == "error" && m["code"] == "recording_unavailable"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|m| m["type"] == "joined"),
        "never told it joined: {seen:?}"
    );
}

/// `POST path` with `headers` and `body` over a plain TCP connection: status and body.
async fn post(node: &Node, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(node.signaling_addr)
        .await
        .unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // A refusal may come before the whole body is read: a write error then is expected.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b.trim()).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR-a-still";

#[tokio::test]
async fn the_agents_checklist_outcome_and_snapshot_are_sealed_with_the_session() {
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let (mut user, _) = Signal::join(&node, "kyc-steps", "user-1", Role::User).await;
    let (mut agent, _) = Signal::join(&node, "kyc-steps", "agent-7", Role::Agent).await;

    let r = agent
        .request(json!({"type": "markChecklist", "step": "document shown", "checked": true}))
        .await;
    assert_eq!(r["type"], "ok", "{r}");
    let r = user
        .request(json!({"type": "markChecklist", "step": "document shown", "checked": true}))
        .await;
    assert_eq!(r["code"], "not_allowed", "only the agent: {r}");
    let r = agent
        .request(json!({"type": "markChecklist", "step": "", "checked": true}))
        .await;
    assert_eq!(r["code"], "invalid_field", "{r}");
    let r = user
        .request(json!({"type": "recordOutcome", "outcome": "approved"}))
        .await;
    assert_eq!(r["code"], "not_allowed", "{r}");

    let agent_token = token("kyc-steps", "agent-7", Role::Agent, Duration::from_secs(60));
    let bearer = format!("Bearer {agent_token}");
    let auth = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "image/png"),
    ];
    let (status, stored) = post(&node, "/v1/snapshot", &auth, PNG).await;
    assert_eq!(status, 201, "{stored}");
    let file = stored["file"].as_str().unwrap().to_owned();
    assert!(
        file.starts_with("snapshots/") && file.ends_with(".png"),
        "{file}"
    );

    // Forged uploads: each refused with its own code, nothing stored.
    let user_token = token("kyc-steps", "user-1", Role::User, Duration::from_secs(60));
    let user_bearer = format!("Bearer {user_token}");
    let other = token(
        "kyc-nowhere",
        "agent-7",
        Role::Agent,
        Duration::from_secs(60),
    );
    let other_bearer = format!("Bearer {other}");
    let big = [PNG, &vec![0u8; 4 << 20]].concat();
    for (what, headers, body, status, code) in [
        (
            "no token",
            vec![("Content-Type", "image/png")],
            PNG.to_vec(),
            401,
            "token_missing",
        ),
        (
            "user's token",
            vec![("Authorization", user_bearer.as_str())],
            PNG.to_vec(),
            403,
            "not_allowed",
        ),
        (
            "another session",
            vec![("Authorization", other_bearer.as_str())],
            PNG.to_vec(),
            404,
            "not_recorded_here",
        ),
        (
            "not an image",
            vec![("Authorization", bearer.as_str())],
            b"GIF89a...".to_vec(),
            415,
            "not_an_image",
        ),
        (
            "a mislabelled one",
            vec![
                ("Authorization", bearer.as_str()),
                ("Content-Type", "image/jpeg"),
            ],
            PNG.to_vec(),
            415,
            "not_an_image",
        ),
        (
            "oversized",
            vec![("Authorization", bearer.as_str())],
            big,
            413,
            "too_big",
        ),
    ] {
        let (got, reply) = post(&node, "/v1/snapshot", &headers, &body).await;
        assert_eq!(got, status, "{what}: {reply}");
        assert_eq!(reply["code"], code, "{what}: {reply}");
    }

    let r = agent
        .request(json!({"type": "recordOutcome", "outcome": "approved", "note": "face matches the card"}))
        .await;
    assert_eq!(r["type"], "ok", "{r}");
    agent.send_text(&json!({"type": "leave"}).to_string()).await;
    agent.until_closed().await;
    user.send_text(&json!({"type": "leave"}).to_string()).await;
    user.until_closed().await;

    let run = sealed_run(root.path(), "kyc-steps").await;
    let v = verify(&run, None);
    assert_eq!(v.faults, vec![]);
    let m = v.manifest.unwrap();
    let sealed = m
        .files
        .iter()
        .find(|f| f.path == file)
        .expect("snapshot sealed");
    assert_eq!(sealed.sha256, stored["sha256"].as_str().unwrap());
    assert_eq!(
        std::fs::read_dir(run.join("snapshots")).unwrap().count(),
        1,
        "only the accepted snapshot is stored"
    );
    let entries = audit(&run);
    let find = |event: &str| {
        entries
            .iter()
            .find(|e| e["event"] == event)
            .cloned()
            .unwrap_or_else(|| panic!("no {event}: {entries:?}"))
    };
    let step = find("checklist_marked");
    assert_eq!(step["step"], "document shown");
    assert_eq!(step["checked"], true);
    assert_eq!(step["user"], "agent-7", "the official's identity");
    assert_eq!(step["role"], "agent");
    let shot = find("snapshot_taken");
    assert_eq!(shot["file"], file.as_str());
    assert_eq!(shot["sha256"], stored["sha256"]);
    assert_eq!(shot["user"], "agent-7");
    let outcome = find("outcome_recorded");
    assert_eq!(outcome["outcome"], "approved");
    assert_eq!(outcome["note"], "face matches the card");
    assert_eq!(outcome["user"], "agent-7");
    assert_eq!(
        entries
            .iter()
            .filter(|e| e["event"] == "checklist_marked")
            .count(),
        1,
        "refused steps are not in the log"
    );
}

/// The agent console in Chromium: once the customer's video decodes, it marks a checklist
/// step, takes a snapshot of the customer's picture and records an outcome; all three are in
/// the sealed audit log, and the snapshot is a PNG the manifest seals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_console_marks_snapshots_and_decides_into_the_sealed_log() {
    assert_isolated_network();
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let (user, agent) = call_pages(&node, "kyc-console", "", "&verifyAfterFrames=30");
    wait_until(
        "the agent console recording an outcome",
        Duration::from_secs(90),
        &[&user, &agent],
        || !agent.reports("OUTCOME").is_empty(),
    )
    .await;
    assert!(agent.reports("ERROR").is_empty(), "{}", agent.transcript());
    let snapshot = agent.reports("SNAPSHOT").remove(0);
    drop(agent);
    drop(user);

    let run = sealed_run(root.path(), "kyc-console").await;
    let v = verify(&run, None);
    assert_eq!(v.faults, vec![]);
    let file = snapshot["file"].as_str().unwrap();
    let png = std::fs::read(run.join(file)).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG still");
    let events: Vec<String> = audit(&run)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    for e in ["checklist_marked", "snapshot_taken", "outcome_recorded"] {
        assert!(events.iter().any(|x| x == e), "{e} in {events:?}");
    }
}

/// A session whose recording fails (here: the user's file cannot be created, as on a full
/// disk) does not go on unrecorded: the failure is in the audit log at once, both
/// participants are let go with `recording_failed`, and the run is sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_recording_fails_ends_with_the_failure_in_its_log() {
    assert_isolated_network();
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let (user, agent) = call_pages(&node, "kyc-fail", "", "");
    let mut run = None;
    for _ in 0..200 {
        run = runs(root.path(), "kyc-fail").pop();
        if run.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let run = run.expect("the session's run folder");
    // Where the user's file must go, a directory: the file cannot be created.
    std::fs::create_dir_all(run.join("media/user-alice.webm")).unwrap();
    let ended = |b: &Browser| {
        b.reports("CLOSED")
            .iter()
            .chain(b.reports("ERROR").iter())
            .any(|r| r.to_string().contains("recording_failed"))
    };
    wait_until(
        "both participants let go on the failure",
        Duration::from_secs(90),
        &[&user, &agent],
        || ended(&user) && ended(&agent),
    )
    .await;
    let run = sealed_run(root.path(), "kyc-fail").await;
    let entries = audit(&run);
    let failed = entries
        .iter()
        .find(|e| e["event"] == "recording_failed")
        .expect("the failure in the log");
    assert_eq!(failed["file"], "media/user-alice.webm");
    assert_eq!(failed["user"], "alice");
    let left: Vec<&Value> = entries
        .iter()
        .filter(|e| e["event"] == "participant_left")
        .collect();
    assert_eq!(left.len(), 2, "{entries:?}");
    assert!(
        left.iter().all(|e| e["reason"] == "recording_failed"),
        "{left:?}"
    );
    assert_eq!(verify(&run, None).faults, vec![]);
}

/// The demo pages of a call: the user alice and the agent bob, with extra page options.
fn call_pages(node: &Node, session: &str, user_opts: &str, agent_opts: &str) -> (Browser, Browser) {
    let day = Duration::from_secs(3600);
    let page = |role: &str, user: &str, r: Role, opts: &str| {
        let t = token(session, user, r, day);
        format!("{}/demo/{role}.html#token={t}{opts}", node.http_url())
    };
    (
        Browser::open(&page("user", "alice", Role::User, user_opts)),
        Browser::open(&page("agent", "bob", Role::Agent, agent_opts)),
    )
}

fn recording_token(session: &str, rec: Option<bool>, residency: Option<&str>) -> String {
    signer()
        .mint_with(
            &session.parse().unwrap(),
            &"user-9".parse().unwrap(),
            Role::User,
            Duration::from_secs(60),
            meridian::auth::RecordingClaims {
                rec,
                residency: residency.map(str::to_owned),
                profile: None,
            },
        )
        .unwrap()
}

/// The refusal a join with `token` gets: (error code, close code).
async fn refused(node: &Node, token: &str) -> (Value, Option<u16>) {
    let mut s = Signal::connect(node).await;
    s.send_text(&json!({"type":"join","version":1,"token":token}).to_string())
        .await;
    let (seen, close) = s.until_closed().await;
    assert!(!seen.iter().any(|m| m["type"] == "joined"), "{seen:?}");
    let error = seen
        .into_iter()
        .find(|m| m["type"] == "error")
        .expect("an error before the close");
    (error["code"].clone(), close)
}

#[tokio::test]
async fn the_token_says_whether_and_where_a_session_is_recorded() {
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    // Not recorded: told so, and nothing written.
    let t = recording_token("kyc-unrec", Some(false), None);
    let (mut s, joined) = Signal::connect(&node).await.join_with(&t).await;
    assert_eq!(joined["recorded"], false, "{joined}");
    s.send_text(&json!({"type": "leave"}).to_string()).await;
    s.until_closed().await;
    assert!(runs(root.path(), "kyc-unrec").is_empty());
    // Recorded in this node's region, named explicitly.
    let t = recording_token("kyc-here", None, Some("test"));
    let (_s, joined) = Signal::connect(&node).await.join_with(&t).await;
    assert_eq!(joined["recorded"], true, "{joined}");
    // A residency no region of the mesh has.
    let t = recording_token("kyc-mars", Some(true), Some("mars"));
    assert_eq!(
        refused(&node, &t).await,
        (json!("unknown_residency"), Some(4401))
    );
    assert!(runs(root.path(), "kyc-mars").is_empty());

    // A node that does not record refuses a session that must be recorded.
    let plain = start_node().await;
    let t = recording_token("kyc-must", Some(true), None);
    assert_eq!(
        refused(&plain, &t).await,
        (json!("recording_unavailable"), Some(1011))
    );
}

/// What `ffprobe` says of a recording: its streams' codecs and the file's duration.
fn probe(file: &Path) -> (Vec<String>, f64) {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_entries"])
        .arg("stream=codec_name:format=duration")
        .args(["-of", "json"])
        .arg(file)
        .output()
        .expect("ffprobe runs (tests/run.sh installs ffmpeg)");
    assert!(
        out.status.success(),
        "ffprobe {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut codecs: Vec<String> = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["codec_name"].as_str().unwrap().to_owned())
        .collect();
    codecs.sort();
    let duration = v["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    (codecs, duration)
}

/// Every frame of `file` decodes: `ffmpeg -v error` prints nothing. WebRTC video has a
/// variable frame rate; frames keep the file's own timestamps (`-enc_time_base -1`), as with
/// ffmpeg's default output time base, its guess of a frame rate, two frames can share a tick,
/// which the null muxer reports although nothing failed to decode.
fn decodes_cleanly(file: &Path) {
    let out = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(file)
        .args(["-enc_time_base", "-1", "-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && errors.trim().is_empty(),
        "{} does not decode cleanly: {errors}",
        file.display()
    );
}

fn media_files(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("media"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A call between a Chromium user (VP8 simulcast and Opus) and a Chromium agent (VP8 and
/// Opus) on a recording node leaves one WebM per participant in the sealed folder: ffprobe
/// reads VP8 and Opus with the duration of the call, ffmpeg decodes every frame without an
/// error, and the manifest seals the files with the audit's start and stop entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_call_leaves_a_webm_per_participant_that_players_open() {
    assert_isolated_network();
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let opened = std::time::Instant::now();
    let (user, agent) = call_pages(&node, "kyc-media", "&simulcast=1", "");
    both_decoding(
        "the user and the agent decoding each other",
        90,
        &user,
        &agent,
    )
    .await;
    let decoding = opened.elapsed();
    // Some seconds of call, recorded.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let call = opened.elapsed();
    drop(agent);
    drop(user);

    let run = sealed_run(root.path(), "kyc-media").await;
    let v = verify(&run, None);
    assert_eq!(v.faults, vec![]);
    let sealed: Vec<String> = v
        .manifest
        .unwrap()
        .files
        .iter()
        .map(|f| f.path.clone())
        .collect();
    let files = media_files(&run);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["agent-bob.webm", "user-alice.webm"], "{sealed:?}");
    for f in &files {
        let (codecs, duration) = probe(f);
        eprintln!(
            "{}: {codecs:?}, {duration:.2} s (call {:.2} s, both decoding after {:.2} s)",
            f.display(),
            call.as_secs_f64(),
            decoding.as_secs_f64()
        );
        if let Ok(keep) = std::env::var("MERIDIAN_KEEP_RECORDING") {
            let _ = std::fs::copy(f, Path::new(&keep).join(f.file_name().unwrap()));
        }
        assert_eq!(codecs, ["opus", "vp8"], "{}", f.display());
        // From the first frames (before both pages decoded) to the pages' close.
        let (least, most) = (
            call.as_secs_f64() - decoding.as_secs_f64() - 1.0,
            call.as_secs_f64() + 2.0,
        );
        assert!(
            (least..most).contains(&duration),
            "{}: {duration:.2} s, the call lasted {:.2} s ({:.2} s decoding)",
            f.display(),
            call.as_secs_f64(),
            decoding.as_secs_f64()
        );
        decodes_cleanly(f);
        let rel = format!("media/{}", f.file_name().unwrap().to_string_lossy());
        assert!(sealed.contains(&rel), "{rel} sealed in {sealed:?}");
    }
    let entries = audit(&run);
    for who in ["alice", "bob"] {
        for event in ["recording_started", "recording_stopped"] {
            assert!(
                entries
                    .iter()
                    .any(|e| e["event"] == event && e["user"] == who),
                "{event} for {who}"
            );
        }
    }
    review_plays_both_files(&node, "kyc-media", Duration::from_secs(3600)).await;
}

/// An HTTP/1.0 GET with headers; the status and the raw body.
async fn raw_get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>) {
    http_get_bytes(addr, "127.0.0.1".parse().unwrap(), path, headers).await
}

/// The review page of a sealed session: the API admits the agent (not the user), says the
/// seal verifies, and signs links that serve ranges (a forged one is refused); Chromium plays
/// both participants' files, both advancing.
async fn review_plays_both_files(node: &Node, session: &str, day: Duration) {
    let agent = token(session, "bob", Role::Agent, day);
    let auth = format!("Bearer {agent}");
    let (status, body) = raw_get(
        node.signaling_addr,
        &format!("/v1/review/{session}"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let review: Value = serde_json::from_slice(&body).unwrap();
    let run = &review["runs"][0];
    assert_eq!(run["verified"], true, "{run}");
    assert_eq!(run["files"].as_array().unwrap().len(), 2, "{run}");
    let url = run["files"][0]["url"].as_str().unwrap();
    let (status, head) = raw_get(node.signaling_addr, url, &[("Range", "bytes=0-3")]).await;
    assert_eq!(
        (status, head.as_slice()),
        (206, &[0x1a, 0x45, 0xdf, 0xa3][..]),
        "EBML magic, as a range"
    );
    let forged = url.replace("sig=", "sig=0");
    assert_eq!(raw_get(node.signaling_addr, &forged, &[]).await.0, 403);
    let user = format!("Bearer {}", token(session, "alice", Role::User, day));
    let (status, _) = raw_get(
        node.signaling_addr,
        &format!("/v1/review/{session}"),
        &[("Authorization", &user)],
    )
    .await;
    assert_eq!(status, 403, "a user does not review");
    let other = format!("Bearer {}", token("kyc-other", "bob", Role::Agent, day));
    let (status, _) = raw_get(
        node.signaling_addr,
        &format!("/v1/review/{session}"),
        &[("Authorization", &other)],
    )
    .await;
    assert_eq!(status, 403, "a token for another session");

    let page = Browser::open(&format!(
        "{}/review.html#token={agent}&autoplay=1",
        node.http_url()
    ));
    let advancing = || {
        let r = page.reports("PLAYBACK");
        let times = |i: usize| -> Vec<f64> {
            r[i]["times"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_f64().unwrap())
                .collect()
        };
        r.len() >= 4 && {
            let (a, b) = (times(r.len() - 4), times(r.len() - 1));
            a.len() == 2 && a.iter().zip(&b).all(|(x, y)| y - x > 1.5)
        }
    };
    wait_until(
        "both recordings playing on the review page",
        Duration::from_secs(60),
        &[&page],
        advancing,
    )
    .await;
    let shown = page.reports("REVIEW").remove(0);
    assert_eq!(shown["verified"], true, "{shown}");
    assert!(page.reports("ERROR").is_empty(), "{}", page.transcript());
}

/// A user publishing H.264 is recorded into Matroska (WebM holds no H.264): ffprobe reads
/// H.264 and Opus, ffmpeg decodes it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h264_publisher_is_recorded_into_a_matroska_file_that_plays() {
    assert_isolated_network();
    let root = tempfile::tempdir().unwrap();
    let node = recording_node(root.path()).await;
    let (user, agent) = call_pages(&node, "kyc-h264", "&codec=H264", "");
    wait_until(
        "the agent decoding the user's H.264",
        Duration::from_secs(90),
        &[&user, &agent],
        || decoding(&agent),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(agent);
    drop(user);

    let run = sealed_run(root.path(), "kyc-h264").await;
    assert_eq!(verify(&run, None).faults, vec![]);
    let file = run.join("media/user-alice.mkv");
    let (codecs, duration) = probe(&file);
    assert_eq!(codecs, ["h264", "opus"], "{}", file.display());
    assert!(duration > 4.0, "{duration:.2} s");
    decodes_cleanly(&file);
}

/// A `meridian serve` process recording to `root`, on `port`.
fn serve_recording(root: &Path, port: u16) -> std::process::Child {
    let cfg = root.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[node]
region = "test"
latitude = 19.0
longitude = 72.8
{sections}[recording]
enabled = true
dir = "{}"
signing_key_file = "{}"
create_signing_key = true
"#,
            root.join("recordings").display(),
            root.join("node.key").display(),
            sections = serve_sections(port),
        ),
    )
    .unwrap();
    serve_process(&cfg, &root.join(format!("node-{port}.log")))
}

async fn until_listening(root: &Path, port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the node did not listen on {port} within 10 s: {}",
        std::fs::read_to_string(root.join(format!("node-{port}.log"))).unwrap_or_default()
    );
}

/// The pts (ms) of the first and last packets ffprobe reads in `file`.
fn packet_span(file: &Path) -> (u64, u64) {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "packet=pts",
            "-of",
            "csv=p=0",
        ])
        .arg(file)
        .output()
        .unwrap();
    let pts: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    (
        pts.iter().copied().min().unwrap_or(0),
        pts.iter().copied().max().unwrap_or(0),
    )
}

/// A node killed with SIGKILL in the middle of a recorded call leaves media files that play
/// up to the crash and an audit log whose chain holds up to its last complete entry; started
/// again, it seals the session as interrupted, and the sealed folder verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_recording_leaves_playable_files_and_seals_them_as_interrupted() {
    assert_isolated_network();
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut node = serve_recording(root.path(), port);
    until_listening(root.path(), port).await;
    let day = Duration::from_secs(3600);
    let page = |role: &str, user: &str, r: Role| {
        let t = token("kyc-killed", user, r, day);
        format!("http://127.0.0.1:{port}/demo/{role}.html#token={t}")
    };
    let user = Browser::open(&page("user", "alice", Role::User));
    let agent = Browser::open(&page("agent", "bob", Role::Agent));
    both_decoding(
        "the user and the agent decoding each other",
        90,
        &user,
        &agent,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    node.kill().unwrap(); // SIGKILL
    node.wait().unwrap();
    drop(agent);
    drop(user);

    let run = runs(root.path(), "kyc-killed")
        .pop()
        .expect("a session folder");
    assert!(!run.join(MANIFEST).exists(), "not sealed by a killed node");
    let chain =
        meridian::compliance::audit::verify_chain(&std::fs::read(run.join("audit.jsonl")).unwrap());
    let cut_last = matches!(
        chain.faults.as_slice(),
        [meridian::compliance::audit::ChainFault::Incomplete { .. }]
    );
    assert!(
        chain.faults.is_empty() || cut_last,
        "the chain holds up to its last complete entry: {:?}",
        chain.faults
    );
    let files = media_files(&run);
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        let (codecs, _) = probe(f);
        assert_eq!(codecs, ["opus", "vp8"], "{}", f.display());
        let (first, last) = packet_span(f);
        // Six seconds of call after both decoded; whole clusters up to about a second (and
        // the writer's two-second reordering wait) before the kill.
        assert!(
            last - first >= 2500,
            "{} plays {first}..{last} ms",
            f.display()
        );
        decodes_cleanly(f);
    }

    let mut again = serve_recording(root.path(), port);
    until_listening(root.path(), port).await;
    // SAFETY: sends SIGTERM to the child started above.
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    again.wait().unwrap();
    let key = parse_public_key(root.path().join("node.pub.pem").to_str().unwrap()).unwrap();
    let v = verify(&run, Some(&key));
    assert_eq!(v.faults, vec![], "{}", run.display());
    let m = v.manifest.unwrap();
    assert_eq!(m.status, SealStatus::Interrupted);
    for f in &files {
        let rel = format!("media/{}", f.file_name().unwrap().to_string_lossy());
        assert!(m.files.iter().any(|e| e.path == rel), "{rel} sealed");
    }
    assert_eq!(audit(&run).last().unwrap()["event"], "session_interrupted");
}

/// Every file under `dir` (none when it does not exist).
/// A KYC call between a user on the India node (VP8 simulcast + Opus) and an agent on the US
/// node (VP8 + Opus), residency India: India alone keeps the sealed folder, with both
/// participants' files (the agent's media piped in from the US) and the agent's arrival as
/// the US node relayed it; the US and Europe nodes write nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_region_call_is_recorded_in_its_residency_region_only() {
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let nodes = recording_mesh(&root).await;
    let (india, us) = (&nodes[0], &nodes[2]);
    let page = |node: &Node, role: &str, user: &str, r: Role, opts: &str| {
        let t = signer()
            .mint_with(
                &"kyc-residency".parse().unwrap(),
                &user.parse().unwrap(),
                r,
                Duration::from_secs(3600),
                meridian::auth::RecordingClaims {
                    rec: Some(true),
                    residency: Some("india".into()),
                    profile: None,
                },
            )
            .unwrap();
        format!("{}/demo/{role}.html#token={t}{opts}", node.http_url())
    };
    let user = Browser::open(&page(india, "user", "alice", Role::User, "&simulcast=1"));
    let agent = Browser::open(&page(us, "agent", "bob", Role::Agent, ""));
    both_decoding(
        "the user in India and the agent in the US decoding each other",
        90,
        &user,
        &agent,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop(agent);
    drop(user);

    let session = root.join("rec-india/recordings/kyc-residency");
    let mut run = None;
    for _ in 0..100 {
        run = std::fs::read_dir(&session)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|r| r.join(MANIFEST).exists());
        if run.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = run.expect("India seals the session");
    let key = parse_public_key(root.join("india.pub.pem").to_str().unwrap()).unwrap();
    assert_eq!(verify(&run, Some(&key)).faults, vec![]);
    let names: Vec<String> = media_files(&run)
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["agent-bob.webm", "user-alice.webm"]);
    for f in media_files(&run) {
        let (codecs, duration) = probe(&f);
        assert_eq!(codecs, ["opus", "vp8"], "{}", f.display());
        assert!(duration > 4.0, "{}: {duration:.2} s", f.display());
        decodes_cleanly(&f);
    }
    let entries = audit(&run);
    let bob = entries
        .iter()
        .find(|e| e["event"] == "participant_joined" && e["user"] == "bob")
        .expect("the agent's arrival, relayed");
    assert_eq!(
        (bob["region"].as_str(), bob["node"].as_str()),
        (Some("us"), Some("us-1"))
    );
    assert!(entries
        .iter()
        .any(|e| e["event"] == "participant_left" && e["user"] == "bob"));
    for region in ["us", "europe"] {
        // Nothing but the node's own (empty) session database.
        let dir = root.join(format!("rec-{region}/recordings"));
        let written = written_besides_database(&root, region);
        assert_eq!(written, Vec::<PathBuf>::new(), "{region} wrote nothing");
        let db = meridian::compliance::db::SessionDb::open(&format!(
            "sqlite://{}",
            dir.join("sessions.db").display()
        ))
        .await
        .unwrap();
        assert_eq!(
            db.list(10).await.unwrap(),
            vec![],
            "{region} indexed nothing"
        );
    }
    let db = meridian::compliance::db::SessionDb::open(&format!(
        "sqlite://{}",
        root.join("rec-india/recordings/sessions.db").display()
    ))
    .await
    .unwrap();
    let runs = db.show("kyc-residency").await.unwrap();
    let mut regions: Vec<&str> = runs[0]
        .participant_list
        .iter()
        .map(|p| p.region.as_str())
        .collect();
    regions.sort();
    assert_eq!(regions, ["india", "us"], "India indexes both participants");
}

/// India (two nodes) and the US, each node recording under `root/rec-<node>`.
async fn two_india_nodes_and_us(root: &Path) -> Vec<Node> {
    let keys = root.to_path_buf();
    routed_mesh_of(
        root,
        &[
            ("india-1".into(), ("india", 19.076, 72.8777)),
            ("india-2".into(), ("india", 19.076, 72.8777)),
            ("us-1".into(), ("us", 39.0, -77.5)),
        ],
        move |cfg| {
            let node = cfg.node.id.clone().unwrap().to_string();
            cfg.recording.enabled = true;
            cfg.recording.dir = keys.join(format!("rec-{node}")).join("recordings");
            cfg.recording.signing_key_file = Some(keys.join(format!("sign-{node}.key")));
            cfg.recording.create_signing_key = true;
        },
    )
    .await
}

/// A participant of `session` recorded in `residency`, joined on `node`.
async fn join_recorded(
    node: &Node,
    session: &str,
    user: &str,
    role: Role,
    residency: &str,
) -> Signal {
    let t = signer()
        .mint_with(
            &session.parse().unwrap(),
            &user.parse().unwrap(),
            role,
            Duration::from_secs(600),
            meridian::auth::RecordingClaims {
                rec: Some(true),
                residency: Some(residency.into()),
                profile: None,
            },
        )
        .unwrap();
    Signal::connect(node).await.join_with(&t).await.0
}

/// Bytes of the session's media files under `recordings` (any run).
fn media_bytes(recordings: &Path, session: &str) -> u64 {
    runs(&recordings.join(".."), session)
        .iter()
        .flat_map(|r| media_files(r))
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// The node recording a session (India's first node) leaves the mesh mid-call: the call goes
/// on, and its recording continues on India's other node, whose sealed log says where the
/// recording was lost and holds both participants and the published video from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_node_lost_mid_call_is_continued_in_its_residency_region_with_the_gap_logged() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut nodes = two_india_nodes_and_us(&root).await;
    let us = &nodes[2];
    let session = "kyc-continued";
    let mut user = join_recorded(us, session, "cust-1", Role::User, "india").await;
    let (producer, _publisher, _p) = publish_as(&mut user, TestCodec::Vp8).await;
    let mut agent = join_recorded(us, session, "agent-1", Role::Agent, "india").await;
    let (watched, _s) =
        subscribe_as(&mut agent, &producer, TestCodec::Vp8, PeerState::default()).await;
    let first = root.join("rec-india-1/recordings");
    let second = root.join("rec-india-2/recordings");
    wait_for(
        "India's first node records the video",
        Duration::from_secs(10),
        || media_bytes(&first, session) > 5_000,
    )
    .await;
    assert!(
        runs(&second.join(".."), session).is_empty(),
        "one recorder at a time"
    );

    // India's first node goes away (its process would be gone: its pipes close).
    drop(nodes.remove(0));
    wait_for(
        "India's second node records the video",
        Duration::from_secs(15),
        || media_bytes(&second, session) > 5_000,
    )
    .await;
    let received = watched.received.lock().unwrap().len();
    wait_for(
        "the agent still receives video",
        Duration::from_secs(5),
        || watched.received.lock().unwrap().len() > received + 20,
    )
    .await;
    assert!(
        !agent
            .events
            .iter()
            .chain(user.events.iter())
            .any(|e| e["type"] == "error"),
        "nobody was told of an error: {:?} {:?}",
        agent.events,
        user.events
    );

    user.send_text(r#"{"type":"leave"}"#).await;
    agent.send_text(r#"{"type":"leave"}"#).await;
    let run = sealed_run(&second.join(".."), session).await;
    let key = parse_public_key(root.join("sign-india-2.pub.pem").to_str().unwrap()).unwrap();
    assert_eq!(verify(&run, Some(&key)).faults, vec![]);
    let entries = audit(&run);
    let resumed: Vec<&Value> = entries
        .iter()
        .filter(|e| e["event"] == "recording_resumed")
        .collect();
    assert_eq!(resumed.len(), 2, "one per participant: {entries:?}");
    assert!(
        resumed.iter().all(|e| e["previous_node"] == "india-1"),
        "{resumed:?}"
    );
    for user in ["cust-1", "agent-1"] {
        assert!(
            entries
                .iter()
                .any(|e| e["event"] == "participant_joined" && e["user"] == user),
            "{user} in the continued log: {entries:?}"
        );
    }
    assert!(
        entries
            .iter()
            .any(|e| e["event"] == "producer_started" && e["producer"] == producer.as_str()),
        "the video that was already flowing: {entries:?}"
    );
    assert!(!media_files(&run).is_empty());
}

/// When the lost recording node was the last of the session's residency region, the session
/// may not go on unrecorded: its participants are closed with `recording_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_residency_region_is_lost_ends_with_recording_failed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut nodes = two_india_nodes_and_us(&root).await;
    let mut agent = join_recorded(&nodes[2], "kyc-orphaned", "agent-1", Role::Agent, "us").await;
    // Recorded on US itself: losing India changes nothing for it.
    let mut user = join_recorded(&nodes[2], "kyc-india", "cust-1", Role::User, "india").await;
    drop(nodes.remove(0));
    drop(nodes.remove(0));
    let (seen, close) = user.until_closed().await;
    let error = seen
        .iter()
        .find(|m| m["type"] == "error")
        .expect("told why");
    assert_eq!(error["code"], "recording_failed", "{seen:?}");
    assert!(close.is_some());
    // The session recorded on the US goes on.
    let us = &nodes[0];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        us.workers
            .stats()
            .participants
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the agent of the session recorded on the US is still there"
    );
    agent.send_text(r#"{"type":"leave"}"#).await;
}
