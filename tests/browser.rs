//! Real browsers through Meridian: headless Chromium publishes a fake camera from the user
//! page and the agent page, and each decodes the other's video.

mod common;

use std::time::Duration;

use common::browser::*;
use common::*;
use meridian::auth::Role;
use serde_json::Value;

/// Opens the user page and the agent page of `session` in two browser processes; `user_opts`
/// and `agent_opts` are appended to each page's URL fragment.
fn open_pair(
    node: &meridian::node::Node,
    session: &str,
    user_opts: &str,
    agent_opts: &str,
) -> (Browser, Browser) {
    open_pair_across(node, node, session, user_opts, agent_opts)
}

/// The user page on `user_node` and the agent page on `agent_node`.
fn open_pair_across(
    user_node: &meridian::node::Node,
    agent_node: &meridian::node::Node,
    session: &str,
    user_opts: &str,
    agent_opts: &str,
) -> (Browser, Browser) {
    let day = Duration::from_secs(3600);
    let url = |role: &str, user: &str, r: Role, opts: &str| {
        let t = token(session, user, r, day);
        let node = if r == Role::User {
            user_node
        } else {
            agent_node
        };
        format!("{}/demo/{role}.html#token={t}{opts}", node.http_url())
    };
    (
        Browser::open(&url("user", "alice", Role::User, user_opts)),
        Browser::open(&url("agent", "bob", Role::Agent, agent_opts)),
    )
}

/// The page lifted its layer cap and has since decoded the high layer.
fn decodes_high_layer_after_lift(b: &Browser) -> bool {
    !b.reports("LIFTED").is_empty() && b.reports("STATS").iter().any(|r| video_width(r) >= 1000)
}

