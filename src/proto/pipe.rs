//! Pipe wire formats (documented in `docs/pipe-protocol.md`): media frames carried in QUIC
//! datagrams, and control messages in MessagePack on one bidirectional stream. Decoders
//! return errors for anything malformed; they never panic.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::ids::{NodeId, ParticipantId, ProducerId, RegionId, SessionId, UserId};

pub const WIRE_VERSION: u8 = 4;
/// ALPN protocol id of pipe connections.
pub const ALPN: &[u8] = b"meridian-pipe/1";

/// Bytes before the RTP packet in a media datagram.
pub const FRAME_HEADER: usize = 7;
const KIND_RTP: u8 = 0;
const KIND_NACK: u8 = 1;
/// Most sequence numbers one NACK frame carries.
pub const MAX_NACK_SEQS: usize = 64;

/// Why a pipe was closed: the QUIC application close code and reason each end sends
/// (docs/pipe-protocol.md, "Close codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// Normal close (the node stops, or the pipe is done).
    Done,
    /// No `hello` in time.
    NoHello,
    /// The first control message was not `hello`.
    HelloNotFirst,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// A control message did not decode.
    MalformedControl,
    /// A node connected to itself.
    SelfConnection,
    /// A second pipe between the same two nodes.
    Duplicate,
    /// No heartbeat for 3 s: the peer is declared down.
    HeartbeatTimeout,
    /// The peer is not published in DNS (discovery on).
    NotDiscovered,
    /// The peer's DNS record was removed.
    RemovedFromDiscovery,
    /// `hello` names another node or region than the peer's certificate.
    IdentityMismatch,
}

impl CloseCode {
    const ALL: [CloseCode; 11] = [
        CloseCode::Done,
        CloseCode::NoHello,
        CloseCode::HelloNotFirst,
        CloseCode::UnsupportedVersion,
        CloseCode::MalformedControl,
        CloseCode::SelfConnection,
        CloseCode::Duplicate,
        CloseCode::HeartbeatTimeout,
        CloseCode::NotDiscovered,
        CloseCode::RemovedFromDiscovery,
        CloseCode::IdentityMismatch,
    ];

    /// The number on the wire.
    pub fn code(self) -> u32 {
        match self {
            CloseCode::Done => 0,
            CloseCode::NoHello => 1,
            CloseCode::HelloNotFirst => 2,
            CloseCode::UnsupportedVersion => 3,
            CloseCode::MalformedControl => 4,
            CloseCode::SelfConnection => 5,
            CloseCode::Duplicate => 6,
            CloseCode::HeartbeatTimeout => 7,
            CloseCode::NotDiscovered => 8,
            CloseCode::RemovedFromDiscovery => 9,
            CloseCode::IdentityMismatch => 10,
        }
    }

    /// The reason phrase sent with it.
    pub fn reason(self) -> &'static [u8] {
        match self {
            CloseCode::Done => b"done",
            CloseCode::NoHello => b"no hello",
            CloseCode::HelloNotFirst => b"first message must be hello",
            CloseCode::UnsupportedVersion => b"unsupported version",
            CloseCode::MalformedControl => b"malformed control message",
            CloseCode::SelfConnection => b"connected to itself",
            CloseCode::Duplicate => b"duplicate pipe",
            CloseCode::HeartbeatTimeout => b"heartbeat timeout",
            CloseCode::NotDiscovered => b"not in discovery",
            CloseCode::RemovedFromDiscovery => b"removed from discovery",
            CloseCode::IdentityMismatch => b"hello does not match the certificate",
        }
    }

    /// The code a peer closed with, if it is one of ours.
    pub fn from_code(code: u64) -> Option<CloseCode> {
        Self::ALL.into_iter().find(|c| u64::from(c.code()) == code)
    }
}

