//! Compliance profiles: a regulator's rules for a session, as data. A profile is named in the
//! token (`profile` claim) or by the node's `recording.profile`; its rules are checked at the
//! points of a session where they apply (join, the customer's first media, the agent's
//! questions), and each rule leaves the audit entry that evidences it. Another regime is
//! another `[recording.profiles.<name>]` table, not another code path. The rules and their
//! evidence are tabled in docs/compliance.md.
//!
//! Decisions only: no sockets, no clocks (the caller passes the time), no randomness beyond
//! the question order it is handed a generator for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::ids::RegionId;

/// The name of the built-in profile for India's video KYC (RBI Master Direction on KYC,
/// "V-CIP").
pub const RBI_VCIP: &str = "rbi-vcip";

/// Longest consent text, question or profile name accepted from a configuration.
const MAX_TEXT_CHARS: usize = 4000;
/// A location older than this (by the browser's own timestamp) is not live.
pub const LOCATION_MAX_AGE: Duration = Duration::from_secs(300);
/// Clock difference allowed between a browser and the node.
const LOCATION_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// A fix less precise than this (metres) is no location.
const MAX_ACCURACY_M: f64 = 100_000.0;

/// One profile's rules (`[recording.profiles.<name>]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileRules {
    /// The text the customer (`user` role) agrees to before any media of theirs starts;
    /// absent: no consent step.
    #[serde(default)]
    pub consent: Option<String>,
    /// The customer's live location (browser geolocation) is captured before their media
    /// starts.
    #[serde(default)]
    pub location: bool,
    /// ISO 3166-1 alpha-2 countries the customer's network address must be placed in by
    /// GeoIP; empty: anywhere. An address GeoIP cannot place is outside every country.
    #[serde(default)]
    pub countries: Vec<String>,
    /// The region that keeps every artefact of the session (recordings, snapshots, audit log,
    /// database rows, uploads); a token naming another residency is refused.
    #[serde(default)]
    pub residency: Option<RegionId>,
    /// The pool the agent console draws questions from, in an order drawn per agent.
    #[serde(default)]
    pub questions: Vec<String>,
}

/// A profile with its name.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub rules: ProfileRules,
}

/// Why a configured profile cannot be used (named in the node's start-up error).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileConfigError {
    #[error("recording.profile = {0:?} names no profile: define [recording.profiles.{0}] or use \"rbi-vcip\"")]
    UnknownDefault(String),
    #[error("recording.profiles.{profile}: {reason}")]
    Invalid { profile: String, reason: String },
}

/// Why a session, a join or a step is refused under its profile. Each has a code clients
/// are told.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileRefusal {
    #[error("the token names compliance profile {0:?}, which this node does not know")]
    UnknownProfile(String),
    #[error(
        "compliance profile {0} requires the session to be recorded; the token says rec = false"
    )]
    RecordingRequired(String),
    #[error("compliance profile {profile} keeps sessions in region {required}; the token asks for {asked}")]
    ResidencyConflict {
        profile: String,
        required: RegionId,
        asked: String,
    },
    #[error("compliance profile {profile} admits customers connecting from {allowed} only; your network address is placed in {placed}")]
    OutsideCountries {
        profile: String,
        allowed: String,
        placed: String,
    },
    #[error("give your consent (giveConsent) before your camera or microphone starts: compliance profile {0} requires it")]
    ConsentRequired(String),
    #[error("share your location (shareLocation) before your camera or microphone starts: compliance profile {0} requires it")]
    LocationRequired(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotAllowed(String),
}

impl ProfileRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            ProfileRefusal::UnknownProfile(_) => "unknown_profile",
            ProfileRefusal::RecordingRequired(_) => "recording_required",
            ProfileRefusal::ResidencyConflict { .. } => "residency_conflict",
            ProfileRefusal::OutsideCountries { .. } => "outside_allowed_countries",
            ProfileRefusal::ConsentRequired(_) => "consent_required",
            ProfileRefusal::LocationRequired(_) => "location_required",
            ProfileRefusal::Invalid(_) => "invalid_field",
            ProfileRefusal::NotAllowed(_) => "not_allowed",
        }
    }
}

/// A location as the browser reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Location {
    pub latitude: f64,
    pub longitude: f64,
    /// Metres (the Geolocation API's `accuracy`).
    pub accuracy: f64,
    /// When the browser took the fix: milliseconds since the Unix epoch.
    pub captured_at_ms: u64,
}

/// The profiles a node knows, and the one it applies when a token names none.
#[derive(Debug, Clone, Default)]
pub struct Profiles {
    known: BTreeMap<String, Arc<Profile>>,
    default: Option<Arc<Profile>>,
}

