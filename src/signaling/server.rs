//! The HTTP listener in front of the signaling router: who may hold a connection, and for how
//! long a connection may stay silent before it says what it wants.
//!
//! `axum::serve` has neither a header-read timeout nor a connection cap, so a few hundred idle
//! sockets from one host could take every file descriptor. Here each accepted connection needs
//! a permit, counted globally and per source address (trusted proxies, which carry many
//! clients, count only globally), and hyper closes a connection that has not sent a complete
//! request head within the header timeout. A WebSocket keeps its connection's permit until it
//! closes; its own idle rules live in the connection loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::admission::{Admission, Permit};

/// Kernel send buffer of each connection (Linux doubles it for bookkeeping).
const SEND_BUFFER: usize = 64 * 1024;

/// Serves `app` on `listener` until the task is dropped. Handlers see the peer address as
/// `ConnectInfo<SocketAddr>` and the connection's permit as `Extension<Arc<Permit>>`. A
/// connection must deliver a complete request head within `header_timeout`, when new and
/// whenever it waits, kept alive, for its next request.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    admission: Arc<Admission>,
    header_timeout: Duration,
) {
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
        let permit: Arc<Permit> = match admission.admit(peer.ip()) {
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
