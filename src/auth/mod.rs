//! Session access tokens (JWT).
//!
//! A token admits one user to one verification session with one role until its expiry. This
//! module verifies and mints tokens; it knows nothing of sockets or sessions' media.

pub mod turn;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::{SessionId, UserId};

/// What a participant may do in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person being verified: publishes camera and microphone, sees agents.
    User,
    /// The verifying agent: publishes, sees everyone.
    Agent,
    /// A supervisor or auditor: sees everyone, never publishes.
    Observer,
}

impl Role {
    /// As in tokens and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Agent => "agent",
            Role::Observer => "observer",
        }
    }

    pub fn may_publish(self) -> bool {
        !matches!(self, Role::Observer)
    }

    /// Whether a participant with this role is shown what a `publisher` publishes.
    /// Users see agents only: two customers in one session never see each other.
    pub fn may_see(self, publisher: Role) -> bool {
        match self {
            Role::User => publisher == Role::Agent,
            Role::Agent | Role::Observer => true,
        }
    }
}

/// The claims Meridian reads from a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: UserId,
    /// Session the token admits to.
    pub sid: SessionId,
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default)]
    pub iat: u64,
    pub iss: String,
    pub aud: String,
    /// Whether the session is recorded; absent: the node's `recording.enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rec: Option<bool>,
    /// The region whose node keeps the session's records; absent: the node's
    /// `recording.default_residency`, else the node's own region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency: Option<String>,
    /// The compliance profile the session runs under (for example `rbi-vcip`); absent: the
    /// node's `recording.profile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// The recording claims a token may carry (see [`Claims::rec`], [`Claims::residency`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordingClaims {
    pub rec: Option<bool>,
    pub residency: Option<String>,
    pub profile: Option<String>,
}

/// Latest expiry accepted: the start of the year 10000. Anything later is not a real expiry
/// and would overflow the clock arithmetic that ends access.
pub const MAX_EXP: u64 = 253_402_300_800;

impl Claims {
    /// When access ends. Saturates far in the future for an `exp` that [`TokenVerifier`]
    /// would have refused, so no caller can overflow.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(self.exp.min(MAX_EXP)))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(MAX_EXP))
    }

    /// Whether access has ended at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now >= self.expires_at()
    }
}

/// Why a token was refused. Messages never include the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token was given: send one in the `token` field of `join`")]
    Missing,
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("the token has expired: ask the application for a new one")]
    Expired,
    #[error("the token is not valid yet (nbf in the future): check the issuer's clock")]
    NotYetValid,
    #[error("the token's signature does not verify with this node's key")]
    BadSignature,
    #[error("the token uses algorithm {found}; this node only accepts {expected}")]
    WrongAlgorithm { found: String, expected: String },
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token is meant for another audience")]
    WrongAudience,
    #[error("the token admits to session {token} but the join asked for session {requested}")]
    WrongSession {
        token: SessionId,
        requested: SessionId,
    },
}

impl TokenError {
    /// Stable code for signaling errors and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::WrongAlgorithm { .. } => "token_wrong_algorithm",
            TokenError::WrongIssuer => "token_wrong_issuer",
            TokenError::WrongAudience => "token_wrong_audience",
            TokenError::WrongSession { .. } => "token_wrong_session",
        }
    }
}

/// Token signature algorithms Meridian accepts. `none` is never accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthAlgorithm {
    HS256,
    EdDSA,
}

