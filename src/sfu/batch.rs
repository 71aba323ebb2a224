//! Batched UDP sends: every datagram the worker produces during one turn of its loop (one
//! received batch and all the copies it fans out to) leaves in one `sendmmsg` call. Each message
//! may carry its own source address (IP_PKTINFO / IPV6_PKTINFO), so replies leave from the
//! address the client sent to even on a wildcard-bound socket.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use bytes::BytesMut;

/// Datagrams waiting to be sent; the buffers and kernel structures are reused across flushes.
#[derive(Default)]
pub struct SendBatch {
    items: Vec<(SocketAddr, Option<IpAddr>, BytesMut)>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<[u64; 8]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Buffers of sent datagrams, cleared, for the next copies (see [`SendBatch::buffer`]).
    free: Vec<BytesMut>,
}

/// Capacity of a pooled buffer: the largest datagram accepted plus SRTP's tag, rounded up.
pub const BUFFER_CAPACITY: usize = 2048;

/// Pooled buffers kept at most (per worker): a turn's worth of copies at high fan-out.
const MAX_FREE: usize = 1024;

/// Most messages handed to one `sendmmsg` call (the kernel's UIO_MAXIOV is 1024).
const MAX_PER_CALL: usize = 512;

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    /// Payload bytes of the datagrams sent.
    pub bytes: usize,
    pub failed: usize,
    pub syscalls: usize,
}

impl SendBatch {
    pub fn push(&mut self, dst: SocketAddr, src: Option<IpAddr>, data: BytesMut) {
        self.items.push((dst, src, data));
    }

    /// An empty buffer of [`BUFFER_CAPACITY`] for a datagram to push: one whose datagram left
    /// in an earlier flush when there is one, so steady forwarding allocates nothing.
    pub fn buffer(&mut self) -> BytesMut {
        self.free
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_CAPACITY))
    }

    /// Keeps a sent datagram's buffer for [`SendBatch::buffer`] if it is whole and large enough
    /// (rtc's own datagrams are often slices of a larger buffer: those are let go).
    fn recycle(free: &mut Vec<BytesMut>, mut b: BytesMut) {
        b.clear();
        if free.len() < MAX_FREE && b.capacity() >= BUFFER_CAPACITY {
            free.push(b);
        }
    }

    /// Takes the queued datagrams (destination, source address, bytes) without sending them,
    /// for a caller that carries them itself (tests on a virtual clock).
    pub fn drain(&mut self) -> impl Iterator<Item = (SocketAddr, Option<IpAddr>, BytesMut)> + '_ {
        self.items.drain(..)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sends everything queued on `fd` (a non-blocking UDP socket). Datagrams the kernel will
    /// not take now (full buffer) are dropped and counted, as UDP would.
    pub fn flush(&mut self, fd: RawFd) -> Flushed {
        let mut out = Flushed::default();
        let n = self.items.len();
        if n == 0 {
            return out;
        }
        // SAFETY: all-zero is a valid value for these plain C structs.
        self.addrs.resize(n, unsafe { zeroed() });
        self.iovs.resize(
            n,
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        );
        self.cmsgs.resize(n, [0u64; 8]);
        self.hdrs.resize(n, unsafe { zeroed() });
        for (i, (dst, src, data)) in self.items.iter_mut().enumerate() {
            let addr_len = write_sockaddr(&mut self.addrs[i], *dst);
            self.iovs[i] = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = addr_len;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            let cbuf = &mut self.cmsgs[i];
            let clen = match src {
                Some(ip) => write_pktinfo(cbuf, *ip, *dst),
                None => 0,
            };
            if clen > 0 {
                h.msg_control = cbuf.as_mut_ptr().cast();
                h.msg_controllen = clen as _;
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            self.hdrs[i].msg_len = 0;
        }
        let mut at = 0;
        while at < n {
            let count = (n - at).min(MAX_PER_CALL);
            // SAFETY: hdrs[at..at + count] point into addrs, iovs, cmsgs and the items' buffers,
            // all alive and unmoved until this call returns.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[at..].as_mut_ptr(),
                    count as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            out.syscalls += 1;
            if r < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first message failed (unreachable destination, full buffer): skip it and
                // keep going with the rest.
                out.failed += 1;
                at += 1;
                continue;
            }
            out.sent += r as usize;
            out.bytes += self.iovs[at..at + r as usize]
                .iter()
                .map(|v| v.iov_len)
                .sum::<usize>();
            at += (r as usize).max(1).min(count);
            if r == 0 {
                out.failed += 1;
            }
        }
        for (_, _, b) in self.items.drain(..) {
            Self::recycle(&mut self.free, b);
        }
        out
    }
}

fn write_sockaddr(storage: &mut libc::sockaddr_storage, addr: SocketAddr) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Writes a PKTINFO control message choosing the source address; returns its length.
fn write_pktinfo(buf: &mut [u64; 8], src: IpAddr, dst: SocketAddr) -> usize {
    let bytes = std::mem::size_of_val(buf);
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_control = buf.as_mut_ptr().cast();
    msg.msg_controllen = bytes as _;
    // SAFETY: msg describes `buf`, which is 64 bytes and 8-byte aligned: room for one pktinfo.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return 0;
        }
        match (src, dst) {
            (IpAddr::V4(ip), SocketAddr::V4(_)) => {
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize
            }
            (IpAddr::V6(ip), SocketAddr::V6(_)) => {
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_reaches_every_destination_in_one_call_from_the_chosen_source() {
        let sender = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = SendBatch::default();
        for i in 0..10u8 {
            let dst = if i % 2 == 0 { &a } else { &b };
            batch.push(
                dst.local_addr().unwrap(),
                Some(IpAddr::from([127, 0, 0, 2])),
                BytesMut::from(&[i; 100][..]),
            );
        }
        let f = batch.flush(sender.as_raw_fd());
        assert_eq!(
            f,
            Flushed {
                sent: 10,
                bytes: 10 * 100,
                failed: 0,
                syscalls: 1
            }
        );
        let mut buf = [0u8; 200];
        for s in [&a, &b] {
            for _ in 0..5 {
                let (n, from) = s.recv_from(&mut buf).unwrap();
                assert_eq!(n, 100);
                assert_eq!(from.ip(), IpAddr::from([127, 0, 0, 2]), "source pinned");
                assert_eq!(from.port(), sender.local_addr().unwrap().port());
            }
        }
        assert!(batch.is_empty());
    }
}
