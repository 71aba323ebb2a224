//! Shared test harness: start a node on ephemeral ports, talk signaling over a real WebSocket,
//! and run in-process WebRTC peers built on webrtc-rs's sans-I/O core over real UDP.
#![allow(dead_code)]

pub mod browser;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use meridian::auth::{Role, TokenSigner};
use meridian::config::NodeConfig;
use meridian::node::Node;
use rtc::interceptor::{Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_H264, MIME_TYPE_VP8,
};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A region config on ephemeral ports with the test secret.
pub fn test_config(announced: &str, listen_ip: &str) -> NodeConfig {
    NodeConfig::from_toml_str(&format!(
        r#"
[node]
region = "test"
latitude = 19.0
longitude = 72.8
[signaling]
listen = "127.0.0.1:0"
max_message_bytes = 16384
join_timeout_secs = 2
[rtc]
listen_ip = "{listen_ip}"
announced_ip = "{announced}"
port = 0
[auth]
issuer = "meridian-test"
audience = "meridian"
algorithm = "HS256"
secret = "{SECRET}"
"#
    ))
    .expect("test config is valid")
}

/// Starts `regions.len()` nodes joined by pipes (each dials the ones started before it) and
/// waits until every pipe is up. `dir` receives the cluster's certificates.
pub async fn start_mesh(dir: &std::path::Path, regions: &[&str]) -> Vec<Node> {
    let ids: Vec<meridian::ids::NodeId> = regions
        .iter()
        .map(|r| format!("{r}-1").parse().unwrap())
        .collect();
    let files = meridian::mesh::tls::write_cluster(dir, &ids).unwrap();
    let mut nodes: Vec<Node> = Vec::new();
    for (region, f) in regions.iter().zip(files) {
        let peers = nodes
            .iter()
            .map(|n| n.mesh.as_ref().unwrap().local_addr)
            .collect();
        nodes.push(mesh_node(region, f, peers).await);
    }
    let want = regions.len() - 1;
    wait_for("every pipe up", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|n| n.mesh.as_ref().unwrap().pipes().len() == want)
    })
    .await;
    nodes
}

/// India and US nodes whose pipe runs through an impairment proxy; waits for the pipe.
pub async fn pair_over_link(
    dir: &std::path::Path,
    imp: meridian::netem::Impairment,
) -> (Node, meridian::netem::ImpairProxy, Node) {
    let ids = ["india-1".parse().unwrap(), "us-1".parse().unwrap()];
    let mut files = meridian::mesh::tls::write_cluster(dir, &ids).unwrap();
    let india = mesh_node("india", files.remove(0), vec![]).await;
    let link = meridian::netem::start(
        "127.0.0.1:0".parse().unwrap(),
        india.mesh.as_ref().unwrap().local_addr,
        imp,
    )
    .await
    .unwrap();
    let us = mesh_node("us", files.remove(0), vec![link.local_addr]).await;
    wait_for(
        "pipe up through the impaired link",
        Duration::from_secs(15),
        || us.mesh.as_ref().unwrap().pipes().len() == 1,
    )
    .await;
    (india, link, us)
}

/// The inter-region link of the tests: 100 ms one way, 5 ms jitter, 2% loss each way.
pub fn long_lossy_link() -> meridian::netem::Impairment {
    meridian::netem::Impairment {
        delay: Duration::from_millis(100),
        jitter: Duration::from_millis(5),
        loss: 0.02,
        seed: 42,
    }
}

/// One node of a mesh, dialing `peers`.
pub async fn mesh_node(
    region: &str,
    files: meridian::mesh::tls::NodeFiles,
    peers: Vec<SocketAddr>,
) -> Node {
    let mut cfg = test_config("127.0.0.1", "127.0.0.1");
    cfg.node.region = region.parse().unwrap();
    cfg.mesh = Some(meridian::config::MeshSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        peers,
        ca_file: files.ca_file,
        cert_file: files.cert_file,
        key_file: files.key_file,
    });
    Node::start(cfg).await.expect("node starts")
}

