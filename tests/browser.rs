//! Real browsers through Meridian: headless Chromium publishes a fake camera from the user
//! page and the agent page, and each decodes the other's video.

mod common;

use std::time::{Duration, Instant};

use common::browser::*;
use common::*;
use meridian::auth::Role;

fn page(node: &meridian::node::Node, role: &str, token: &str, extra: &str) -> String {
    format!("{}/demo/{role}.html#token={token}{extra}", node.http_url())
}

async fn wait_until(
    what: &str,
    within: Duration,
    browsers: &[&Browser],
    mut cond: impl FnMut() -> bool,
) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > within {
            let t: Vec<String> = browsers.iter().map(|b| b.transcript()).collect();
            panic!(
                "timed out waiting for {what}; browser reports:\n{}",
                t.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_agent_pages_decode_each_others_video() {
    assert_isolated_network();
    let node = start_node().await;
    let day = Duration::from_secs(3600);
    let user = Browser::open(&page(
        &node,
        "user",
        &token("kyc-browser", "alice", Role::User, day),
        "",
    ));
    let agent = Browser::open(&page(
        &node,
        "agent",
        &token("kyc-browser", "bob", Role::Agent, day),
        "",
    ));

    let decoding = |b: &Browser| {
        let r = b.reports("STATS");
        // Frames decoded, and still rising between the last two reports.
        r.len() >= 2
            && video_frames(&r[r.len() - 1]) > video_frames(&r[r.len() - 2])
            && video_frames(&r[r.len() - 1]) >= 30
    };
    wait_until(
        "both pages decoding each other's video",
        Duration::from_secs(90),
        &[&user, &agent],
        || decoding(&user) && decoding(&agent),
    )
    .await;
    let stats = node.worker.stats();
    assert!(
        stats
            .rtp_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_consumer_gets_low_layer_then_high_after_the_cap_is_lifted() {
    assert_isolated_network();
    let node = start_node().await;
    let day = Duration::from_secs(3600);
    let user = Browser::open(&page(
        &node,
        "user",
        &token("kyc-sim", "alice", Role::User, day),
        "&simulcast=1",
    ));
    let agent = Browser::open(&page(
        &node,
        "agent",
        &token("kyc-sim", "bob", Role::Agent, day),
        "&maxLayer=0&liftAfterFrames=60",
    ));

    wait_until(
        "the capped consumer decoding the low layer",
        Duration::from_secs(90),
        &[&user, &agent],
        || agent.reports("STATS").iter().any(|r| video_frames(r) >= 30),
    )
    .await;
    let low: Vec<u64> = agent
        .reports("STATS")
        .iter()
        .filter(|r| video_frames(r) > 0)
        .map(video_width)
        .collect();
    assert!(
        low.iter().all(|&w| w > 0 && w <= 400),
        "while capped at layer 0 the width stays at the low layer's (1280/4): {low:?}"
    );
    wait_until(
        "the lifted consumer decoding the high layer",
        Duration::from_secs(90),
        &[&user, &agent],
        || {
            !agent.reports("LIFTED").is_empty()
                && agent
                    .reports("STATS")
                    .iter()
                    .any(|r| video_width(r) >= 1000)
        },
    )
    .await;
}