/// A request to resend packets of one producer stream layer, sent as a datagram back towards
/// the origin: repair must be as quick as the media, so it does not queue behind the reliable
/// control stream; the receiver asks again if the packet still does not come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackFrame {
    /// The origin's stream number of the producer.
    pub stream: u32,
    pub layer: u8,
    pub seqs: Vec<u16>,
}

impl NackFrame {
    pub fn encode(&self) -> Bytes {
        let n = self.seqs.len().min(MAX_NACK_SEQS);
        let mut b = BytesMut::with_capacity(FRAME_HEADER + 2 * n);
        b.put_u8(WIRE_VERSION);
        b.put_u8(KIND_NACK);
        b.put_u32(self.stream);
        b.put_u8(self.layer);
        for s in &self.seqs[..n] {
            b.put_u16(*s);
        }
        b.freeze()
    }
}

/// A datagram on a pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    Media(MediaFrame<'a>),
    Nack(NackFrame),
}

/// The stream a pipe datagram concerns, read from its header alone (for handing it to the
/// worker that owns the stream before anything is parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRef {
    /// A media frame: the sending node's stream number.
    Origin(u32),
    /// A resend request: the receiving node's own stream number.
    Local(u32),
}

impl StreamRef {
    /// `None` for anything too short or of another version or kind; the full decoder then
    /// refuses it and counts it.
    pub fn of(d: &[u8]) -> Option<StreamRef> {
        if d.len() < FRAME_HEADER || d[0] != WIRE_VERSION {
            return None;
        }
        let stream = u32::from_be_bytes([d[2], d[3], d[4], d[5]]);
        match d[1] {
            KIND_RTP => Some(StreamRef::Origin(stream)),
            KIND_NACK => Some(StreamRef::Local(stream)),
            _ => None,
        }
    }
}

impl<'a> Datagram<'a> {
    pub fn decode(d: &'a [u8]) -> Result<Self, FrameError> {
        if d.len() >= 2 && d[0] == WIRE_VERSION && d[1] == KIND_NACK {
            if d.len() < FRAME_HEADER || (d.len() - FRAME_HEADER) % 2 != 0 {
                return Err(FrameError::TooShort(d.len()));
            }
            let seqs: Vec<u16> = d[FRAME_HEADER..]
                .chunks_exact(2)
                .take(MAX_NACK_SEQS)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            return Ok(Datagram::Nack(NackFrame {
                stream: u32::from_be_bytes([d[2], d[3], d[4], d[5]]),
                layer: d[6],
                seqs,
            }));
        }
        MediaFrame::decode(d).map(Datagram::Media)
    }
}

/// One RTP packet of one producer stream (simulcast layer) on a pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFrame<'a> {
    /// The origin node's stream number for the producer, from its announcement.
    pub stream: u32,
    pub layer: u8,
    /// The RTP packet as the origin received it, after SRTP (QUIC encrypts the pipe).
    pub rtp: &'a [u8],
}

/// Why a datagram is not a media frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("datagram of {0} bytes is shorter than a frame header plus an RTP header")]
    TooShort(usize),
    #[error("frame version {0} is not supported (this node speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("payload is not RTP version 2")]
    NotRtp,
}

impl<'a> MediaFrame<'a> {
    pub fn decode(d: &'a [u8]) -> Result<Self, FrameError> {
        if d.len() < FRAME_HEADER + 12 {
            return Err(FrameError::TooShort(d.len()));
        }
        if d[0] != WIRE_VERSION {
            return Err(FrameError::Version(d[0]));
        }
        if d[1] != KIND_RTP {
            return Err(FrameError::Kind(d[1]));
        }
        let rtp = &d[FRAME_HEADER..];
        if rtp[0] >> 6 != 2 {
            return Err(FrameError::NotRtp);
        }
        Ok(MediaFrame {
            stream: u32::from_be_bytes([d[2], d[3], d[4], d[5]]),
            layer: d[6],
            rtp,
        })
    }

