//! Mutation fuzzing of every decoder that reads bytes from the network: pipe datagrams, pipe
//! control messages, signaling messages, STUN usernames on the media port, RTP payload headers,
//! DNS TXT records, HTTP forwarding headers, and GeoIP tables.
//! Each target starts from valid inputs and applies random bit flips, truncations, insertions
//! and splices; a decoder passes when it never panics. Seeded, so a failure reproduces; the
//! iteration count can be raised with MERIDIAN_FUZZ_ITERS for longer runs.

use bytes::{BufMut, BytesMut};
use meridian::media::demux::{binding_request_is_authentic, binding_request_local_ufrag};
use meridian::media::keyframe::is_keyframe;
use meridian::media::Codec;
use meridian::mesh::discovery::parse_txt;
use meridian::proto::pipe::{Control, Datagram, MediaFrame, NackFrame, ProducerAnnouncement};
use meridian::signaling::edge::client_ip;
use meridian::signaling::protocol::parse;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn iterations() -> usize {
    std::env::var("MERIDIAN_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..6) {
        match rng.random_range(0..6) {
            0 if !d.is_empty() => {
                let i = rng.random_range(0..d.len());
                d[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !d.is_empty() => {
                let cut = rng.random_range(0..d.len());
                d.truncate(cut);
            }
            2 => {
                let i = rng.random_range(0..=d.len());
                let n = rng.random_range(1..16);
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                d.splice(i..i, junk);
            }
            3 if !d.is_empty() => {
                let i = rng.random_range(0..d.len());
                d[i] = *[0u8, 0xff, 0x7f, 0x80, 0xc1]
                    .get(rng.random_range(0..5))
                    .unwrap();
            }
            4 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    let at = rng.random_range(0..=d.len());
                    d.splice(at..at, other[from..].iter().copied());
                }
            }
            _ => d.reverse(),
        }
    }
    d
}

fn fuzz(name: &str, seeds: Vec<Vec<u8>>, mut target: impl FnMut(&[u8])) {
    let mut rng = StdRng::seed_from_u64(name.bytes().map(u64::from).sum());
    for seed in &seeds {
        target(seed);
    }
    for _ in 0..iterations() {
        let input = mutate(&mut rng, &seeds);
        target(&input);
    }
}

fn rtp(payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x90, 96, 0x12, 0x34, 0, 0, 0x10, 0, 0xde, 0xad, 0xbe, 0xef];
    p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0x01, 0, 0]);
    p.extend_from_slice(payload);
    p
}

#[test]
fn pipe_datagram_decoder_never_panics() {
    let mut media = BytesMut::new();
    MediaFrame::put_header(&mut media, 7, 1);
    media.put_slice(&rtp(&[0x10, 0, 1, 2, 3]));
    let nack = NackFrame {
        stream: 7,
        layer: 0,
        seqs: vec![1, 2, 3],
    }
    .encode();
    fuzz("datagram", vec![media.to_vec(), nack.to_vec()], |d| {
        if let Ok(Datagram::Media(f)) = Datagram::decode(d) {
            // What the worker does next with a media frame must not panic either.
            let mut b = bytes::Bytes::copy_from_slice(f.rtp);
            let _ = <rtc::rtp::Packet as rtc::shared::marshal::Unmarshal>::unmarshal(&mut b);
        }
    });
}

#[test]
fn pipe_control_decoder_never_panics() {
    let announce = Control::ProducerAnnounce(ProducerAnnouncement {
        session: "s1".parse().unwrap(),
        producer: "pr-1".parse().unwrap(),
        stream: 3,
        participant: "pa-1".parse().unwrap(),
        user: "u".parse().unwrap(),
        role: meridian::auth::Role::Agent,
        kind: "video".into(),
        mime_type: "video/VP8".into(),
        clock_rate: 90_000,
        channels: 0,
        fmtp: String::new(),
        rids: vec!["l".into(), "h".into()],
        paused: false,
    });
    let seeds = [
        announce,
        Control::Interest {
            session: "s1".parse().unwrap(),
        },
        Control::LayerBitrates {
            producer: "pr-1".parse().unwrap(),
            bitrates: vec![Some(1), None],
        },
        Control::Hello {
            version: 2,
            node: "india-1".parse().unwrap(),
            region: "india".parse().unwrap(),
            signaling_url: "wss://in-1.example.com/v1/ws".into(),
            latitude: 19.07,
            longitude: 72.87,
            pipe_addr: Some("10.0.0.5:7100".into()),
        },
        Control::Heartbeat {
            load: meridian::mesh::membership::Load {
                cpu: 0.25,
                consumers: 12,
                factor: 0.3,
                ..Default::default()
            },
            draining: true,
            weight: 1.0,
        },
    ]
    .iter()
    .map(|m| m.encode()[4..].to_vec())
    .collect();
    fuzz("control", seeds, |d| {
        let _ = Control::decode(d);
    });
}

