//! WebRTC transports: the peer connections of participants, one to publish and one to
//! receive. Datagrams and ICE-TCP frames are matched to their connection by source address,
//! bound only by an authenticated STUN Binding request; connections are drained of what they
//! have to send, their timers run, their state changes followed; offers are negotiated.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::RTCPeerConnection;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

use super::engine::build_peer_connection;
use super::keys::{Arena, ConnKey, ConsumerKey, ParticipantKey, ProducerKey};
use super::*;
use super::{producer::*, worker::*};
use crate::media::demux::{binding_request_is_authentic, binding_request_local_ufrag};

pub(super) const MAX_ADDRS_PER_CONN: usize = 8;

pub(super) struct Conn {
    pub(super) pc: RTCPeerConnection,
    pub(super) kind: TransportKind,
    pub(super) participant: ParticipantKey,
    pub(super) ufrag: String,
    /// Local ICE password: the key of the MESSAGE-INTEGRITY that binds a new address.
    pub(super) ice_pwd: String,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) tcp_peers: Vec<SocketAddr>,
    /// Local address the client sends to; replies leave from it so the client sees the
    /// candidate it chose.
    pub(super) src_ip: Option<IpAddr>,
    pub(super) deadline: Option<Instant>,
    pub(super) connected: bool,
    pub(super) dirty: bool,
    /// Subscribe side: the send-side bandwidth estimate towards the client (`sfu::bwe`).
    pub(super) estimate: Option<std::sync::Arc<super::bwe::SendEstimate>>,
    /// Subscribe side: sends repairs and probes on RTX (`sfu::rtx`).
    pub(super) repairs: Option<std::sync::Arc<super::rtx::Repairs>>,
    /// Subscribe side: when to probe for more bandwidth (`sfu::bwe`).
    pub(super) prober: super::bwe::Prober,
    /// Subscribe side: transport-wide numbering and the estimator (`sfu::egress`).
    pub(super) send_side: Option<super::egress::SendSide>,
    /// Subscribe side: how RTP leaves (`sfu::egress`).
    pub(super) send_path: super::egress::SendPath,
    /// Subscribe side with in-place encryption: where rtc's key derivation is watched.
    pub(super) capture: Option<std::sync::Arc<crate::media::srtp::KeyCapture>>,
    /// Where media goes: the selected candidate pair's remote end, as rtc last addressed
    /// something other than STUN to it.
    pub(super) dest: Option<(SocketAddr, TransportProtocol)>,
    /// When the next sender reports are due (streams encrypted in place).
    pub(super) next_report: Option<Instant>,
    pub(super) created: Instant,
    /// Publish side: incoming SSRC → (producer, layer); filled as streams open.
    pub(super) ssrc_route: HashMap<u32, (ProducerKey, u8)>,
    /// Publish side: track id → producer.
    pub(super) track_producer: HashMap<String, ProducerKey>,
    /// Subscribe side: consumer track id → consumer.
    pub(super) track_consumer: HashMap<String, ConsumerKey>,
}

pub(super) fn sdp_error(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.chars().take(300).collect()
}

/// Whether a client whose first subscribe offer is `sdp` can take repairs and probes on RTX
/// (RFC 4588): its offer proposes RTX, or has no video yet (a first subscribe to audio; every
/// browser proposes RTX with video, and a client that later does not gets no retransmissions
/// on a transport-cc connection, counted in `meridian_nack_unserved_no_rtx_total`).
pub(super) fn offers_rtx(sdp: &str) -> bool {
    let rtx = sdp
        .lines()
        .any(|l| l.starts_with("a=rtpmap:") && l.to_ascii_lowercase().contains(" rtx/"));
    rtx || !sdp.lines().any(|l| l.starts_with("m=video"))
}

/// Simulcast RIDs of one m-line, in the order of its `a=simulcast:send` attribute.
pub(super) fn simulcast_rids(sdp: &str, mid: &str) -> Vec<String> {
    let mut in_section = false;
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            in_section = false;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            in_section = m == mid;
        } else if in_section {
            if let Some(list) = line.strip_prefix("a=simulcast:send ") {
                let first = list.split(' ').next().unwrap_or("");
                return first
                    .split(';')
                    .map(|alt| alt.split(',').next().unwrap_or("").trim_start_matches('~'))
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
        }
    }
    Vec::new()
}