    /// Writes the frame header into `out`; the caller appends the RTP packet.
    pub fn put_header(out: &mut BytesMut, stream: u32, layer: u8) {
        out.put_u8(WIRE_VERSION);
        out.put_u8(KIND_RTP);
        out.put_u32(stream);
        out.put_u8(layer);
    }
}

/// The RTP fields a media frame carries, borrowed from a parsed packet.
pub struct RtpParts<'a> {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub csrc: &'a [u32],
    /// One-byte header extensions (RFC 8285): id 1-14, 1-16 bytes each.
    pub extensions: &'a [(u8, &'a [u8])],
    pub payload: &'a [u8],
}

impl RtpParts<'_> {
    /// Bytes `put` will write.
    pub fn size(&self) -> usize {
        let ext: usize = self.extensions.iter().map(|(_, d)| 1 + d.len()).sum();
        let ext_block = if self.extensions.is_empty() {
            0
        } else {
            4 + ext.div_ceil(4) * 4
        };
        12 + 4 * self.csrc.len().min(15) + ext_block + self.payload.len()
    }

    /// Serializes the packet (no padding) into `out`, without intermediate allocation.
    pub fn put(&self, out: &mut BytesMut) {
        let cc = self.csrc.len().min(15);
        let x = !self.extensions.is_empty();
        out.put_u8(0x80 | (u8::from(x) << 4) | cc as u8);
        out.put_u8((u8::from(self.marker) << 7) | (self.payload_type & 0x7f));
        out.put_u16(self.sequence_number);
        out.put_u32(self.timestamp);
        out.put_u32(self.ssrc);
        for c in &self.csrc[..cc] {
            out.put_u32(*c);
        }
        if x {
            let ext: usize = self.extensions.iter().map(|(_, d)| 1 + d.len()).sum();
            let words = ext.div_ceil(4);
            out.put_u16(0xBEDE);
            out.put_u16(words as u16);
            for (id, data) in self.extensions {
                out.put_u8((id << 4) | (data.len().clamp(1, 16) as u8 - 1));
                out.put_slice(data);
            }
            for _ in ext..words * 4 {
                out.put_u8(0);
            }
        }
        out.put_slice(self.payload);
    }
}

/// A node's load, sent in every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Fraction of the machine's CPU the node used over the last interval (0..=1).
    pub cpu: f32,
    pub sessions: u32,
    pub participants: u32,
    pub producers: u32,
    pub consumers: u32,
    /// Media bits per second sent to clients and pipes.
    pub bitrate_out: u64,
    /// Load relative to the node's capacity: 1.0 means full. The largest of CPU over its
    /// limit, sessions over `limits.max_sessions` and consumers over `limits.max_consumers`.
    pub factor: f32,
}

/// A producer as announced to another node: enough to create consumers of it there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProducerAnnouncement {
    pub session: SessionId,
    pub producer: ProducerId,
    /// The origin's stream number: media frames of this producer carry it.
    pub stream: u32,
    pub participant: ParticipantId,
    pub user: UserId,
    pub role: Role,
    /// `audio` or `video`.
    pub kind: String,
    pub mime_type: String,
    pub clock_rate: u32,
    pub channels: u16,
    pub fmtp: String,
    /// Simulcast RIDs, lowest first; empty without simulcast.
    pub rids: Vec<String>,
    pub paused: bool,
}

