//! Edge selection: which node a client should join, and the alternates to try if it cannot.
//! Pure functions of the client's place and the membership; the signaling edge supplies both.
//!
//! The `nearest` selector (the default) ranks regions by great-circle distance from the client,
//! divided by the operator's region weight, after dropping nodes that are draining or at
//! capacity; an override map can pin countries or continents whose network paths disagree with
//! geography. Inside a region the least loaded node comes first. `least_loaded` ignores
//! geography altogether.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::geo::Place;
use super::membership::MemberView;
use crate::ids::{NodeId, RegionId};

/// Mean Earth radius used by the haversine formula.
const EARTH_RADIUS_KM: f64 = 6371.0;

/// Great-circle distance between two points given in degrees.
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

/// Which selection strategy a node uses (`routing.selector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectorKind {
    /// Nearest region by distance and weight, then least loaded node.
    #[default]
    Nearest,
    /// Least loaded node anywhere.
    LeastLoaded,
}

/// The operator's routing policy.
#[derive(Debug, Clone, Default)]
pub struct RoutingPolicy {
    pub selector: SelectorKind,
    /// Region for clients whose address has no place (private, unknown).
    pub default_region: Option<RegionId>,
    /// Let a client with no known place name its region (`?region=`).
    pub allow_region_hint: bool,
    /// Multiplies a region's attraction: distance is divided by the weight (default 1).
    pub region_weights: HashMap<RegionId, f64>,
    /// Country code (ISO 3166-1 alpha-2) to region, checked before continents.
    pub country_overrides: HashMap<String, RegionId>,
    /// Continent code (AF AN AS EU NA OC SA) to region.
    pub continent_overrides: HashMap<String, RegionId>,
}

/// Why the first node was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    /// The client's place is known; its nearest region (after weights) was taken.
    Nearest,
    /// A country or continent override named the region.
    Override,
    /// The client's place is unknown and its region hint was taken.
    Hint,
    /// The client's place is unknown: the configured default region.
    Default,
    /// The client's place is unknown and no default region is available: least loaded node.
    Unlocated,
    /// The `least_loaded` selector.
    LeastLoaded,
}

/// The nodes a client should try, best first: indexes into the member list.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub order: Vec<usize>,
    pub reason: Reason,
}

/// No node can take a new session.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "no node can take new sessions: all {members} known nodes are draining, down or at capacity"
)]
pub struct NoEdge {
    pub members: usize,
}

/// A node can take a new session: not draining and under its capacity.
pub fn eligible(m: &MemberView) -> bool {
    !m.draining && m.load.factor < 1.0
}

/// Orders the eligible members for a client at `place` (or unknown) with an optional hint.
pub fn select(
    policy: &RoutingPolicy,
    place: Option<&Place>,
    hint: Option<&RegionId>,
    members: &[MemberView],
) -> Result<Selection, NoEdge> {
    select_with_affinity(policy, place, hint, members, &|_| false)
}

