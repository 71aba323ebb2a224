//! A node's death in the middle of a call: the India node runs as its own `meridian serve`
//! process and is killed with SIGKILL while a Chromium user (placed in Mumbai) talks to a
//! Chromium agent on the US node. The user's SDK moves to the next nearest healthy edge
//! (Europe), publishes again and subscribes again; both pages decode again. The recovery
//! time is measured and printed; afterwards no pipe, session, participant, producer or
//! consumer is left behind on the surviving nodes.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::browser::*;
use common::*;

/// The documented bound (docs/operations.md#node-failure) the test holds the SDK to.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);

/// `meridian serve` for india-1 (Mumbai), dialing `peers`, with the cluster files `f`.
fn serve_india(
    dir: &Path,
    port: u16,
    f: &meridian::mesh::tls::NodeFiles,
    peers: &[std::net::SocketAddr],
) -> std::process::Child {
    let cfg = dir.join("india-1.toml");
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    std::fs::write(
        &cfg,
        format!(
            r#"
[node]
region = "india"
id = "india-1"
latitude = 19.076
longitude = 72.8777
{sections}[routing]
default_region = "europe"
[mesh]
listen = "127.0.0.1:0"
peers = [{}]
ca_file = "{}"
cert_file = "{}"
key_file = "{}"
"#,
            peers.join(", "),
            f.ca_file.display(),
            f.cert_file.display(),
            f.key_file.display(),
            sections = serve_sections(port),
        ),
    )
    .unwrap();
    serve_process(&cfg, &dir.join("india-1.log"))
}

/// Every video consumer a page has reported.
fn video_consumers(b: &Browser) -> std::collections::HashSet<String> {
    b.reports("STATS")
        .iter()
        .filter_map(|r| r["consumers"].as_object().cloned())
        .flat_map(|m| {
            m.into_iter()
                .filter(|(_, c)| c["kind"] == "video")
                .map(|(id, _)| id)
        })
        .collect()
}

/// The page decodes video on a consumer it did not have in `old`: 30 frames or more, and
/// rising between its last two reports.
fn decoding_anew(b: &Browser, old: &std::collections::HashSet<String>) -> bool {
    let frames = |r: &serde_json::Value| {
        r["consumers"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(id, c)| !old.contains(*id) && c["kind"] == "video")
                    .filter_map(|(_, c)| c["framesDecoded"].as_u64())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let r = b.reports("STATS");
    r.len() >= 2
        && frames(&r[r.len() - 1]) > frames(&r[r.len() - 2])
        && frames(&r[r.len() - 1]) >= 30
}

fn figures(n: &meridian::node::Node) -> [u64; 4] {
    let s = n.workers.stats();
    [
        s.sessions.load(Relaxed),
        s.participants.load(Relaxed),
        s.producers.load(Relaxed),
        s.consumers.load(Relaxed),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_is_back_in_media_on_the_next_edge_after_their_node_is_killed() {
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<meridian::ids::NodeId> = ["europe-1", "us-1", "india-1"]
        .iter()
        .map(|i| i.parse().unwrap())
        .collect();
    let mut files = meridian::mesh::tls::write_cluster(dir.path(), &ids).unwrap();
    let india_files = files.pop().unwrap();
    let us_files = files.pop().unwrap();
    let europe_files = files.pop().unwrap();
    let europe =
        meridian::node::Node::start(mesh_config("europe-1", SITES[1], europe_files, vec![]))
            .await
            .unwrap();
    let europe_mesh = europe.mesh.as_ref().unwrap().local_addr;
    let us =
        meridian::node::Node::start(mesh_config("us-1", SITES[2], us_files, vec![europe_mesh]))
            .await
            .unwrap();
    let us_mesh = us.mesh.as_ref().unwrap().local_addr;
    let india_port = free_port();
    let mut india = serve_india(
        dir.path(),
        india_port,
        &india_files,
        &[europe_mesh, us_mesh],
    );
    let log = || std::fs::read_to_string(dir.path().join("india-1.log")).unwrap_or_default();
    for _ in 0..200 {
        if europe.members().len() == 3 && us.members().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(us.members().len(), 3, "India joined the mesh: {}", log());

    // The user is in Mumbai and asks the US node for an edge: India. The agent joins the US
    // node directly.
    let (_mumbai, user, agent) =
        mumbai_user_and_agent(&us, &us, "kyc-failover", "127.1.0.9".parse().unwrap()).await;
    assert_eq!(
        user.reports("EDGE")[0]["node"],
        "india-1",
        "{}",
        user.transcript()
    );
    india.kill().unwrap(); // SIGKILL
    india.wait().unwrap();
    let killed = Instant::now();
    let (user_old, agent_old) = (video_consumers(&user), video_consumers(&agent));
    let (mut user_back, mut agent_back) = (None, None);
    while killed.elapsed() < Duration::from_secs(60)
        && (user_back.is_none() || agent_back.is_none())
    {
        if user_back.is_none() && decoding_anew(&user, &user_old) {
            user_back = Some(killed.elapsed());
        }
        if agent_back.is_none() && decoding_anew(&agent, &agent_old) {
            agent_back = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (Some(user_back), Some(agent_back)) = (user_back, agent_back) else {
        panic!(
            "not back in media within 60 s (user {user_back:?}, agent {agent_back:?}):\n{}\n---\n{}",
            user.transcript(),
            agent.transcript()
        );
    };
    let states = user.reports("SIGNALING");
    let moved = states
        .iter()
        .find(|r| r["state"] == "reconnected")
        .cloned()
        .unwrap_or_default();
    println!(
        "node failure: user decoding again after {:.1} s, agent after {:.1} s (SIGKILL of india-1; user moved to {})",
        user_back.as_secs_f64(),
        agent_back.as_secs_f64(),
        moved["node"]
    );
    assert_eq!(moved["failover"], true, "{states:?}");
    assert_eq!(
        moved["node"], "europe-1",
        "the next nearest edge to Mumbai: {states:?}"
    );
    assert!(
        user_back.max(agent_back) < RECOVERY_BOUND,
        "recovered in {user_back:?} / {agent_back:?}"
    );

    // The dead node is dropped everywhere; when the call ends, nothing is left behind.
    wait_for(
        "india-1 dropped from the mesh",
        Duration::from_secs(15),
        || {
            [&europe, &us].iter().all(|n| {
                n.members().len() == 2
                    && n.mesh
                        .as_ref()
                        .unwrap()
                        .pipes()
                        .iter()
                        .all(|p| p.node.as_str() != "india-1")
            })
        },
    )
    .await;
    drop(user);
    drop(agent);
    wait_for(
        "no state left on the surviving nodes",
        Duration::from_secs(40),
        || figures(&europe) == [0; 4] && figures(&us) == [0; 4],
    )
    .await;
}
