//! The worker core driven directly, without sockets, threads or sleeps: inputs carry a
//! virtual time and outputs are read from the core's queues and the participants' event
//! channels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::pipes::media_frame;
use super::worker::Worker;
use super::*;
use crate::proto::pipe::{Datagram, ProducerAnnouncement};

struct Harness {
    core: Worker,
    now: Instant,
    /// Turns of `pump` (simulcast tests).
    #[cfg(feature = "loadgen")]
    pumps: u64,
}

impl Harness {
    /// A core as a node in a mesh has it (joins to new sessions wait for the mesh's replay).
    fn new() -> Self {
        let (mesh, _) = mpsc::unbounded_channel();
        let cfg = WorkerConfig {
            mesh: Some(mesh),
            ..test_worker_config(1)
        };
        Self {
            core: Worker::new(
                cfg,
                "127.0.0.1:40000".parse().unwrap(),
                Arc::new(WorkerStats::default()),
            ),
            now: Instant::now(),
            #[cfg(feature = "loadgen")]
            pumps: 0,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn command(&mut self, cmd: Command) {
        self.core.handle_command(self.now, cmd);
        self.core.flush(self.now);
    }

    fn tick(&mut self) {
        self.core.handle_tick(self.now);
        self.core.flush(self.now);
    }

    /// Joins `user` to `session` and answers the mesh replay at once; returns the
    /// participant's id and event queue.
    fn join(&mut self, session: &str, user: &str) -> (ParticipantId, mpsc::Receiver<SfuEvent>) {
        let (events, rx) = event_channel();
        let (reply, mut answer) = oneshot::channel();
        let session: SessionId = session.parse().unwrap();
        self.command(Command::Join {
            session: session.clone(),
            user: user.parse().unwrap(),
            role: Role::Agent,
            recorded: false,
            events,
            reply,
        });
        self.command(Command::SessionReplayed { session });
        let joined = answer.try_recv().expect("answered").expect("joined");
        (joined.participant_id, rx)
    }

    fn pipe_up(&mut self, pipe: PipeId) -> Arc<PipeCounters> {
        let counters = Arc::new(PipeCounters::default());
        self.core
            .pipe_up(pipe, "us-1".parse().unwrap(), counters.clone());
        self.core.set_pipe_rtt(pipe, Duration::from_millis(100));
        counters
    }

    /// A VP8 producer of another node announced over `pipe` as stream `stream`.
    fn remote_producer(&mut self, pipe: PipeId, session: &str, id: &str, stream: u32) {
        self.command(Command::RemoteProducer {
            pipe,
            announcement: ProducerAnnouncement {
                session: session.parse().unwrap(),
                producer: id.parse().unwrap(),
                stream,
                participant: "remote-p".parse().unwrap(),
                user: "remote-user".parse().unwrap(),
                role: Role::User,
                kind: "video".into(),
                mime_type: "video/VP8".into(),
                clock_rate: 90_000,
                channels: 0,
                fmtp: String::new(),
                rids: Vec::new(),
                paused: false,
            },
        });
    }

    /// One media frame of `stream` with sequence number `seq`, as the origin sends it.
    fn pipe_media(&mut self, pipe: PipeId, stream: u32, seq: u16) {
        let pkt = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                payload_type: 96,
                sequence_number: seq,
                timestamp: u32::from(seq) * 3000,
                ssrc: 0x5555,
                ..Default::default()
            },
            payload: Bytes::from_static(&[0x10, 0x01, 0, 0, 0, 0, 0, 0]),
        };
        let mut arena = BytesMut::new();
        let frame = media_frame(&mut arena, stream, 0, &pkt, &Default::default());
        self.core.handle_pipe_datagram(self.now, pipe, frame);
        self.core.flush(self.now);
    }

    /// Sequence numbers asked for again on `pipe` since the last call.
    fn nacked(&mut self, pipe: PipeId) -> Vec<u16> {
        let mut out = Vec::new();
        for (p, frame) in self.core.pipe_out.drain(..) {
            if let (true, Ok(Datagram::Nack(n))) = (p == pipe, Datagram::decode(&frame)) {
                out.extend(n.seqs);
            }
        }
        out
    }

    fn mesh_events(&mut self) -> Vec<MeshEvent> {
        self.core.mesh_out.drain(..).collect()
    }
}

fn drain(rx: &mut mpsc::Receiver<SfuEvent>) -> Vec<SfuEvent> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        out.push(ev);
    }
    out
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn pipe_loss_is_asked_for_at_once_and_again_after_a_round_trip_until_repaired() {
    let mut h = Harness::new();
    let (_p, _events) = h.join("kyc-repair", "agent");
    let pipe = PipeId(3);
    h.pipe_up(pipe);
    h.remote_producer(pipe, "kyc-repair", "prod-1", 0x0200_0001);
    h.pipe_media(pipe, 0x0200_0001, 100);
    h.pipe_media(pipe, 0x0200_0001, 101);
    assert!(h.nacked(pipe).is_empty(), "no gap yet");
    h.pipe_media(pipe, 0x0200_0001, 104);
    assert_eq!(
        h.nacked(pipe),
        vec![102, 103],
        "a gap is asked for on arrival"
    );
    // Within 1.5 round trips (RTT 100 ms), nothing is asked again.
    h.advance(100 * MS);
    h.tick();
    assert!(h.nacked(pipe).is_empty());
    // After it, what is still missing is asked again; what arrived is not.
    h.pipe_media(pipe, 0x0200_0001, 102);
    h.advance(60 * MS);
    h.tick();
    assert_eq!(h.nacked(pipe), vec![103]);
    h.pipe_media(pipe, 0x0200_0001, 103);
    h.advance(200 * MS);
    h.tick();
    assert!(h.nacked(pipe).is_empty(), "repaired: nothing more to ask");
}

