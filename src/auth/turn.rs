//! TURN credentials in the TURN REST style coturn's `use-auth-secret` checks: the username is
//! `<expiry unix seconds>:<user>` and the password the base64 HMAC-SHA1 of the username under
//! a secret the node shares with its region's coturn. coturn recomputes the HMAC and refuses a
//! username whose expiry has passed, so a credential is worthless after `ttl` and nobody needs
//! to revoke it. Pure functions of the secret, the user and the time.

use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::{Deserialize, Serialize};

/// An entry of the browser's `RTCConfiguration.iceServers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

/// Issues TURN credentials for the region's TURN servers.
#[derive(Clone)]
pub struct TurnIssuer {
    urls: Vec<String>,
    key: ring::hmac::Key,
    ttl: Duration,
}

/// Shortest shared secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TurnConfigError {
    #[error("turn.urls is empty: name at least one `turn:` or `turns:` URL")]
    NoUrls,
    #[error("turn.urls entry {0:?} is not a `turn:` or `turns:` URL")]
    BadUrl(String),
    #[error("the TURN secret is {0} bytes; use at least {MIN_SECRET_BYTES} (for example `openssl rand -hex 32`)")]
    ShortSecret(usize),
    #[error("turn.ttl_secs must be between 60 and 86400, not {0}")]
    BadTtl(u64),
}

impl TurnIssuer {
    pub fn new(urls: Vec<String>, secret: &[u8], ttl: Duration) -> Result<Self, TurnConfigError> {
        if urls.is_empty() {
            return Err(TurnConfigError::NoUrls);
        }
        if let Some(bad) = urls
            .iter()
            .find(|u| !(u.starts_with("turn:") || u.starts_with("turns:")))
        {
            return Err(TurnConfigError::BadUrl(bad.clone()));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TurnConfigError::ShortSecret(secret.len()));
        }
        if !(60..=86_400).contains(&ttl.as_secs()) {
            return Err(TurnConfigError::BadTtl(ttl.as_secs()));
        }
        Ok(Self {
            urls,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret),
            ttl,
        })
    }

    /// Credentials for `user`, valid until `now + ttl`.
    pub fn issue(&self, user: &str, now: SystemTime) -> IceServer {
        let expiry = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.ttl)
            .as_secs();
        self.issue_until(user, expiry)
    }

    /// Credentials for `user` that expire at `expiry` (Unix seconds).
    pub fn issue_until(&self, user: &str, expiry: u64) -> IceServer {
        // coturn splits the username at its first colon: the user part may hold anything.
        let username = format!("{expiry}:{user}");
        let tag = ring::hmac::sign(&self.key, username.as_bytes());
        IceServer {
            urls: self.urls.clone(),
            credential: base64::engine::general_purpose::STANDARD.encode(tag.as_ref()),
            username,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TurnIssuer {
        TurnIssuer::new(
            vec!["turn:turn.example.com:3478?transport=udp".into()],
            b"north-sea-0123456789",
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    #[test]
    fn the_password_is_the_hmac_sha1_of_the_expiry_stamped_username() {
        // The same derivation coturn performs (RFC 2104 HMAC-SHA1, standard base64).
        let c = issuer().issue_until("cust-1", 1_700_000_000);
        assert_eq!(c.username, "1700000000:cust-1");
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(
                ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
                b"north-sea-0123456789",
            ),
            b"1700000000:cust-1",
        );
        assert_eq!(
            c.credential,
            base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
        );
        assert_eq!(c.credential.len(), 28, "20 bytes of SHA-1 in base64");
    }

    #[test]
    fn credentials_expire_ttl_after_issue() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = issuer().issue("agent-7", now);
        assert_eq!(c.username, "1003600:agent-7");
        assert_ne!(c.credential, issuer().issue("agent-8", now).credential);
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let ok = vec!["turns:t.example.com:5349".to_string()];
        let ttl = Duration::from_secs(600);
        assert_eq!(
            TurnIssuer::new(vec![], b"0123456789abcdef", ttl).err(),
            Some(TurnConfigError::NoUrls)
        );
        assert!(matches!(
            TurnIssuer::new(vec!["stun:x".into()], b"0123456789abcdef", ttl).err(),
            Some(TurnConfigError::BadUrl(_))
        ));
        assert_eq!(
            TurnIssuer::new(ok.clone(), b"short", ttl).err(),
            Some(TurnConfigError::ShortSecret(5))
        );
        assert_eq!(
            TurnIssuer::new(ok, b"0123456789abcdef", Duration::from_secs(5)).err(),
            Some(TurnConfigError::BadTtl(5))
        );
    }
}
