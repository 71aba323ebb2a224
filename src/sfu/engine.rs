//! How the node's peer connections are built: codecs, feedback, header extensions,
//! interceptors, ICE-lite with the announced candidate.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::interceptor::{
    Attribute, AttributedPacket, Interceptor, NackGeneratorBuilder, Packet, Registry, Slot,
    StreamInfo, TaggedPacket,
};
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_rtcp_reports, configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8, MIME_TYPE_VP9,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::transport::{RTCDtlsRole, RTCIceCandidateInit};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use std::sync::Arc;

use super::rtx::{Repairs, RtxSender, RTX_SLOT};
use crate::media::srtp::KeyCapture;

use crate::media::extensions::{AUDIO_LEVEL, VIDEO_ORIENTATION};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

use super::TransportKind;

fn video_feedback() -> Vec<RTCPFeedback> {
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.into(),
        parameter: parameter.into(),
    };
    vec![
        fb("goog-remb", ""),
        fb("ccm", "fir"),
        fb("nack", ""),
        fb("nack", "pli"),
    ]
}

fn codec(mime: &str, clock_rate: u32, channels: u16, fmtp: &str, pt: u8) -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: mime.into(),
            clock_rate,
            channels,
            sdp_fmtp_line: fmtp.into(),
            rtcp_feedback: if mime.starts_with("video") && mime != MIME_TYPE_RTX {
                video_feedback()
            } else {
                vec![]
            },
        },
        payload_type: pt,
    }
}

/// The codecs every Meridian peer connection negotiates, in preference order. A subscribe
/// connection also offers RTX for each video codec (repairs and probes go there, see
/// `sfu::rtx`); a publish connection does not, because rtc cannot yet tell which simulcast
/// layer an RTX packet repairs (it ignores `repaired-rtp-stream-id`), so publishers
/// retransmit on the layer's own SSRC.
fn media_engine(kind: TransportKind) -> Result<MediaEngine, Error> {
    let mut m = MediaEngine::default();
    m.register_codec(
        codec(MIME_TYPE_OPUS, 48_000, 2, "minptime=10;useinbandfec=1", 111),
        RtpCodecKind::Audio,
    )?;
    let video = [
        codec(MIME_TYPE_VP8, 90_000, 0, "", 96),
        codec(
            MIME_TYPE_H264,
            90_000,
            0,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            102,
        ),
        codec(
            MIME_TYPE_H264,
            90_000,
            0,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
            104,
        ),
        codec(MIME_TYPE_VP9, 90_000, 0, "profile-id=0", 98),
    ];
    for c in video {
        let pt = c.payload_type;
        m.register_codec(c, RtpCodecKind::Video)?;
        if kind == TransportKind::Subscribe {
            let rtx = codec(MIME_TYPE_RTX, 90_000, 0, &format!("apt={pt}"), pt + 1);
            m.register_codec(rtx, RtpCodecKind::Video)?;
        }
    }
    for (uri, kind) in [
        (AUDIO_LEVEL, RtpCodecKind::Audio),
        (VIDEO_ORIENTATION, RtpCodecKind::Video),
    ] {
        m.register_header_extension(
            RTCRtpHeaderExtensionCapability { uri: uri.into() },
            kind,
            None,
        )?;
    }
    Ok(m)
}

/// The parts of an interceptor that passes packets on through `read` and `write` queues and
/// keeps no timer: the associated types, the polls and the timeouts.
macro_rules! queued_interceptor {
    () => {
        type Rout = TaggedPacket;
        type Wout = TaggedPacket;
        type Eout = ();
        type Error = Error;
        type Time = Instant;

        fn poll_read(&mut self) -> Option<TaggedPacket> {
            self.read.pop_front()
        }
        fn poll_write(&mut self) -> Option<TaggedPacket> {
            self.write.pop_front()
        }
        fn handle_timeout(&mut self, _now: Instant) -> Result<(), Error> {
            Ok(())
        }
        fn poll_timeout(&mut self) -> Option<Instant> {
            None
        }
    };
}
pub(super) use queued_interceptor;