/// The pipe of `from` that leads to the node of `to`.
pub fn pipe_to(from: &Node, to: &Node) -> meridian::mesh::PipeReport {
    from.mesh
        .as_ref()
        .unwrap()
        .pipes()
        .into_iter()
        .find(|p| p.node == to.id)
        .unwrap_or_else(|| panic!("no pipe from {} to {}", from.id, to.id))
}

/// A plain HTTP/1.0 GET against the node's signaling server; returns the body.
pub async fn http_get(node: &Node, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(node.signaling_addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

pub async fn start_node() -> Node {
    Node::start(test_config("127.0.0.1", "127.0.0.1"))
        .await
        .expect("node starts")
}

pub fn signer() -> TokenSigner {
    TokenSigner::hs256(SECRET.as_bytes(), "meridian-test", "meridian")
}

pub fn token(session: &str, user: &str, role: Role, ttl: Duration) -> String {
    signer()
        .mint(&session.parse().unwrap(), &user.parse().unwrap(), role, ttl)
        .unwrap()
}

/// A signaling client over a real WebSocket.
pub struct Signal {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Unsolicited messages seen while waiting for replies.
    pub events: Vec<Value>,
}

impl Signal {
    pub async fn connect(node: &Node) -> Signal {
        let url = format!("ws://{}/v1/ws", node.signaling_addr);
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connects");
        Signal {
            ws,
            next_id: 1,
            events: Vec::new(),
        }
    }

    pub async fn join(node: &Node, session: &str, user: &str, role: Role) -> (Signal, Value) {
        let mut s = Signal::connect(node).await;
        let t = token(session, user, role, Duration::from_secs(600));
        s.send_text(&json!({"type":"join","version":1,"token":t}).to_string())
            .await;
        let joined = s.recv().await.expect("joined");
        assert_eq!(joined["type"], "joined", "{joined}");
        (s, joined)
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("ws send");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws
            .send(Message::Binary(data.into()))
            .await
            .expect("ws send");
    }

    /// Next JSON message, or None when the socket closed (close frame returned via `closed`).
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("signaling reply within 10 s")?
            {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Reads until the socket closes; returns (messages seen, close code).
    pub async fn until_closed(&mut self) -> (Vec<Value>, Option<u16>) {
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("socket closes within 10 s")
            {
                Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(frame))) => return (seen, frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return (seen, None),
            }
        }
    }

    pub async fn request(&mut self, mut body: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        body["requestId"] = json!(id);
        self.send_text(&body.to_string()).await;
        loop {
            let m = self.recv().await.expect("reply before close");
            if m["requestId"] == json!(id) {
                return m;
            }
            self.events.push(m);
        }
    }

    /// Waits for an unsolicited message of `ty`.
    pub async fn event(&mut self, ty: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["type"] == ty) {
            return self.events.remove(i);
        }
        loop {
            let m = self.recv().await.expect("event before close");
            if m["type"] == ty {
                return m;
            }
            self.events.push(m);
        }
    }
}

/// One received RTP packet, as the subscriber saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub payload_type: u8,
    pub frame: u32,
    pub keyframe: bool,
    /// Video orientation (CVO) byte, if the packet carried one under this peer's id.
    pub orientation: Option<u8>,
    pub at: Instant,
}

/// Rotation the test publisher signals in every packet: 90 degrees.
pub const TEST_ORIENTATION: u8 = 0x01;
const CVO: &str = "urn:3gpp:video-orientation";

/// Counters and records a peer task shares with the test.
#[derive(Default)]
pub struct PeerState {
    pub connected: AtomicBool,
    pub plis_received: AtomicU64,
    pub packets_sent: AtomicU64,
    pub received: Mutex<Vec<Received>>,
    /// Remote addresses this peer received datagrams from.
    pub remote_addrs: Mutex<Vec<SocketAddr>>,
    pub stop: AtomicBool,
    /// When non-zero, every n-th incoming RTP datagram is dropped before the peer sees it
    /// (loss on the last hop, which the node must repair).
    pub drop_every_nth_rtp: AtomicU64,
    pub rtp_datagrams_dropped: AtomicU64,
    /// Keyframe requests the subscriber should send now, one after another.
    pub send_plis: AtomicU64,
}

