//! Classifies datagrams arriving on the shared media socket (RFC 7983) and extracts the ICE
//! username, which is how a datagram from a new address is matched to its peer connection.

/// What a datagram on the media port looks like, judged by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    Stun,
    Dtls,
    Rtp,
    Unknown,
}

pub fn classify(d: &[u8]) -> DatagramKind {
    match d.first() {
        Some(0..=3) => DatagramKind::Stun,
        Some(20..=63) => DatagramKind::Dtls,
        Some(128..=191) => DatagramKind::Rtp,
        _ => DatagramKind::Unknown,
    }
}

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const BINDING_REQUEST: u16 = 0x0001;
const HEADER: usize = 20;
const INTEGRITY_LEN: usize = 20;

/// Attributes of a STUN Binding request: (type, offset of the attribute in `d`, value).
fn binding_attributes(d: &[u8]) -> Option<impl Iterator<Item = (u16, usize, &[u8])>> {
    if d.len() < HEADER || d[4..8] != MAGIC_COOKIE {
        return None;
    }
    if u16::from_be_bytes([d[0], d[1]]) != BINDING_REQUEST {
        return None;
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    let body = d.get(HEADER..HEADER + len)?;
    let mut at = 0;
    Some(std::iter::from_fn(move || {
        let ty = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        let alen = u16::from_be_bytes([*body.get(at + 2)?, *body.get(at + 3)?]) as usize;
        let value = body.get(at + 4..at + 4 + alen)?;
        let offset = HEADER + at;
        at += 4 + alen.div_ceil(4) * 4;
        Some((ty, offset, value))
    }))
}

/// Whether a Binding request carries a MESSAGE-INTEGRITY (RFC 8489 section 14.5) made with
/// `password`, the local ICE password of the connection its username names. Only such a
/// request may bind a new source address to a connection: the username travels in clear, so
/// it alone proves nothing. Never panics on garbage.
pub fn binding_request_is_authentic(d: &[u8], password: &[u8]) -> bool {
    let Some(mut attrs) = binding_attributes(d) else {
        return false;
    };
    let Some((_, offset, tag)) = attrs.find(|(ty, ..)| *ty == ATTR_MESSAGE_INTEGRITY) else {
        return false;
    };
    if tag.len() != INTEGRITY_LEN {
        return false;
    }
    // The HMAC covers everything before the attribute, with the header's length field set as
    // if the message ended right after it (later FINGERPRINT excluded).
    let Ok(len) = u16::try_from(offset + 4 + INTEGRITY_LEN - HEADER) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, password);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(&d[..2]);
    ctx.update(&len.to_be_bytes());
    ctx.update(&d[4..offset]);
    let expected = ctx.sign();
    // Constant time: how much of a guessed tag matched must not show in the timing.
    expected
        .as_ref()
        .iter()
        .zip(tag)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The local (our) ufrag from a STUN Binding request's USERNAME (`local:remote`), or `None` for
/// anything that is not a well-formed Binding request carrying one. Never panics on garbage.
pub fn binding_request_local_ufrag(d: &[u8]) -> Option<&str> {
    let (_, _, value) = binding_attributes(d)?.find(|(ty, ..)| *ty == ATTR_USERNAME)?;
    let s = std::str::from_utf8(value).ok()?;
    s.split(':').next().filter(|u| !u.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(username: &str) -> Vec<u8> {
        let mut attr = vec![0x00, 0x06];
        attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attr.extend_from_slice(username.as_bytes());
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attr.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn username_of_binding_request_is_found() {
        let m = binding("srvUfrag:cliUfrag");
        assert_eq!(classify(&m), DatagramKind::Stun);
        assert_eq!(binding_request_local_ufrag(&m), Some("srvUfrag"));
    }

    /// `m` with a MESSAGE-INTEGRITY made with `password`.
    fn signed(mut m: Vec<u8>, password: &[u8]) -> Vec<u8> {
        let len = (m.len() - HEADER + 24) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, password);
        let tag = ring::hmac::sign(&key, &m);
        m.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
        m.extend_from_slice(tag.as_ref());
        m
    }

    #[test]
    fn only_a_request_signed_with_the_ice_password_is_authentic() {
        let m = signed(binding("srvUfrag:cliUfrag"), b"server-password");
        assert!(binding_request_is_authentic(&m, b"server-password"));
        assert!(!binding_request_is_authentic(&m, b"another-password"));
        assert!(!binding_request_is_authentic(
            &binding("srvUfrag:cliUfrag"),
            b"server-password"
        ));
        let mut tampered = m.clone();
        tampered[25] ^= 1; // inside USERNAME
        assert!(!binding_request_is_authentic(&tampered, b"server-password"));
        for cut in 0..m.len() {
            assert!(!binding_request_is_authentic(&m[..cut], b"server-password"));
        }
    }

    #[test]
    fn truncated_or_garbage_datagrams_yield_nothing() {
        let m = binding("abcd:efgh");
        for cut in 0..m.len() {
            let _ = binding_request_local_ufrag(&m[..cut]);
        }
        assert_eq!(binding_request_local_ufrag(&[0u8; 3]), None);
        assert_eq!(binding_request_local_ufrag(&[0xff; 64]), None);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[0x80, 0]), DatagramKind::Rtp);
        assert_eq!(classify(&[22]), DatagramKind::Dtls);
    }
}