/// The simulcast tests measure layer choice, which follows the estimated capacity: they run
/// alone (write), the other browser tests two at a time (read).
static LOAD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Waits until both pages decode the other's video.
async fn both_decoding(what: &str, user: &Browser, agent: &Browser) {
    wait_until(what, Duration::from_secs(90), &[user, agent], || {
        decoding(user) && decoding(agent)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_agent_pages_decode_each_others_video() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let node = start_node().await;
    let (user, agent) = open_pair(&node, "kyc-browser", "", "");

    both_decoding("both pages decoding each other's video", &user, &agent).await;
    let stats = node.workers.stats();
    assert!(
        stats
            .rtp_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // Both pages' SDKs report what they experience (every 5 s): the node's client metrics
    // show each role's summaries, a first-frame time and a decoded picture height.
    let sample = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let labels = |role: &str| {
        format!(
            "{{region=\"{}\",node=\"{}\",role=\"{role}\"}}",
            node.region, node.id
        )
    };
    let mut text = String::new();
    for _ in 0..60 {
        text = metrics(&node).await;
        let ok = ["user", "agent"].iter().all(|role| {
            sample(
                &text,
                &format!("meridian_client_reports_total{}", labels(role)),
            ) >= 1.0
                && sample(
                    &text,
                    &format!("meridian_client_first_frame_seconds_count{}", labels(role)),
                ) >= 1.0
                && sample(
                    &text,
                    &format!("meridian_client_frames_decoded_total{}", labels(role)),
                ) > 0.0
        });
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for role in ["user", "agent"] {
        let l = labels(role);
        assert!(
            sample(&text, &format!("meridian_client_reports_total{l}")) >= 1.0,
            "{role} reported:\n{text}"
        );
        assert!(
            sample(
                &text,
                &format!("meridian_client_first_frame_seconds_count{l}")
            ) >= 1.0,
            "{role} first frame:\n{text}"
        );
        assert!(
            sample(&text, &format!("meridian_client_frames_decoded_total{l}")) > 0.0,
            "{role} frames:\n{text}"
        );
        assert!(
            sample(
                &text,
                &format!("meridian_client_frame_height_pixels_count{l}")
            ) >= 1.0,
            "{role} height:\n{text}"
        );
    }
    assert_eq!(
        node.metrics.errors("bad_stats"),
        0,
        "the SDK's summaries are in range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_consumer_gets_low_layer_then_high_after_the_cap_is_lifted() {
    // Two 720p simulcast pairs at once starve two cores: alone.
    let _load = LOAD.write().await;
    assert_isolated_network();
    let node = start_node().await;
    let (user, agent) = open_pair(
        &node,
        "kyc-sim",
        "&simulcast=1",
        "&maxLayer=0&liftAfterFrames=60",
    );

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
        || decodes_high_layer_after_lift(&agent),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_in_india_and_agent_in_us_decode_each_other_through_the_pipe() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_mesh(dir.path(), &["india", "us"]).await;
    let (user, agent) = open_pair_across(&nodes[0], &nodes[1], "kyc-cross", "", "");
    both_decoding(
        "both pages decoding each other's video across regions",
        &user,
        &agent,
    )
    .await;
    for (from, to) in [(&nodes[0], &nodes[1]), (&nodes[1], &nodes[0])] {
        assert!(
            pipe_to(from, to).datagrams_out > 100,
            "media crossed {} → {}",
            from.id,
            to.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_region_call_keeps_decoding_over_a_long_lossy_link() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let (india, link, us) = pair_over_link(dir.path(), long_lossy_link()).await;
    let (user, agent) = open_pair_across(&india, &us, "kyc-lossy-browser", "", "");
    let frames = |b: &Browser| b.reports("STATS").last().map(video_frames).unwrap_or(0);
    wait_until(
        "both pages decoding over the lossy link",
        Duration::from_secs(90),
        &[&user, &agent],
        || frames(&user) >= 30 && frames(&agent) >= 30,
    )
    .await;
    let (n_user, n_agent) = (user.reports("STATS").len(), agent.reports("STATS").len());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let repaired = pipe_to(&india, &us).retransmitted + pipe_to(&us, &india).retransmitted;
    // Frames decoded in each one-second report over the window: a call that froze on a lost
    // packet until the next keyframe would show seconds with nothing decoded.
    let per_second = |b: &Browser, from: usize| -> Vec<u64> {
        let r: Vec<u64> = b.reports("STATS")[from..]
            .iter()
            .map(video_frames)
            .collect();
        r.windows(2).map(|w| w[1].saturating_sub(w[0])).collect()
    };
    let (u, a) = (per_second(&user, n_user), per_second(&agent, n_agent));
    println!(
        "frames decoded per second on a 100 ms / 2% link: user {u:?}, agent {a:?}; link dropped {}, pipes resent {repaired}",
        link.stats.dropped.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(u.len() >= 4 && a.len() >= 4);
    assert!(
        u.iter().chain(&a).all(|&f| f >= 5),
        "no second without decoded video: user {u:?}, agent {a:?}"
    );
    assert!(
        link.stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// Bits per second the pipe from `from` to `to` carries, over `window`.
async fn pipe_bitrate(
    from: &meridian::node::Node,
    to: &meridian::node::Node,
    window: Duration,
) -> f64 {
    let b0 = pipe_to(from, to).bytes_out;
    tokio::time::sleep(window).await;
    (pipe_to(from, to).bytes_out - b0) as f64 * 8.0 / window.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_simulcast_layers_remote_consumers_need_cross_the_pipe() {
    // Two 720p simulcast pairs at once starve two cores: alone.
    let _load = LOAD.write().await;
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_mesh(dir.path(), &["india", "us"]).await;
    let (india, us) = (&nodes[0], &nodes[1]);
    // The user on India publishes three layers; the agent on US starts capped at the lowest.
    let (user, agent) = open_pair_across(
        india,
        us,
        "kyc-sim-cross",
        "&simulcast=1",
        "&maxLayer=0&liftAfterFrames=150",
    );
    wait_until(
        "the US agent decoding the low layer",
        Duration::from_secs(90),
        &[&user, &agent],
        || agent.reports("STATS").iter().any(|r| video_frames(r) >= 60),
    )
    .await;
    // Still capped (the lift comes at 150 frames): measure what crosses.
    let capped = pipe_bitrate(india, us, Duration::from_secs(2)).await;
    let widths: Vec<u64> = agent
        .reports("STATS")
        .iter()
        .map(video_width)
        .filter(|&w| w > 0)
        .collect();
    assert!(
        widths.iter().all(|&w| w <= 400),
        "capped consumer sees the low layer: {widths:?}"
    );
    wait_until(
        "the US agent decoding the high layer after the lift",
        Duration::from_secs(90),
        &[&user, &agent],
        || decodes_high_layer_after_lift(&agent),
    )
    .await;
    // The best of a few windows: a publisher starved of CPU for a moment (two browser tests
    // share two cores) sends little in any one window, whatever the node forwards.
    let mut lifted = 0f64;
    for _ in 0..5 {
        lifted = lifted.max(pipe_bitrate(india, us, Duration::from_secs(2)).await);
        if capped * 2.5 < lifted {
            break;
        }
    }
    println!(
        "India→US pipe: {:.0} kbit/s capped at layer 0, {:.0} kbit/s after the lift",
        capped / 1e3,
        lifted / 1e3
    );
    assert!(
        capped * 2.5 < lifted,
        "only the low layer crossed while capped: {capped:.0} b/s capped vs {lifted:.0} b/s lifted; browser reports:\n{}\n---\n{}",
        user.transcript(),
        agent.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_tcp_carries_the_call_when_the_node_offers_no_udp() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.rtc.udp = false;
    let node = meridian::node::Node::start(cfg).await.unwrap();
    let (user, agent) = open_pair(&node, "kyc-tcp", "", "");
    both_decoding("both pages decoding over TCP", &user, &agent).await;
    let stats = node.workers.stats();
    assert!(
        stats
            .tcp_frames_in
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100
    );
    assert_eq!(
        stats
            .datagrams_in
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no UDP at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_user_and_chromium_agent_decode_each_others_video() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let node = start_node().await;
    let day = Duration::from_secs(3600);
    let url = |role: &str, user: &str, r: Role| {
        let t = token("kyc-firefox", user, r, day);
        format!("{}/demo/{role}.html#token={t}", node.http_url())
    };
    let user = Browser::firefox(&url("user", "alice", Role::User));
    let agent = Browser::open(&url("agent", "bob", Role::Agent));
    both_decoding(
        "Firefox and Chromium decoding each other's video",
        &user,
        &agent,
    )
    .await;
    // What each browser decodes was encrypted by Meridian in place, with its own sender
    // reports (`sfu::egress`), not by rtc's sender.
    assert_eq!(
        metric_sum(&node, "meridian_srtp_in_place_connections_total").await,
        2.0,
        "both subscribe connections encrypted in place"
    );
    assert_eq!(
        metric_sum(&node, "meridian_srtp_fallback_connections_total").await,
        0.0
    );
    assert!(metric_sum(&node, "meridian_sender_reports_total").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_follows_the_edge_answer_to_the_nearest_node_from_any_node() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let dir = tempfile::tempdir().unwrap();
    let nodes = routed_mesh(dir.path(), |_| {}).await;
    let (india, europe, us) = (&nodes[0], &nodes[1], &nodes[2]);
    // The user's browser reaches the nodes through a SOCKS proxy whose connections leave from
    // 127.1.0.7: the development GeoIP table puts that address in Mumbai.
    let mumbai = common::socks::SocksProxy::start("127.1.0.7".parse().unwrap()).await;
    let day = Duration::from_secs(3600);
    let session = "kyc-routed";
    let user_url = format!(
        "{}/demo/user.html#token={}&route=1",
        us.http_url(),
        token(session, "alice", Role::User, day)
    );
    let user = Browser::open_with(
        &user_url,
        &[
            format!("--proxy-server=socks5://{}", mumbai.addr),
            // Chromium never proxies loopback unless told to.
            "--proxy-bypass-list=<-loopback>".into(),
        ],
    );
    // The agent has no place (127.0.0.1): the default region, Europe, whichever node it asks.
    let agent_url = format!(
        "{}/demo/agent.html#token={}&route=1",
        india.http_url(),
        token(session, "bob", Role::Agent, day)
    );
    let agent = Browser::open(&agent_url);
    wait_until(
        "both pages routed",
        Duration::from_secs(30),
        &[&user, &agent],
        || !user.reports("EDGE").is_empty() && !agent.reports("EDGE").is_empty(),
    )
    .await;
    let u = &user.reports("EDGE")[0];
    assert_eq!(
        (u["node"].as_str(), u["reason"].as_str()),
        (Some("india-1"), Some("nearest")),
        "asked US, placed in Mumbai: India"
    );
    let a = &agent.reports("EDGE")[0];
    assert_eq!(
        (a["node"].as_str(), a["reason"].as_str()),
        (Some("europe-1"), Some("default")),
        "asked India, no place: the default region"
    );
    // Joined where routed, and the call works across the pipe.
    both_decoding("user (India) and agent (Europe) decoding", &user, &agent).await;
    let participants = |n: &meridian::node::Node| {
        n.workers
            .stats()
            .participants
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(participants(india), 1);
    assert_eq!(participants(europe), 1);
    assert_eq!(participants(us), 0);
}

#[test]
fn console_lines_of_both_browsers_parse() {
    let chrome = r#"[1:2:INFO:CONSOLE(41)] "MERIDIAN_STATS {"role":"agent"}", source: http://127.0.0.1:1/demo/demo.js (41)"#;
    assert_eq!(parse_console(chrome).unwrap().1["role"], "agent");
    let firefox = r#"console.log: "MERIDIAN_STATS {\"role\":\"user\"}""#;
    assert_eq!(parse_console(firefox).unwrap().1["role"], "user");
}

/// The newest consumer of `kind` the page subscribed to, and its frames/samples so far.
fn newest_consumer(b: &Browser, kind: &str) -> Option<String> {
    b.reports("SUBSCRIBED")
        .iter()
        .rev()
        .find(|r| r["kind"] == kind)
        .and_then(|r| r["consumerId"].as_str().map(str::to_owned))
}

fn consumer_field(b: &Browser, consumer: &str, field: &str) -> u64 {
    b.reports("STATS")
        .last()
        .and_then(|r| r["consumers"][consumer][field].as_u64())
        .unwrap_or(0)
}

/// The user reloads (a new connection with the same token), then closes the page for good:
/// the agent decodes the new video, then is shown that the user left.
async fn rejoin_and_leave(firefox_agent: bool) {
    assert_isolated_network();
    let node = start_node().await;
    let day = Duration::from_secs(3600);
    let session = if firefox_agent {
        "kyc-rejoin-ff"
    } else {
        "kyc-rejoin"
    };
    let user_url = format!(
        "{}/demo/user.html#token={}",
        node.http_url(),
        token(session, "alice", Role::User, day)
    );
    let agent_url = format!(
        "{}/demo/agent.html#token={}",
        node.http_url(),
        token(session, "bob", Role::Agent, day)
    );
    let user = Browser::open(&user_url);
    let agent = if firefox_agent {
        Browser::firefox(&agent_url)
    } else {
        Browser::open(&agent_url)
    };
    both_decoding("the first call", &user, &agent).await;
    let first = newest_consumer(&agent, "video").unwrap();
    // The user reloads the page.
    drop(user);
    let user = Browser::open(&user_url);
    wait_until(
        "the agent decoding the rejoined user's new video",
        Duration::from_secs(60),
        &[&user, &agent],
        || {
            newest_consumer(&agent, "video")
                .is_some_and(|c| c != first && consumer_field(&agent, &c, "framesDecoded") >= 30)
        },
    )
    .await;
    let mids: Vec<String> = agent
        .reports("SUBSCRIBED")
        .iter()
        .filter_map(|r| r["mid"].as_str().map(str::to_owned))
        .collect();
    let mut unique = mids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        mids.len(),
        "every consumer on its own m-line: {mids:?}"
    );
    // The user closes the page: the agent is shown that they left.
    drop(user);
    wait_until(
        "the agent page showing that the user left",
        Duration::from_secs(15),
        &[&agent],
        || agent.reports("REMOTE").iter().any(|r| r["state"] == "left"),
    )
    .await;
    assert!(agent
        .reports("PRESENCE")
        .iter()
        .any(|r| r["event"] == "left" && r["userId"] == "alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_reloads_is_seen_again_and_one_who_leaves_is_shown_gone() {
    let _load = LOAD.read().await;
    rejoin_and_leave(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firefox_agent_sees_a_reloaded_user_again_and_is_shown_when_they_leave() {
    let _load = LOAD.read().await;
    rejoin_and_leave(true).await;
}

/// Both pages play each other's sound, the user's page fits a phone with a self-view large
/// enough to frame a document, and the agent's console shows readable figures.
async fn sound_and_phone_layout(firefox_user: bool) {
    assert_isolated_network();
    let node = start_node().await;
    let day = Duration::from_secs(3600);
    let session = if firefox_user {
        "kyc-phone-ff"
    } else {
        "kyc-phone"
    };
    let url = |role: &str, user: &str, r: Role| {
        format!(
            "{}/demo/{role}.html#token={}",
            node.http_url(),
            token(session, user, r, day)
        )
    };
    let user = Browser::phone(&url("user", "alice", Role::User), firefox_user);
    let agent = Browser::desktop(&url("agent", "bob", Role::Agent));
    both_decoding("phone user and agent decoding", &user, &agent).await;
    let hears = |b: &Browser| {
        let r = b.reports("STATS");
        let Some(last) = r.last() else { return false };
        let audio = last["consumers"]
            .as_object()
            .map(|m| {
                m.values().any(|c| {
                    c["kind"] == "audio" && c["totalSamplesReceived"].as_u64().unwrap_or(0) > 0
                })
            })
            .unwrap_or(false);
        let level = r.iter().any(|s| {
            s["consumers"].as_object().is_some_and(|m| {
                m.values()
                    .any(|c| c["kind"] == "audio" && c["audioLevel"].as_f64().unwrap_or(0.0) > 0.0)
            })
        });
        audio && level && last["remoteMuted"] == false
    };
    wait_until(
        "both pages playing the other's sound",
        Duration::from_secs(30),
        &[&user, &agent],
        || hears(&user) && hears(&agent),
    )
    .await;
    let layout = user.reports("LAYOUT");
    let l = layout.last().expect("the user page reports its layout");
    let (viewport, own) = (l["viewport"].as_u64().unwrap(), l["self"].as_u64().unwrap());
    assert!(viewport <= 520, "{l}");
    assert!(
        own * 100 >= viewport * 85,
        "the self-view fills the phone's width to frame an ID card: {l}"
    );
    assert!(l["remote"].as_u64().unwrap() * 2 <= own + 1, "{l}");
    let a = agent.reports("LAYOUT");
    let a = a.last().unwrap();
    assert!(
        a["remote"].as_u64().unwrap() > 2 * a["self"].as_u64().unwrap(),
        "the agent sees the customer large: {a}"
    );
    let video = newest_consumer(&agent, "video").unwrap();
    assert!(consumer_field(&agent, &video, "fps") > 0);
    assert!(consumer_field(&agent, &video, "kbps") > 0);
    // The node never called a transport disconnected during the call (consent is paced by
    // each browser; forwarding must not stall between checks).
    for b in [&user, &agent] {
        assert!(
            b.reports("TRANSPORT")
                .iter()
                .all(|t| t["state"] != "disconnected"),
            "{}",
            b.transcript()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_on_a_phone_and_the_agent_hear_each_other() {
    let _load = LOAD.read().await;
    sound_and_phone_layout(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_on_a_phone_and_the_agent_hear_each_other() {
    let _load = LOAD.read().await;
    sound_and_phone_layout(true).await;
}

/// Serves one HTML page on a port of its own (another origin than the node's).
async fn serve_page(html: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    html.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(html.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integrators_page_on_another_origin_imports_the_sdk_and_sees_producers_already_there() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let node = start_node().await;
    // The user publishes before the integrator's agent page joins.
    let (mut user, _) = Signal::join(&node, "kyc-cors", "alice", Role::User).await;
    let (_producer, publisher, _task) = publish_as(&mut user, TestCodec::Vp8).await;
    let node_url = node.http_url();
    // The README's example, with `url` instead of `route`; one agent per browser.
    let page = |agent: &str| {
        let token = token("kyc-cors", agent, Role::Agent, Duration::from_secs(600));
        format!(
            r#"<!doctype html><meta charset="utf-8"><body><script type="module">
import {{ MeridianClient }} from "{node_url}/sdk/meridian.js";
const client = new MeridianClient({{ url: "ws://{host}/v1/ws", token: "{token}" }});
const show = async (p) => {{
  const consumer = await client.subscribe(p.producerId, p.kind);
  console.log("MERIDIAN_TRACK " + JSON.stringify({{ kind: consumer.track.kind }}));
  // The Consumer object: close() ends it here and on the node.
  await new Promise((r) => setTimeout(r, 500));
  await consumer.close();
  console.log("MERIDIAN_CONSUMERCLOSED " + JSON.stringify({{ state: consumer.track.readyState }}));
}};
client.addEventListener("produceradded", (e) => show(e.detail));
const joined = await client.connect();
console.log("MERIDIAN_JOINED " + JSON.stringify({{ producers: joined.producers.length }}));
joined.producers.forEach(show);
</script>"#,
            host = node.signaling_addr,
        )
    };
    let (a, b) = (
        serve_page(page("bob")).await,
        serve_page(page("carol")).await,
    );
    assert_ne!(a.port(), node.signaling_addr.port());
    let chromium = Browser::open(&format!("http://{a}/"));
    let firefox = Browser::firefox(&format!("http://{b}/"));
    wait_until(
        "both browsers importing the SDK cross-origin and receiving the producer",
        Duration::from_secs(30),
        &[&chromium, &firefox],
        || {
            [&chromium, &firefox]
                .iter()
                .all(|b| b.reports("TRACK").iter().any(|t| t["kind"] == "video"))
        },
    )
    .await;
    for b in [&chromium, &firefox] {
        assert_eq!(b.reports("JOINED")[0]["producers"], 1);
    }
    wait_until(
        "both browsers closing their consumer",
        Duration::from_secs(30),
        &[&chromium, &firefox],
        || {
            [&chromium, &firefox].iter().all(|b| {
                b.reports("CONSUMERCLOSED")
                    .iter()
                    .any(|t| t["state"] == "ended")
            })
        },
    )
    .await;
    wait_for(
        "no consumer left on the node",
        Duration::from_secs(5),
        || {
            node.workers
                .stats()
                .consumers
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
        },
    )
    .await;
    publisher
        .stop
        .store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The user page's signaling runs through a relay the test cuts: the SDK takes its place back
/// (`reconnecting`, `reconnected`), and the agent sees no leave and keeps decoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_signaling_connection_is_resumed_and_the_agent_sees_no_leave() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.signaling.resume_grace_secs = 20;
    let node = meridian::node::Node::start(cfg).await.unwrap();
    let relay = common::cut::CutProxy::start(node.signaling_addr).await;
    let (user, agent) = open_pair(
        &node,
        "kyc-cut",
        &format!("&ws=ws://{}/v1/ws", relay.addr),
        "",
    );
    both_decoding("both pages decoding before the cut", &user, &agent).await;

    relay.cut();
    wait_until(
        "the user page back in its place",
        Duration::from_secs(30),
        &[&user, &agent],
        || {
            user.reports("SIGNALING")
                .iter()
                .any(|r| r["state"] == "reconnected")
        },
    )
    .await;
    let states: Vec<Value> = user.reports("SIGNALING");
    assert_eq!(states[0]["state"], "reconnecting", "{states:?}");
    assert!(
        states.iter().all(|r| r["state"] != "disconnected"),
        "{states:?}"
    );
    assert!(user.reports("CLOSED").is_empty(), "{}", user.transcript());
    // Still decoding on both sides, and the agent never saw the user leave.
    both_decoding("both pages decoding after the cut", &user, &agent).await;
    assert!(saw_no_leave(&agent), "{}", agent.transcript());
    assert_eq!(
        node.workers
            .stats()
            .participants
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

/// A network change in the middle of a call: the user page restarts ICE (new credentials, a
/// new candidate pair checked and answered by the node) and the call goes on; the agent sees
/// no leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ice_restart_moves_the_call_to_a_new_path_without_the_agent_seeing_a_leave() {
    let _load = LOAD.read().await;
    assert_isolated_network();
    let node = start_node().await;
    let (user, agent) = open_pair(&node, "kyc-ice-restart", "&restartIceAfter=4000", "");
    both_decoding("both pages decoding", &user, &agent).await;
    wait_until(
        "the user page restarted ICE",
        Duration::from_secs(30),
        &[&user, &agent],
        || !user.reports("ICERESTART").is_empty(),
    )
    .await;
    let r = &user.reports("ICERESTART")[0];
    assert_eq!(r["ok"], true, "{r}");
    let (before, after) = (&r["before"], &r["after"]);
    assert_ne!(
        before["ufrag"], after["ufrag"],
        "new ICE credentials from the node: {r}"
    );
    assert_ne!(
        before["pairId"], after["pairId"],
        "a new candidate pair: {r}"
    );
    assert_eq!(after["pairState"], "succeeded", "{r}");
    assert!(
        after["responses"].as_u64().unwrap_or(0) > 0,
        "the node answered the new checks: {r}"
    );
    both_decoding("both pages decoding after the restart", &user, &agent).await;
    assert!(saw_no_leave(&agent), "{}", agent.transcript());
}
