//! The HTTP listener in front of the signaling router: who may hold a connection, and for how
//! long a connection may stay silent before it says what it wants.
//!
//! `axum::serve` has neither a header-read timeout nor a connection cap, so a few hundred idle
//! sockets from one host could take every file descriptor. Here each accepted connection needs
//! a permit, counted globally and per source address (trusted proxies, which carry many
//! clients, count only globally), and hyper closes a connection that has not sent a complete
//! request head within the header timeout. A WebSocket keeps its connection's permit until it
//! closes; its own idle rules live in the connection loop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::cidr::{normalize, Cidr};

/// Kernel send buffer of each connection (Linux doubles it for bookkeeping).
const SEND_BUFFER: usize = 64 * 1024;

/// How many connections the listener admits.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections at once, from everyone.
    pub max: usize,
    /// Open connections at once from one source address.
    pub per_source: usize,
    /// Sources counted only against `max` (reverse proxies carrying many clients).
    pub exempt: Vec<Cidr>,
    /// Time to receive a complete request head, on a new or an idle kept-alive connection.
    pub header_timeout: Duration,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("the node holds its maximum number of signaling connections")]
    Full,
    #[error("this source holds its maximum number of signaling connections")]
    SourceFull,
}

/// Open connections, counted for admission and for `/metrics`.
#[derive(Debug)]
pub struct Admission {
    limits: ConnectionLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    pub refused_full: AtomicU64,
    pub refused_source: AtomicU64,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    admission: Arc<Admission>,
    /// The source it counts against, or none for an exempt source.
    source: Option<IpAddr>,
}

impl Admission {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
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

    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnPermit, AdmissionError> {
        let peer = normalize(peer);
        let exempt = self.limits.exempt.iter().any(|c| c.contains(peer));
        // A poisoned lock only means another accept panicked mid-update; the counts stay usable.
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
        Ok(ConnPermit {
            admission: self.clone(),
            source,
        })
    }
}

impl Drop for ConnPermit {
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

/// Serves `app` on `listener` until the task is dropped. Handlers see the peer address as
/// `ConnectInfo<SocketAddr>` and the connection's permit as `Extension<Arc<ConnPermit>>`.
pub async fn serve(listener: TcpListener, app: Router, admission: Arc<Admission>) {
    let header_timeout = admission.limits.header_timeout;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors or a transient network error: wait rather than spin.
                tracing::warn!(error = %e, "signaling accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match admission.admit(peer.ip()) {
            Ok(p) => Arc::new(p),
            Err(_) => continue, // dropping the stream refuses it; counted in `admit`
        };
        let _ = stream.set_nodelay(true);
        // Signaling is small messages: a fixed kernel buffer (instead of one autotuned up to
        // megabytes) bounds what a client that stops reading can hold of the node's memory.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req.extensions_mut().insert(permit.clone());
                let app = app.clone();
                async move { app.oneshot(req).await }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_source: usize, exempt: &[&str]) -> Arc<Admission> {
        Admission::new(ConnectionLimits {
            max,
            per_source,
            exempt: exempt.iter().map(|c| c.parse().unwrap()).collect(),
            header_timeout: Duration::from_secs(1),
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