/// Delivers keyframe requests, NACKs and bandwidth estimates to the application: the SFU
/// relays keyframe requests upstream and serves NACKs from the producer's packet cache,
/// neither of which an interceptor of one peer connection can do.
///
/// Each goes on alone. rtc hands a compound RTCP packet to the track named by its first
/// packet's first SSRC; browsers lead their compounds with a receiver report, whose first
/// block names whichever stream it likes (audio, or an RTX stream that is no track, and then
/// rtc drops the whole compound). Left together, most NACKs and PLIs of a subscriber that
/// also receives audio or RTX never reached its video consumer. On its own, each is routed by
/// its own media SSRC.
///
/// Transport-wide feedback (transport-cc) goes to the application too: the worker numbers
/// the packets and keeps their departures (`sfu::egress`). Its media SSRC is whichever stream
/// the browser last received on, often an RTX stream that is no track; it is readdressed to
/// the newest media stream of the connection so rtc hands it over.
#[derive(Default)]
pub struct DeliverFeedback {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    /// Media SSRCs of the connection's bound local streams, oldest first.
    local: Vec<u32>,
}

/// Hands a copy of each sender report from a publisher to the application (the recording
/// maps its streams' RTP clocks through them); the original goes on to rtc's receiver reports.
#[derive(Default)]
pub struct DeliverSenderReports {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for DeliverSenderReports {
    queued_interceptor!();

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        if let Packet::Rtcp(pkts) = &msg.message.packet {
            for p in pkts {
                if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                    let copy: Box<dyn rtc::rtcp::Packet> = Box::new(SenderReport {
                        reports: Vec::new(),
                        profile_extensions: Default::default(),
                        ..sr.clone()
                    });
                    self.read.push_back(TaggedPacket {
                        now: msg.now,
                        transport: msg.transport,
                        message: AttributedPacket::new(Packet::Rtcp(vec![copy]))
                            .with(Attribute::DeliverToApplication),
                    });
                }
            }
        }
        self.read.push_back(msg);
        Ok(())
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        self.write.push_back(msg);
        Ok(())
    }
}

