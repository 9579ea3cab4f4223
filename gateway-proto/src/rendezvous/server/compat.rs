//! Transitional, test-only: the server's former output calls (`handle` appending to a
//! `Vec`, `drain_events`, `drain_redirected`) for the agent's simulator tests, which
//! someone else is moving out of `agent.rs` right now. Built for `cfg(test)` only, so
//! the public API has one shape. Delete once those tests drive
//! [`RendezvousServer::handle_datagram`] and the `poll_*` methods.
use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use super::{RendezvousEvent, RendezvousHandled, RendezvousServer, discovery_index};
use crate::{MAIN_SOCKET, Transmit};

/// A CHANGE-REQUEST answer to send from discovery socket `endpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Redirected {
    /// Index of the discovery socket (as given to `set_alternates`).
    pub endpoint: usize,
    /// The datagram.
    pub transmit: Transmit,
}

impl RendezvousServer {
    /// [`Self::handle_datagram`], appending the service socket's datagrams to `out`
    /// and keeping the others for [`Self::drain_redirected`].
    pub(crate) fn handle(
        &mut self,
        now: Instant,
        now_unix: u64,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        out: &mut Vec<Transmit>,
    ) -> RendezvousHandled {
        let handled = self.handle_datagram(now, now_unix, from, local, datagram);
        let mut redirected = VecDeque::new();
        for transmit in self.transmits.drain(..) {
            if transmit.socket == MAIN_SOCKET {
                out.push(transmit);
            } else {
                redirected.push_back(transmit);
            }
        }
        self.transmits = redirected;
        handled
    }

    /// The events gathered since the last call.
    pub(crate) fn drain_events(&mut self) -> impl Iterator<Item = RendezvousEvent> + '_ {
        std::iter::from_fn(|| self.poll_event())
    }

    /// The CHANGE-REQUEST answers [`Self::handle`] kept.
    pub(crate) fn drain_redirected(&mut self) -> impl Iterator<Item = Redirected> + '_ {
        self.transmits.drain(..).filter_map(|transmit| {
            Some(Redirected {
                endpoint: discovery_index(transmit.socket)?,
                transmit: transmit.on_socket(MAIN_SOCKET),
            })
        })
    }
}
