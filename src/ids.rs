//! Identifier newtypes shared by every plane.
//!
//! Identifiers travel through signaling, tokens and (later) pipe frames, so each one is validated
//! once at the edge with [`std::str::FromStr`] and is then trusted everywhere else.

use std::fmt;
use std::str::FromStr;

/// A pipe (QUIC connection to another node), numbered by the mesh in the order pipes open.
/// Never seen outside the node: it names a pipe in logs, metrics and the worker's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PipeId(pub u64);

impl fmt::Display for PipeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} characters long; at most {max} are allowed")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} may only contain ASCII letters, digits, '-', '_' and '.'; found {found:?}")]
    BadChar { kind: &'static str, found: char },
}

/// Longest identifier accepted from outside.
pub const MAX_ID_LEN: usize = 64;

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: s.len(),
            max: MAX_ID_LEN,
        });
    }
    if let Some(found) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar { kind, found });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A fresh random identifier (128 bits of entropy).
            pub fn random() -> Self {
                Self(format!(concat!($prefix, "{:032x}"), rand::random::<u128>()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                validate($kind, s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A region of the mesh, e.g. `india`.
    RegionId, "region id", "r-"
);
string_id!(
    /// One Meridian process.
    NodeId, "node id", "n-"
);
string_id!(
    /// A verification session (one KYC call, one exam): a Router on each node that hosts it.
    SessionId, "session id", "s-"
);
string_id!(
    /// The application's user id, taken from the token's `sub` claim.
    UserId, "user id", "u-"
);
string_id!(
    /// One signaling connection of one user in one session.
    ParticipantId, "participant id", "pa-"
);
string_id!(
    /// An incoming track. Kept identical on every node the producer is piped to.
    ProducerId, "producer id", "pr-"
);
string_id!(
    /// One outgoing copy of a producer to one participant.
    ConsumerId, "consumer id", "co-"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        let id: SessionId = "kyc-2026.11_24".parse().unwrap();
        assert_eq!(id.to_string(), "kyc-2026.11_24");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SessionId>(&json).unwrap(), id);
    }

    #[test]
    fn bad_ids_are_rejected_with_the_reason() {
        assert_eq!(
            "".parse::<RegionId>().unwrap_err(),
            IdError::Empty { kind: "region id" }
        );
        assert!(matches!(
            "a/b".parse::<SessionId>().unwrap_err(),
            IdError::BadChar { found: '/', .. }
        ));
        let long = "x".repeat(65);
        assert!(matches!(
            long.parse::<ProducerId>().unwrap_err(),
            IdError::TooLong { len: 65, .. }
        ));
        assert!(serde_json::from_str::<SessionId>("\"a b\"").is_err());
    }

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = ProducerId::random();
        let b = ProducerId::random();
        assert_ne!(a, b);
        assert!(a.as_str().parse::<ProducerId>().is_ok());
    }
}