#[test]
fn a_slow_pipe_is_asked_again_later_than_a_fast_one() {
    let mut h = Harness::new();
    let (_p, _events) = h.join("kyc-rtt", "agent");
    let pipe = PipeId(4);
    h.pipe_up(pipe);
    h.core.set_pipe_rtt(pipe, Duration::from_millis(400));
    h.remote_producer(pipe, "kyc-rtt", "prod-1", 7);
    h.pipe_media(pipe, 7, 10);
    h.pipe_media(pipe, 7, 12);
    assert_eq!(h.nacked(pipe), vec![11]);
    h.advance(300 * MS);
    h.tick();
    assert!(h.nacked(pipe).is_empty(), "a 400 ms pipe waits 600 ms");
    h.advance(310 * MS);
    h.tick();
    assert_eq!(h.nacked(pipe), vec![11]);
}

#[test]
fn keyframe_requests_for_a_piped_producer_are_aggregated_per_interval() {
    let mut h = Harness::new();
    let (_p, _events) = h.join("kyc-kf", "agent");
    let pipe = PipeId(5);
    h.pipe_up(pipe);
    h.remote_producer(pipe, "kyc-kf", "prod-1", 9);
    h.mesh_events();
    let pk = h.core.producer_ids[&"prod-1".parse::<ProducerId>().unwrap()];
    let requests = |h: &mut Harness| {
        h.mesh_events()
            .into_iter()
            .filter(|e| matches!(e, MeshEvent::KeyframeRequest { .. }))
            .count()
    };
    // Many consumers asking within the interval cost the origin one request.
    for _ in 0..10 {
        h.core.request_keyframe(h.now, pk, 0);
        h.advance(10 * MS);
    }
    assert_eq!(requests(&mut h), 1);
    h.advance(300 * MS);
    h.core.request_keyframe(h.now, pk, 0);
    assert_eq!(requests(&mut h), 1, "the next interval allows one more");
}

#[test]
fn a_closed_pipe_takes_its_producers_and_participants_out_of_every_session() {
    let mut h = Harness::new();
    let (_p, mut events) = h.join("kyc-down", "agent");
    let pipe = PipeId(6);
    h.pipe_up(pipe);
    h.command(Command::RemoteParticipantJoined {
        pipe,
        session: "kyc-down".parse().unwrap(),
        participant: ParticipantInfo {
            participant_id: "remote-p".parse().unwrap(),
            user_id: "remote-user".parse().unwrap(),
            role: Role::User,
        },
    });
    h.remote_producer(pipe, "kyc-down", "prod-1", 11);
    let seen = drain(&mut events);
    assert!(seen.iter().any(
        |e| matches!(e, SfuEvent::ParticipantJoined(p) if p.participant_id.as_str() == "remote-p")
    ));
    assert!(seen
        .iter()
        .any(|e| matches!(e, SfuEvent::ProducerAdded(p) if p.producer_id.as_str() == "prod-1")));
    assert_eq!(WorkerStats::get(&h.core.stats.producers), 1);

    h.command(Command::PipeDown { pipe });
    let seen = drain(&mut events);
    assert!(seen
        .iter()
        .any(|e| matches!(e, SfuEvent::ProducerClosed(p) if p.as_str() == "prod-1")));
    assert!(seen.iter().any(
        |e| matches!(e, SfuEvent::ParticipantLeft(p) if p.participant_id.as_str() == "remote-p")
    ));
    assert_eq!(WorkerStats::get(&h.core.stats.producers), 0);
    // Frames still in flight from the closed pipe are ignored, and counted.
    h.pipe_media(pipe, 11, 1);
    assert!(h.core.pipe_out.is_empty());
    assert_eq!(WorkerStats::get(&h.core.stats.pipe_frames_unknown), 1);
}

#[test]
fn the_last_participant_leaving_ends_the_session_and_its_piped_producers() {
    let mut h = Harness::new();
    let (a, _ea) = h.join("kyc-leave", "agent");
    let (b, mut eb) = h.join("kyc-leave", "user");
    let pipe = PipeId(8);
    h.pipe_up(pipe);
    h.remote_producer(pipe, "kyc-leave", "prod-1", 12);
    let opened = h.mesh_events();
    assert!(
        opened
            .iter()
            .filter(|e| matches!(e, MeshEvent::SessionActive(_)))
            .count()
            == 1,
        "one session, activated once: {opened:?}"
    );
    h.command(Command::Leave { participant: a });
    drain(&mut eb);
    let left = h.mesh_events();
    assert!(left
        .iter()
        .any(|e| matches!(e, MeshEvent::ParticipantLeft { .. })));
    assert!(!left
        .iter()
        .any(|e| matches!(e, MeshEvent::SessionInactive(_))));
    assert_eq!(WorkerStats::get(&h.core.stats.sessions), 1);
    h.command(Command::Leave { participant: b });
    let ended = h.mesh_events();
    assert!(ended
        .iter()
        .any(|e| matches!(e, MeshEvent::SessionInactive(s) if s.as_str() == "kyc-leave")));
    for c in [
        &h.core.stats.sessions,
        &h.core.stats.participants,
        &h.core.stats.producers,
        &h.core.stats.consumers,
    ] {
        assert_eq!(WorkerStats::get(c), 0);
    }
    assert!(h.core.producer_ids.is_empty() && h.core.routers.is_empty());
}

