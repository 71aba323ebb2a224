//! A node forwards a publisher's RTP to subscribers over real UDP, with DTLS-SRTP, through its
//! single media port; peers are webrtc-rs (sans-I/O core) clients in this process.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use serde_json::{json, Value};

/// A publisher on a user's publish transport and a subscriber consuming it on an agent's
/// subscribe transport, both running.
struct Flow {
    publisher: Arc<PeerState>,
    subscriber: Arc<PeerState>,
    /// PLIs the publisher had received before the subscription was made.
    plis_before_subscribe: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    user: Signal,
    agent: Signal,
    producer_id: String,
}

impl Flow {
    async fn start(node: &meridian::node::Node, session: &str) -> Flow {
        Self::start_with(node, session, PeerState::default(), TestCodec::Vp8).await
    }

    /// Like `start`, with the subscriber's state (and so its impairments) and the codec given.
    async fn start_with(
        node: &meridian::node::Node,
        session: &str,
        subscriber_state: PeerState,
        codec: TestCodec,
    ) -> Flow {
        let (mut user, _) = Signal::join(node, session, "alice", Role::User).await;
        let (mut agent, _) = Signal::join(node, session, "bob", Role::Agent).await;

        let (producer_id, publisher_state, publisher_task) = publish_as(&mut user, codec).await;

        // The agent learns of the producer from an event.
        let added = agent.event("producerAdded").await;
        assert_eq!(added["producer"]["producerId"], producer_id.as_str());
        assert_eq!(added["producer"]["kind"], "video");

        wait_for("publisher connected", Duration::from_secs(10), || {
            publisher_state.connected.load(Ordering::Relaxed)
        })
        .await;
        // Let the publisher's first keyframe pass before anyone subscribes, so the subscriber
        // can only start on a keyframe that its own subscription asked for.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let plis_before_subscribe = publisher_state.plis_received.load(Ordering::Relaxed);

        let (subscriber_state, subscriber_task) =
            subscribe_as(&mut agent, &producer_id, codec, subscriber_state).await;
        Flow {
            publisher: publisher_state,
            subscriber: subscriber_state,
            plis_before_subscribe,
            tasks: vec![publisher_task, subscriber_task],
            user,
            agent,
            producer_id,
        }
    }

    fn publisher_plis(&self) -> u64 {
        self.publisher.plis_received.load(Ordering::Relaxed)
    }

    fn received(&self) -> usize {
        self.subscriber.received.lock().unwrap().len()
    }

