//! ICE-TCP (RFC 6544, passive candidates): the fallback for clients whose networks block UDP.
//! Each accepted TCP connection carries RFC 4571 frames (16-bit length, then one STUN, DTLS,
//! RTP or RTCP packet). Connections are owned by small tasks that hand frames to the worker and
//! write what the worker gives them; the worker routes frames exactly as it routes datagrams.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::admission::{Admission, Limits};

/// What connection tasks tell the worker.
pub(super) enum TcpEvent {
    Opened {
        peer: SocketAddr,
        out: mpsc::Sender<Bytes>,
    },
    Frame {
        peer: SocketAddr,
        data: BytesMut,
    },
    Closed {
        peer: SocketAddr,
    },
}

/// Open TCP media connections a node accepts at once; more are refused at accept.
pub const MAX_TCP_CONNECTIONS: usize = 4096;
/// Open TCP media connections from one source address (each participant needs two; an
/// office behind one NAT may hold many).
pub const MAX_TCP_PER_SOURCE: usize = 64;
/// A connection must send an authenticated Binding request (which the worker answers) within
/// this time, or it is closed: silent connections cannot hold places.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(5);
/// A connection that delivers no complete frame for this long is closed. Clients send
/// consent checks every few seconds (RFC 7675 gives up after 30 s without them).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that cannot complete this long means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one slow TCP client before further ones are dropped.
const OUT_QUEUE: usize = 512;

/// Splits a byte stream into RFC 4571 frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, if one has fully arrived.
    pub fn next_frame(&mut self) -> Option<BytesMut> {
        if self.buf.len() < 2 {
            return None;
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if self.buf.len() < 2 + len {
            return None;
        }
        self.buf.advance(2);
        Some(self.buf.split_to(len))
    }
}

/// Prefixes a packet with its 16-bit length. Packets over 65535 bytes cannot be framed.
pub fn frame(packet: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(packet.len()).ok()?;
    let mut out = Vec::with_capacity(packet.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
    Some(out)
}

/// Accepts connections until the worker goes away.
pub(super) async fn accept_loop(
    listener: TcpListener,
    events: mpsc::UnboundedSender<TcpEvent>,
    stats: Arc<super::WorkerStats>,
) {
    let admission = Admission::new(Limits {
        max: MAX_TCP_CONNECTIONS,
        per_source: MAX_TCP_PER_SOURCE,
        exempt: Vec::new(),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "ICE-TCP accept failed");
                // Out of descriptors: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if events.is_closed() {
            return;
        }
        let Ok(permit) = admission.admit(peer.ip()) else {
            stats.tcp_refused.fetch_add(1, Relaxed);
            continue; // dropping the stream refuses it
        };
        let _ = stream.set_nodelay(true);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        if events.send(TcpEvent::Opened { peer, out: out_tx }).is_err() {
            return;
        }
        let events = events.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(why) = connection(stream, peer, out_rx, &events).await {
                stats.tcp_timed_out.fetch_add(1, Relaxed);
                tracing::debug!(reason = why, "closing an ICE-TCP connection");
            }
            let _ = events.send(TcpEvent::Closed { peer });
            drop(permit);
        });
    }
}

/// Runs one connection until either side ends it; `Err` says which timeout closed it.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut out: mpsc::Receiver<Bytes>,
    events: &mpsc::UnboundedSender<TcpEvent>,
) -> Result<(), &'static str> {
    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    // The worker writes to a connection only after an authenticated Binding request on it,
    // so its first write is the proof that the client holds the ICE password.
    let mut authenticated = false;
    let auth_deadline = tokio::time::sleep(AUTH_DEADLINE);
    tokio::pin!(auth_deadline);
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            _ = &mut auth_deadline, if !authenticated => {
                return Err("no authenticated Binding request in time");
            }
            // Only complete frames count: a frame announced and never finished is silence.
            _ = &mut idle => return Err("idle"),
            read = stream.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(n) => n,
                };
                decoder.extend(&buf[..n]);
                while let Some(data) = decoder.next_frame() {
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                    if events.send(TcpEvent::Frame { peer, data }).is_err() {
                        return Ok(());
                    }
                }
            }
            packet = out.recv() => {
                // The worker dropping its sender means it gave up on this connection.
                let Some(packet) = packet else { return Ok(()) };
                authenticated = true;
                let Some(framed) = frame(&packet) else { continue };
                match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&framed)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => return Err("the client stopped reading"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_are_reassembled() {
        let mut d = FrameDecoder::default();
        let mut stream = frame(b"hello").unwrap();
        stream.extend(frame(b"").unwrap());
        stream.extend(frame(&[7u8; 300]).unwrap());
        for chunk in stream.chunks(3) {
            d.extend(chunk);
        }
        assert_eq!(&d.next_frame().unwrap()[..], b"hello");
        assert_eq!(d.next_frame().unwrap().len(), 0);
        assert_eq!(d.next_frame().unwrap().len(), 300);
        assert!(d.next_frame().is_none());
    }

    #[test]
    fn incomplete_frames_wait_and_oversized_packets_are_not_framed() {
        let mut d = FrameDecoder::default();
        d.extend(&[0, 10, 1, 2]);
        assert!(d.next_frame().is_none());
        assert!(frame(&vec![0u8; 70_000]).is_none());
    }
}