impl ProfileRules {
    /// India's video KYC (V-CIP) as Meridian enforces it by default; a deployment overrides
    /// any of it by defining `[recording.profiles.rbi-vcip]`.
    pub fn rbi_vcip() -> Self {
        Self {
            consent: Some(
                "I consent to this video-based customer identification process (V-CIP): the \
                 call is recorded and kept in India with my live location, my image and the \
                 documents I show, for verifying my identity under the RBI Master Direction \
                 on KYC."
                    .into(),
            ),
            location: true,
            countries: vec!["IN".into()],
            residency: Some("india".parse().expect("a valid region id")),
            questions: [
                "Please state your full name as it appears on your document.",
                "Please state your date of birth.",
                "What is your current address, with its PIN code?",
                "What is your father's or mother's name?",
                "Which city are you in right now?",
                "What is your occupation?",
                "Please hold your document closer to the camera and read its number aloud.",
                "Please turn your head slowly to the left, then to the right.",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    fn validate(&self, profile: &str) -> Result<(), ProfileConfigError> {
        let invalid = |reason: String| ProfileConfigError::Invalid {
            profile: profile.to_owned(),
            reason,
        };
        let text_ok = |t: &str| {
            !t.trim().is_empty()
                && t.chars().count() <= MAX_TEXT_CHARS
                && !t.chars().any(|c| c.is_control() && c != '\n')
        };
        if let Some(c) = &self.consent {
            if !text_ok(c) {
                return Err(invalid(format!(
                    "consent must be 1 to {MAX_TEXT_CHARS} characters of text"
                )));
            }
        }
        for c in &self.countries {
            if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(invalid(format!(
                    "countries: {c:?} is not an ISO 3166-1 alpha-2 code such as \"IN\""
                )));
            }
        }
        if let Some(q) = self.questions.iter().find(|q| !text_ok(q)) {
            return Err(invalid(format!(
                "questions: {:?} is not 1 to {MAX_TEXT_CHARS} characters of text",
                q.chars().take(40).collect::<String>()
            )));
        }
        Ok(())
    }
}

impl Profiles {
    /// The built-in `rbi-vcip` profile, the configured ones (a configured `rbi-vcip` replaces
    /// the built-in), and the default for tokens that name none.
    pub fn new(
        configured: &BTreeMap<String, ProfileRules>,
        default: Option<&str>,
    ) -> Result<Self, ProfileConfigError> {
        let mut known = BTreeMap::new();
        known.insert(
            RBI_VCIP.to_owned(),
            Arc::new(Profile {
                name: RBI_VCIP.into(),
                rules: ProfileRules::rbi_vcip(),
            }),
        );
        for (name, rules) in configured {
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok {
                return Err(ProfileConfigError::Invalid {
                    profile: name.clone(),
                    reason: "a profile name is 1 to 64 of a-z, 0-9 and -".into(),
                });
            }
            rules.validate(name)?;
            known.insert(
                name.clone(),
                Arc::new(Profile {
                    name: name.clone(),
                    rules: rules.clone(),
                }),
            );
        }
        let default = match default {
            None => None,
            Some(d) => Some(
                known
                    .get(d)
                    .cloned()
                    .ok_or_else(|| ProfileConfigError::UnknownDefault(d.to_owned()))?,
            ),
        };
        Ok(Self { known, default })
    }

    /// The profile a session runs under: the token's, else the node's default, else none.
    pub fn resolve(&self, claim: Option<&str>) -> Result<Option<Arc<Profile>>, ProfileRefusal> {
        match claim {
            None => Ok(self.default.clone()),
            Some(name) => self
                .known
                .get(name)
                .cloned()
                .map(Some)
                .ok_or_else(|| ProfileRefusal::UnknownProfile(name.chars().take(64).collect())),
        }
    }
}

impl Profile {
    /// The recording claims the session runs with: the profile's rules over the token's.
    pub fn recording(
        &self,
        rec: Option<bool>,
        residency: Option<&str>,
    ) -> Result<(Option<bool>, Option<String>), ProfileRefusal> {
        if rec == Some(false) {
            return Err(ProfileRefusal::RecordingRequired(self.name.clone()));
        }
        let residency = match (&self.rules.residency, residency) {
            (Some(required), Some(asked)) if required.as_str() != asked => {
                return Err(ProfileRefusal::ResidencyConflict {
                    profile: self.name.clone(),
                    required: required.clone(),
                    asked: asked.chars().take(64).collect(),
                })
            }
            (Some(required), _) => Some(required.to_string()),
            (None, asked) => asked.map(str::to_owned),
        };
        Ok((Some(true), residency))
    }

    /// Whether a customer placed in `country` by GeoIP may join.
    pub fn admits_country(&self, country: Option<&str>) -> Result<(), ProfileRefusal> {
        let allowed = &self.rules.countries;
        if allowed.is_empty() || country.is_some_and(|c| allowed.iter().any(|a| a == c)) {
            return Ok(());
        }
        Err(ProfileRefusal::OutsideCountries {
            profile: self.name.clone(),
            allowed: allowed.join(", "),
            placed: country.unwrap_or("no known country").to_owned(),
        })
    }

    /// Whether the customer's media may start, given the steps done so far.
    pub fn media_allowed(&self, consented: bool, located: bool) -> Result<(), ProfileRefusal> {
        if self.rules.consent.is_some() && !consented {
            return Err(ProfileRefusal::ConsentRequired(self.name.clone()));
        }
        if self.rules.location && !located {
            return Err(ProfileRefusal::LocationRequired(self.name.clone()));
        }
        Ok(())
    }

    /// The consent entry for the text the customer was shown, which must be the profile's.
    pub fn consent_entry(&self, shown: &str) -> Result<Value, ProfileRefusal> {
        let Some(text) = &self.rules.consent else {
            return Err(ProfileRefusal::NotAllowed(format!(
                "compliance profile {} has no consent step",
                self.name
            )));
        };
        if shown != text {
            return Err(ProfileRefusal::Invalid(
                "the consent text differs from the one this session asks for (see `joined.profile.consent`)".into(),
            ));
        }
        Ok(json!({
            "profile": self.name,
            "text": text,
            "text_sha256": super::sha256_hex(text.as_bytes()),
        }))
    }

    /// The location entry for a fix the browser reported, checked for sense and freshness at
    /// `now`. `geoip_country`: where the network address was placed, kept beside it.
    pub fn location_entry(
        &self,
        l: Location,
        geoip_country: Option<&str>,
        now: SystemTime,
    ) -> Result<Value, ProfileRefusal> {
        if !self.rules.location {
            return Err(ProfileRefusal::NotAllowed(format!(
                "compliance profile {} does not capture locations",
                self.name
            )));
        }
        let finite = [l.latitude, l.longitude, l.accuracy]
            .iter()
            .all(|v| v.is_finite());
        if !finite
            || !(-90.0..=90.0).contains(&l.latitude)
            || !(-180.0..=180.0).contains(&l.longitude)
            || !(0.0..=MAX_ACCURACY_M).contains(&l.accuracy)
        {
            return Err(ProfileRefusal::Invalid(format!(
                "a location is a latitude in [-90, 90], a longitude in [-180, 180] and an accuracy of 0 to {MAX_ACCURACY_M} m"
            )));
        }
        let taken = UNIX_EPOCH + Duration::from_millis(l.captured_at_ms.min(u64::MAX / 2));
        let too_old = now
            .duration_since(taken)
            .is_ok_and(|age| age > LOCATION_MAX_AGE);
        let too_new = taken
            .duration_since(now)
            .is_ok_and(|ahead| ahead > LOCATION_CLOCK_SKEW);
        if too_old || too_new {
            return Err(ProfileRefusal::Invalid(format!(
                "the location must be live: taken within the last {} s (by the browser's clock)",
                LOCATION_MAX_AGE.as_secs()
            )));
        }
        Ok(json!({
            "profile": self.name,
            "latitude": l.latitude,
            "longitude": l.longitude,
            "accuracy_m": l.accuracy,
            "captured_at": super::utc_rfc3339(taken),
            "geoip_country": geoip_country,
        }))
    }

    /// An order in which one agent is offered the question pool.
    pub fn question_order(&self, rng: &mut impl rand::Rng) -> Vec<usize> {
        use rand::seq::SliceRandom;
        let mut order: Vec<usize> = (0..self.rules.questions.len()).collect();
        order.shuffle(rng);
        order
    }

    /// What `joined` tells clients about the profile.
    pub fn summary(&self) -> Value {
        json!({
            "name": self.name,
            "consent": self.rules.consent,
            "location": self.rules.location,
            "questions": !self.rules.questions.is_empty(),
        })
    }
}

/// ISO 6709 form of a fix (`+19.0760+072.8777/`), as file titles carry it.
pub fn iso6709(latitude: f64, longitude: f64) -> String {
    format!("{latitude:+08.4}{longitude:+09.4}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rbi() -> Arc<Profile> {
        Profiles::new(&BTreeMap::new(), Some(RBI_VCIP))
            .unwrap()
            .resolve(None)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn the_token_names_the_profile_and_the_node_gives_the_default() {
        let none = Profiles::new(&BTreeMap::new(), None).unwrap();
        assert_eq!(none.resolve(None), Ok(None));
        assert_eq!(
            none.resolve(Some(RBI_VCIP)).unwrap().unwrap().name,
            RBI_VCIP
        );
        assert_eq!(
            none.resolve(Some("bafin-videoident")).unwrap_err().code(),
            "unknown_profile"
        );
        let mut configured = BTreeMap::new();
        configured.insert(
            "bafin-videoident".to_owned(),
            ProfileRules {
                consent: Some("Ich willige ein.".into()),
                location: false,
                countries: vec!["DE".into(), "AT".into()],
                residency: Some("europe".parse().unwrap()),
                questions: Vec::new(),
            },
        );
        let both = Profiles::new(&configured, Some("bafin-videoident")).unwrap();
        let p = both.resolve(None).unwrap().unwrap();
        assert_eq!(p.name, "bafin-videoident");
        assert!(p.admits_country(Some("AT")).is_ok());
        assert_eq!(
            Profiles::new(&BTreeMap::new(), Some("nope")).unwrap_err(),
            ProfileConfigError::UnknownDefault("nope".into())
        );
        configured.get_mut("bafin-videoident").unwrap().countries = vec!["de".into()];
        assert!(matches!(
            Profiles::new(&configured, None),
            Err(ProfileConfigError::Invalid { .. })
        ));
    }

    #[test]
    fn rbi_vcip_records_in_india_and_refuses_a_token_that_says_otherwise() {
        let p = rbi();
        assert_eq!(
            p.recording(None, None),
            Ok((Some(true), Some("india".into())))
        );
        assert_eq!(
            p.recording(Some(true), Some("india")),
            Ok((Some(true), Some("india".into())))
        );
        assert_eq!(
            p.recording(Some(false), None).unwrap_err().code(),
            "recording_required"
        );
        assert_eq!(
            p.recording(None, Some("us")).unwrap_err().code(),
            "residency_conflict"
        );
    }

    #[test]
    fn rbi_vcip_admits_customers_placed_in_india_only() {
        let p = rbi();
        assert!(p.admits_country(Some("IN")).is_ok());
        let out = p.admits_country(Some("US")).unwrap_err();
        assert_eq!(out.code(), "outside_allowed_countries");
        assert!(out.to_string().contains("placed in US"), "{out}");
        assert!(p.admits_country(None).is_err(), "unplaced is not in India");
    }

    #[test]
    fn the_customers_media_waits_for_consent_then_location() {
        let p = rbi();
        assert_eq!(
            p.media_allowed(false, true).unwrap_err().code(),
            "consent_required"
        );
        assert_eq!(
            p.media_allowed(true, false).unwrap_err().code(),
            "location_required"
        );
        assert!(p.media_allowed(true, true).is_ok());
        let consent = p.rules.consent.clone().unwrap();
        let e = p.consent_entry(&consent).unwrap();
        assert_eq!(
            e["text_sha256"],
            super::super::sha256_hex(consent.as_bytes())
        );
        assert_eq!(
            p.consent_entry("I agree").unwrap_err().code(),
            "invalid_field"
        );
    }

    #[test]
    fn a_location_must_be_sensible_and_live() {
        let p = rbi();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ms = 1_800_000_000_000;
        let fix = Location {
            latitude: 19.076,
            longitude: 72.8777,
            accuracy: 25.0,
            captured_at_ms: ms - 2_000,
        };
        let e = p.location_entry(fix, Some("IN"), now).unwrap();
        assert_eq!(
            e["captured_at"],
            super::super::utc_rfc3339(now - Duration::from_secs(2))
        );
        assert_eq!(e["geoip_country"], "IN");
        for bad in [
            Location {
                latitude: 91.0,
                ..fix
            },
            Location {
                longitude: f64::NAN,
                ..fix
            },
            Location {
                accuracy: -1.0,
                ..fix
            },
            Location {
                captured_at_ms: ms - 600_000,
                ..fix
            },
            Location {
                captured_at_ms: ms + 120_000,
                ..fix
            },
            Location {
                captured_at_ms: u64::MAX,
                ..fix
            },
        ] {
            assert_eq!(
                p.location_entry(bad, None, now).unwrap_err().code(),
                "invalid_field",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn each_agent_gets_the_whole_pool_in_its_own_order() {
        let p = rbi();
        let mut rng = rand::rng();
        let mut a = p.question_order(&mut rng);
        assert_eq!(a.len(), p.rules.questions.len());
        a.sort();
        assert_eq!(a, (0..p.rules.questions.len()).collect::<Vec<_>>());
        assert_eq!(iso6709(19.076, 72.8777), "+19.0760+072.8777/");
        assert_eq!(iso6709(-1.2921, -0.1278), "-01.2921-000.1278/");
    }
}