/// The key a node verifies tokens with.
#[derive(Debug, Clone, Copy)]
pub enum VerifyingKey<'a> {
    /// HS256 shared secret.
    Hs256Secret(&'a [u8]),
    /// EdDSA: an Ed25519 public key in PEM form.
    Ed25519PublicPem(&'a [u8]),
}

/// Why a verifying key could not be used.
#[derive(Debug, thiserror::Error)]
#[error("not an Ed25519 public key in PEM form: {0}")]
pub struct KeyError(String);

fn algorithm(a: AuthAlgorithm) -> Algorithm {
    match a {
        AuthAlgorithm::HS256 => Algorithm::HS256,
        AuthAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// Verifies tokens against one key, one algorithm, one issuer and one audience.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    alg: Algorithm,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("alg", &self.alg)
            .finish()
    }
}

impl TokenVerifier {
    /// A verifier for tokens signed with `key`, from `issuer` for `audience`, tolerating
    /// `leeway` seconds of clock skew on `nbf`.
    pub fn with_key(
        key: VerifyingKey<'_>,
        issuer: &str,
        audience: &str,
        leeway: u64,
    ) -> Result<Self, KeyError> {
        let (key, alg) = match key {
            VerifyingKey::Hs256Secret(secret) => {
                (DecodingKey::from_secret(secret), AuthAlgorithm::HS256)
            }
            VerifyingKey::Ed25519PublicPem(pem) => (
                DecodingKey::from_ed_pem(pem).map_err(|e| KeyError(e.to_string()))?,
                AuthAlgorithm::EdDSA,
            ),
        };
        Ok(Self::new(key, algorithm(alg), issuer, audience, leeway))
    }

    pub fn new(
        key: DecodingKey,
        alg: Algorithm,
        issuer: &str,
        audience: &str,
        leeway: u64,
    ) -> Self {
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = leeway;
        validation.validate_nbf = true;
        Self {
            key,
            validation,
            alg,
        }
    }

    /// Checks signature, algorithm, issuer, audience and time; returns the claims.
    ///
    /// The leeway absorbs clock skew on `nbf` only: a token whose `exp` has passed is refused
    /// outright, because every second past `exp` would be access the issuer did not grant.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let claims = self.verify_signature(token)?;
        if claims.exp > MAX_EXP {
            return Err(TokenError::Malformed(format!(
                "exp {} is beyond any plausible expiry (at most {MAX_EXP})",
                claims.exp
            )));
        }
        if claims.expired_at(SystemTime::now()) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// As [`Self::verify`], and when a token is refused although its signature verifies
    /// (expired, not yet valid, another issuer or audience): its claims, so the refusal can be
    /// written to that session's audit log. A token whose signature does not verify names no
    /// session reliably: `None`.
    pub fn verify_attributed(
        &self,
        token: &str,
    ) -> Result<Claims, (TokenError, Option<Box<Claims>>)> {
        self.verify(token).map_err(|e| {
            let signed = matches!(
                e,
                TokenError::Expired
                    | TokenError::NotYetValid
                    | TokenError::WrongIssuer
                    | TokenError::WrongAudience
            );
            let claims = signed.then(|| {
                let mut lax = self.validation.clone();
                lax.validate_exp = false;
                lax.validate_nbf = false;
                lax.validate_aud = false;
                lax.iss = None;
                lax.set_required_spec_claims::<&str>(&[]);
                decode::<Claims>(token, &self.key, &lax)
                    .ok()
                    .map(|d| Box::new(d.claims))
            });
            (e, claims.flatten())
        })
    }

    fn verify_signature(&self, token: &str) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        // Look at the header ourselves first so that `alg: none` and other algorithms get a
        // precise answer rather than a generic parse error.
        let header_alg = peek_alg(token)?;
        if header_alg != format!("{:?}", self.alg) {
            return Err(TokenError::WrongAlgorithm {
                found: header_alg,
                expected: format!("{:?}", self.alg),
            });
        }
        use jsonwebtoken::errors::ErrorKind as K;
        decode::<Claims>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidSignature => TokenError::BadSignature,
                K::InvalidIssuer => TokenError::WrongIssuer,
                K::InvalidAudience => TokenError::WrongAudience,
                K::InvalidAlgorithm => TokenError::WrongAlgorithm {
                    found: header_alg.clone(),
                    expected: format!("{:?}", self.alg),
                },
                other => TokenError::Malformed(format!("{other:?}")),
            })
    }
}

fn peek_alg(token: &str) -> Result<String, TokenError> {
    let header_b64 = token
        .split('.')
        .next()
        .ok_or_else(|| TokenError::Malformed("no header".into()))?;
    if token.split('.').count() != 3 {
        return Err(TokenError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header_b64.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    #[derive(Deserialize)]
    struct H {
        alg: String,
    }
    let h: H = serde_json::from_slice(&raw)
        .map_err(|_| TokenError::Malformed("header is not JSON with an `alg`".into()))?;
    Ok(h.alg)
}

/// Mints tokens; used by `meridian token` and by `meridian dev` for the demo links.
pub struct TokenSigner {
    key: EncodingKey,
    alg: Algorithm,
    issuer: String,
    audience: String,
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("cannot load the signing key: {0}")]
    Key(String),
    #[error("cannot sign: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

impl TokenSigner {
    pub fn hs256(secret: &[u8], issuer: &str, audience: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret),
            alg: Algorithm::HS256,
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    pub fn eddsa_pem(private_pem: &[u8], issuer: &str, audience: &str) -> Result<Self, MintError> {
        Ok(Self {
            key: EncodingKey::from_ed_pem(private_pem)
                .map_err(|e| MintError::Key(e.to_string()))?,
            alg: Algorithm::EdDSA,
            issuer: issuer.into(),
            audience: audience.into(),
        })
    }

    pub fn mint(
        &self,
        session: &SessionId,
        user: &UserId,
        role: Role,
        ttl: Duration,
    ) -> Result<String, MintError> {
        self.mint_with(session, user, role, ttl, RecordingClaims::default())
    }

    /// A token that also says whether and where the session is recorded.
    pub fn mint_with(
        &self,
        session: &SessionId,
        user: &UserId,
        role: Role,
        ttl: Duration,
        recording: RecordingClaims,
    ) -> Result<String, MintError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: user.clone(),
            sid: session.clone(),
            role,
            exp: now + ttl.as_secs(),
            iat: now,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            rec: recording.rec,
            residency: recording.residency,
            profile: recording.profile,
        };
        Ok(encode(&Header::new(self.alg), &claims, &self.key)?)
    }
}