/// Control messages. Encoded as MessagePack maps with field names (`rmp_serde::to_vec_named`)
/// so that fields can be added without breaking older peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// First message each way: who is at the other end.
    Hello {
        version: u8,
        node: NodeId,
        region: RegionId,
        /// Where clients join the sender, its site, and the pipe address it is published under.
        #[serde(default)]
        signaling_url: String,
        #[serde(default)]
        latitude: f64,
        #[serde(default)]
        longitude: f64,
        /// `ip:port` text (MessagePack has no address type).
        #[serde(default)]
        pipe_addr: Option<String>,
    },
    /// Sent every second on every pipe, and at once when the drain state changes. Silence
    /// for three seconds means the sender is down.
    Heartbeat {
        load: Load,
        draining: bool,
        /// The operator's routing weight for the sender (`meridian ctl weight`).
        #[serde(default = "neutral_weight")]
        weight: f32,
    },
    /// The sender hosts participants of `session`: announce its producers to the sender.
    Interest {
        session: SessionId,
    },
    /// The sender no longer hosts participants of `session`.
    InterestEnd {
        session: SessionId,
    },
    /// Answer to `interest`, after the participants and producers of `session` the sender
    /// hosts (possibly none): the receiver now knows the session as the sender does.
    InterestReplayed {
        session: SessionId,
    },
    /// A participant of a session the receiver is interested in joined the sender.
    ParticipantJoined {
        session: SessionId,
        participant: ParticipantId,
        user: UserId,
        role: Role,
    },
    ParticipantLeft {
        session: SessionId,
        participant: ParticipantId,
    },
    ProducerAnnounce(ProducerAnnouncement),
    ProducerClosed {
        producer: ProducerId,
    },
    ProducerPaused {
        producer: ProducerId,
        paused: bool,
    },
    /// Send these layers (bit i = layer i) of `producer` over the pipe; replaces the previous set.
    Consume {
        producer: ProducerId,
        layers: u32,
    },
    /// Stop sending `producer`.
    StopConsume {
        producer: ProducerId,
    },
    /// A consumer behind the sender needs a keyframe of this layer.
    KeyframeRequest {
        producer: ProducerId,
        layer: u8,
    },
    /// Bitrates (bits/s) of the producer's layers at the origin, `None` = not flowing.
    LayerBitrates {
        producer: ProducerId,
        bitrates: Vec<Option<u64>>,
    },
    /// The publisher's RTCP sender report for a layer of `producer` the receiver consumes:
    /// NTP time (32.32) at RTP time `rtp`, for the receiver's recording of the stream.
    SenderReport {
        producer: ProducerId,
        layer: u8,
        ntp: u64,
        rtp: u32,
    },
    /// An audit record of a participant of the sender, for a session the receiver records
    /// (its residency region). Answered by `record_ack` with the same `id`.
    Record {
        id: u64,
        session: SessionId,
        entry: RecordEntry,
    },
    /// The record `id` is on the receiver's disk (`error` absent), or why it is not.
    RecordAck {
        id: u64,
        #[serde(default)]
        error: Option<String>,
    },
    /// From a session's recording node: its recording failed, so the session ends; the
    /// receiver lets go of its participants of `session`.
    RecordingEnded {
        session: SessionId,
        reason: String,
    },
    /// An operator's call the sender's admin API received for the receiver (`meridian ctl`
    /// reaches the mesh through any one node). Answered by `admin_answer` with the same `id`.
    AdminRequest {
        id: u64,
        call: crate::proto::admin::AdminCall,
    },
    AdminAnswer {
        id: u64,
        reply: crate::proto::admin::AdminReply,
    },
}

fn neutral_weight() -> f32 {
    1.0
}

/// What happened to a participant of the sending node, for the recording node's audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RecordEntry {
    Joined {
        participant: ParticipantId,
        user: UserId,
        role: Role,
        /// The compliance profile the session runs under.
        #[serde(default)]
        profile: Option<String>,
    },
    /// A join refused by the session's rules: the code the client was told and the other
    /// fields of the entry, as a JSON object's text.
    Refused {
        user: UserId,
        role: Role,
        #[serde(default)]
        profile: Option<String>,
        code: String,
        fields: String,
    },
    Left {
        participant: ParticipantId,
        reason: String,
    },
    /// `event`: `started`, `paused`, `resumed` or `stopped`; `media`: `audio` or `video`
    /// when started.
    Producer {
        participant: ParticipantId,
        producer: ProducerId,
        event: String,
        #[serde(default)]
        media: Option<String>,
    },
    /// A verification step of the participant (`checklist_marked`, `outcome_recorded`,
    /// `consent_given`, `location_captured`, `question_asked`), its fields as a JSON object's
    /// text.
    Note {
        participant: ParticipantId,
        event: String,
        fields: String,
    },
}