#[test]
fn a_join_waits_for_the_mesh_replay_or_its_deadline_on_the_virtual_clock() {
    let mut h = Harness::new();
    let (events, _rx) = event_channel();
    let (reply, mut answer) = oneshot::channel();
    h.command(Command::Join {
        session: "kyc-wait".parse().unwrap(),
        user: "agent".parse().unwrap(),
        role: Role::Agent,
        recorded: false,
        events,
        reply,
    });
    h.advance(400 * MS);
    h.tick();
    assert!(answer.try_recv().is_err(), "still waiting for the mesh");
    h.advance(200 * MS);
    h.tick();
    assert!(
        answer.try_recv().expect("answered by the deadline").is_ok(),
        "answered with what is known"
    );
}

#[test]
fn pipe_stream_numbers_carry_the_worker_number() {
    let mut h = Harness::new();
    let a = h.core.allocate_stream();
    let b = h.core.allocate_stream();
    assert_ne!(a, b);
    assert_eq!(stream_worker(a), 1);
    assert_eq!(stream_worker(b), 1);
}

/// A publisher sending three simulcast layers and a subscriber, both real (sans-I/O) WebRTC
/// peers whose datagrams the test carries to and from the core, all on the virtual clock.
#[cfg(feature = "loadgen")]
mod simulcast {
    use std::net::SocketAddr;

    use rtc::peer_connection::message::RTCMessage;
    use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
    use rtc::rtcp::sender_report::SenderReport;
    use rtc::sansio::Protocol;

    use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;

    use crate::sfu::egress::SendPath;
    use crate::sfu::keys::{ConnKey, ConsumerKey};
    use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

    use super::*;
    use crate::client::media::{Encoding, MediaPeer, Outgoing, PeerMedia};

    const NODE: &str = "127.0.0.1:40000";

    struct Client {
        peer: MediaPeer,
        addr: SocketAddr,
        /// Streams it sends (publisher).
        streams: Vec<Outgoing>,
        /// Layers whose keyframe requests it ignores for now.
        deaf: Vec<u8>,
        /// Layers it no longer sends.
        silent: Vec<u8>,
        /// (layer, keyframe) of every packet received.
        received: Vec<(u8, bool)>,
        /// (SSRC, sequence number, timestamp) of every packet received.
        rtp: Vec<(u32, u16, u32)>,
        /// Sender reports received, each with the number of RTP packets of its SSRC received
        /// before it.
        reports: Vec<(SenderReport, usize)>,
        /// Every datagram the node sent it, as it went on the wire (when asked for).
        wire: Option<Vec<BytesMut>>,
        /// Loss on its way to the node.
        loss: Loss,
    }

    /// One packet lost on a client's way to the node: the next RTP packet it sends, and with
    /// `forever` every retransmission of it too.
    #[derive(Default)]
    struct Loss {
        next: Option<bool>,
        /// (SSRC, sequence number, forever) of the packet lost.
        lost: Option<(u32, u16, bool)>,
        /// Datagrams dropped.
        dropped: u32,
    }

    impl Loss {
        fn drops(&mut self, d: &[u8]) -> bool {
            if d.len() < 12 || d[0] >> 6 != 2 || (192..=223).contains(&d[1]) {
                return false;
            }
            let (ssrc, seq) = (
                u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
                u16::from_be_bytes([d[2], d[3]]),
            );
            if let Some(forever) = self.next.take() {
                self.lost = Some((ssrc, seq, forever));
                self.dropped += 1;
                return true;
            }
            if self.lost == Some((ssrc, seq, true)) {
                self.dropped += 1;
                return true;
            }
            false
        }
    }

    impl Client {
        fn new(addr: &str, media: PeerMedia) -> Client {
            Self::offering(addr, media, Vec::new())
        }

        /// A client offering only these SRTP profiles (empty: rtc's defaults).
        fn offering(addr: &str, media: PeerMedia, profiles: Vec<SrtpProtectionProfile>) -> Client {
            let addr: SocketAddr = addr.parse().unwrap();
            Client {
                peer: MediaPeer::unbound_offering(addr, media, profiles).unwrap(),
                addr,
                streams: Vec::new(),
                deaf: Vec::new(),
                silent: Vec::new(),
                received: Vec::new(),
                rtp: Vec::new(),
                reports: Vec::new(),
                wire: None,
                loss: Loss::default(),
            }
        }
    }

    impl Harness {
        fn plain() -> Self {
            let mut h = Harness::new();
            h.core.meshed = false;
            h
        }