/// The video codec a test peer sends or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestCodec {
    Vp8,
    H264,
}

impl TestCodec {
    /// A one-packet frame: codec header marking key or delta frame, the frame number at
    /// bytes 10..14, filler to 1000 bytes.
    fn payload(self, key: bool, frame: u32) -> Vec<u8> {
        let mut p = vec![0u8; 1000];
        match self {
            TestCodec::Vp8 => {
                p[0] = 0x10; // descriptor: S=1, PID=0
                p[1] = if key { 0x00 } else { 0x01 }; // P bit
            }
            TestCodec::H264 => p[0] = if key { 0x65 } else { 0x41 }, // IDR or non-IDR slice
        }
        p[10..14].copy_from_slice(&frame.to_be_bytes());
        p
    }

    fn is_key(self, p: &[u8]) -> bool {
        match self {
            TestCodec::Vp8 => p.get(1).is_some_and(|b| b & 1 == 0),
            TestCodec::H264 => p.first().is_some_and(|b| b & 0x1f == 5),
        }
    }
}

fn engine(codec: TestCodec, publish: bool) -> (MediaEngine, RTCRtpCodec) {
    let mut m = MediaEngine::default();
    // Publisher and subscriber number their extensions differently, so forwarding must map
    // ids rather than copy them.
    let extensions: &[&str] = if publish {
        &[CVO]
    } else {
        &["urn:ietf:params:rtp-hdrext:toffset", CVO]
    };
    for uri in extensions {
        m.register_header_extension(
            RTCRtpHeaderExtensionCapability { uri: (*uri).into() },
            RtpCodecKind::Video,
            None,
        )
        .unwrap();
    }
    let codec = match codec {
        TestCodec::Vp8 => RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
        TestCodec::H264 => RTCRtpCodec {
            mime_type: MIME_TYPE_H264.into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
                .into(),
            rtcp_feedback: vec![],
        },
    };
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: codec.clone(),
            payload_type: 100,
        },
        RtpCodecKind::Video,
    )
    .unwrap();
    (m, codec)
}

/// A test WebRTC peer: one UDP socket, one sans-I/O peer connection.
pub struct RtcPeer {
    pub pc: RTCPeerConnection,
    pub socket: tokio::net::UdpSocket,
    pub local: SocketAddr,
    pub publish_ssrc: Option<u32>,
    pub codec: TestCodec,
    /// This peer's id for the video-orientation extension, from its own offer.
    pub cvo_id: Option<u8>,
}

