//! What a session leaves behind for compliance, as files: the hash-chained audit log
//! ([`audit`]) and the signed manifest that seals a session folder, with the checks
//! `meridian verify` runs ([`seal`]). File formats and checks only: no sockets, no clocks
//! beyond the timestamps written into entries.

pub mod audit;
pub mod db;
pub mod frames;
pub mod media;
pub mod policy;
pub mod profile;
pub mod recorder;
pub mod seal;
pub mod storage;
pub mod webm;

use std::fmt::Write as _;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// `t` as an RFC 3339 UTC timestamp with microseconds (`2026-11-30T01:02:03.456789Z`).
pub fn utc_rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_999_323_456_789);
        assert_eq!(utc_rfc3339(t), "2026-11-30T00:42:03.456789Z");
        assert_eq!(utc_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