        /// Carries every datagram both ways, runs due timers, lets the publisher send one
        /// packet per layer, then moves the clock on by 5 ms.
        fn pump(&mut self, clients: &mut [&mut Client]) {
            let node: SocketAddr = NODE.parse().unwrap();
            for c in clients.iter_mut() {
                let pc = c.peer.pc();
                if pc.poll_timeout().is_some_and(|t| t <= self.now) {
                    let _ = pc.handle_timeout(self.now);
                }
                for (i, o) in c.streams.iter_mut().enumerate() {
                    if !c.silent.contains(&(i as u8)) {
                        o.send(pc, self.now);
                    }
                }
                while let Some(msg) = pc.poll_write() {
                    if c.loss.drops(&msg.message) {
                        continue;
                    }
                    self.core
                        .handle_datagram(self.now, c.addr, None, &msg.message);
                }
            }
            if self.core.poll_timeout().is_some_and(|t| t <= self.now) {
                self.core.handle_timeout(self.now);
            }
            self.core.flush(self.now);
            for (dst, _, data) in self.core.batch.drain() {
                let Some(c) = clients.iter_mut().find(|c| c.addr == dst) else {
                    continue;
                };
                if let Some(wire) = &mut c.wire {
                    wire.push(data.clone());
                }
                let _ = c.peer.pc().handle_read(TaggedBytesMut {
                    now: self.now,
                    transport: TransportContext {
                        local_addr: dst,
                        peer_addr: node,
                        ecn: None,
                        transport_protocol: TransportProtocol::UDP,
                    },
                    message: data,
                });
            }
            for c in clients.iter_mut() {
                let Client {
                    peer,
                    streams,
                    deaf,
                    received,
                    rtp,
                    reports,
                    ..
                } = &mut **c;
                let pc = peer.pc();
                while pc.poll_event().is_some() {}
                while let Some(msg) = pc.poll_read() {
                    match msg.message {
                        RTCMessage::RtpPacket(_, p) => {
                            let h = &p.header;
                            rtp.push((h.ssrc, h.sequence_number, h.timestamp));
                            let key = p.payload.get(1).is_some_and(|b| b & 1 == 0);
                            received.push((p.payload.get(26).copied().unwrap_or(255), key));
                        }
                        RTCMessage::RtcpPacket(_, pkts) => {
                            for p in pkts {
                                if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                                    let before = rtp.iter().filter(|r| r.0 == sr.ssrc).count();
                                    reports.push((sr.clone(), before));
                                }
                                let Some(pli) = p.as_any().downcast_ref::<PictureLossIndication>()
                                else {
                                    continue;
                                };
                                for (i, o) in streams.iter_mut().enumerate() {
                                    if o.ssrc() == pli.media_ssrc && !deaf.contains(&(i as u8)) {
                                        o.request_keyframe();
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            self.advance(5 * MS);
            if self.ticks_due() {
                self.core.handle_tick(self.now);
                self.core.flush(self.now);
            }
        }

        /// `participant` publishes `video` from a new client: the client and its producer.
        fn publisher(
            &mut self,
            participant: ParticipantId,
            video: Vec<Encoding>,
        ) -> (Client, ProducerId) {
            let mut publisher = Client::new(
                "10.0.0.1:5000",
                PeerMedia {
                    audio: None,
                    video,
                    high_first: false,
                },
            );
            let (reply, mut answer) = oneshot::channel();
            self.command(Command::Publish {
                participant,
                offer: publisher.peer.offer().unwrap(),
                reply,
            });
            let published = answer.try_recv().unwrap().expect("published");
            publisher.peer.answer(&published.answer).unwrap();
            publisher.streams = publisher.peer.outgoing();
            (publisher, published.producers[0].1.producer_id.clone())
        }

        /// `participant` subscribes to `producer` from a new client, capped at `max_layer`.
        fn subscriber(
            &mut self,
            participant: ParticipantId,
            producer: ProducerId,
            max_layer: Option<u8>,
        ) -> (Client, Subscribed) {
            self.subscriber_offering(participant, producer, max_layer, Vec::new())
        }

        /// [`Harness::subscriber`] whose client offers only these SRTP profiles.
        fn subscriber_offering(
            &mut self,
            participant: ParticipantId,
            producer: ProducerId,
            max_layer: Option<u8>,
            profiles: Vec<SrtpProtectionProfile>,
        ) -> (Client, Subscribed) {
            let mut subscriber = Client::offering("10.0.0.2:5000", PeerMedia::default(), profiles);
            subscriber.peer.add_receiver(true).unwrap();
            let (reply, mut answer) = oneshot::channel();
            self.command(Command::Subscribe {
                participant,
                producer,
                offer: subscriber.peer.offer().unwrap(),
                max_layer,
                reply,
            });
            let subscribed = answer.try_recv().unwrap().expect("subscribed");
            subscriber.peer.answer(&subscribed.answer).unwrap();
            (subscriber, subscribed)
        }

        /// Whether the 100 ms periodic turn is due (the virtual clock moves 5 ms a pump).
        fn ticks_due(&mut self) -> bool {
            self.pumps += 1;
            self.pumps % 20 == 0
        }
    }

    fn pump_until(
        h: &mut Harness,
        clients: &mut [&mut Client],
        what: &str,
        cond: impl Fn(&[&mut Client]) -> bool,
    ) {
        for _ in 0..4000 {
            if cond(clients) {
                return;
            }
            h.pump(clients);
        }
        panic!("not within 20 virtual seconds: {what}");
    }

    /// Browsers lead their compound RTCP with a receiver report whose first block may name a
    /// stream that is no track here (an RTX stream): the NACK and PLI behind it must still
    /// reach the consumer (rtc routes a compound by its first SSRC and would drop it whole).
    #[test]
    fn a_nack_and_a_pli_behind_a_report_on_another_stream_reach_the_consumer() {
        use rtc::rtcp::receiver_report::ReceiverReport;
        use rtc::rtcp::reception_report::ReceptionReport;
        use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
        use std::sync::atomic::Ordering::Relaxed;

        let mut h = Harness::plain();
        h.core.cfg.send_side_bwe = true;
        let (user, _user_events) = h.join("kyc-rtcp", "user");
        let (agent, _agent_events) = h.join("kyc-rtcp", "agent");
        let layer = Encoding {
            packets_per_s: 200.0,
            payload_bytes: 200,
        };
        let (mut publisher, producer) = h.publisher(user, vec![layer]);
        let (mut subscriber, subscribed) = h.subscriber(agent, producer, None);
        pump_until(
            &mut h,
            &mut [&mut publisher, &mut subscriber],
            "100 packets forwarded",
            |c| c[1].received.len() >= 100,
        );
        // Past the keyframe requests of the start.
        for _ in 0..100 {
            h.pump(&mut [&mut publisher, &mut subscriber]);
        }

        let c = &h.core.consumers[h.core.consumer_ids[&subscribed.consumer_id]];
        let (media_ssrc, newest) = (c.ssrc, c.rewriter.last_seq().unwrap());
        let retransmitted = h.core.stats.rtp_retransmitted.load(Relaxed);
        let requested = h.core.stats.keyframe_requests.load(Relaxed);
        let pc = subscriber.peer.pc();
        let receiver = pc.get_receivers().next().unwrap();
        let compound: Vec<Box<dyn rtc::rtcp::Packet>> = vec![
            Box::new(ReceiverReport {
                ssrc: 1,
                reports: vec![ReceptionReport {
                    ssrc: 0x5eed_0001,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            Box::new(TransportLayerNack {
                sender_ssrc: 1,
                media_ssrc,
                nacks: vec![NackPair::new(newest.wrapping_sub(3))],
            }),
            Box::new(PictureLossIndication {
                sender_ssrc: 1,
                media_ssrc,
            }),
        ];
        pc.rtp_receiver(receiver)
            .unwrap()
            .write_rtcp(h.now, compound)
            .unwrap();
        for _ in 0..4 {
            h.pump(&mut [&mut publisher, &mut subscriber]);
        }
        assert_eq!(
            h.core.stats.rtp_retransmitted.load(Relaxed),
            retransmitted + 1,
            "the NACKed packet was sent again"
        );
        assert_eq!(
            h.core.stats.keyframe_requests.load(Relaxed),
            requested + 1,
            "the PLI became a keyframe request to the publisher"
        );
    }

    /// Browsers drop their top simulcast layer under CPU or bandwidth pressure, sometimes
    /// after a few packets and before any keyframe of it: a consumer joining then gets the
    /// best layer still flowing rather than waiting for the stopped one forever.
    #[test]
    fn a_top_layer_that_stopped_after_a_few_packets_is_not_waited_for() {
        let mut h = Harness::plain();
        let (user, _user_events) = h.join("kyc-stop", "user");
        let (agent, _agent_events) = h.join("kyc-stop", "agent");
        let layer = Encoding {
            packets_per_s: 200.0,
            payload_bytes: 200,
        };
        let (mut publisher, producer) = h.publisher(user, vec![layer; 3]);
        publisher.deaf.push(2);
        for _ in 0..100 {
            h.pump(&mut [&mut publisher]);
        }
        publisher.silent.push(2);
        for _ in 0..600 {
            h.pump(&mut [&mut publisher]);
        }
        let (mut subscriber, _) = h.subscriber(agent, producer, None);
        pump_until(
            &mut h,
            &mut [&mut publisher, &mut subscriber],
            "40 packets of a layer still flowing",
            |c| c[1].received.len() >= 40,
        );
        assert!(subscriber.received[0].1, "starts on a keyframe");
        assert!(
            subscriber.received.iter().all(|&(l, _)| l == 1),
            "the best layer flowing: {:?}",
            &subscriber.received[..5]
        );
    }

    #[test]
    fn a_simulcast_consumer_switches_layer_only_on_a_keyframe_of_the_new_layer() {
        switches_on_keyframes(false);
    }

    #[test]
    fn with_send_side_estimation_the_subscribers_feedback_drives_its_consumer() {
        switches_on_keyframes(true);
    }

    /// With `send_side_bwe`, the subscriber's transport-cc feedback (the rtc client reports
    /// arrivals) reaches GCC and the consumer's layer choice; the switch rules are the same.
    fn switches_on_keyframes(send_side_bwe: bool) {
        let mut h = Harness::plain();
        h.core.cfg.send_side_bwe = send_side_bwe;
        let (user, _user_events) = h.join("kyc-sim", "user");
        let (agent, mut agent_events) = h.join("kyc-sim", "agent");
        let layer = Encoding {
            packets_per_s: 200.0,
            payload_bytes: 200,
        };
        let (mut publisher, producer) = h.publisher(user, vec![layer; 3]);
        let (mut subscriber, subscribed) = h.subscriber(agent.clone(), producer, Some(0));

        // Capped at the lowest layer: it starts on a keyframe of layer 0 and gets only that.
        pump_until(
            &mut h,
            &mut [&mut publisher, &mut subscriber],
            "40 packets of layer 0",
            |c| c[1].received.len() >= 40,
        );
        assert!(subscriber.received[0].1, "starts on a keyframe");
        assert!(subscriber.received.iter().all(|&(l, _)| l == 0));

        // The cap is lifted, but layer 2 answers no keyframe request for a while: the
        // consumer stays on layer 0 without a gap rather than forwarding layer 2 mid-stream.
        publisher.deaf.push(2);
        let (reply, _) = oneshot::channel();
        let agent_id = agent.clone();
        h.command(Command::SetConsumerLayer {
            participant: agent,
            consumer: subscribed.consumer_id.clone(),
            max_layer: 2,
            reply,
        });
        let before = subscriber.received.len();
        for _ in 0..300 {
            h.pump(&mut [&mut publisher, &mut subscriber]);
        }
        let held = &subscriber.received[before..];
        assert!(held.len() > 200, "media kept flowing: {}", held.len());
        assert!(
            held.iter().all(|&(l, _)| l == 0),
            "no layer 2 before its keyframe"
        );

        // Layer 2's keyframe comes: from it on, only layer 2, starting with that keyframe.
        publisher.deaf.clear();
        publisher.streams[2].request_keyframe();
        let before = subscriber.received.len();
        pump_until(
            &mut h,
            &mut [&mut publisher, &mut subscriber],
            "layer 2 arriving",
            |c| c[1].received[before..].iter().any(|&(l, _)| l == 2),
        );
        for _ in 0..20 {
            h.pump(&mut [&mut publisher, &mut subscriber]);
        }
        let after = &subscriber.received[before..];
        let first = after.iter().position(|&(l, _)| l == 2).unwrap();
        assert!(after[first].1, "the switch happens on layer 2's keyframe");
        assert!(after[first..].iter().all(|&(l, _)| l == 2), "{after:?}");
        if send_side_bwe {
            let sub = h.core.participants[h.core.participant_ids[&agent_id]]
                .subscribe
                .unwrap();
            let estimate = h.core.conns[sub].estimate.as_ref().unwrap();
            assert!(
                estimate.reports() > 0,
                "transport-cc feedback reached the estimator"
            );
            let c = &h.core.consumers[h.core.consumer_ids[&subscribed.consumer_id]];
            assert!(
                c.selector.bandwidth().is_some_and(|b| b > 0) && estimate.target().is_some(),
                "and the consumer's layer choice"
            );
        }
        let events = drain(&mut agent_events);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, SfuEvent::ConsumerLayerChanged { layer: 2, .. })),
            "the agent is told: {events:?}"
        );
        if send_side_bwe {
            assert!(
                events.iter().any(|e| matches!(
                    e,
                    SfuEvent::ConsumerLayerChanged {
                        estimate_bps: Some(_),
                        ..
                    }
                )),
                "with the estimate it was chosen by: {events:?}"
            );
        }
    }

    /// A user publishing and an agent subscribed, flowing: the agent's subscribe connection.
    fn flowing_call(h: &mut Harness) -> (Client, Client, ConnKey, ConsumerKey) {
        flowing_call_offering(h, Vec::new())
    }

    /// [`flowing_call`] with the agent's client offering only these SRTP profiles.
    fn flowing_call_offering(
        h: &mut Harness,
        profiles: Vec<SrtpProtectionProfile>,
    ) -> (Client, Client, ConnKey, ConsumerKey) {
        let (user, _user_events) = h.join("kyc-srtp", "user");
        let (agent, _agent_events) = h.join("kyc-srtp", "agent");
        let layer = Encoding {
            packets_per_s: 200.0,
            payload_bytes: 600,
        };
        let (mut publisher, producer) = h.publisher(user, vec![layer]);
        let (mut subscriber, subscribed) =
            h.subscriber_offering(agent.clone(), producer, None, profiles);
        pump_until(
            h,
            &mut [&mut publisher, &mut subscriber],
            "100 packets forwarded",
            |c| c[1].received.len() >= 100,
        );
        let ck = h.core.participants[h.core.participant_ids[&agent]]
            .subscribe
            .unwrap();
        let cid = h.core.consumer_ids[&subscribed.consumer_id];
        (publisher, subscriber, ck, cid)
    }

    /// The in-place path rests on how rtc 0.21.1 derives SRTP keys (`media::srtp`): if an rtc
    /// upgrade changes it, this fails here rather than in a browser. The key is taken, confirmed
    /// against rtc's own SRTCP, and an independent rtc peer decrypts and decodes the copies.
    #[test]
    fn copies_encrypted_in_place_with_the_key_taken_from_rtc_decrypt_at_an_rtc_subscriber() {
        in_place_with(Vec::new(), crate::media::srtp::Profile::AeadAes128Gcm);
    }

    /// The same with the other profile browsers offer, AES-CM-128 with HMAC-SHA1-80.
    #[test]
    fn copies_encrypted_in_place_with_aes_cm_hmac_sha1_80_decrypt_at_an_rtc_subscriber() {
        in_place_with(
            vec![SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80],
            crate::media::srtp::Profile::Aes128CmHmacSha1_80,
        );
    }

    fn in_place_with(offered: Vec<SrtpProtectionProfile>, expected: crate::media::srtp::Profile) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut h = Harness::plain();
        h.core.cfg.send_side_bwe = true;
        let (_publisher, subscriber, ck, _) = flowing_call_offering(&mut h, offered);
        match &h.core.conns[ck].send_path {
            SendPath::InPlace(p) => assert_eq!(p.profile(), expected),
            _ => panic!("the connection is not sending in place"),
        }
        let stats = &h.core.stats;
        assert_eq!(stats.srtp_in_place_connections.load(Relaxed), 1);
        assert_eq!(stats.srtp_fallback_connections.load(Relaxed), 0);
        assert_eq!(
            stats.srtp_key_mismatch.load(Relaxed),
            0,
            "rtc's SRTCP confirmed the key"
        );
        assert!(
            !h.core.conns[ck].send_path.awaits_key_check(),
            "the key was checked against rtc's SRTCP"
        );
        assert!(subscriber.received[0].1, "decoded from a keyframe");
        let estimate = h.core.conns[ck].estimate.as_ref().unwrap();
        assert!(
            estimate.reports() > 0,
            "the subscriber's transport-cc feedback on the copies reached the estimator"
        );
    }

    /// Browsers align audio and video by the sender reports of each stream: a stream sent in
    /// place gets them from the node, with counts and an RTP time that match what was sent.
    #[test]
    fn streams_sent_in_place_have_sender_reports_matching_what_was_sent() {
        let mut h = Harness::plain();
        let (mut publisher, mut subscriber, _, cid) = flowing_call(&mut h);
        let ssrc = h.core.consumers[cid].ssrc;
        pump_until(
            &mut h,
            &mut [&mut publisher, &mut subscriber],
            "two sender reports",
            |c| c[1].reports.iter().filter(|r| r.0.ssrc == ssrc).count() >= 2,
        );
        let (sr, received) = subscriber
            .reports
            .iter()
            .rfind(|r| r.0.ssrc == ssrc)
            .unwrap();
        assert!(sr.ntp_time != 0);
        // Nothing is lost here: the report counts what the subscriber had received before it
        // (a copy or two may be on the way behind it).
        let received = *received as u32;
        assert!(
            (received..=received + 2).contains(&sr.packet_count),
            "packet count {} against {received} received before the report",
            sr.packet_count
        );
        assert!(sr.octet_count >= sr.packet_count * 600, "payload octets");
        // The report's RTP time is the newest packet's, moved on by the time since (a tick
        // at most here), so it matches the stream's timestamps now to within 200 ms.
        let newest = subscriber
            .rtp
            .iter()
            .filter(|r| r.0 == ssrc)
            .map(|r| r.2)
            .max_by_key(|&ts| ts.wrapping_sub(sr.rtp_time) as i32)
            .unwrap();
        let off = (sr.rtp_time.wrapping_sub(newest) as i32).unsigned_abs();
        assert!(off < 90_000 / 5, "RTP time {off} ticks from the stream's");
    }

    /// The subscriber NACKs the copy sent five before the newest; the call goes on a little.
    /// Returns the NACKed sequence number.
    fn nack_a_recent_copy(
        h: &mut Harness,
        publisher: &mut Client,
        subscriber: &mut Client,
        cid: ConsumerKey,
    ) -> u16 {
        use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
        let c = &h.core.consumers[cid];
        let lost = c.rewriter.last_seq().unwrap().wrapping_sub(5);
        let nack: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: c.ssrc,
            nacks: vec![NackPair::new(lost)],
        })];
        let pc = subscriber.peer.pc();
        let receiver = pc.get_receivers().next().unwrap();
        pc.rtp_receiver(receiver)
            .unwrap()
            .write_rtcp(h.now, nack)
            .unwrap();
        for _ in 0..4 {
            h.pump(&mut [&mut *publisher, &mut *subscriber]);
        }
        lost
    }

    /// Decrypts the captured datagrams of one SSRC in order with the node's outbound key
    /// (rtc's SRTP, an implementation independent of `media::srtp`): sequence number → packet.
    fn decrypt_stream(
        key: &crate::media::srtp::MasterKey,
        wire: &[BytesMut],
        ssrc: u32,
    ) -> std::collections::HashMap<u16, rtc::rtp::Packet> {
        use rtc::shared::marshal::Unmarshal;
        let crypto = rtc::crypto::default_provider().unwrap();
        let mut ctx = rtc::srtp::context::Context::new(
            &key.key,
            &key.salt_block[..12],
            rtc::srtp::protection_profile::ProtectionProfile::AeadAes128Gcm,
            None,
            None,
            crypto.crypto(),
        )
        .unwrap();
        let mut out = std::collections::HashMap::new();
        for d in wire {
            if d.len() < 12 || d[0] >> 6 != 2 || (192..=223).contains(&d[1]) {
                continue;
            }
            if u32::from_be_bytes([d[8], d[9], d[10], d[11]]) != ssrc {
                continue;
            }
            let Ok(clear) = ctx.decrypt_rtp(d) else {
                continue; // a replay of a number already seen
            };
            let pkt = rtc::rtp::Packet::unmarshal(&mut &clear[..]).unwrap();
            out.entry(pkt.header.sequence_number).or_insert(pkt);
        }
        out
    }

    /// A NACKed copy goes again on the RTX stream (a fresh SRTP index) and carries exactly
    /// what the original carried: same payload after the original sequence number, same
    /// timestamp, marker and header extensions but its own transport-wide number.
    #[test]
    fn a_nacked_copy_is_repaired_on_rtx_with_the_original_payload_and_extensions() {
        let mut h = Harness::plain();
        h.core.cfg.send_side_bwe = true;
        let (mut publisher, mut subscriber, ck, cid) = flowing_call(&mut h);
        subscriber.wire = Some(Vec::new());
        for _ in 0..20 {
            h.pump(&mut [&mut publisher, &mut subscriber]);
        }
        let c = &h.core.consumers[cid];
        let (ssrc, rtx) = (c.ssrc, c.rtx.unwrap());
        let lost = nack_a_recent_copy(&mut h, &mut publisher, &mut subscriber, cid);
        let key = h.core.conns[ck]
            .capture
            .as_ref()
            .unwrap()
            .outbound()
            .unwrap();
        let twcc = h.core.consumers[cid].twcc_id.unwrap();
        let wire = subscriber.wire.take().unwrap();
        let original = &decrypt_stream(&key, &wire, ssrc)[&lost];
        let repairs = decrypt_stream(&key, &wire, rtx.ssrc);
        let repair = repairs
            .values()
            .find(|p| p.payload[..2] == lost.to_be_bytes())
            .expect("a repair of the NACKed copy on the RTX stream");
        assert_eq!(
            &repair.payload[2..],
            &original.payload[..],
            "the original payload"
        );
        assert_eq!(repair.header.timestamp, original.header.timestamp);
        assert_eq!(repair.header.marker, original.header.marker);
        assert_eq!(repair.header.payload_type, rtx.payload_type);
        let others = |p: &rtc::rtp::Packet| {
            let mut e: Vec<_> = p
                .header
                .extensions
                .iter()
                .filter(|e| e.id != twcc)
                .map(|e| (e.id, e.payload.clone()))
                .collect();
            e.sort();
            e
        };
        assert_eq!(
            others(repair),
            others(original),
            "the same header extensions"
        );
        assert_ne!(
            repair.header.get_extension(twcc),
            original.header.get_extension(twcc),
            "its own transport-wide number"
        );
    }

    /// Without RTX, a repair goes on the consumer's own SSRC: the datagram must be the
    /// original's, byte for byte (the same SRTP index with other bytes would reuse a nonce).
    #[test]
    fn a_repair_without_rtx_repeats_the_original_datagram_byte_for_byte() {
        use std::sync::atomic::Ordering::Relaxed;
        let mut h = Harness::plain();
        h.core.cfg.send_side_bwe = true;
        let (mut publisher, mut subscriber, _, cid) = flowing_call(&mut h);
        // As for a client that negotiated no RTX.
        h.core.consumers[cid].rtx = None;
        subscriber.wire = Some(Vec::new());
        for _ in 0..20 {
            h.pump(&mut [&mut publisher, &mut subscriber]);
        }
        let ssrc = h.core.consumers[cid].ssrc;
        let retransmitted = h.core.stats.rtp_retransmitted.load(Relaxed);
        let lost = nack_a_recent_copy(&mut h, &mut publisher, &mut subscriber, cid);
        assert_eq!(
            h.core.stats.rtp_retransmitted.load(Relaxed),
            retransmitted + 1
        );
        let wire = subscriber.wire.take().unwrap();
        let copies: Vec<&BytesMut> = wire
            .iter()
            .filter(|d| {
                d.len() > 12
                    && d[0] >> 6 == 2
                    && !(192..=223).contains(&d[1])
                    && d[8..12] == ssrc.to_be_bytes()
                    && d[2..4] == lost.to_be_bytes()
            })
            .collect();
        assert_eq!(copies.len(), 2, "the original and its repair");
        assert_eq!(copies[0], copies[1]);
    }

    /// With in-place encryption off, copies go through rtc's sender: counted, still decoded,
    /// and still numbered for the estimator.
    #[test]
    fn with_in_place_encryption_off_copies_go_through_rtcs_sender_and_are_counted() {
        use std::sync::atomic::Ordering::Relaxed;
        let mut h = Harness::plain();
        h.core.cfg.send_side_bwe = true;
        h.core.cfg.srtp_in_place = false;
        let (mut publisher, mut subscriber, ck, _) = flowing_call(&mut h);
        pump_until(
            &mut h,
            &mut [&mut publisher, &mut subscriber],
            "rtc's own sender reports",
            |c| c[1].reports.iter().any(|r| r.0.packet_count > 0),
        );
        let stats = &h.core.stats;
        assert_eq!(stats.srtp_in_place_connections.load(Relaxed), 0);
        assert_eq!(stats.srtp_fallback_connections.load(Relaxed), 1);
        assert!(matches!(h.core.conns[ck].send_path, SendPath::Rtc));
        assert!(subscriber.received[0].1, "decoded from a keyframe");
        assert!(
            h.core.conns[ck].estimate.as_ref().unwrap().reports() > 0,
            "transport-cc feedback reached the estimator on rtc's path too"
        );
    }

    /// A packet lost on the publisher's uplink that its retransmission fills costs nothing
    /// more; one never repaired would leave every decoder of the layer stuck until it asks for
    /// a keyframe (browsers wait about 3 s): the node asks the publisher instead, once the
    /// loss has stayed unrepaired for `UNREPAIRED_LOSS_KEYFRAME`.
    #[test]
    fn a_publishers_loss_left_unrepaired_gets_the_layer_a_keyframe() {
        use crate::sfu::worker::UNREPAIRED_LOSS_KEYFRAME;
        use std::sync::atomic::Ordering::Relaxed;
        let mut h = Harness::plain();
        let (mut publisher, mut subscriber, _, _) = flowing_call(&mut h);
        let asked = |h: &Harness| h.core.stats.keyframe_requests_unrepaired_loss.load(Relaxed);
        let keyframes = |c: &Client| c.received.iter().filter(|r| r.1).count();

        publisher.loss.next = Some(false);
        for _ in 0..400 {
            h.pump(&mut [&mut publisher, &mut subscriber]);
        }
        assert_eq!(publisher.loss.dropped, 1);
        assert_eq!(
            asked(&h),
            0,
            "the publisher's retransmission filled the gap"
        );

        let before = keyframes(&subscriber);
        publisher.loss.next = Some(true);
        let lost_at = h.now;
        pump_until(
            &mut h,
            &mut [&mut publisher, &mut subscriber],
            "a keyframe for the subscriber after the unrepaired loss",
            |c| keyframes(c[1]) > before,
        );
        assert!(
            publisher.loss.dropped > 2,
            "the publisher kept retransmitting it"
        );
        assert_eq!(asked(&h), 1);
        let waited = h.now - lost_at;
        assert!(
            waited >= UNREPAIRED_LOSS_KEYFRAME && waited < 2 * UNREPAIRED_LOSS_KEYFRAME,
            "keyframe after {waited:?}"
        );
    }
}
