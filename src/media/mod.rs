//! Media primitives that know nothing about sessions or participants: RTP rewriting, keyframe
//! detection, simulcast layer choice and datagram classification. Everything here is pure and
//! allocation-free so that it can sit on the per-packet path.

pub mod cache;
pub mod demux;
pub mod extensions;
pub mod keyframe;
pub mod layers;
pub mod reception;
pub mod repair;
pub mod rewrite;
pub mod srtp;
pub mod vp8;

/// Codecs Meridian forwards. Forwarding never re-encodes, so a consumer always receives the
/// producer's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    Vp8,
    Vp9,
    H264,
    Opus,
}

impl Codec {
    pub fn from_mime(mime: &str) -> Option<Self> {
        let m = mime.to_ascii_lowercase();
        Some(match m.as_str() {
            "video/vp8" => Codec::Vp8,
            "video/vp9" => Codec::Vp9,
            "video/h264" => Codec::H264,
            "audio/opus" => Codec::Opus,
            _ => return None,
        })
    }

    pub fn is_video(self) -> bool {
        !matches!(self, Codec::Opus)
    }

    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Opus => 48_000,
            _ => 90_000,
        }
    }
}
