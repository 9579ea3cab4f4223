//! Instructions for a kernel fast path: which bound channels it may relay without
//! the core, kept in step with channels, permissions and allocations.
use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use super::{Allocation, Channel, TurnServer, TurnServerEvent};
use crate::{peer_policy::PeerPolicy, transmit::Transport};

/// One bound channel as a kernel fast path sees it: ChannelData from `client` to
/// `service` on `channel` goes from `relay` to `peer`, and UDP from `peer` to
/// `relay` goes back to `client` as ChannelData on `channel`, until `expires`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastChannel {
    /// The allocation's id (stable while any of its channels is installed; reused
    /// only after every one of them was removed): the key of its counters.
    pub allocation: u32,
    /// The client's address (always UDP).
    pub client: SocketAddr,
    /// The gateway address the client talks to (its port is the driver's).
    pub service: IpAddr,
    /// The channel number.
    pub channel: u16,
    /// The allocation's relay address.
    pub relay: SocketAddr,
    /// The peer the channel is bound to (canonical form).
    pub peer: SocketAddr,
    /// When the entry stops being valid: the earliest of the channel's, the peer
    /// permission's and the allocation's expiry.
    pub expires: Instant,
}

/// An instruction to a kernel fast path, emitted only when [`TurnConfig::fast_path`](super::TurnConfig::fast_path)
/// is on. Entries exist only for channels that are bound, whose peer has a live
/// permission and passes the peer policy, of UDP clients whose allocation has no
/// bandwidth cap (the kernel applies no per-packet policy). Everything else, and
/// anything the kernel declines, goes through the core as before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPath {
    /// Install (or update: same client, channel and allocation) an entry.
    Install(FastChannel),
    /// Remove the entry installed for this channel (expired, unbound, permission
    /// lapsed, allocation deleted).
    Remove(FastChannel),
}

impl TurnServer {
    /// Whether the fast path may hold entries at all: asked for, and no per-packet
    /// policy (a bandwidth cap) that only the core can apply.
    pub(super) fn fast_path_allowed(&self) -> bool {
        self.config.fast_path && self.config.bandwidth_bytes_per_second == 0
    }

    /// Brings allocation `index`'s fast-path entries in line with its state.
    pub(super) fn sync_fast_path_of(&mut self, index: usize, now: Instant) {
        let fast = self.fast_path_allowed();
        if let Some(allocation) = self.slots.get_mut(index).and_then(Option::as_mut) {
            sync_fast_path(allocation, index, now, fast, &self.policy, &mut self.events);
        }
    }
}

/// The fast-path view of `channel` of the allocation in slot `index`.
pub(super) fn fast_channel(
    allocation: &Allocation,
    index: usize,
    channel: &Channel,
) -> FastChannel {
    FastChannel {
        allocation: index as u32,
        client: allocation.client.addr,
        service: allocation
            .local
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        channel: channel.number,
        relay: allocation.relay,
        peer: channel.peer,
        expires: channel.fast.unwrap_or(channel.expires),
    }
}

/// Emits the Install and Remove instructions that make the fast-path entries of
/// `allocation` (in slot `index`) match its channels and permissions at `now`.
/// `allowed`: the relay allows the fast path at all (see
/// [`TurnServer::fast_path_allowed`]).
pub(super) fn sync_fast_path(
    allocation: &mut Allocation,
    index: usize,
    now: Instant,
    allowed: bool,
    policy: &PeerPolicy,
    out: &mut VecDeque<TurnServerEvent>,
) {
    // Only UDP clients whose gateway address is known, and allocation ids that fit.
    let eligible = allowed
        && allocation.client.transport == Transport::Udp
        && allocation.local.is_some()
        && u32::try_from(index).is_ok()
        && allocation.expires > now;
    for i in 0..allocation.channels.len() {
        let channel = &allocation.channels[i];
        let permission = allocation
            .permissions
            .iter()
            .find(|p| p.ip == channel.peer.ip().to_canonical() && p.expires > now)
            .map(|p| p.expires);
        let wanted = match permission {
            Some(permission)
                if eligible && channel.expires > now && policy.check_peer(channel.peer).is_ok() =>
            {
                Some(channel.expires.min(permission).min(allocation.expires))
            }
            _ => None,
        };
        if wanted == channel.fast {
            continue;
        }
        let removed = channel.fast.is_some() && wanted.is_none();
        if removed {
            out.push_back(TurnServerEvent::FastPath(FastPath::Remove(fast_channel(
                allocation, index, channel,
            ))));
        }
        allocation.channels[i].fast = wanted;
        if wanted.is_some() {
            let channel = &allocation.channels[i];
            out.push_back(TurnServerEvent::FastPath(FastPath::Install(fast_channel(
                allocation, index, channel,
            ))));
        }
    }
}
