//! ICE-TCP (RFC 6544, passive candidates): the fallback for clients whose networks block UDP.
//! Each accepted TCP connection carries RFC 4571 frames (16-bit length, then one STUN, DTLS,
//! RTP or RTCP packet). Connections are owned by small tasks that hand frames to the worker and
//! write what the worker gives them; the worker routes frames exactly as it routes datagrams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

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
pub(super) async fn accept_loop(listener: TcpListener, events: mpsc::UnboundedSender<TcpEvent>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "ICE-TCP accept failed");
                continue;
            }
        };
        if events.is_closed() {
            return;
        }
        if open.load(Ordering::Relaxed) >= MAX_TCP_CONNECTIONS {
            continue; // dropping the stream refuses it
        }
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        if events.send(TcpEvent::Opened { peer, out: out_tx }).is_err() {
            return;
        }
        let events = events.clone();
        let open = open.clone();
        tokio::spawn(async move {
            connection(stream, peer, out_rx, &events).await;
            let _ = events.send(TcpEvent::Closed { peer });
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut out: mpsc::Receiver<Bytes>,
    events: &mpsc::UnboundedSender<TcpEvent>,
) {
    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                decoder.extend(&buf[..n]);
                while let Some(data) = decoder.next_frame() {
                    if events.send(TcpEvent::Frame { peer, data }).is_err() {
                        return;
                    }
                }
            }
            packet = out.recv() => {
                // The worker dropping its sender means it gave up on this connection.
                let Some(packet) = packet else { return };
                let Some(framed) = frame(&packet) else { continue };
                if stream.write_all(&framed).await.is_err() {
                    return;
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