    async fn stop(self) {
        self.publisher.stop.store(true, Ordering::Relaxed);
        self.subscriber.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_publisher_packets_continuously_starting_with_a_keyframe() {
    let node = start_node().await;
    let flow = Flow::start(&node, "kyc-fwd").await;
    wait_for("150 forwarded packets", Duration::from_secs(15), || {
        flow.received() >= 150
    })
    .await;
    let plis = flow.publisher.plis_received.load(Ordering::Relaxed);
    let plis_before = flow.plis_before_subscribe;
    let got = flow.subscriber.received.lock().unwrap().clone();
    flow.stop().await;

    assert!(
        plis > plis_before,
        "subscribing must send a keyframe request to the publisher"
    );
    assert!(
        got[0].keyframe,
        "the first forwarded packet must be a keyframe"
    );
    let ssrc = got[0].ssrc;
    assert_ne!(ssrc, 0x1234_5678, "the consumer has its own SSRC");
    let mut seqs: Vec<u16> = got.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0].wrapping_add(1),
            "gap in forwarded sequence numbers"
        );
    }
    let mut frames: Vec<u32> = got.iter().map(|r| r.frame).collect();
    frames.dedup();
    for w in frames.windows(2) {
        assert_eq!(w[1], w[0] + 1, "payloads forwarded unchanged and in order");
    }
    assert!(got.iter().all(|r| r.ssrc == ssrc));
    assert!(
        got.iter().all(|r| r.orientation == Some(TEST_ORIENTATION)),
        "video orientation reaches the subscriber under the subscriber's own extension id"
    );
    let stats = node.workers.stats();
    assert!(stats.rtp_forwarded.load(Ordering::Relaxed) >= 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_are_placed_on_two_workers_and_each_forwards_through_its_own_port() {
    let node = start_node().await;
    assert_eq!(node.workers.len(), 2);
    let a = Flow::start(&node, "kyc-worker-a").await;
    let b = Flow::start(&node, "kyc-worker-b").await;
    let wa = node.workers.worker_of(&"kyc-worker-a".parse().unwrap());
    let wb = node.workers.worker_of(&"kyc-worker-b".parse().unwrap());
    assert!(wa.is_some() && wb.is_some() && wa != wb, "{wa:?} {wb:?}");
    wait_for("both sessions forward", Duration::from_secs(15), || {
        a.received() >= 50 && b.received() >= 50
    })
    .await;
    // Each flow's media came from its own worker's port, as its candidates said.
    let port_a = media_addr_of(&node, "kyc-worker-a").port();
    let port_b = media_addr_of(&node, "kyc-worker-b").port();
    assert_ne!(port_a, port_b);
    for (flow, port) in [(&a, port_a), (&b, port_b)] {
        for state in [&flow.publisher, &flow.subscriber] {
            let from = state.remote_addrs.lock().unwrap().clone();
            assert!(!from.is_empty());
            assert!(from.iter().all(|f| f.port() == port), "{from:?} vs {port}");
        }
    }
    // Both workers carry media, and the per-worker figures say so.
    for w in node.workers.iter() {
        assert!(w.stats().rtp_forwarded.load(Ordering::Relaxed) >= 50);
    }
    let m = metrics(&node).await;
    for worker in ["0", "1"] {
        let line = m
            .lines()
            .find(|l| {
                l.starts_with("meridian_rtp_forwarded_total{")
                    && l.contains(&format!("worker=\"{worker}\""))
            })
            .unwrap_or_else(|| panic!("no series for worker {worker}:\n{m}"));
        let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 50, "{line}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_on_the_media_port_are_counted_and_do_not_disturb_forwarding() {
    let node = start_node().await;
    let flow = Flow::start(&node, "kyc-garbage").await;
    wait_for("media flowing", Duration::from_secs(15), || {
        flow.received() >= 20
    })
    .await;

    // Garbage from an unknown address: random bytes, RTP-looking and DTLS-looking junk, a STUN
    // Binding request with a username no connection has, and an oversized datagram.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let media = node.workers.get(0).media_addr();
    let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[9; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x08]);
    stun.extend_from_slice(b"nobody:x");
    let before = node
        .workers
        .stats()
        .datagrams_unroutable
        .load(Ordering::Relaxed);
    let mut sent = 0u64;
    for i in 0..200u32 {
        let d: Vec<u8> = match i % 5 {
            0 => (0..(i % 300) as usize)
                .map(|j| (j as u8).wrapping_mul(31) ^ i as u8)
                .collect(),
            1 => vec![
                0x80, 0x60, 0, 1, 0, 0, 0, 1, 0x12, 0x34, 0x56, 0x78, 1, 2, 3,
            ],
            2 => vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 5, 1, 2, 3, 4, 5],
            3 => stun.clone(),
            _ => vec![0xab; 1600],
        };
        if junk.send_to(&d, media).await.is_ok() {
            sent += 1;
        }
    }
    let received_before = flow.received();
    wait_for(
        "media still flowing after the garbage",
        Duration::from_secs(10),
        || flow.received() >= received_before + 50,
    )
    .await;
    let stats = node.workers.stats();
    let dropped = stats.datagrams_unroutable.load(Ordering::Relaxed) - before
        + stats.datagrams_oversized.load(Ordering::Relaxed);
    assert!(
        dropped >= sent * 9 / 10,
        "garbage is counted: {dropped} of {sent}"
    );
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_is_byte_identical_to_the_original_copy() {
    // The publisher sends a video-orientation extension in every packet, so the original
    // copies carry one. Under SRTP the same sequence number with other bytes would reuse an
    // AES-GCM nonce; equal ciphertext under one key and nonce means equal plaintext.
    let node = start_node().await;
    let lossy = PeerState::default();
    lossy.drop_every_nth_rtp.store(7, Ordering::Relaxed);
    let flow = Flow::start_with(&node, "kyc-resend", lossy, TestCodec::Vp8).await;
    wait_for("20 retransmissions", Duration::from_secs(20), || {
        flow.subscriber.resent_rtp.lock().unwrap().len() >= 20
    })
    .await;
    let subscriber = flow.subscriber.clone();
    flow.stop().await;
    let pairs = subscriber.resent_rtp.lock().unwrap().clone();
    for (original, resent) in &pairs {
        assert_eq!(
            original,
            resent,
            "retransmission of seq {} differs from the original copy",
            u16::from_be_bytes([original[2], original[3]])
        );
    }
    // And what the subscriber decrypted still carries the orientation.
    assert!(subscriber
        .received
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.orientation == Some(TEST_ORIENTATION)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_checking_consent_every_seven_seconds_receives_without_gaps() {
    let node = start_node().await;
    let (mut user, _) = Signal::join(&node, "kyc-consent", "alice", Role::User).await;
    let (mut agent, _) = Signal::join(&node, "kyc-consent", "bob", Role::Agent).await;
    let (producer, publisher, _p) = publish_as(&mut user, TestCodec::Vp8).await;
    wait_for("publisher connected", Duration::from_secs(10), || {
        publisher.connected.load(Ordering::Relaxed)
    })
    .await;
    // RFC 7675 lets a client pace its consent checks; this one checks every 7 s.
    let mut sub = RtcPeer::paced_subscriber(TestCodec::Vp8, Duration::from_secs(7))
        .await
        .unwrap();
    let reply = agent
        .request(json!({"type":"subscribe","producerId":producer,"sdp":sub.offer().unwrap()}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    sub.answer(reply["sdp"].as_str().unwrap()).unwrap();
    let state = Arc::new(PeerState::default());
    let _s = sub.spawn(state.clone());
    wait_for("media flowing", Duration::from_secs(10), || {
        state.received.lock().unwrap().len() >= 25
    })
    .await;
    // Three check intervals.
    let from = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(22)).await;
    let arrivals: Vec<std::time::Instant> = state
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.at)
        .filter(|&t| t >= from)
        .collect();
    let longest = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::MAX);
    assert!(
        longest < Duration::from_millis(700),
        "media paused for {longest:?} between consent checks"
    );
    let r = agent.request(json!({"type":"ping"})).await;
    assert_eq!(r["type"], "pong");
    let states: Vec<&Value> = agent
        .events
        .iter()
        .filter(|e| e["type"] == "transportState")
        .map(|e| &e["state"])
        .collect();
    assert!(
        states
            .iter()
            .all(|s| *s == "connecting" || *s == "connected"),
        "{states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_loss_is_repaired_from_the_producer_cache() {
    let node = start_node().await;
    let lossy = PeerState::default();
    lossy.drop_every_nth_rtp.store(10, Ordering::Relaxed);
    let flow = Flow::start_with(&node, "kyc-nack", lossy, TestCodec::Vp8).await;
    wait_for("300 packets", Duration::from_secs(20), || {
        flow.received() >= 300
    })
    .await;
    // Give the last NACKs time to be answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dropped = flow
        .subscriber
        .rtp_datagrams_dropped
        .load(Ordering::Relaxed);
    let mut seqs = flow.subscriber.sequence_numbers();
    flow.stop().await;

    assert!(dropped >= 25, "the impairment dropped packets: {dropped}");
    let resent = node
        .workers
        .stats()
        .rtp_retransmitted
        .load(Ordering::Relaxed);
    assert!(
        resent >= dropped / 2,
        "{resent} retransmissions for {dropped} losses"
    );
    // Up to the most recent packets, whose repair may still be under way, nothing is missing.
    seqs.sort_unstable();
    seqs.dedup();
    let settled = &seqs[..seqs.len() - 20];
    let missing = settled
        .windows(2)
        .map(|w| w[1].wrapping_sub(w[0]) as usize - 1)
        .sum::<usize>();
    assert_eq!(missing, 0, "every lost packet was recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_is_forwarded_unchanged_starting_on_an_idr() {
    let node = start_node().await;
    let flow = Flow::start_with(&node, "kyc-h264", PeerState::default(), TestCodec::H264).await;
    wait_for("100 H.264 packets", Duration::from_secs(15), || {
        flow.received() >= 100
    })
    .await;
    let got = flow.subscriber.received.lock().unwrap().clone();
    flow.stop().await;
    assert!(
        got[0].keyframe,
        "the first forwarded H.264 packet is an IDR"
    );
    let mut frames: Vec<u32> = got.iter().map(|r| r.frame).collect();
    frames.dedup();
    assert!(frames.windows(2).all(|w| w[1] == w[0] + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_keyframe_requests_reach_the_publisher_throttled() {
    let node = start_node().await;
    let flow = Flow::start(&node, "kyc-pli").await;
    wait_for("media flowing", Duration::from_secs(15), || {
        flow.received() >= 100
    })
    .await;
    let before = flow.publisher_plis();
    // A burst of ten PLIs from the subscriber.
    flow.subscriber.send_plis.store(10, Ordering::Relaxed);
    wait_for(
        "a PLI relayed to the publisher",
        Duration::from_secs(5),
        || flow.publisher_plis() > before,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let relayed = flow.publisher_plis() - before;
    flow.stop().await;
    assert!(
        relayed <= 2,
        "ten PLIs in a burst are throttled upstream, {relayed} relayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_producer_stops_media_and_resumes_on_a_keyframe() {
    let node = start_node().await;
    let mut flow = Flow::start(&node, "kyc-pause").await;
    wait_for("media flowing", Duration::from_secs(15), || {
        flow.received() >= 50
    })
    .await;
    let id = flow.producer_id.clone();
    let reply = flow
        .user
        .request(json!({"type":"pauseProducer","producerId":id}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(
        flow.agent.event("producerPaused").await["producerId"],
        id.as_str()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paused_at = flow.received();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        flow.received(),
        paused_at,
        "nothing is forwarded while paused"
    );

    let reply = flow
        .user
        .request(json!({"type":"resumeProducer","producerId":id}))
        .await;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(
        flow.agent.event("producerResumed").await["producerId"],
        id.as_str()
    );
    wait_for("media again", Duration::from_secs(10), || {
        flow.received() >= paused_at + 30
    })
    .await;
    let got = flow.subscriber.received.lock().unwrap().clone();
    flow.stop().await;
    assert!(got[paused_at].keyframe, "forwarding resumes on a keyframe");
    let mut seqs: Vec<u16> = got.iter().map(|r| r.seq).collect();
    seqs.dedup();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
        "the consumer's sequence stays continuous across the pause"
    );
}