/// Like [`select`], for a client of a session some nodes already host (`hosts`): within the
/// chosen region (and among equals anywhere), a node hosting the session comes before the
/// others, so the participants of one session in one region meet on one node rather than
/// needing a pipe between two.
pub fn select_with_affinity(
    policy: &RoutingPolicy,
    place: Option<&Place>,
    hint: Option<&RegionId>,
    members: &[MemberView],
    hosts: &dyn Fn(&NodeId) -> bool,
) -> Result<Selection, NoEdge> {
    let candidates: Vec<usize> = (0..members.len())
        .filter(|&i| eligible(&members[i]))
        .collect();
    if candidates.is_empty() {
        return Err(NoEdge {
            members: members.len(),
        });
    }
    let by_load = |a: &usize, b: &usize| {
        let (ma, mb) = (&members[*a], &members[*b]);
        (!hosts(&ma.info.node))
            .cmp(&!hosts(&mb.info.node))
            .then_with(|| ma.load.factor.total_cmp(&mb.load.factor))
            .then_with(|| ma.info.node.cmp(&mb.info.node))
    };
    if policy.selector == SelectorKind::LeastLoaded {
        let mut order = candidates;
        order.sort_by(by_load);
        return Ok(Selection {
            order,
            reason: Reason::LeastLoaded,
        });
    }
    let has = |r: &RegionId| candidates.iter().any(|&i| &members[i].info.region == r);
    // The region to put first, if the policy names one, and the point to measure from.
    let (pinned, origin, reason) = match place {
        Some(p) => {
            let over = p
                .country
                .as_ref()
                .and_then(|c| policy.country_overrides.get(c))
                .or_else(|| {
                    p.continent
                        .as_ref()
                        .and_then(|c| policy.continent_overrides.get(c))
                })
                .filter(|r| has(r));
            match over {
                Some(r) => (
                    Some(r.clone()),
                    Some((p.latitude, p.longitude)),
                    Reason::Override,
                ),
                None => (None, Some((p.latitude, p.longitude)), Reason::Nearest),
            }
        }
        None => {
            let hinted = hint.filter(|r| policy.allow_region_hint && has(r));
            let (region, reason) = match hinted {
                Some(r) => (Some(r.clone()), Reason::Hint),
                None => match policy.default_region.as_ref().filter(|r| has(r)) {
                    Some(r) => (Some(r.clone()), Reason::Default),
                    None => (None, Reason::Unlocated),
                },
            };
            // Alternates are ranked by distance from the chosen region's site.
            let origin = region.as_ref().and_then(|r| {
                candidates
                    .iter()
                    .map(|&i| &members[i].info)
                    .find(|m| &m.region == r)
                    .map(|m| (m.latitude, m.longitude))
            });
            (region, origin, reason)
        }
    };
    // A region's distance is its nearest eligible node's, divided by its weight: the
    // configured one times the operator's for the node (`ctl weight`, from its heartbeats).
    let mut region_cost: HashMap<&RegionId, f64> = HashMap::new();
    for &i in &candidates {
        let m = &members[i].info;
        let cost = match origin {
            Some((lat, lon)) => {
                let w = policy.region_weights.get(&m.region).copied().unwrap_or(1.0)
                    * f64::from(members[i].weight.max(f32::MIN_POSITIVE));
                haversine_km(lat, lon, m.latitude, m.longitude) / w
            }
            None => 0.0,
        };
        let e = region_cost.entry(&m.region).or_insert(f64::INFINITY);
        *e = e.min(cost);
    }
    let rank = |i: usize| {
        let r = &members[i].info.region;
        let first = pinned.as_ref() == Some(r);
        (!first, region_cost[r])
    };
    let mut order = candidates.clone();
    order.sort_by(|&a, &b| {
        let (fa, ca) = rank(a);
        let (fb, cb) = rank(b);
        let by_region = fa.cmp(&fb).then(ca.total_cmp(&cb));
        if origin.is_some() {
            // Keep a region's nodes together when two regions are equally far.
            by_region
                .then_with(|| members[a].info.region.cmp(&members[b].info.region))
                .then_with(|| by_load(&a, &b))
        } else {
            by_region.then_with(|| by_load(&a, &b))
        }
    });
    Ok(Selection { order, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::membership::{Load, NodeInfo};

    fn member(node: &str, region: &str, lat: f64, lon: f64, factor: f32) -> MemberView {
        MemberView {
            info: NodeInfo {
                node: node.parse().unwrap(),
                region: region.parse().unwrap(),
                signaling_url: String::new(),
                latitude: lat,
                longitude: lon,
                pipe_addr: None,
            },
            load: Load {
                factor,
                ..Load::default()
            },
            draining: false,
            local: false,
            rtt: None,
            weight: 1.0,
        }
    }

    fn mesh() -> Vec<MemberView> {
        vec![
            member("india-1", "india", 19.076, 72.8777, 0.1),
            member("europe-1", "europe", 50.1109, 8.6821, 0.1),
            member("us-1", "us", 39.0438, -77.4874, 0.1),
            member("india-2", "india", 19.076, 72.8777, 0.05),
        ]
    }

    fn at(lat: f64, lon: f64, country: &str, continent: &str) -> Place {
        Place {
            latitude: lat,
            longitude: lon,
            country: Some(country.into()),
            continent: Some(continent.into()),
            city: None,
        }
    }

    fn nodes(members: &[MemberView], s: &Selection) -> Vec<String> {
        s.order
            .iter()
            .map(|&i| members[i].info.node.to_string())
            .collect()
    }

    #[test]
    fn haversine_matches_known_distances() {
        // Mumbai - Frankfurt is about 6,560 km; London - New York about 5,570 km.
        let d = haversine_km(19.076, 72.8777, 50.1109, 8.6821);
        assert!((6500.0..6620.0).contains(&d), "{d}");
        let d = haversine_km(51.5074, -0.1278, 40.7128, -74.006);
        assert!((5540.0..5600.0).contains(&d), "{d}");
        assert_eq!(haversine_km(10.0, 20.0, 10.0, 20.0), 0.0);
    }

    #[test]
    fn nearest_region_first_then_least_loaded_node_then_the_rest_by_distance() {
        let m = mesh();
        let policy = RoutingPolicy::default();
        let s = select(&policy, Some(&at(1.35, 103.82, "SG", "AS")), None, &m).unwrap();
        assert_eq!(s.reason, Reason::Nearest);
        assert_eq!(nodes(&m, &s), ["india-2", "india-1", "europe-1", "us-1"]);
    }

    #[test]
    fn draining_and_full_nodes_are_skipped() {
        let mut m = mesh();
        m[3].draining = true;
        m[0].load.factor = 1.0;
        let s = select(
            &RoutingPolicy::default(),
            Some(&at(19.0, 72.8, "IN", "AS")),
            None,
            &m,
        )
        .unwrap();
        assert_eq!(nodes(&m, &s), ["europe-1", "us-1"]);
        for v in &mut m {
            v.draining = true;
        }
        assert_eq!(
            select(&RoutingPolicy::default(), None, None, &m),
            Err(NoEdge { members: 4 })
        );
    }

    #[test]
    fn overrides_pin_countries_and_continents() {
        let m = mesh();
        let mut policy = RoutingPolicy::default();
        let nairobi = at(-1.2921, 36.8219, "KE", "AF");
        // Geography alone sends Nairobi to India.
        let s = select(&policy, Some(&nairobi), None, &m).unwrap();
        assert_eq!(m[s.order[0]].info.region.as_str(), "india");
        policy
            .continent_overrides
            .insert("AF".into(), "europe".parse().unwrap());
        let s = select(&policy, Some(&nairobi), None, &m).unwrap();
        assert_eq!(s.reason, Reason::Override);
        assert_eq!(m[s.order[0]].info.region.as_str(), "europe");
        // A country entry wins over its continent's.
        policy
            .country_overrides
            .insert("KE".into(), "us".parse().unwrap());
        let s = select(&policy, Some(&nairobi), None, &m).unwrap();
        assert_eq!(m[s.order[0]].info.region.as_str(), "us");
    }

    #[test]
    fn weights_bias_the_distance() {
        let m = mesh();
        let dubai = at(25.2048, 55.2708, "AE", "AS");
        let mut policy = RoutingPolicy::default();
        let s = select(&policy, Some(&dubai), None, &m).unwrap();
        assert_eq!(m[s.order[0]].info.region.as_str(), "india");
        // Dubai is ~1,900 km from Mumbai and ~4,800 km from Frankfurt.
        policy.region_weights.insert("europe".parse().unwrap(), 3.0);
        let s = select(&policy, Some(&dubai), None, &m).unwrap();
        assert_eq!(m[s.order[0]].info.region.as_str(), "europe");
    }

    #[test]
    fn an_operators_weight_announced_by_a_node_biases_its_region() {
        let mut m = mesh();
        let dubai = at(25.2048, 55.2708, "AE", "AS");
        let policy = RoutingPolicy::default();
        for v in m.iter_mut().filter(|v| v.info.region.as_str() == "india") {
            v.weight = 0.2;
        }
        let s = select(&policy, Some(&dubai), None, &m).unwrap();
        assert_eq!(m[s.order[0]].info.region.as_str(), "europe");
        // India still takes clients when it is the only region left.
        let mumbai = at(19.07, 72.87, "IN", "AS");
        let india_only: Vec<MemberView> = m
            .into_iter()
            .filter(|v| v.info.region.as_str() == "india")
            .collect();
        let s = select(&policy, Some(&mumbai), None, &india_only).unwrap();
        assert!(!s.order.is_empty());
    }

    #[test]
    fn unknown_place_uses_hint_only_when_allowed_else_default() {
        let m = mesh();
        let mut policy = RoutingPolicy {
            default_region: Some("us".parse().unwrap()),
            ..RoutingPolicy::default()
        };
        let hint: RegionId = "india".parse().unwrap();
        let s = select(&policy, None, Some(&hint), &m).unwrap();
        assert_eq!(s.reason, Reason::Default);
        // Alternates by distance from the default region's site: Europe before India.
        assert_eq!(nodes(&m, &s), ["us-1", "europe-1", "india-2", "india-1"]);
        policy.allow_region_hint = true;
        let s = select(&policy, None, Some(&hint), &m).unwrap();
        assert_eq!(s.reason, Reason::Hint);
        assert_eq!(m[s.order[0]].info.region.as_str(), "india");
        // No default configured: least loaded first.
        let s = select(&RoutingPolicy::default(), None, None, &m).unwrap();
        assert_eq!(s.reason, Reason::Unlocated);
        assert_eq!(m[s.order[0]].info.node.as_str(), "india-2");
    }

    #[test]
    fn least_loaded_selector_ignores_geography() {
        let mut m = mesh();
        m[2].load.factor = 0.0;
        let policy = RoutingPolicy {
            selector: SelectorKind::LeastLoaded,
            ..RoutingPolicy::default()
        };
        let s = select(&policy, Some(&at(19.0, 72.8, "IN", "AS")), None, &m).unwrap();
        assert_eq!(s.reason, Reason::LeastLoaded);
        assert_eq!(m[s.order[0]].info.node.as_str(), "us-1");
    }

    #[test]
    fn a_node_already_hosting_the_session_comes_first_in_its_region() {
        let m = mesh();
        let policy = RoutingPolicy::default();
        let mumbai = at(19.07, 72.87, "IN", "AS");
        // india-2 is less loaded, so it is first for a new session...
        let s = select(&policy, Some(&mumbai), None, &m).unwrap();
        assert_eq!(m[s.order[0]].info.node.as_str(), "india-2");
        // ...but a session hosted on india-1 goes there; the region stays the nearest.
        let hosts = |n: &NodeId| n.as_str() == "india-1";
        let s = select_with_affinity(&policy, Some(&mumbai), None, &m, &hosts).unwrap();
        assert_eq!(m[s.order[0]].info.node.as_str(), "india-1");
        assert_eq!(m[s.order[1]].info.node.as_str(), "india-2");
        // A session hosted only in another region does not pull the client there.
        let hosts = |n: &NodeId| n.as_str() == "us-1";
        let s = select_with_affinity(&policy, Some(&mumbai), None, &m, &hosts).unwrap();
        assert_eq!(m[s.order[0]].info.region.as_str(), "india");
    }
}