/// The mids of an offer's media sections that send (`sendonly`, `sendrecv` or no direction),
/// leaving out rejected ones (port 0) and data channels.
pub(super) fn sending_mids(sdp: &str) -> Vec<String> {
    let mut out = Vec::new();
    for section in sdp.split("\nm=").skip(1) {
        let mut lines = section.lines();
        let media = lines.next().unwrap_or("");
        let mut fields = media.split_whitespace();
        let (kind, port) = (fields.next(), fields.next());
        if !matches!(kind, Some("audio" | "video")) || port == Some("0") {
            continue;
        }
        let mut mid = None;
        let mut sends = true;
        for l in lines.map(str::trim_end) {
            if let Some(m) = l.strip_prefix("a=mid:") {
                mid = Some(m.to_owned());
            }
            if matches!(l, "a=recvonly" | "a=inactive") {
                sends = false;
            }
        }
        if let (true, Some(mid)) = (sends, mid) {
            out.push(mid);
        }
    }
    out
}

pub(super) fn sdp_attribute(sdp: &str, prefix: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix(prefix))
        .map(str::to_owned)
}

/// Binding requests from addresses not yet bound, checked per source address and second:
/// more than this from one address are dropped unchecked, so a flood of forged requests
/// costs bounded HMAC work and cannot crowd out a real client's checks from its own address.
pub(super) const UNAUTHENTICATED_PER_SOURCE: u32 = 200;

/// Source addresses tracked per second; past this, new ones wait for the next second.
pub(super) const UNAUTHENTICATED_SOURCES: usize = 4096;

/// Rate limit for STUN from sources not bound to any connection (sans-I/O: time passed in).
pub(super) struct UnauthenticatedLimiter {
    pub(super) window: Option<Instant>,
    pub(super) counts: HashMap<IpAddr, u32>,
}

impl UnauthenticatedLimiter {
    pub(super) fn new() -> Self {
        Self {
            window: None,
            counts: HashMap::new(),
        }
    }

    pub(super) fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.counts.clear();
        }
        if self.counts.len() >= UNAUTHENTICATED_SOURCES && !self.counts.contains_key(&ip) {
            return false;
        }
        let n = self.counts.entry(ip).or_default();
        *n += 1;
        *n <= UNAUTHENTICATED_PER_SOURCE
    }
}

pub(super) fn conn_connected(conns: &Arena<ConnKey, Conn>, ck: ConnKey) -> bool {
    conns.get(ck).is_some_and(|c| c.connected)
}

