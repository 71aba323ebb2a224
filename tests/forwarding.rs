//! A node forwards a publisher's RTP to subscribers over real UDP, with DTLS-SRTP, through its
//! single media port; peers are webrtc-rs (sans-I/O core) clients in this process.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meridian::auth::Role;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_publisher_packets_continuously_starting_with_a_keyframe() {
    let node = start_node().await;
    let (mut user, _) = Signal::join(&node, "kyc-fwd", "alice", Role::User).await;
    let (mut agent, _) = Signal::join(&node, "kyc-fwd", "bob", Role::Agent).await;

    let mut publisher = RtcPeer::publisher().await;
    let offer = publisher.offer();
    let reply = user.request(json!({"type":"publish","sdp":offer})).await;
    assert_eq!(reply["type"], "published", "{reply}");
    publisher.answer(reply["sdp"].as_str().unwrap());
    let producer_id = reply["producers"][0]["producerId"]
        .as_str()
        .unwrap()
        .to_owned();
    let pub_state = Arc::new(PeerState::default());
    let pub_task = publisher.spawn(pub_state.clone());

    // The agent learns of the producer from an event and subscribes.
    let added = agent.event("producerAdded").await;
    assert_eq!(added["producer"]["producerId"], producer_id.as_str());
    assert_eq!(added["producer"]["kind"], "video");

    wait_for("publisher connected", Duration::from_secs(10), || {
        pub_state.connected.load(Ordering::Relaxed)
    })
    .await;
    // Let the publisher's first keyframe pass before anyone subscribes, so the subscriber
    // can only start on a keyframe that its own subscription asked for.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let plis_before = pub_state.plis_received.load(Ordering::Relaxed);

    let mut subscriber = RtcPeer::subscriber().await;
    let offer = subscriber.offer();
    let reply = agent
        .request(json!({"type":"subscribe","producerId":producer_id,"sdp":offer}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    subscriber.answer(reply["sdp"].as_str().unwrap());
    let sub_state = Arc::new(PeerState::default());
    let sub_task = subscriber.spawn(sub_state.clone());

    wait_for("150 forwarded packets", Duration::from_secs(15), || {
        sub_state.received.lock().unwrap().len() >= 150
    })
    .await;
    pub_state.stop.store(true, Ordering::Relaxed);
    sub_state.stop.store(true, Ordering::Relaxed);
    let _ = tokio::join!(pub_task, sub_task);

    assert!(
        pub_state.plis_received.load(Ordering::Relaxed) > plis_before,
        "subscribing must send a keyframe request to the publisher"
    );
    let got = sub_state.received.lock().unwrap().clone();
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
    assert!(node.worker.stats().rtp_forwarded.load(Ordering::Relaxed) >= 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_on_the_media_port_are_counted_and_do_not_disturb_forwarding() {
    let node = start_node().await;
    let (mut user, _) = Signal::join(&node, "kyc-garbage", "alice", Role::User).await;
    let (mut agent, _) = Signal::join(&node, "kyc-garbage", "bob", Role::Agent).await;
    let mut publisher = RtcPeer::publisher().await;
    let reply = user
        .request(json!({"type":"publish","sdp":publisher.offer()}))
        .await;
    publisher.answer(reply["sdp"].as_str().unwrap());
    let producer_id = reply["producers"][0]["producerId"]
        .as_str()
        .unwrap()
        .to_owned();
    let pub_state = Arc::new(PeerState::default());
    let pub_task = publisher.spawn(pub_state.clone());
    let mut subscriber = RtcPeer::subscriber().await;
    let reply = agent
        .request(json!({"type":"subscribe","producerId":producer_id,"sdp":subscriber.offer()}))
        .await;
    subscriber.answer(reply["sdp"].as_str().unwrap());
    let sub_state = Arc::new(PeerState::default());
    let sub_task = subscriber.spawn(sub_state.clone());
    wait_for("media flowing", Duration::from_secs(15), || {
        sub_state.received.lock().unwrap().len() >= 20
    })
    .await;

    // Garbage from an unknown address: random bytes, RTP-looking and DTLS-looking junk, a STUN
    // Binding request with a username no connection has, and an oversized datagram.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let media = node.worker.media_addr();
    let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[9; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x08]);
    stun.extend_from_slice(b"nobody:x");
    let before = node
        .worker
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
    let received_before = sub_state.received.lock().unwrap().len();
    wait_for(
        "media still flowing after the garbage",
        Duration::from_secs(10),
        || sub_state.received.lock().unwrap().len() >= received_before + 50,
    )
    .await;
    let stats = node.worker.stats();
    let dropped = stats.datagrams_unroutable.load(Ordering::Relaxed) - before
        + stats.datagrams_oversized.load(Ordering::Relaxed);
    assert!(
        dropped >= sent * 9 / 10,
        "garbage is counted: {dropped} of {sent}"
    );
    pub_state.stop.store(true, Ordering::Relaxed);
    sub_state.stop.store(true, Ordering::Relaxed);
    let _ = tokio::join!(pub_task, sub_task);
}
