//! The kernel socket's side of a splice attempt: its TCP state, read through
//! `TCP_INFO`, and its TTL / hop limit.
//!
//! An attempt succeeds when the kernel socket that did the `connect()` takes an
//! injected SYN-ACK and reaches ESTABLISHED; nothing but `getsockopt(TCP_INFO)`
//! says so without reading or writing data. The SYN goes out with a low TTL (so it
//! opens this side's NAT mapping without reaching the peer), hence the TTL setter.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::{Duration, Instant},
};

use socket2::Socket;

/// A kernel TCP socket's state (Linux `TCP_INFO`'s `tcpi_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// ESTABLISHED.
    Established,
    /// SYN_SENT: connect() sent its SYN and waits for a SYN or SYN-ACK.
    SynSent,
    /// SYN_RECV: a SYN came in (simultaneous open), our SYN-ACK is out.
    SynRecv,
    /// FIN_WAIT1.
    FinWait1,
    /// FIN_WAIT2.
    FinWait2,
    /// TIME_WAIT.
    TimeWait,
    /// CLOSE: not connected (e.g. the attempt was reset or gave up).
    Close,
    /// CLOSE_WAIT: the peer sent its FIN.
    CloseWait,
    /// LAST_ACK.
    LastAck,
    /// LISTEN.
    Listen,
    /// CLOSING.
    Closing,
    /// A state this type does not know, by its kernel number.
    Other(u8),
}

impl TcpState {
    fn from_kernel(n: u8) -> Self {
        match n {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            n => Self::Other(n),
        }
    }

    /// Whether the handshake completed: ESTABLISHED or any state a connection can
    /// only reach from it (a fast peer may already have sent its FIN).
    pub fn is_synchronized(self) -> bool {
        matches!(
            self,
            Self::Established
                | Self::FinWait1
                | Self::FinWait2
                | Self::TimeWait
                | Self::CloseWait
                | Self::LastAck
                | Self::Closing
        )
    }
}

/// The TCP state of a kernel socket.
pub fn tcp_state(socket: BorrowedFd<'_>) -> io::Result<TcpState> {
    let mut info = [0u8; 8];
    let mut len = libc::socklen_t::try_from(info.len()).unwrap_or(8);
    // SAFETY: getsockopt(2) writes at most `len` bytes into `info`, which is that
    // long, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpState::from_kernel(info[0]))
}

/// Polls `socket`'s state every few milliseconds for up to `timeout` until `done`
/// holds for it; returns the last state seen either way.
pub fn wait_for_state(
    socket: &impl AsFd,
    timeout: Duration,
    mut done: impl FnMut(TcpState) -> bool,
) -> io::Result<TcpState> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = tcp_state(socket.as_fd())?;
        if done(now) || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sets the TTL (IPv4) or unicast hop limit (IPv6) of a kernel socket, e.g. low for
/// the SYN of a splice attempt and back to normal once it is established.
pub fn set_socket_ttl(socket: &Socket, v6: bool, ttl: u8) -> io::Result<()> {
    if v6 {
        socket.set_unicast_hops_v6(u32::from(ttl))
    } else {
        socket.set_ttl_v4(u32::from(ttl))
    }
}
