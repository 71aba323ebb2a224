//! Admission of connections to a listener: a cap on how many are open at once, in all and
//! per source address, so that one host cannot take every place (or every file descriptor).
//! Used by the signaling listener and the ICE-TCP media listener alike.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::cidr::{normalize, Cidr};

/// How many connections a listener admits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at once, from everyone.
    pub max: usize,
    /// Open connections at once from one source address.
    pub per_source: usize,
    /// Sources counted only against `max` (reverse proxies carrying many clients).
    pub exempt: Vec<Cidr>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("the listener holds its maximum number of connections")]
    Full,
    #[error("this source holds its maximum number of connections")]
    SourceFull,
}

/// Open connections of one listener, counted for admission and for `/metrics`.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    pub refused_full: AtomicU64,
    pub refused_source: AtomicU64,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    /// The source it counts against, or none for an exempt source.
    source: Option<IpAddr>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new((0, HashMap::new())),
            refused_full: AtomicU64::new(0),
            refused_source: AtomicU64::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().map(|o| o.0).unwrap_or(0)
    }

    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, AdmissionError> {
        let peer = normalize(peer);
        let exempt = self.limits.exempt.iter().any(|c| c.contains(peer));
        // A poisoned lock only means a holder panicked mid-update; the counts stay usable.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.limits.max {
            self.refused_full.fetch_add(1, Relaxed);
            return Err(AdmissionError::Full);
        }
        let source = if exempt {
            None
        } else {
            let n = open.1.entry(peer).or_default();
            if *n >= self.limits.per_source {
                self.refused_source.fetch_add(1, Relaxed);
                return Err(AdmissionError::SourceFull);
            }
            *n += 1;
            Some(peer)
        };
        open.0 += 1;
        Ok(Permit {
            admission: self.clone(),
            source,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(ip) = self.source {
            if let Some(n) = open.1.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_source: usize, exempt: &[&str]) -> Arc<Admission> {
        Admission::new(Limits {
            max,
            per_source,
            exempt: exempt.iter().map(|c| c.parse().unwrap()).collect(),
        })
    }

    #[test]
    fn one_source_cannot_take_every_place() {
        let a = admission(10, 2, &[]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = a.admit(ip).unwrap();
        let _second = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).unwrap_err(), AdmissionError::SourceFull);
        assert!(a.admit("192.0.2.2".parse().unwrap()).is_ok());
        drop(first);
        assert!(a.admit(ip).is_ok(), "a closed connection frees its place");
    }

    #[test]
    fn trusted_proxies_count_only_against_the_global_cap() {
        let a = admission(3, 1, &["10.0.0.0/8"]);
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| a.admit(proxy).unwrap()).collect();
        assert_eq!(a.admit(proxy).unwrap_err(), AdmissionError::Full);
        assert_eq!(a.open(), 3);
        drop(held);
        assert_eq!(a.open(), 0);
    }
}
