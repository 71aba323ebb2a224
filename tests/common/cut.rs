//! A TCP relay whose connections the test can cut at once (no close handshake of any
//! protocol inside: both sides see the connection end), while it keeps accepting new ones.
//! A browser's signaling WebSocket pointed at it loses its connection the way a network
//! change or a proxy restart loses it.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

pub struct CutProxy {
    pub addr: SocketAddr,
    cut: broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = broadcast::channel(4);
        let tx = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut stop = tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = stop.recv() => {}
                    }
                });
            }
        });
        CutProxy { addr, cut, task }
    }

    /// Ends every connection relayed now.
    pub fn cut(&self) {
        let _ = self.cut.send(());
    }
}
