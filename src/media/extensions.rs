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

/// Removes every header extension, leaving the header as if it never had any: the extension
/// flag, profile and padding too. `rtc` counts the zero bytes of a received extension block
/// into the header's padding and sizes what it marshals from it, so clearing the list alone
/// leaves the publisher's padding behind; once extensions are added again (ours, and the TWCC
/// sender's transport-wide number) a large leftover makes the copy fail to marshal and it is
/// silently dropped. Chromium publishers' blocks carry such padding: with transport-cc on the
/// subscribe side, Chromium subscribers got almost no video until this was reset.
pub fn strip(header: &mut rtc::rtp::header::Header) {
    header.extension = false;
    header.extensions.clear();
    header.extension_profile = 0;
    header.extensions_padding = 0;
}

#[cfg(test)]
mod strip_tests {
    use rtc::shared::marshal::{Marshal, Unmarshal};

    #[test]
    fn extensions_added_after_stripping_marshal_to_a_consistent_block() {
        // However much padding the publisher's extension block carried (the parser counts its
        // zero bytes), what forwarding writes afterwards must parse back to the same payload:
        // video orientation under the consumer's id, then a transport-wide sequence number.
        for publisher_padding in 0..24 {
            let mut pkt = rtc::rtp::Packet {
                header: rtc::rtp::header::Header {
                    version: 2,
                    payload_type: 96,
                    sequence_number: 7,
                    ssrc: 9,
                    ..Default::default()
                },
                payload: bytes::Bytes::from_static(&[0xaa; 20]),
            };
            pkt.header
                .set_extension(2, bytes::Bytes::from_static(&[1, 2, 3]))
                .unwrap();
            pkt.header.extensions_padding = publisher_padding;
            super::strip(&mut pkt.header);
            pkt.header
                .set_extension(13, bytes::Bytes::from_static(&[1]))
                .unwrap();
            pkt.header
                .set_extension(3, bytes::Bytes::from_static(&[0, 42]))
                .unwrap();
            let wire = pkt
                .marshal()
                .unwrap_or_else(|e| panic!("publisher padding {publisher_padding}: {e}"));
            let mut raw = wire.clone();
            let back = rtc::rtp::Packet::unmarshal(&mut raw).unwrap();
            assert_eq!(
                &back.payload[..],
                &[0xaa; 20],
                "publisher padding {publisher_padding}: the payload starts where it should"
            );
            assert_eq!(&back.header.get_extension(13).unwrap()[..], &[1]);
            assert_eq!(&back.header.get_extension(3).unwrap()[..], &[0, 42]);
        }
    }
}
