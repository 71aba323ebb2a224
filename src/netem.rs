//! A userspace network impairment proxy (this kernel has no netem): forwards UDP between
//! clients and one upstream address with added delay, jitter and random loss, in both
//! directions, and optionally a bandwidth limit on what reaches each client. Tests and
//! benchmarks put it between nodes to emulate inter-region links, and between a browser and a
//! node to emulate a subscriber's constrained downlink.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// How a link misbehaves, per direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Extra delay drawn uniformly from 0..jitter; order is kept (no reordering).
    pub jitter: Duration,
    /// Probability (0..=1) that a datagram is dropped.
    pub loss: f64,
    /// Seed of the loss and jitter draws, so a run can be repeated.
    pub seed: u64,
}

impl Impairment {
    pub fn none() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            seed: 1,
        }
    }
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
}

/// A running proxy; dropping it stops forwarding.
pub struct ImpairProxy {
    /// Where clients send to reach the upstream through the impairment.
    pub local_addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    /// Bandwidth each client may receive, bits/s (0: unlimited); can change while running.
    pub downlink_bps: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ImpairProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One direction's delay line: datagrams leave in order once their time has come.
fn delay_line(
    socket: Arc<UdpSocket>,
    imp: Impairment,
    stats: Arc<ProxyStats>,
    seed: u64,
) -> (
    mpsc::UnboundedSender<(Bytes, SocketAddr)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Bytes, SocketAddr)>();
    let task = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut queue: std::collections::VecDeque<(Instant, Bytes, SocketAddr)> =
            Default::default();
        let mut last = Instant::now();
        loop {
            let next = queue.front().map(|(t, _, _)| *t);
            tokio::select! {
                msg = rx.recv() => {
                    let Some((data, to)) = msg else { break };
                    if imp.loss > 0.0 && rng.random::<f64>() < imp.loss {
                        stats.dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    let jitter = if imp.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        imp.jitter.mul_f64(rng.random::<f64>())
                    };
                    let at = (Instant::now() + imp.delay + jitter).max(last);
                    last = at;
                    queue.push_back((at, data, to));
                }
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()), if next.is_some() => {
                    let now = Instant::now();
                    while queue.front().is_some_and(|(t, _, _)| *t <= now) {
                        if let Some((_, data, to)) = queue.pop_front() {
                            if socket.send_to(&data, to).await.is_ok() {
                                stats.forwarded.fetch_add(1, Relaxed);
                            }
                        }
                    }
                }
            }
        }
    });
    (tx, task)
}

/// A socket with room for a few hundred milliseconds of bursts: the proxy's own task may
/// wait behind browsers for the CPU, and the kernel's default buffer would then add losses
/// nobody asked for.
async fn bind_roomy(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Starts a proxy on `listen` towards `upstream`, impairing both directions alike.
pub async fn start(
    listen: SocketAddr,
    upstream: SocketAddr,
    imp: Impairment,
) -> std::io::Result<ImpairProxy> {
    let front = Arc::new(bind_roomy(listen).await?);
    let local_addr = front.local_addr()?;
    let stats = Arc::new(ProxyStats::default());
    let downlink_bps = Arc::new(AtomicU64::new(0));
    let (to_clients, back_task) = delay_line(front.clone(), imp, stats.clone(), imp.seed ^ 0x5a5a);
    let main = {
        let stats = stats.clone();
        let downlink_bps = downlink_bps.clone();
        tokio::spawn(async move {
            // One upstream socket per client, so replies find their way back.
            let mut clients: HashMap<SocketAddr, mpsc::UnboundedSender<(Bytes, SocketAddr)>> =
                HashMap::new();
            let mut buf = vec![0u8; 65536];
            let mut n_clients = 0u64;
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                let data = Bytes::copy_from_slice(&buf[..n]);
                if let std::collections::hash_map::Entry::Vacant(slot) = clients.entry(from) {
                    let Ok(up) = bind_roomy(SocketAddr::new(upstream.ip(), 0)).await else {
                        continue;
                    };
                    let up = Arc::new(up);
                    n_clients += 1;
                    let (tx, _task) = delay_line(
                        up.clone(),
                        imp,
                        stats.clone(),
                        imp.seed.wrapping_add(n_clients),
                    );
                    // Replies from upstream go back through the return delay line, each
                    // client's at most at the downlink rate.
                    // The reader never waits: a datagram is admitted to the bottleneck's queue
                    // (or dropped) when it arrives, and a pacer releases it when it has crossed
                    // the link. Waiting in the reader would make the socket's receive buffer the
                    // queue, seconds deep instead of QUEUE_LIMIT.
                    let back = to_clients.clone();
                    let (paced, mut leaving) = mpsc::unbounded_channel::<(Instant, Bytes)>();
                    tokio::spawn(async move {
                        while let Some((leave, data)) = leaving.recv().await {
                            tokio::time::sleep_until(leave.into()).await;
                            if back.send((data, from)).is_err() {
                                break;
                            }
                        }
                    });
                    let (rate, stats) = (downlink_bps.clone(), stats.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        let mut limit = RateLimit::default();
                        while let Ok((n, _)) = up.recv_from(&mut buf).await {
                            let now = Instant::now();
                            let bps = rate.load(Relaxed);
                            let leave = if bps > 0 {
                                match limit.admit(now, n, bps) {
                                    Some(leave) => leave,
                                    None => {
                                        stats.dropped.fetch_add(1, Relaxed);
                                        continue;
                                    }
                                }
                            } else {
                                now
                            };
                            if paced
                                .send((leave, Bytes::copy_from_slice(&buf[..n])))
                                .is_err()
                            {
                                break;
                            }
                        }
                    });
                    slot.insert(tx);
                }
                if let Some(tx) = clients.get(&from) {
                    let _ = tx.send((data, upstream));
                }
            }
        })
    };
    Ok(ImpairProxy {
        local_addr,
        stats,
        downlink_bps,
        tasks: vec![main, back_task],
    })
}