#[test]
fn signaling_parser_never_panics() {
    let seeds = [
        r#"{"type":"join","version":1,"token":"a.b.c","sessionId":"s"}"#,
        r#"{"type":"subscribe","requestId":2,"producerId":"pr-1","sdp":"v=0\r\n","maxLayer":1}"#,
        r#"{"type":"candidate","transport":"publish","candidate":"candidate:1 1 udp 1 1.2.3.4 5 typ host"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("signaling", seeds, |d| {
        if let Ok(text) = std::str::from_utf8(d) {
            let _ = parse(text);
        }
    });
}

#[test]
fn stun_username_reader_never_panics() {
    let mut m = vec![0x00, 0x01, 0x00, 0x10, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&[1; 12]);
    m.extend_from_slice(&[0x00, 0x06, 0x00, 0x09]);
    m.extend_from_slice(b"abcd:efgh\0\0\0");
    // The same request with a MESSAGE-INTEGRITY after the username.
    let mut signed = m.clone();
    signed[3] = 0x28;
    signed.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    signed.extend_from_slice(&[9; 20]);
    fuzz("stun", vec![m, signed], |d| {
        let _ = binding_request_local_ufrag(d);
        let _ = binding_request_is_authentic(d, b"password");
    });
}

#[test]
fn keyframe_detection_never_panics() {
    let seeds = vec![
        vec![0x90, 0x80, 0x81, 0x23, 0x10],
        vec![0x78, 0, 2, 0x67, 0x42, 0, 1, 0x68],
        vec![0x7c, 0x85, 1, 2],
        vec![0x88, 0, 0],
    ];
    fuzz("keyframe", seeds, |d| {
        for c in [Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Opus] {
            let _ = is_keyframe(c, d);
        }
    });
}

#[test]
fn dns_txt_reader_never_panics() {
    let seeds = vec![
        b"node=india-1".to_vec(),
        b"region=india".to_vec(),
        b"version=2".to_vec(),
    ];
    fuzz("txt", seeds, |d| {
        // TXT records hold several strings: read the input as one, and as split pieces.
        let _ = parse_txt([d]);
        let _ = parse_txt(d.split(|&b| b == b';'));
    });
}

#[test]
fn forwarding_header_reader_never_panics() {
    let trusted: Vec<meridian::cidr::Cidr> =
        vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    let seeds = vec![
        b"192.0.2.1, 203.0.113.5, 10.1.1.1".to_vec(),
        b"for=192.0.2.1;proto=https, for=\"[2001:db8:4::9]:4711\"".to_vec(),
        b"for=unknown, for=_hidden".to_vec(),
    ];
    fuzz("forwarded", seeds, |d| {
        let Ok(value) = axum::http::HeaderValue::from_bytes(d) else {
            return;
        };
        for name in ["x-forwarded-for", "forwarded"] {
            let mut h = axum::http::HeaderMap::new();
            h.insert(name, value.clone());
            for from in [
                meridian::config::ClientAddressHeader::XForwardedFor,
                meridian::config::ClientAddressHeader::Forwarded,
            ] {
                let _ = client_ip("10.0.0.1".parse().unwrap(), &h, &trusted, from);
            }
        }
    });
}

#[test]
fn geoip_table_reader_never_panics() {
    let seeds = vec![meridian::mesh::geo::DEV_TABLE.as_bytes()[..600].to_vec()];
    fuzz("geoip-table", seeds, |d| {
        if let Ok(text) = std::str::from_utf8(d) {
            if let Ok(rows) = meridian::mesh::geo::parse_table(text) {
                let _ = meridian::mesh::geo::build_city_db(&rows);
            }
        }
    });
}
