//! A minimal SOCKS5 proxy (RFC 1928, CONNECT, no authentication) whose outgoing connections
//! leave from a chosen source address. A browser pointed at it appears to the nodes to be at
//! that address: with the development GeoIP table, 127.1.x.y is in Mumbai.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub struct SocksProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SocksProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SocksProxy {
    pub async fn start(source: IpAddr) -> SocksProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = relay(client, source).await;
                });
            }
        });
        SocksProxy { addr, task }
    }
}

async fn relay(mut client: TcpStream, source: IpAddr) -> std::io::Result<()> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not SOCKS5");
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(bad());
    }
    let mut methods = vec![0u8; head[1] as usize];
    client.read_exact(&mut methods).await?;
    client.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    if req[0] != 5 || req[1] != 1 {
        client.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Err(bad());
    }
    let ip: IpAddr = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            client.read_exact(&mut a).await?;
            a.into()
        }
        4 => {
            let mut a = [0u8; 16];
            client.read_exact(&mut a).await?;
            a.into()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name).await?;
            let name = String::from_utf8(name).map_err(|_| bad())?;
            if name == "localhost" {
                IpAddr::from([127, 0, 0, 1])
            } else {
                name.parse().map_err(|_| bad())?
            }
        }
        _ => return Err(bad()),
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    let target = SocketAddr::new(ip, u16::from_be_bytes(port));
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let mut upstream = match sock.connect(target).await {
        Ok(s) => s,
        Err(e) => {
            client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            return Err(e);
        }
    };
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
