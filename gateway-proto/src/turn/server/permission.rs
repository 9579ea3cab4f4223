//! CreatePermission and ChannelBind: which peers an allocation may talk to, and the
//! channels that carry its data with 4 bytes of framing.
use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use super::{Allocation, Channel, Permission, Reply, RequestOutcome, TurnServer};
use crate::{
    stun::{self, Message},
    turn::{CHANNEL_MAX, CHANNEL_MIN, attr as turn_attr},
};

impl TurnServer {
    /// Checks a peer address against the allocation's family and the policy; with
    /// `port_counts` (a channel, which names one transport address) the port too, else
    /// the address alone (a permission, which RFC 8656 keys by IP address).
    fn check_peer(
        &self,
        relay: SocketAddr,
        peer: SocketAddr,
        port_counts: bool,
    ) -> Result<(), PeerRefusal> {
        let peer_ip = peer.ip().to_canonical();
        if peer_ip.is_ipv4() != relay.is_ipv4() {
            return Err(PeerRefusal::Family);
        }
        let verdict = if port_counts {
            self.policy.check_peer(peer)
        } else {
            self.policy.check(peer.ip())
        };
        verdict.map_err(|_| PeerRefusal::Denied)
    }

    /// The slot and relay address of an existing allocation.
    fn relay_of(&self, existing: Option<usize>) -> Option<(usize, SocketAddr)> {
        let index = existing?;
        Some((index, self.slots.get(index)?.as_ref()?.relay))
    }

    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        existing: Option<usize>,
        reply: &Reply,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let Some((index, relay)) = self.relay_of(existing) else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        // All or nothing: every peer is checked before any permission is installed.
        let mut peers = [None; 8];
        let mut count = 0;
        for attribute in message.attributes().flatten() {
            if attribute.ty != turn_attr::XOR_PEER_ADDRESS {
                continue;
            }
            let Some(peer) = stun::decode_xor_address(attribute.value, reply.tid) else {
                reply.error(out, 400, "Bad Request");
                return RequestOutcome::BadRequest;
            };
            if let Err(refusal) = self.check_peer(relay, peer, false) {
                return refusal.answer(reply, out);
            }
            if count == peers.len() {
                reply.error(out, 508, "Insufficient Capacity");
                return RequestOutcome::Capacity;
            }
            peers[count] = Some(peer.ip().to_canonical());
            count += 1;
        }
        if count == 0 {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        }
        let lifetime = self.config.permission_lifetime;
        let max = self.config.max_permissions;
        let Some(allocation) = self.slots[index].as_mut() else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        let new = peers
            .iter()
            .flatten()
            .filter(|ip| !allocation.permissions.iter().any(|p| p.ip == **ip))
            .count();
        let live = allocation
            .permissions
            .iter()
            .filter(|p| p.expires > now)
            .count();
        if live + new > max {
            reply.error(out, 508, "Insufficient Capacity");
            return RequestOutcome::Capacity;
        }
        allocation.permissions.retain(|p| p.expires > now);
        for ip in peers.iter().flatten() {
            install_permission(allocation, *ip, now + lifetime);
        }
        self.sync_fast_path_of(index, now);
        reply.success_with(out, |_| {});
        RequestOutcome::Ok
    }

    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        existing: Option<usize>,
        reply: &Reply,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let Some((index, relay)) = self.relay_of(existing) else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        let mut number = None;
        let mut peer = None;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                turn_attr::CHANNEL_NUMBER => {
                    number = attribute
                        .value
                        .get(..2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]));
                }
                turn_attr::XOR_PEER_ADDRESS => {
                    peer = stun::decode_xor_address(attribute.value, reply.tid);
                }
                _ => {}
            }
        }
        let (Some(number), Some(peer)) = (number, peer) else {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        }
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if let Err(refusal) = self.check_peer(relay, peer, true) {
            return refusal.answer(reply, out);
        }
        let channel_lifetime = self.config.channel_lifetime;
        let permission_lifetime = self.config.permission_lifetime;
        let max_channels = self.config.max_channels;
        let max_permissions = self.config.max_permissions;
        let Some(allocation) = self.slots[index].as_mut() else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        // The number must not be bound to another peer, nor the peer to another number.
        let conflict = allocation
            .channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer));
        if conflict {
            reply.error(out, 400, "Bad Request");
            return RequestOutcome::BadRequest;
        }
        let rebinding = allocation.channels.iter().any(|c| c.number == number);
        let needs_permission = !allocation.permissions.iter().any(|p| p.ip == peer.ip());
        if (!rebinding && allocation.channels.len() >= max_channels)
            || (needs_permission && allocation.permissions.len() >= max_permissions)
        {
            reply.error(out, 508, "Insufficient Capacity");
            return RequestOutcome::Capacity;
        }
        match allocation.channels.iter_mut().find(|c| c.number == number) {
            Some(channel) => channel.expires = now + channel_lifetime,
            None => allocation.channels.push(Channel {
                number,
                peer,
                expires: now + channel_lifetime,
                fast: None,
            }),
        }
        install_permission(allocation, peer.ip(), now + permission_lifetime);
        self.sync_fast_path_of(index, now);
        reply.success_with(out, |_| {});
        RequestOutcome::Ok
    }
}

enum PeerRefusal {
    Family,
    Denied,
}

impl PeerRefusal {
    /// The error answer for a refused peer: 443 for a family mismatch, 403 for policy.
    fn answer(self, reply: &Reply, out: &mut Vec<u8>) -> RequestOutcome {
        match self {
            Self::Family => {
                reply.error(out, 443, "Peer Address Family Mismatch");
                RequestOutcome::Family
            }
            Self::Denied => {
                reply.error(out, 403, "Forbidden");
                RequestOutcome::Forbidden
            }
        }
    }
}

fn install_permission(allocation: &mut Allocation, ip: IpAddr, expires: Instant) {
    let ip = ip.to_canonical();
    match allocation.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(permission) => permission.expires = expires,
        None => allocation.permissions.push(Permission { ip, expires }),
    }
}