/// Largest control message accepted.
pub const MAX_CONTROL: usize = 256 * 1024;

/// Why a control frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control message of {0} bytes exceeds the {MAX_CONTROL}-byte limit")]
    TooLarge(usize),
    #[error("malformed control message: {0}")]
    Malformed(String),
}

impl Control {
    /// Length-prefixed (u32, big-endian) MessagePack.
    pub fn encode(&self) -> Bytes {
        // Serializing these plain data types into a Vec cannot fail.
        let body = rmp_serde::to_vec_named(self).unwrap_or_default();
        let mut out = BytesMut::with_capacity(4 + body.len());
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
        out.freeze()
    }

    pub fn decode(body: &[u8]) -> Result<Control, ControlError> {
        if body.len() > MAX_CONTROL {
            return Err(ControlError::TooLarge(body.len()));
        }
        rmp_serde::from_slice(body).map_err(|e| ControlError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_frames_round_trip() {
        let mut b = BytesMut::new();
        MediaFrame::put_header(&mut b, 77, 2);
        let rtp = [0x80u8, 96, 0, 1, 0, 0, 0, 9, 0, 0, 0, 5, 0xaa];
        b.put_slice(&rtp);
        let f = MediaFrame::decode(&b).unwrap();
        assert_eq!((f.stream, f.layer, f.rtp), (77, 2, &rtp[..]));
    }

    #[test]
    fn rtp_writer_matches_the_rtc_parser() {
        use rtc::shared::marshal::{Marshal, Unmarshal};
        let parts = RtpParts {
            marker: true,
            payload_type: 96,
            sequence_number: 65535,
            timestamp: 0xdead_beef,
            ssrc: 0x0102_0304,
            csrc: &[7],
            extensions: &[(1, &[0x7f]), (2, &[1, 2])],
            payload: &[9, 8, 7, 6, 5],
        };
        let mut b = BytesMut::new();
        parts.put(&mut b);
        assert_eq!(b.len(), parts.size());
        let mut raw = b.clone().freeze();
        let p = rtc::rtp::Packet::unmarshal(&mut raw).unwrap();
        assert_eq!(p.header.sequence_number, 65535);
        assert_eq!(p.header.timestamp, 0xdead_beef);
        assert_eq!(p.header.csrc, vec![7]);
        assert!(p.header.marker);
        assert_eq!(&p.header.get_extension(1).unwrap()[..], &[0x7f]);
        assert_eq!(&p.header.get_extension(2).unwrap()[..], &[1, 2]);
        assert_eq!(&p.payload[..], &[9, 8, 7, 6, 5]);
        // Without extensions the bytes are exactly what rtc itself would write.
        let plain = RtpParts {
            extensions: &[],
            csrc: &[],
            ..parts
        };
        let mut b = BytesMut::new();
        plain.put(&mut b);
        let mut raw = b.clone().freeze();
        let p = rtc::rtp::Packet::unmarshal(&mut raw).unwrap();
        assert_eq!(p.marshal().unwrap(), b.freeze());
    }

    #[test]
    fn close_codes_round_trip_and_stay_numbered_as_documented() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(u64::from(c.code())), Some(c));
        }
        assert_eq!(CloseCode::IdentityMismatch.code(), 10);
        assert_eq!(CloseCode::from_code(11), None);
    }

    #[test]
    fn a_datagram_names_its_stream_from_the_header_alone() {
        let mut b = BytesMut::new();
        MediaFrame::put_header(&mut b, 0x0100_0007, 0);
        assert_eq!(StreamRef::of(&b), Some(StreamRef::Origin(0x0100_0007)));
        let n = NackFrame {
            stream: 0x0200_0001,
            layer: 0,
            seqs: vec![1],
        };
        assert_eq!(
            StreamRef::of(&n.encode()),
            Some(StreamRef::Local(0x0200_0001))
        );
        assert_eq!(StreamRef::of(&[WIRE_VERSION, 9, 0, 0, 0, 1, 0]), None);
        assert_eq!(StreamRef::of(&[WIRE_VERSION + 1, 0, 0, 0, 0, 1, 0]), None);
        assert_eq!(StreamRef::of(&[WIRE_VERSION, 0]), None);
    }

    #[test]
    fn nack_frames_round_trip() {
        let n = NackFrame {
            stream: 9,
            layer: 1,
            seqs: vec![65535, 0, 7],
        };
        assert_eq!(Datagram::decode(&n.encode()), Ok(Datagram::Nack(n)));
        assert!(Datagram::decode(&[WIRE_VERSION, KIND_NACK, 0, 0, 0, 1, 0, 5]).is_err());
    }

    #[test]
    fn garbage_datagrams_are_errors_not_panics() {
        assert_eq!(MediaFrame::decode(&[]), Err(FrameError::TooShort(0)));
        let mut d = vec![9u8; 40];
        assert_eq!(MediaFrame::decode(&d), Err(FrameError::Version(9)));
        d[0] = WIRE_VERSION;
        assert_eq!(MediaFrame::decode(&d), Err(FrameError::Kind(9)));
        d[1] = 0;
        assert_eq!(MediaFrame::decode(&d), Err(FrameError::NotRtp));
        for len in 0..64 {
            for fill in [0u8, 1, 0x80, 0xff] {
                let mut g = vec![fill; len];
                if len > 1 {
                    g[0] = WIRE_VERSION;
                }
                let _ = MediaFrame::decode(&g);
                let _ = Datagram::decode(&g);
                if len > 1 {
                    g[1] = KIND_NACK;
                    let _ = Datagram::decode(&g);
                }
            }
        }
    }

    #[test]
    fn control_messages_round_trip_and_garbage_is_refused() {
        let msgs = [
            Control::Hello {
                version: 1,
                node: "india-1".parse().unwrap(),
                region: "india".parse().unwrap(),
                signaling_url: "wss://in-1.example.com/v1/ws".into(),
                latitude: 19.07,
                longitude: 72.87,
                pipe_addr: Some("10.0.0.5:7100".into()),
            },
            Control::Heartbeat {
                load: Load {
                    cpu: 0.5,
                    consumers: 40,
                    factor: 0.5,
                    ..Default::default()
                },
                draining: true,
                weight: 0.5,
            },
            Control::AdminRequest {
                id: 7,
                call: crate::proto::admin::AdminCall::Rebalance {
                    below: 0.8,
                    deadline_secs: 30,
                },
            },
            Control::AdminAnswer {
                id: 7,
                reply: crate::proto::admin::AdminReply::Session { part: None },
            },
            Control::Consume {
                producer: "pr-1".parse().unwrap(),
                layers: 0b101,
            },
            Control::KeyframeRequest {
                producer: "pr-1".parse().unwrap(),
                layer: 2,
            },
        ];
        for m in msgs {
            let enc = m.encode();
            assert_eq!(Control::decode(&enc[4..]).unwrap(), m);
        }
        // A heartbeat from before weights counts as neutral.
        let old = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "heartbeat",
            "load": Load::default(),
            "draining": false
        }))
        .unwrap();
        assert!(matches!(
            Control::decode(&old).unwrap(),
            Control::Heartbeat { weight, .. } if weight == 1.0
        ));
        assert!(Control::decode(&[0xc1, 0x00]).is_err());
        assert!(Control::decode(b"\x81\xa4type\xa5bogus").is_err());
        // An id that breaks the id rules is refused while decoding.
        let bad =
            rmp_serde::to_vec_named(&serde_json::json!({"type":"stop_consume","producer":"a b"}))
                .unwrap();
        assert!(Control::decode(&bad).is_err());
        for len in 0..48 {
            let g: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = Control::decode(&g);
        }
    }
}