/// A new Ed25519 key pair as (private PKCS#8 PEM, public SPKI PEM).
pub fn generate_ed25519_pem() -> (String, String) {
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    // ring's generator only fails when the OS has no randomness source.
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("OS random source");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ring parses its own PKCS#8");
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    (pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", &spki))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(
            DecodingKey::from_secret(SECRET),
            Algorithm::HS256,
            "iss",
            "aud",
            0,
        )
    }

    fn sid() -> SessionId {
        "kyc-1".parse().unwrap()
    }

    fn uid() -> UserId {
        "alice".parse().unwrap()
    }

    #[test]
    fn valid_hs256_token_yields_claims() {
        let t = TokenSigner::hs256(SECRET, "iss", "aud")
            .mint(&sid(), &uid(), Role::Agent, Duration::from_secs(60))
            .unwrap();
        let c = verifier().verify(&t).unwrap();
        assert_eq!(c.sid, sid());
        assert_eq!(c.role, Role::Agent);
    }

    #[test]
    fn expired_token_is_rejected() {
        let signer = TokenSigner::hs256(SECRET, "iss", "aud");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = Claims {
            sub: uid(),
            sid: sid(),
            role: Role::User,
            exp: now - 10,
            iat: now - 100,
            iss: "iss".into(),
            aud: "aud".into(),
            rec: None,
            residency: None,
            profile: None,
        };
        let t = encode(&Header::new(Algorithm::HS256), &claims, &signer.key).unwrap();
        assert_eq!(verifier().verify(&t), Err(TokenError::Expired));
        // Signed by this node's key: the refusal names its session.
        let (e, named) = verifier().verify_attributed(&t).unwrap_err();
        assert_eq!(e, TokenError::Expired);
        assert_eq!(named.map(|c| c.sid), Some(sid()));
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"another secret, another secret!!"),
        )
        .unwrap();
        let (e, named) = verifier().verify_attributed(&forged).unwrap_err();
        assert_eq!((e, named), (TokenError::BadSignature, None));
    }

    #[test]
    fn wrongly_signed_token_is_rejected() {
        let t = TokenSigner::hs256(b"another-secret-another-secret-xx", "iss", "aud")
            .mint(&sid(), &uid(), Role::User, Duration::from_secs(60))
            .unwrap();
        assert_eq!(verifier().verify(&t), Err(TokenError::BadSignature));
    }

    #[test]
    fn alg_none_is_rejected() {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!(
            "{}.{}.",
            b(r#"{"alg":"none","typ":"JWT"}"#),
            b(
                r#"{"sub":"alice","sid":"kyc-1","role":"agent","exp":9999999999,"iss":"iss","aud":"aud"}"#
            )
        );
        assert!(matches!(
            verifier().verify(&t),
            Err(TokenError::WrongAlgorithm { found, .. }) if found == "none"
        ));
    }

    #[test]
    fn wrong_issuer_and_audience_are_rejected() {
        let t = TokenSigner::hs256(SECRET, "other", "aud")
            .mint(&sid(), &uid(), Role::User, Duration::from_secs(60))
            .unwrap();
        assert_eq!(verifier().verify(&t), Err(TokenError::WrongIssuer));
        let t = TokenSigner::hs256(SECRET, "iss", "other")
            .mint(&sid(), &uid(), Role::User, Duration::from_secs(60))
            .unwrap();
        assert_eq!(verifier().verify(&t), Err(TokenError::WrongAudience));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for g in ["", "abc", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30.zzz"] {
            assert!(verifier().verify(g).is_err(), "{g}");
        }
    }

    #[test]
    fn eddsa_tokens_verify_with_the_generated_public_key() {
        let (private, public) = generate_ed25519_pem();
        let t = TokenSigner::eddsa_pem(private.as_bytes(), "iss", "aud")
            .unwrap()
            .mint(&sid(), &uid(), Role::Observer, Duration::from_secs(60))
            .unwrap();
        let v = TokenVerifier::new(
            DecodingKey::from_ed_pem(public.as_bytes()).unwrap(),
            Algorithm::EdDSA,
            "iss",
            "aud",
            0,
        );
        assert_eq!(v.verify(&t).unwrap().role, Role::Observer);
        // An HS256 token is refused by an EdDSA node even if it is otherwise valid.
        let hs = TokenSigner::hs256(SECRET, "iss", "aud")
            .mint(&sid(), &uid(), Role::User, Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            v.verify(&hs),
            Err(TokenError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn users_see_agents_but_not_other_users() {
        assert!(Role::User.may_see(Role::Agent));
        assert!(!Role::User.may_see(Role::User));
        assert!(Role::Agent.may_see(Role::User));
        assert!(!Role::Observer.may_publish());
    }
}
