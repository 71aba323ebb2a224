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
const BINDING_REQUEST: u16 = 0x0001;

/// The local (our) ufrag from a STUN Binding request's USERNAME (`local:remote`), or `None` for
/// anything that is not a well-formed Binding request carrying one. Never panics on garbage.
pub fn binding_request_local_ufrag(d: &[u8]) -> Option<&str> {
    if d.len() < 20 || d[4..8] != MAGIC_COOKIE {
        return None;
    }
    let msg_type = u16::from_be_bytes([d[0], d[1]]);
    if msg_type != BINDING_REQUEST {
        return None;
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    let body = d.get(20..20 + len)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let ty = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + alen)?;
        if ty == ATTR_USERNAME {
            let s = std::str::from_utf8(value).ok()?;
            return s.split(':').next().filter(|u| !u.is_empty());
        }
        at += 4 + alen.div_ceil(4) * 4;
    }
    None
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