impl RtcPeer {
    async fn new(publish: bool, codec: TestCodec) -> RtcPeer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let test_codec = codec;
        let (mut media, codec) = engine(codec, publish);
        let registry = Registry::new().with(
            Slot::from(14_000),
            meridian::sfu::engine::DeliverFeedback::default(),
        );
        let registry = register_default_interceptors(registry, &mut media).unwrap();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .unwrap();
        let mut publish_ssrc = None;
        if publish {
            let ssrc = 0x1234_5678;
            publish_ssrc = Some(ssrc);
            let track = MediaStreamTrack::new(
                "cam".into(),
                "cam-video".into(),
                "camera".into(),
                RtpCodecKind::Video,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec,
                    ..Default::default()
                }],
            );
            pc.add_transceiver_from_track(
                track,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Sendonly,
                    ..Default::default()
                }),
            )
            .unwrap();
        } else {
            pc.add_transceiver_from_kind(
                RtpCodecKind::Video,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    ..Default::default()
                }),
            )
            .unwrap();
        }
        pc.add_local_candidate(RTCIceCandidateInit {
            candidate: format!(
                "candidate:1 1 udp 2130706431 {} {} typ host",
                local.ip(),
                local.port()
            ),
            ..Default::default()
        })
        .unwrap();
        RtcPeer {
            pc,
            socket,
            local,
            publish_ssrc,
            codec: test_codec,
            cvo_id: None,
        }
    }

    pub async fn publisher() -> RtcPeer {
        Self::new(true, TestCodec::Vp8).await
    }

    pub async fn subscriber() -> RtcPeer {
        Self::new(false, TestCodec::Vp8).await
    }

    pub async fn publisher_with(codec: TestCodec) -> RtcPeer {
        Self::new(true, codec).await
    }

    pub async fn subscriber_with(codec: TestCodec) -> RtcPeer {
        Self::new(false, codec).await
    }

    pub fn offer(&mut self) -> String {
        let offer = self.pc.create_offer(None).unwrap();
        self.pc
            .set_local_description(Instant::now(), offer)
            .unwrap();
        let sdp = self.pc.local_description().unwrap().sdp;
        self.cvo_id = sdp.lines().find_map(|l| {
            let rest = l.strip_prefix("a=extmap:")?;
            let (id, uri) = rest.split_once(' ')?;
            (uri.trim() == CVO).then(|| id.parse().ok()).flatten()
        });
        sdp
    }

    pub fn answer(&mut self, sdp: &str) {
        self.pc
            .set_remote_description(
                Instant::now(),
                RTCSessionDescription::answer(sdp.to_owned()).unwrap(),
            )
            .unwrap();
    }

    /// Runs the peer until `state.stop`: answers the network, sends ~50 VP8 packets/s when
    /// publishing (a keyframe first and after every PLI), records packets when subscribing.
    pub fn spawn(mut self, state: Arc<PeerState>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut frame: u32 = 0;
            let mut want_keyframe = true;
            let mut seq: u16 = 1000;
            let mut media = tokio::time::interval(Duration::from_millis(20));
            let mut rtp_datagrams = 0u64;
            let sender = self.pc.get_senders().next();
            while !state.stop.load(Ordering::Relaxed) {
                while let Some(msg) = self.pc.poll_write() {
                    let _ = self
                        .socket
                        .send_to(&msg.message, msg.transport.peer_addr)
                        .await;
                }
                while let Some(ev) = self.pc.poll_event() {
                    if let rtc::peer_connection::event::RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                        state.connected.store(
                            s == rtc::peer_connection::state::RTCPeerConnectionState::Connected,
                            Ordering::Relaxed,
                        );
                    }
                }
                while let Some(msg) = self.pc.poll_read() {
                    match msg.message {
                        RTCMessage::RtpPacket(_, p) => {
                            let pl = &p.payload;
                            let frame = pl
                                .get(10..14)
                                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                                .unwrap_or(u32::MAX);
                            state.received.lock().unwrap().push(Received {
                                ssrc: p.header.ssrc,
                                seq: p.header.sequence_number,
                                ts: p.header.timestamp,
                                payload_type: p.header.payload_type,
                                frame,
                                keyframe: self.codec.is_key(pl),
                                orientation: self
                                    .cvo_id
                                    .and_then(|id| p.header.get_extension(id))
                                    .and_then(|b| b.first().copied()),
                                at: Instant::now(),
                            });
                        }
                        RTCMessage::RtcpPacket(_, pkts) => {
                            for p in pkts {
                                if p.as_any().is::<PictureLossIndication>() {
                                    state.plis_received.fetch_add(1, Ordering::Relaxed);
                                    want_keyframe = true;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let plis = state.send_plis.swap(0, Ordering::Relaxed);
                if plis > 0 {
                    let ssrc = state.received.lock().unwrap().first().map(|r| r.ssrc);
                    let receiver = self.pc.get_receivers().next();
                    if let (Some(ssrc), Some(rid)) = (ssrc, receiver) {
                        if let Some(mut r) = self.pc.rtp_receiver(rid) {
                            for _ in 0..plis {
                                let pli = PictureLossIndication {
                                    sender_ssrc: 1,
                                    media_ssrc: ssrc,
                                };
                                let _ = r.write_rtcp(Instant::now(), vec![Box::new(pli)]);
                            }
                        }
                    }
                    continue;
                }
                let deadline = self
                    .pc
                    .poll_timeout()
                    .unwrap_or_else(|| Instant::now() + Duration::from_millis(50))
                    .min(Instant::now() + Duration::from_millis(50));
                tokio::select! {
                    r = self.socket.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { break };
                        // RTP, not RTCP (RFC 5761: RTCP packet types 200-206 in byte 1).
                        let is_rtp = n > 1 && (128..=191).contains(&buf[0]) && !(200..=206).contains(&buf[1]);
                        let nth = state.drop_every_nth_rtp.load(Ordering::Relaxed);
                        if is_rtp && nth > 0 {
                            rtp_datagrams += 1;
                            if rtp_datagrams % nth == 0 {
                                state.rtp_datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                        {
                            let mut addrs = state.remote_addrs.lock().unwrap();
                            if !addrs.contains(&from) { addrs.push(from); }
                        }
                        let _ = self.pc.handle_read(TaggedBytesMut {
                            now: Instant::now(),
                            transport: TransportContext {
                                local_addr: self.local,
                                peer_addr: from,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: BytesMut::from(&buf[..n]),
                        });
                    }
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        let _ = self.pc.handle_timeout(Instant::now());
                    }
                    _ = media.tick(), if sender.is_some() && state.connected.load(Ordering::Relaxed) => {
                        let Some(sid) = sender else { continue };
                        let key = std::mem::take(&mut want_keyframe);
                        let payload = self.codec.payload(key, frame);
                        let mut pkt = rtc::rtp::Packet {
                            header: rtc::rtp::header::Header {
                                version: 2,
                                marker: true,
                                payload_type: 100,
                                sequence_number: seq,
                                timestamp: frame.wrapping_mul(1800),
                                ssrc: self.publish_ssrc.unwrap_or(1),
                                ..Default::default()
                            },
                            payload: payload.into(),
                        };
                        if let Some(id) = self.cvo_id {
                            let _ = pkt.header.set_extension(id, vec![TEST_ORIENTATION].into());
                        }
                        if let Some(mut s) = self.pc.rtp_sender(sid) {
                            if s.write_rtp(Instant::now(), pkt).is_ok() {
                                state.packets_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        seq = seq.wrapping_add(1);
                        frame += 1;
                    }
                }
            }
            let _ = self.pc.close();
        })
    }
}

/// Publishes one video track of `codec` on `signal`'s publish transport and starts sending;
/// returns the producer id and the running publisher.
pub async fn publish_as(
    signal: &mut Signal,
    codec: TestCodec,
) -> (String, Arc<PeerState>, tokio::task::JoinHandle<()>) {
    let mut publisher = RtcPeer::publisher_with(codec).await;
    let reply = signal
        .request(json!({"type":"publish","sdp":publisher.offer()}))
        .await;
    assert_eq!(reply["type"], "published", "{reply}");
    publisher.answer(reply["sdp"].as_str().unwrap());
    let id = reply["producers"][0]["producerId"]
        .as_str()
        .unwrap()
        .to_owned();
    let state = Arc::new(PeerState::default());
    let task = publisher.spawn(state.clone());
    (id, state, task)
}

/// Subscribes `signal`'s participant to `producer` and starts receiving into `state`.
pub async fn subscribe_as(
    signal: &mut Signal,
    producer: &str,
    codec: TestCodec,
    state: PeerState,
) -> (Arc<PeerState>, tokio::task::JoinHandle<()>) {
    let mut sub = RtcPeer::subscriber_with(codec).await;
    let reply = signal
        .request(json!({"type":"subscribe","producerId":producer,"sdp":sub.offer()}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    sub.answer(reply["sdp"].as_str().unwrap());
    let state = Arc::new(state);
    let task = sub.spawn(state.clone());
    (state, task)
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
