//! The data plane: Send indications, ChannelData and what peers send back, each
//! checked against permissions, the policy and the bandwidth cap.
//!
//! Per-datagram lookups return a route (which relay socket, which peer, which
//! client and framing) and the driver sends the payload straight from its receive
//! buffer: nothing here copies or queues application data. Only control messages go
//! through [`TurnServer::poll_transmit`].
use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use super::{ClientAddr, DropReason, TokenBucket, TurnHandled, TurnServer};
use crate::{
    stun::{self, Message},
    turn::attr as turn_attr,
};

/// Where data a peer sent to a relay address goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToClient {
    /// The client's address.
    pub client: ClientAddr,
    /// The gateway address the client talks to (reply source), when known.
    pub local: Option<IpAddr>,
    /// The channel bound to the peer, if any: ChannelData; otherwise a Data indication.
    pub channel: Option<u16>,
}

impl TurnServer {
    /// A Send indication: a route for its DATA (borrowed from the message), or why
    /// it is dropped.
    pub(super) fn send_indication<'a>(
        &mut self,
        now: Instant,
        client: ClientAddr,
        message: &Message<'a>,
    ) -> TurnHandled<'a> {
        let Some(index) = self.by_client.get(&client).copied() else {
            return TurnHandled::Dropped(DropReason::NoAllocation);
        };
        let tid = message.transaction_id();
        let mut peer = None;
        let mut data = None;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                turn_attr::XOR_PEER_ADDRESS => {
                    peer = stun::decode_xor_address(attribute.value, tid)
                }
                turn_attr::DATA => data = Some(attribute.value),
                _ => {}
            }
        }
        let (Some(peer), Some(data)) = (peer, data) else {
            return TurnHandled::Dropped(DropReason::Malformed);
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        match self.outbound(now, index, peer, data.len()) {
            Ok(relay) => TurnHandled::Relay { relay, peer, data },
            Err(reason) => TurnHandled::Dropped(reason),
        }
    }

    /// The checks every client-to-peer packet passes: permission, policy, bandwidth.
    fn outbound(
        &mut self,
        now: Instant,
        index: usize,
        peer: SocketAddr,
        len: usize,
    ) -> Result<SocketAddr, DropReason> {
        if self.policy.check_peer(peer).is_err() {
            return Err(DropReason::DeniedPeer);
        }
        let rate = self.config.bandwidth_bytes_per_second;
        let allocation = self
            .slots
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(DropReason::NoAllocation)?;
        if !allocation.permitted(peer.ip(), now) {
            return Err(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut allocation.bucket, rate, now, len) {
            return Err(DropReason::Bandwidth);
        }
        Ok(allocation.relay)
    }

    /// ChannelData from `client` on `channel` carrying `len` bytes: where to send it
    /// (the relay socket and the peer), or why not. A route, not a transmit: the
    /// driver sends the data from its receive buffer (zero-copy).
    pub fn channel_data_from_client(
        &mut self,
        now: Instant,
        client: impl Into<ClientAddr>,
        channel: u16,
        len: usize,
    ) -> Result<(SocketAddr, SocketAddr), DropReason> {
        let client = client.into();
        let index = *self
            .by_client
            .get(&client)
            .ok_or(DropReason::NoAllocation)?;
        let peer = self
            .slots
            .get(index)
            .and_then(Option::as_ref)
            .and_then(|a| {
                a.channels
                    .iter()
                    .find(|c| c.number == channel && c.expires > now)
            })
            .map(|c| c.peer)
            .ok_or(DropReason::NoChannel)?;
        let relay = self.outbound(now, index, peer, len)?;
        Ok((relay, peer))
    }

    /// A datagram of `len` bytes from `peer` arrived at the relay address `relay`:
    /// whether and how it goes to the client. A route, not a transmit: the driver
    /// frames the data in its receive buffer (zero-copy for ChannelData).
    pub fn data_from_peer(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        len: usize,
    ) -> Result<ToClient, DropReason> {
        let index = *self.by_relay.get(&relay).ok_or(DropReason::NoAllocation)?;
        let rate = self.config.bandwidth_bytes_per_second;
        let allocation = self
            .slots
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(DropReason::NoAllocation)?;
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if !allocation.permitted(peer.ip(), now) {
            return Err(DropReason::NoPermission);
        }
        if !take_bandwidth(&mut allocation.bucket, rate, now, len) {
            return Err(DropReason::Bandwidth);
        }
        Ok(ToClient {
            client: allocation.client,
            local: allocation.local,
            channel: allocation.channel_to(peer, now),
        })
    }

    /// Writes a Data indication carrying `data` from `peer` into `out` (cleared first).
    pub fn data_indication(&mut self, peer: SocketAddr, data: &[u8], out: &mut Vec<u8>) {
        // Indications need unique-enough transaction ids, not secret ones.
        self.tid_counter = self.tid_counter.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.tid_counter.to_be_bytes());
        crate::turn::data_indication(tid, peer, data, out);
    }
}

fn take_bandwidth(bucket: &mut TokenBucket, rate: u64, now: Instant, len: usize) -> bool {
    if rate == 0 {
        return true;
    }
    let elapsed = now.saturating_duration_since(bucket.last);
    let refill =
        (elapsed.as_nanos().min(u128::from(u64::MAX)) as u64).saturating_mul(rate) / 1_000_000_000;
    if refill > 0 {
        bucket.tokens = bucket.tokens.saturating_add(refill).min(rate);
        bucket.last = now;
    }
    let len = len as u64;
    if bucket.tokens >= len {
        bucket.tokens -= len;
        true
    } else {
        false
    }
}