/// Most a rate-limited link queues before it drops (a bottleneck's buffer).
const QUEUE_LIMIT: Duration = Duration::from_millis(200);

/// A bottleneck link: datagrams leave one after another at the rate; one that would wait
/// longer than [`QUEUE_LIMIT`] is dropped. Time is passed in.
#[derive(Debug, Default)]
struct RateLimit {
    free_at: Option<Instant>,
}

impl RateLimit {
    /// When a datagram of `bytes` arriving at `now` has left the link, or `None` when the
    /// queue is full and it is dropped.
    fn admit(&mut self, now: Instant, bytes: usize, bps: u64) -> Option<Instant> {
        let start = self.free_at.map_or(now, |t| t.max(now));
        if start - now > QUEUE_LIMIT {
            return None;
        }
        let leave = start + Duration::from_secs_f64(bytes as f64 * 8.0 / bps as f64);
        self.free_at = Some(leave);
        Some(leave)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_spaces_datagrams_and_drops_beyond_its_queue() {
        let t0 = Instant::now();
        let mut l = RateLimit::default();
        // 1000 bytes at 800 kbit/s: 10 ms each.
        let leaves: Vec<_> = (0..30).map(|_| l.admit(t0, 1000, 800_000)).collect();
        assert_eq!(leaves[0], Some(t0 + Duration::from_millis(10)));
        assert_eq!(leaves[1], Some(t0 + Duration::from_millis(20)));
        // A 200 ms queue holds about 20 of them; the rest of a burst is dropped.
        let kept = leaves.iter().flatten().count();
        assert_eq!(
            kept, 21,
            "a 200 ms queue at 10 ms each, plus the one on the wire"
        );
        let more = l.admit(t0 + Duration::from_millis(5), 1000, 800_000);
        assert_eq!(more, None, "the queue is full");
        // Once it drains, datagrams pass again.
        assert!(l
            .admit(t0 + Duration::from_millis(300), 1000, 800_000)
            .is_some());
    }

    #[tokio::test]
    async fn delays_and_drops_as_configured() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let imp = Impairment {
            delay: Duration::from_millis(40),
            jitter: Duration::ZERO,
            loss: 0.25,
            seed: 7,
        };
        let proxy = start(
            "127.0.0.1:0".parse().unwrap(),
            server.local_addr().unwrap(),
            imp,
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sent_at = Instant::now();
        for i in 0..400u32 {
            client
                .send_to(&i.to_be_bytes(), proxy.local_addr)
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let mut first_at = None;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), server.recv_from(&mut buf)).await
        {
            first_at.get_or_insert_with(Instant::now);
            got.push(u32::from_be_bytes(buf[..n].try_into().unwrap()));
        }
        assert!(first_at.unwrap() - sent_at >= Duration::from_millis(40));
        let lost = 400 - got.len();
        assert!(
            (60..=140).contains(&lost),
            "about a quarter dropped: {lost}"
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "order is kept");
        assert_eq!(proxy.stats.dropped.load(Relaxed) as usize, lost);
    }
}
