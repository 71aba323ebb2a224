//! Whether a joining participant's session is recorded, and whether this node may be the one
//! that records it: the token's claims over the node's defaults.

use crate::ids::RegionId;

/// The node's side of the decision (`[recording]` in its config).
#[derive(Debug, Clone, Default)]
pub struct RecordingPolicy {
    /// Sessions are recorded unless the token says otherwise (`recording.enabled`).
    pub record_by_default: bool,
    /// Where sessions are recorded unless the token says (`recording.default_residency`);
    /// absent: the region of the node the participant joins.
    pub default_residency: Option<RegionId>,
    /// This node can record (its recorder is running).
    pub can_record: bool,
}

/// Why a join cannot go ahead under the recording rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error("the token's residency {0:?} is not a region of this mesh")]
    UnknownResidency(String),
    #[error("the session must be recorded in region {residency}, and this node (region {here}) cannot relay its records there yet: join through a node of {residency}")]
    RecordedElsewhere { residency: RegionId, here: RegionId },
    #[error("the session must be recorded, and this node does not record sessions (recording.enabled is off)")]
    CannotRecord,
}

impl PolicyRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyRefusal::UnknownResidency(_) => "unknown_residency",
            PolicyRefusal::RecordedElsewhere { .. } | PolicyRefusal::CannotRecord => {
                "recording_unavailable"
            }
        }
    }
}

impl RecordingPolicy {
    /// `Ok(true)`: record the session here; `Ok(false)`: the session is not recorded.
    /// `known` are the regions of the mesh (this node's among them).
    pub fn decide(
        &self,
        rec: Option<bool>,
        residency: Option<&str>,
        here: &RegionId,
        known: &[RegionId],
    ) -> Result<bool, PolicyRefusal> {
        let residency = match residency {
            Some(r) => r
                .parse::<RegionId>()
                .ok()
                .filter(|r| known.contains(r) || r == here)
                .ok_or_else(|| PolicyRefusal::UnknownResidency(r.chars().take(64).collect()))?,
            None => self
                .default_residency
                .clone()
                .unwrap_or_else(|| here.clone()),
        };
        if !rec.unwrap_or(self.record_by_default) {
            return Ok(false);
        }
        if &residency != here {
            return Err(PolicyRefusal::RecordedElsewhere {
                residency,
                here: here.clone(),
            });
        }
        if !self.can_record {
            return Err(PolicyRefusal::CannotRecord);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionId {
        s.parse().unwrap()
    }

    #[test]
    fn the_token_decides_over_the_nodes_defaults() {
        let india = r("india");
        let known = [r("india"), r("us")];
        let node = RecordingPolicy {
            record_by_default: true,
            default_residency: None,
            can_record: true,
        };
        assert_eq!(node.decide(None, None, &india, &known), Ok(true));
        assert_eq!(node.decide(Some(false), None, &india, &known), Ok(false));
        assert_eq!(node.decide(None, Some("india"), &india, &known), Ok(true));
        assert_eq!(
            node.decide(None, Some("us"), &india, &known),
            Err(PolicyRefusal::RecordedElsewhere {
                residency: r("us"),
                here: india.clone()
            })
        );
        assert_eq!(
            node.decide(None, Some("mars"), &india, &known),
            Err(PolicyRefusal::UnknownResidency("mars".into()))
        );
        assert_eq!(
            node.decide(Some(false), Some("../etc"), &india, &known)
                .unwrap_err()
                .code(),
            "unknown_residency",
            "a residency is checked even when not recording"
        );
        let off = RecordingPolicy::default();
        assert_eq!(off.decide(None, None, &india, &known), Ok(false));
        assert_eq!(
            off.decide(Some(true), None, &india, &known),
            Err(PolicyRefusal::CannotRecord)
        );
        let elsewhere = RecordingPolicy {
            default_residency: Some(r("us")),
            ..node
        };
        assert!(matches!(
            elsewhere.decide(None, None, &india, &known),
            Err(PolicyRefusal::RecordedElsewhere { .. })
        ));
    }
}