impl Interceptor for DeliverSenderReports {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

fn for_application(p: &dyn rtc::rtcp::Packet) -> bool {
    let any = p.as_any();
    any.is::<PictureLossIndication>()
        || any.is::<FullIntraRequest>()
        || any.is::<ReceiverEstimatedMaximumBitrate>()
        || any.is::<TransportLayerNack>()
        || any.is::<TransportLayerCc>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for DeliverFeedback {
    queued_interceptor!();

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Error> {
        if let Packet::Rtcp(pkts) = &mut msg.message.packet {
            if pkts.iter().any(|p| for_application(p.as_ref())) {
                let (wanted, rest): (Vec<_>, Vec<_>) = std::mem::take(pkts)
                    .into_iter()
                    .partition(|p| for_application(p.as_ref()));
                for mut p in wanted {
                    if let (Some(cc), Some(&ssrc)) = (
                        p.as_any().downcast_ref::<TransportLayerCc>(),
                        self.local.last(),
                    ) {
                        p = Box::new(TransportLayerCc {
                            media_ssrc: ssrc,
                            ..cc.clone()
                        });
                    }
                    self.read.push_back(TaggedPacket {
                        now: msg.now,
                        transport: msg.transport,
                        message: AttributedPacket::new(Packet::Rtcp(vec![p]))
                            .with(Attribute::DeliverToApplication),
                    });
                }
                // What is left goes on as it came (an empty compound only to carry what
                // earlier interceptors attached, as rtc reserves it for).
                if rest.is_empty() && msg.message.attributes.is_empty() {
                    return Ok(());
                }
                *pkts = rest;
            }
        }
        self.read.push_back(msg);
        Ok(())
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        self.write.push_back(msg);
        Ok(())
    }
}

impl Interceptor for DeliverFeedback {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.local.push(info.ssrc);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.local.retain(|&s| s != info.ssrc);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Silence after which a transport is reported `disconnected` (forwarding continues).
pub const CONSENT_DISCONNECTED: std::time::Duration = std::time::Duration::from_secs(10);
/// Silence after which consent has expired (RFC 7675): the transport fails, media stops.
pub const CONSENT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(30);

/// A new peer connection and what the worker shares with its interceptors.
pub(super) struct Built {
    pub pc: RTCPeerConnection,
    /// Subscribe side: the switch that sends repairs and probes on RTX.
    pub repairs: Option<Arc<Repairs>>,
    /// Subscribe side with `rtc.srtp_in_place`: the connection's SRTP keys, once DTLS is up.
    pub capture: Option<Arc<KeyCapture>>,
}

/// The SRTP profiles a subscribe connection accepts when its copies are encrypted in place:
/// the two `media::srtp` implements (every browser offers both).
fn in_place_profiles() -> Vec<SrtpProtectionProfile> {
    vec![
        SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
        SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
    ]
}

/// A new ICE-lite, DTLS-server peer connection that answers on `announced`.
pub(super) fn build_peer_connection(
    kind: TransportKind,
    announced: SocketAddr,
    cfg: &super::WorkerConfig,
    send_side_bwe: bool,
    stats: Arc<super::WorkerStats>,
    now: Instant,
) -> Result<Built, Error> {
    let (udp, tcp) = (cfg.udp, cfg.tcp);
    let mut media = media_engine(kind)?;
    let mut registry = Registry::new();
    let mut repairs = None;
    if kind == TransportKind::Subscribe {
        let (rtx, shared) = RtxSender::new(stats);
        repairs = Some(shared);
        registry = registry
            .with(Slot::from(14_000), DeliverFeedback::default())
            .with(Slot::from(RTX_SLOT), rtx);
    }
    // Loss from publishers is detected here (NACK generator). Loss towards subscribers is
    // repaired by the worker from one packet cache per producer, not by a per-consumer
    // responder cache, so the subscribe side has no NACK responder.
    let registry = if kind == TransportKind::Publish {
        registry
            .with(Slot::NackGenerator, NackGeneratorBuilder::new().build())
            .with(Slot::from(14_000), DeliverSenderReports::default())
    } else {
        registry
    };
    configure_simulcast_extension_headers(&mut media)?;
    let registry = if kind == TransportKind::Publish {
        // Transport-wide feedback lets the publishing browser's congestion control work.
        configure_twcc_receiver_only(registry, &mut media)?
    } else {
        if send_side_bwe {
            negotiate_transport_cc(&mut media)?;
        }
        registry
    };
    let registry = configure_rtcp_reports(registry);
    let mut settings = SettingEngineBuilder::new()
        .with_lite(true)
        // RFC 7675: consent lasts 30 s after the last authenticated check. Disconnected at
        // 10 s (reported, media continues), failed 20 s later (media stops).
        .with_ice_timeouts(
            Some(CONSENT_DISCONNECTED),
            Some(CONSENT_EXPIRY - CONSENT_DISCONNECTED),
            None,
        )
        .with_answering_dtls_role(RTCDtlsRole::Server);
    let mut capture = None;
    if kind == TransportKind::Subscribe && cfg.srtp_in_place {
        let provider = rtc::crypto::default_provider()
            .map_err(|e| Error::Crypto(format!("no crypto provider: {e}")))?;
        let c = Arc::new(KeyCapture::new(provider));
        settings = settings
            .with_crypto_provider(c.clone())
            .with_srtp_protection_profiles(in_place_profiles());
        capture = Some(c);
    }
    let settings = settings.build();
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(settings)
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .build(now)?;
    if udp {
        pc.add_local_candidate(RTCIceCandidateInit {
            candidate: format!(
                "candidate:1 1 udp 2130706431 {} {} typ host",
                announced.ip(),
                announced.port()
            ),
            ..Default::default()
        })?;
    }
    if tcp {
        // Lower priority than UDP: used only when UDP does not get through.
        pc.add_local_candidate(RTCIceCandidateInit {
            candidate: format!(
                "candidate:2 1 tcp 1518280447 {} {} typ host tcptype passive",
                announced.ip(),
                announced.port()
            ),
            ..Default::default()
        })?;
    }
    pc.add_local_candidate(RTCIceCandidateInit::default())?;
    Ok(Built {
        pc,
        repairs,
        capture,
    })
}

/// Send-side congestion control towards a subscriber: transport-cc feedback and the
/// transport-wide sequence number negotiated, for video and audio. The worker numbers the
/// packets and runs the estimator (`sfu::egress`, `sfu::bwe`); no pacer, layer choice is the
/// rate control.
fn negotiate_transport_cc(media: &mut MediaEngine) -> Result<(), Error> {
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        media.register_feedback(
            RTCPFeedback {
                typ: "transport-cc".into(),
                parameter: String::new(),
            },
            kind,
        );
        media.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.into(),
            },
            kind,
            None,
        )?;
    }
    Ok(())
}