impl Worker {
    /// One UDP datagram from `src`, received on local address `dst_ip`.
    pub(super) fn handle_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst_ip: Option<IpAddr>,
        d: &[u8],
    ) {
        self.stats.datagrams_in.fetch_add(1, Relaxed);
        self.stats.bytes_in.fetch_add(d.len() as u64, Relaxed);
        if d.len() > self.cfg.max_datagram_bytes {
            self.stats.datagrams_oversized.fetch_add(1, Relaxed);
            return;
        }
        let Some(ck) = self.route(now, src, dst_ip, d) else {
            self.stats.datagrams_unroutable.fetch_add(1, Relaxed);
            return;
        };
        self.feed(now, ck, src, TransportProtocol::UDP, BytesMut::from(d));
    }

    /// An ICE-TCP connection from `peer` was accepted.
    pub(super) fn handle_tcp_opened(&mut self, peer: SocketAddr) {
        self.tcp_open.insert(peer);
        self.stats.tcp_connections.fetch_add(1, Relaxed);
    }

    /// An ICE-TCP connection ended.
    pub(super) fn handle_tcp_closed(&mut self, peer: SocketAddr) {
        if !self.tcp_open.remove(&peer) {
            return;
        }
        if let Some(ck) = self.by_tcp_addr.remove(&peer) {
            if let Some(c) = self.conns.get_mut(ck) {
                c.tcp_peers.retain(|p| *p != peer);
            }
        }
        self.stats.tcp_connections.fetch_sub(1, Relaxed);
    }

    /// Cuts an ICE-TCP connection (the driver drops its writer, which closes it).
    pub(super) fn cut_tcp(&mut self, peer: SocketAddr) {
        self.handle_tcp_closed(peer);
        self.tcp_cut.push(peer);
    }

    /// One RFC 4571 frame from an ICE-TCP connection.
    pub(super) fn handle_tcp_frame(&mut self, now: Instant, peer: SocketAddr, data: BytesMut) {
        if !self.tcp_open.contains(&peer) {
            return; // cut already; frames in flight
        }
        self.stats.tcp_frames_in.fetch_add(1, Relaxed);
        let ck = match self.by_tcp_addr.get(&peer) {
            Some(&ck) => Some(ck),
            None => self
                .authenticate(now, peer, &data)
                .filter(|&ck| self.conns[ck].tcp_peers.len() < MAX_ADDRS_PER_CONN),
        };
        let Some(ck) = ck else {
            // A connection that does not open with an authenticated Binding request for a
            // known connection is cut.
            self.stats.datagrams_unroutable.fetch_add(1, Relaxed);
            self.cut_tcp(peer);
            return;
        };
        if self.by_tcp_addr.insert(peer, ck).is_none() {
            self.conns[ck].tcp_peers.push(peer);
        }
        self.feed(now, ck, peer, TransportProtocol::TCP, data);
    }

    /// Hands one packet from the network to its peer connection.
    pub(super) fn feed(
        &mut self,
        now: Instant,
        ck: ConnKey,
        src: SocketAddr,
        transport_protocol: TransportProtocol,
        message: BytesMut,
    ) {
        let local_addr = self.announced;
        let conn = &mut self.conns[ck];
        let res = crate::alloc::in_rtc(|| {
            conn.pc.handle_read(TaggedBytesMut {
                now,
                transport: TransportContext {
                    local_addr,
                    peer_addr: src,
                    ecn: None,
                    transport_protocol,
                },
                message,
            })
        });
        if res.is_err() {
            // A malformed datagram from a known peer: counted (not logged: this is the
            // per-packet path), never fatal.
            self.stats.datagrams_unroutable.fetch_add(1, Relaxed);
        }
        self.process_conn(now, ck);
    }

    pub(super) fn route(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst_ip: Option<IpAddr>,
        d: &[u8],
    ) -> Option<ConnKey> {
        if let Some(&ck) = self.by_addr.get(&src) {
            return Some(ck);
        }
        let ck = self.authenticate(now, src, d)?;
        let conn = &mut self.conns[ck];
        if conn.addrs.len() >= MAX_ADDRS_PER_CONN {
            // Only the client can bind addresses, so the oldest one is the stalest.
            let old = conn.addrs.remove(0);
            self.by_addr.remove(&old);
        }
        conn.addrs.push(src);
        if conn.src_ip.is_none() {
            conn.src_ip = dst_ip;
        }
        self.by_addr.insert(src, ck);
        Some(ck)
    }

    /// The connection a STUN Binding request from an unbound address belongs to, if it is
    /// signed with that connection's ICE password. The username alone travels in clear, so
    /// binding on it would let anyone who saw it take the connection's address slots.
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        src: SocketAddr,
        d: &[u8],
    ) -> Option<ConnKey> {
        let ck = *self.by_ufrag.get(binding_request_local_ufrag(d)?)?;
        if !self.unauthenticated.allow(now, src.ip()) {
            self.stats.stun_rate_limited.fetch_add(1, Relaxed);
            return None;
        }
        if !binding_request_is_authentic(d, self.conns[ck].ice_pwd.as_bytes()) {
            self.stats.stun_unauthenticated.fetch_add(1, Relaxed);
            return None;
        }
        Some(ck)
    }

    /// Drains everything a connection has to say: datagrams out, events, media, timers.
    pub(super) fn process_conn(&mut self, now: Instant, ck: ConnKey) {
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        conn.dirty = false;
        let src_ip = conn.src_ip;
        let mut key_check = None;
        while let Some(msg) = crate::alloc::in_rtc(|| conn.pc.poll_write()) {
            // Anything but STUN goes to the selected pair: where copies sent in place go too.
            if conn.kind == TransportKind::Subscribe && msg.message.first().is_some_and(|&b| b > 3)
            {
                conn.dest = Some((msg.transport.peer_addr, msg.transport.transport_protocol));
                if key_check.is_none()
                    && conn.send_path.awaits_key_check()
                    && super::egress::is_rtcp(&msg.message)
                {
                    key_check = Some(msg.message.clone());
                }
            }
            if msg.transport.transport_protocol == TransportProtocol::TCP {
                if self.tcp_open.contains(&msg.transport.peer_addr) {
                    self.tcp_frames
                        .push((msg.transport.peer_addr, msg.message.freeze()));
                } else {
                    self.stats.send_errors.fetch_add(1, Relaxed);
                }
                continue;
            }
            // Sent together with everything else this turn produces (see `send_batch`).
            self.batch
                .push(msg.transport.peer_addr, src_ip, msg.message);
        }
        while let Some(ev) = crate::alloc::in_rtc(|| conn.pc.poll_event()) {
            self.event_scratch.push(ev);
        }
        if let Some(d) = key_check {
            self.confirm_key(ck, &d);
        }
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        while let Some(msg) = crate::alloc::in_rtc(|| conn.pc.poll_read()) {
            match msg.message {
                RTCMessage::RtpPacket(track, pkt) => self.rtp_scratch.push((track, pkt)),
                RTCMessage::RtcpPacket(track, pkts) => self.rtcp_scratch.push((track, pkts)),
                _ => {}
            }
        }
        self.schedule(ck);

        let mut events = std::mem::take(&mut self.event_scratch);
        for ev in events.drain(..) {
            self.on_pc_event(now, ck, ev);
        }
        self.event_scratch = events;

        let mut rtp = std::mem::take(&mut self.rtp_scratch);
        for (track, pkt) in rtp.drain(..) {
            self.on_rtp(now, ck, &track, pkt);
        }
        self.rtp_scratch = rtp;

        let mut rtcp = std::mem::take(&mut self.rtcp_scratch);
        for (track, pkts) in rtcp.drain(..) {
            self.on_subscriber_rtcp(now, ck, &track, &pkts);
            for p in &pkts {
                if let Some(sr) = p
                    .as_any()
                    .downcast_ref::<rtc::rtcp::sender_report::SenderReport>()
                {
                    self.on_sender_report(ck, sr);
                }
            }
        }
        self.rtcp_scratch = rtcp;
    }

    pub(super) fn schedule(&mut self, ck: ConnKey) {
        let Some(conn) = self.conns.get_mut(ck) else {
            return;
        };
        let next = crate::alloc::in_rtc(|| conn.pc.poll_timeout());
        if next != conn.deadline {
            conn.deadline = next;
            if let Some(t) = next {
                self.timers.push(Reverse((t, ck)));
            }
        }
    }

    /// When `handle_timeout` is next due, if anything waits.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        let timers = self.timers.peek().map(|Reverse((t, _))| *t);
        match (timers, self.next_probe()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the peer connection timers due by `now`.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        if !self.probing.is_empty() {
            self.send_probes(now);
        }
        while let Some(Reverse((t, ck))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(ck) else {
                continue;
            };
            if conn.deadline != Some(t) {
                continue; // superseded
            }
            conn.deadline = None;
            if let Err(e) = crate::alloc::in_rtc(|| conn.pc.handle_timeout(now)) {
                tracing::debug!(error = %e, "peer connection timeout handling failed");
            }
            self.process_conn(now, ck);
            // A deadline that does not move forward would spin; push it a little.
            if let Some(conn) = self.conns.get_mut(ck) {
                if conn.deadline.is_some_and(|d| d <= now) {
                    let d = now + Duration::from_millis(1);
                    conn.deadline = Some(d);
                    self.timers.push(Reverse((d, ck)));
                }
            }
        }
    }

    pub(super) fn mark_dirty(&mut self, ck: ConnKey) {
        if let Some(c) = self.conns.get_mut(ck) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(ck);
            }
        }
    }

    /// Drains every connection that has something to send; call at the end of each turn.
    pub(super) fn flush(&mut self, now: Instant) {
        while let Some(ck) = self.dirty.pop() {
            self.process_conn(now, ck);
        }
    }

    pub(super) fn on_pc_event(&mut self, now: Instant, ck: ConnKey, ev: RTCPeerConnectionEvent) {
        match ev {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                let Some(conn) = self.conns.get_mut(ck) else {
                    return;
                };
                let was_connected = conn.connected;
                // Media keeps flowing while the client's consent is fresh (RFC 7675): ICE
                // calls a pair disconnected after 10 s without a check and fails it at 30 s,
                // and only failure or close stops forwarding. Clients that check every 5-7 s
                // (Firefox, aiortc, RFC 7675 pacing) are never cut off between checks.
                conn.connected = matches!(
                    state,
                    RTCPeerConnectionState::Connected | RTCPeerConnectionState::Disconnected
                );
                let (pk, kind) = (conn.participant, conn.kind);
                tracing::debug!(?kind, %state, "peer connection state");
                if let Some(p) = self.participants.get(pk) {
                    p.send(SfuEvent::TransportState {
                        transport: kind,
                        state: state.to_string(),
                    });
                }
                if !was_connected
                    && conn_connected(&self.conns, ck)
                    && kind == TransportKind::Subscribe
                {
                    self.start_send_path(now, ck);
                    // Consumers waiting on this transport need a keyframe now.
                    let consumers: Vec<ConsumerKey> = self.participants[pk].consumers.clone();
                    for c in consumers {
                        self.request_keyframe_for_consumer(now, c);
                    }
                }
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                let Some(conn) = self.conns.get_mut(ck) else {
                    return;
                };
                if conn.kind != TransportKind::Publish {
                    return;
                }
                let Some(pk) = self
                    .producers
                    .iter()
                    .find(|(_, p)| {
                        matches!(p.origin, Origin::Local { conn, receiver, .. }
                            if conn == ck && receiver == init.receiver_id)
                    })
                    .map(|(k, _)| k)
                else {
                    return;
                };
                let producer = &mut self.producers[pk];
                let layer = match &init.rid {
                    Some(rid) => producer.rids.iter().position(|r| r == rid).unwrap_or(0),
                    None => 0,
                };
                if let Some(l) = producer.layers.get_mut(layer) {
                    l.ssrc = Some(init.ssrc);
                }
                conn.track_producer.insert(init.track_id.clone(), pk);
                conn.ssrc_route.insert(init.ssrc, (pk, layer as u8));
            }
            _ => {}
        }
    }

    /// A new peer connection for a participant. A subscribe connection runs send-side
    /// estimation (`rtc.send_side_bwe`) only when the client's offer has RTX (`rtx`): repairs
    /// and probes must not reuse an SRTP index (see `sfu::rtx`), and without RTX the client's
    /// REMB drives layer choice and repairs are byte-identical copies.
    pub(super) fn new_conn(
        &mut self,
        now: Instant,
        pk: ParticipantKey,
        kind: TransportKind,
        rtx: bool,
    ) -> Result<ConnKey, String> {
        let send_side_bwe = self.cfg.send_side_bwe && rtx && kind == TransportKind::Subscribe;
        let built = build_peer_connection(
            kind,
            self.announced,
            &self.cfg,
            send_side_bwe,
            self.stats.clone(),
            now,
        )
        .map_err(sdp_error)?;
        let (send_side, estimate) = if send_side_bwe {
            let (side, estimate) = super::egress::SendSide::new(now);
            (Some(side), Some(estimate))
        } else {
            (None, None)
        };
        let ck = self.conns.insert(Conn {
            pc: built.pc,
            kind,
            participant: pk,
            ufrag: String::new(),
            ice_pwd: String::new(),
            addrs: Vec::new(),
            tcp_peers: Vec::new(),
            src_ip: None,
            deadline: None,
            connected: false,
            dirty: false,
            ssrc_route: HashMap::new(),
            track_producer: HashMap::new(),
            track_consumer: HashMap::new(),
            estimate,
            repairs: built.repairs,
            prober: super::bwe::Prober::default(),
            send_side,
            send_path: super::egress::SendPath::Pending,
            capture: built.capture,
            dest: None,
            next_report: None,
            created: now,
        });
        let p = &mut self.participants[pk];
        match kind {
            TransportKind::Publish => p.publish = Some(ck),
            TransportKind::Subscribe => p.subscribe = Some(ck),
        }
        self.update_gauges();
        Ok(ck)
    }

    /// Applies an offer and returns the answer; registers the ICE ufrag on first use.
    pub(super) fn negotiate(
        &mut self,
        now: Instant,
        ck: ConnKey,
        offer: String,
    ) -> Result<String, String> {
        let conn = &mut self.conns[ck];
        let desc = RTCSessionDescription::offer(offer).map_err(sdp_error)?;
        conn.pc
            .set_remote_description(now, desc)
            .map_err(sdp_error)?;
        let answer = conn.pc.create_answer(None).map_err(sdp_error)?;
        conn.pc
            .set_local_description(now, answer)
            .map_err(sdp_error)?;
        let sdp = conn
            .pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| "no local description after answering".to_string())?;
        // The local credentials are set by the first answer and change on an ICE restart
        // (which a browser also does when its BUNDLE transport changes): STUN is routed by
        // the current ones.
        let ufrag = sdp_attribute(&sdp, "a=ice-ufrag:").ok_or("answer carries no ICE ufrag")?;
        if ufrag != conn.ufrag {
            conn.ice_pwd =
                sdp_attribute(&sdp, "a=ice-pwd:").ok_or("answer carries no ICE password")?;
            let old = std::mem::replace(&mut conn.ufrag, ufrag.clone());
            self.by_ufrag.remove(&old);
            self.by_ufrag.insert(ufrag, ck);
        }
        self.mark_dirty(ck);
        Ok(sdp)
    }

    /// One of a participant's transports.
    fn transport_of(
        &self,
        participant: &ParticipantId,
        transport: TransportKind,
    ) -> Result<ConnKey, ControlError> {
        let pk = *self
            .participant_ids
            .get(participant)
            .ok_or(ControlError::UnknownParticipant)?;
        let p = &self.participants[pk];
        match transport {
            TransportKind::Publish => p.publish,
            TransportKind::Subscribe => p.subscribe,
        }
        .ok_or(ControlError::NoTransport(transport))
    }

    /// A new offer for a transport the participant has: an ICE restart, which browsers make
    /// after a network change or a failed path. Offers that add or remove media are for
    /// `publish` and `subscribe`: an offer whose m-lines differ from the transport's is refused.
    pub(super) fn renegotiate(
        &mut self,
        now: Instant,
        participant: &ParticipantId,
        transport: TransportKind,
        offer: String,
    ) -> Result<String, ControlError> {
        let ck = self.transport_of(participant, transport)?;
        let known = self.conns[ck].pc.get_transceivers().count();
        let offered = offer.lines().filter(|l| l.starts_with("m=")).count();
        if offered != known {
            return Err(ControlError::BadSdp(format!(
                "the offer has {offered} m-lines and the transport {known}: restart ICE with the same media (publish and subscribe change media)"
            )));
        }
        self.negotiate(now, ck, offer).map_err(ControlError::BadSdp)
    }

    pub(super) fn add_candidate(
        &mut self,
        participant: &ParticipantId,
        transport: TransportKind,
        candidate: String,
        sdp_mid: Option<String>,
    ) -> Result<(), ControlError> {
        let ck = self.transport_of(participant, transport)?;
        // The value of RTCIceCandidate.candidate (`candidate:...`); an SDP line's `a=` is
        // tolerated.
        let candidate = candidate
            .strip_prefix("a=")
            .map(str::to_owned)
            .unwrap_or(candidate);
        if candidate.is_empty() {
            return Ok(()); // end of candidates
        }
        self.conns[ck]
            .pc
            .add_remote_candidate(RTCIceCandidateInit {
                candidate,
                sdp_mid,
                ..Default::default()
            })
            .map_err(|e| ControlError::BadCandidate(sdp_error(e)))
    }

    pub(super) fn close_conn(&mut self, ck: ConnKey) {
        if !self.conns.contains(ck) {
            return;
        }
        let mut conn = self.conns.remove(ck);
        let _ = conn.pc.close();
        while let Some(msg) = crate::alloc::in_rtc(|| conn.pc.poll_write()) {
            self.batch
                .push(msg.transport.peer_addr, conn.src_ip, msg.message);
        }
        for a in &conn.addrs {
            self.by_addr.remove(a);
        }
        for p in &conn.tcp_peers {
            self.by_tcp_addr.remove(p);
            // Dropping the sender ends the connection's task.
            self.cut_tcp(*p);
        }
        if !conn.ufrag.is_empty() {
            self.by_ufrag.remove(&conn.ufrag);
        }
        if let Some(p) = self.participants.get_mut(conn.participant) {
            match conn.kind {
                TransportKind::Publish if p.publish == Some(ck) => p.publish = None,
                TransportKind::Subscribe if p.subscribe == Some(ck) => p.subscribe = None,
                _ => {}
            }
        }
        self.update_gauges();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_with_an_rtx_codec_or_no_video_is_told_apart_from_video_without_rtx() {
        let with = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n";
        let without = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
        assert!(offers_rtx(with));
        assert!(!offers_rtx(without));
        let audio_only = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert!(
            offers_rtx(audio_only),
            "no video yet: assumed, as every browser offers it"
        );
    }

    #[test]
    fn sending_sections_of_an_offer_are_found_by_mid() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=recvonly\r\n\
                   m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:4\r\n";
        assert_eq!(sending_mids(sdp), ["0", "1"]);
    }

    #[test]
    fn simulcast_rids_are_read_in_order_for_the_right_mid() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=rid:l send\r\n\
                   a=simulcast:send l;m;~h\r\n";
        assert_eq!(simulcast_rids(sdp, "1"), vec!["l", "m", "h"]);
        assert!(simulcast_rids(sdp, "0").is_empty());
    }
}
