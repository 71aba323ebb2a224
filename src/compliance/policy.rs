//! Whether a joining participant's session is recorded, and whether this node may be the one
//! that records it: the token's claims over the node's defaults.

use crate::ids::{NodeId, RegionId};

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
    #[error("the session must be recorded in region {0}, and no node of that region is up to record it: try again shortly")]
    NoRecorder(RegionId),
    #[error("the session must be recorded, and this node does not record sessions (recording.enabled is off)")]
    CannotRecord,
}

impl PolicyRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyRefusal::UnknownResidency(_) => "unknown_residency",
            PolicyRefusal::NoRecorder(_) | PolicyRefusal::CannotRecord => "recording_unavailable",
        }
    }
}

/// Where a recorded session's records are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recording {
    /// By this node.
    Here,
    /// By this node of the residency region (the participant's records are relayed there).
    At(NodeId),
}

impl RecordingPolicy {
    /// `Ok(None)`: the session is not recorded; otherwise where it is. `members` are the
    /// mesh's nodes with their regions, this node (`me`, in region `here`) among them. The
    /// recording node of a region is its lowest node id up, the same whichever node asks.
    pub fn decide(
        &self,
        rec: Option<bool>,
        residency: Option<&str>,
        me: (&NodeId, &RegionId),
        members: &[(NodeId, RegionId)],
    ) -> Result<Option<Recording>, PolicyRefusal> {
        let (node, here) = me;
        let known = |r: &RegionId| r == here || members.iter().any(|(_, m)| m == r);
        let residency = match residency {
            Some(r) => r
                .parse::<RegionId>()
                .ok()
                .filter(known)
                .ok_or_else(|| PolicyRefusal::UnknownResidency(r.chars().take(64).collect()))?,
            None => self
                .default_residency
                .clone()
                .unwrap_or_else(|| here.clone()),
        };
        if !rec.unwrap_or(self.record_by_default) {
            return Ok(None);
        }
        let recorder = members
            .iter()
            .filter(|(_, r)| *r == residency)
            .map(|(n, _)| n)
            .chain((*here == residency).then_some(node))
            .min()
            .ok_or_else(|| PolicyRefusal::NoRecorder(residency.clone()))?;
        if recorder != node {
            return Ok(Some(Recording::At(recorder.clone())));
        }
        if !self.can_record {
            return Err(PolicyRefusal::CannotRecord);
        }
        Ok(Some(Recording::Here))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionId {
        s.parse().unwrap()
    }

    fn n(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    #[test]
    fn the_token_decides_over_the_nodes_defaults() {
        let (india, us) = (r("india"), r("us"));
        let me = n("india-1");
        let members = [
            (n("india-1"), india.clone()),
            (n("india-0"), india.clone()),
            (n("us-1"), us.clone()),
        ];
        let node = RecordingPolicy {
            record_by_default: true,
            default_residency: None,
            can_record: true,
        };
        let decide = |p: &RecordingPolicy, rec, res| p.decide(rec, res, (&me, &india), &members);
        // The region's recording node is its lowest id, here india-0.
        let india_0 = Ok(Some(Recording::At(n("india-0"))));
        assert_eq!(decide(&node, None, None), india_0);
        assert_eq!(decide(&node, Some(false), None), Ok(None));
        assert_eq!(decide(&node, None, Some("india")), india_0);
        assert_eq!(
            decide(&node, None, Some("us")),
            Ok(Some(Recording::At(n("us-1"))))
        );
        assert_eq!(
            node.decide(None, None, (&n("india-0"), &india), &members),
            Ok(Some(Recording::Here))
        );
        assert_eq!(
            decide(&node, None, Some("mars")),
            Err(PolicyRefusal::UnknownResidency("mars".into()))
        );
        assert_eq!(
            decide(&node, Some(false), Some("../etc"))
                .unwrap_err()
                .code(),
            "unknown_residency",
            "a residency is checked even when not recording"
        );
        let off = RecordingPolicy::default();
        let alone = |p: &RecordingPolicy, rec| p.decide(rec, None, (&me, &india), &[]);
        assert_eq!(alone(&off, None), Ok(None));
        assert_eq!(alone(&off, Some(true)), Err(PolicyRefusal::CannotRecord));
        assert_eq!(alone(&node, None), Ok(Some(Recording::Here)));
        let europe = RecordingPolicy {
            default_residency: Some(r("europe")),
            ..node
        };
        // A region of the mesh whose nodes are all down.
        let with_europe_down = [(n("us-1"), us.clone())];
        assert_eq!(
            europe.decide(None, Some("us"), (&me, &india), &with_europe_down),
            Ok(Some(Recording::At(n("us-1"))))
        );
        assert_eq!(
            europe.decide(None, None, (&me, &india), &with_europe_down),
            Err(PolicyRefusal::NoRecorder(r("europe")))
        );
    }
}
