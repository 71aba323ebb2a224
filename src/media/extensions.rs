//! Which RTP header extensions a forwarded packet keeps, and under which id. Extension ids are
//! negotiated per peer connection, so a publisher's id for a URI is rarely the subscriber's:
//! the forwarder maps them through two small tables instead of copying ids blindly.

/// Client audio level (RFC 6464): lets receivers show who is speaking.
pub const AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
/// Coordination of video orientation (3GPP TS 26.114): phones send rotation here instead of
/// rotating frames, so dropping it shows a KYC document sideways.
pub const VIDEO_ORIENTATION: &str = "urn:3gpp:video-orientation";

/// Extensions carried end to end, by index.
pub const FORWARDED: [&str; 2] = [AUDIO_LEVEL, VIDEO_ORIENTATION];

/// A publisher's negotiated id → index in [`FORWARDED`].
#[derive(Debug, Clone)]
pub struct IncomingExtensions {
    by_id: [u8; 256],
}

impl IncomingExtensions {
    pub fn new<'a>(negotiated: impl IntoIterator<Item = (&'a str, u16)>) -> Self {
        let mut by_id = [0u8; 256];
        for (uri, id) in negotiated {
            if let (Some(i), Ok(id)) = (FORWARDED.iter().position(|f| *f == uri), u8::try_from(id))
            {
                by_id[id as usize] = i as u8 + 1;
            }
        }
        Self { by_id }
    }

    /// Index in [`FORWARDED`] of the publisher's extension `id`, if it is forwarded.
    pub fn index(&self, id: u8) -> Option<usize> {
        match self.by_id[id as usize] {
            0 => None,
            i => Some(i as usize - 1),
        }
    }
}

/// A consumer's negotiated id for each entry of [`FORWARDED`] (0: not negotiated).
#[derive(Debug, Clone, Copy, Default)]
pub struct OutgoingExtensions {
    ids: [u8; FORWARDED.len()],
}

impl OutgoingExtensions {
    pub fn new<'a>(negotiated: impl IntoIterator<Item = (&'a str, u16)>) -> Self {
        let mut ids = [0u8; FORWARDED.len()];
        for (uri, id) in negotiated {
            if let (Some(i), Ok(id)) = (FORWARDED.iter().position(|f| *f == uri), u8::try_from(id))
            {
                ids[i] = id;
            }
        }
        Self { ids }
    }

    pub fn id(&self, index: usize) -> Option<u8> {
        self.ids.get(index).copied().filter(|&id| id != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_mapped_by_uri_not_copied() {
        let incoming = IncomingExtensions::new([
            (VIDEO_ORIENTATION, 13),
            ("urn:ietf:params:rtp-hdrext:sdes:mid", 4),
        ]);
        let outgoing = OutgoingExtensions::new([(VIDEO_ORIENTATION, 3), (AUDIO_LEVEL, 1)]);
        let i = incoming.index(13).unwrap();
        assert_eq!(outgoing.id(i), Some(3));
        assert_eq!(
            incoming.index(4),
            None,
            "mid is per connection, never forwarded"
        );
        assert_eq!(OutgoingExtensions::default().id(i), None);
    }
}
