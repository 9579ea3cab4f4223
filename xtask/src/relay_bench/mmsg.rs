//! Batched UDP I/O for the load generator's data plane: `sendmmsg` of one datagram
//! repeated, and `recvmmsg` into fixed buffers, both non-blocking on connected sockets.
//!
//! No UDP GSO on purpose: on loopback a GSO send reaches a server that enabled UDP_GRO
//! as one coalesced buffer, which would favour such a server over one that did not;
//! `sendmmsg` hands every server the same individual datagrams.
use std::{io, os::fd::AsRawFd};

/// Largest datagram the receive buffers hold.
pub const RECV_BUFFER: usize = 2048;

fn would_block(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Sends `count` copies of `datagram` on the connected socket; returns how many the
/// kernel took (0 when its buffer is full).
pub fn send_copies(socket: &impl AsRawFd, datagram: &[u8], count: usize) -> io::Result<usize> {
    const MAX: usize = 64;
    let count = count.min(MAX);
    if count == 0 {
        return Ok(0);
    }
    let mut iov = libc::iovec {
        iov_base: datagram.as_ptr() as *mut libc::c_void,
        iov_len: datagram.len(),
    };
    // SAFETY: mmsghdr is plain data; all-zero is a valid "no name, no control" header.
    let mut headers: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for header in headers.iter_mut().take(count) {
        header.msg_hdr.msg_iov = &mut iov;
        header.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the headers point at `iov`, which points at `datagram`; both outlive the
    // call and the kernel only reads them. `count` <= headers.len().
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        let error = io::Error::last_os_error();
        // ECONNREFUSED: an ICMP error from an earlier datagram (server not up yet).
        if would_block(&error) || error.raw_os_error() == Some(libc::ECONNREFUSED) {
            return Ok(0);
        }
        return Err(error);
    }
    Ok(usize::try_from(sent).unwrap_or(0))
}

/// Receive buffers for `recvmmsg`, allocated once.
pub struct RecvBatch {
    buffers: Vec<u8>,
    lengths: Vec<usize>,
    iovs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    /// Buffers for up to `size` datagrams per call.
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            buffers: vec![0; size * RECV_BUFFER],
            lengths: vec![0; size],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                size
            ],
            // SAFETY: mmsghdr is plain data; all-zero is a valid header.
            headers: vec![unsafe { std::mem::zeroed() }; size],
        }
    }

    /// Receives what is queued on the socket (up to the batch size) without blocking;
    /// returns how many datagrams arrived.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        let size = self.lengths.len();
        // The pointers are set afresh on every call, so nothing depends on where the
        // struct lives.
        for ((iov, header), buffer) in self
            .iovs
            .iter_mut()
            .zip(self.headers.iter_mut())
            .zip(self.buffers.chunks_exact_mut(RECV_BUFFER))
        {
            iov.iov_base = buffer.as_mut_ptr().cast();
            iov.iov_len = RECV_BUFFER;
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            header.msg_len = 0;
        }
        // SAFETY: every header points at its own iovec, which points at its own
        // RECV_BUFFER-byte slice of `buffers`; all are owned by self and outlive the call.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                size as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            let error = io::Error::last_os_error();
            if would_block(&error) || error.raw_os_error() == Some(libc::ECONNREFUSED) {
                return Ok(0);
            }
            return Err(error);
        }
        let received = usize::try_from(received).unwrap_or(0);
        for (length, header) in self.lengths.iter_mut().zip(&self.headers).take(received) {
            *length = usize::try_from(header.msg_len)
                .unwrap_or(0)
                .min(RECV_BUFFER);
        }
        Ok(received)
    }

    /// The `i`th datagram of the last [`Self::recv`].
    pub fn get(&self, i: usize) -> &[u8] {
        let len = self.lengths.get(i).copied().unwrap_or(0);
        self.buffers
            .get(i * RECV_BUFFER..i * RECV_BUFFER + len)
            .unwrap_or_default()
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes.
pub fn poll_readable(fds: &mut Vec<libc::pollfd>, timeout_ms: i32) -> io::Result<()> {
    for fd in fds.iter_mut() {
        fd.events = libc::POLLIN;
        fd.revents = 0;
    }
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    #[test]
    fn copies_sent_in_one_call_arrive_as_separate_datagrams() {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sender
            .connect(receiver.local_addr().expect("addr"))
            .expect("connect");
        let sent = send_copies(&sender, b"twelve bytes", 10).expect("send");
        assert_eq!(sent, 10);
        let mut batch = RecvBatch::new(4);
        let mut lengths = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while lengths.len() < 10 && std::time::Instant::now() < deadline {
            let n = batch.recv(&receiver).expect("recv");
            assert!(n <= 4, "never more than the batch size");
            for i in 0..n {
                assert_eq!(batch.get(i), b"twelve bytes");
                lengths.push(batch.get(i).len());
            }
        }
        assert_eq!(lengths, vec![12; 10]);
        assert_eq!(batch.recv(&receiver).expect("recv"), 0, "nothing left");
        assert_eq!(batch.get(99), b"");
    }
}
