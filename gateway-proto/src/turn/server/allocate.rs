//! Allocate (with its relay socket opened by the driver between the request and the
//! answer), EVEN-PORT reservations and Refresh.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use super::{
    Allocation, ClientAddr, EvenPort, OpenError, RelayRequestId, Reply, RequestOutcome,
    Reservation, SWEEP_INTERVAL, TokenBucket, TurnServer, TurnServerEvent, auth::Authenticated,
    read_u32,
};
use crate::{
    stun::Message,
    turn::{AddressFamily, TRANSPORT_UDP, attr as turn_attr, family, xor_address_attribute},
};

/// How long a port reserved by EVEN-PORT's R bit waits for its Allocate (RFC 8656
/// §7.2 suggests about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How long an Allocate waits for the driver's report on its relay socket. The
/// driver reports at once (binding is quick), so this only bounds what a driver that
/// lost a report leaves behind; the client's retransmission then starts afresh.
pub(super) const PENDING_LIFETIME: Duration = Duration::from_secs(5);

/// An Allocate that passed every check, waiting for its relay socket.
#[derive(Debug)]
pub(super) struct PendingAllocation {
    client: ClientAddr,
    local: Option<IpAddr>,
    username: Box<str>,
    user: Box<str>,
    /// How to answer (the request's method, transaction id and key).
    reply: Reply,
    /// The lifetime granted.
    lifetime: Duration,
    /// EVEN-PORT's R bit: a second socket comes with the first, to reserve.
    reserve: bool,
    /// When the report is given up on.
    expires: Instant,
}

impl TurnServer {
    /// Serves an Allocate. `None`: it passed every check and waits for its relay
    /// socket (an [`TurnServerEvent::OpenRelay`] is queued, or was for this
    /// transaction already).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn allocate(
        &mut self,
        now: Instant,
        client: ClientAddr,
        local: Option<IpAddr>,
        existing: Option<usize>,
        auth: Authenticated,
        reply: Reply,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> Option<RequestOutcome> {
        if let Some(index) = existing {
            // A retransmission of the Allocate that created it gets the same answer.
            if let Some(allocation) = self.slots[index]
                .as_ref()
                .filter(|a| a.created_by == reply.tid)
            {
                let remaining = allocation.expires.saturating_duration_since(now);
                let relay = allocation.relay;
                reply.success_with(out, |w| {
                    xor_address_attribute(w, turn_attr::XOR_RELAYED_ADDRESS, relay, reply.tid);
                    w.attribute(
                        turn_attr::LIFETIME,
                        &(remaining.as_secs() as u32).to_be_bytes(),
                    );
                    w.xor_mapped_address(client.addr);
                });
                return Some(RequestOutcome::Ok);
            }
            reply.error(out, 437, "Allocation Mismatch");
            return Some(RequestOutcome::Mismatch);
        }
        if let Some(pending) = self
            .pending_by_client
            .get(&client)
            .and_then(|request| self.pending.get(request))
        {
            // A retransmission while the socket opens: answered once it is there
            // (RFC 8656 §7.2 answers a retransmission as the original). Another
            // Allocate on the same 5-tuple is a mismatch, as it will be once the
            // allocation exists.
            if pending.reply.tid == reply.tid {
                return None;
            }
            reply.error(out, 437, "Allocation Mismatch");
            return Some(RequestOutcome::Mismatch);
        }
        let mut transport = None;
        let mut requested_family = None;
        let mut even_port = false;
        let mut reserve_next = false;
        let mut reservation: Option<[u8; 8]> = None;
        let mut lifetime = None;
        for attribute in message.attributes().flatten() {
            match attribute.ty {
                turn_attr::REQUESTED_TRANSPORT => transport = attribute.value.first().copied(),
                turn_attr::REQUESTED_ADDRESS_FAMILY => {
                    requested_family = Some(attribute.value.first().copied().unwrap_or(0));
                }
                turn_attr::EVEN_PORT => {
                    even_port = true;
                    reserve_next = attribute.value.first().is_some_and(|b| b & 0x80 != 0);
                }
                turn_attr::RESERVATION_TOKEN => {
                    // A token of the wrong size matches nothing (508 below).
                    reservation = Some(attribute.value.try_into().unwrap_or([0xFF; 8]));
                }
                turn_attr::LIFETIME => lifetime = read_u32(attribute.value),
                _ => {}
            }
        }
        let Some(transport) = transport else {
            reply.error(out, 400, "Bad Request");
            return Some(RequestOutcome::BadRequest);
        };
        if transport != TRANSPORT_UDP {
            reply.error(out, 442, "Unsupported Transport Protocol");
            return Some(RequestOutcome::Transport);
        }
        if reservation.is_some() && (requested_family.is_some() || even_port) {
            reply.error(out, 400, "Bad Request");
            return Some(RequestOutcome::BadRequest);
        }
        let family = match requested_family {
            None | Some(family::IPV4) => AddressFamily::V4,
            Some(family::IPV6) => AddressFamily::V6,
            Some(_) => {
                reply.error(out, 440, "Address Family not Supported");
                return Some(RequestOutcome::Family);
            }
        };
        let user_count = self.per_user.get(auth.user.as_str()).copied().unwrap_or(0);
        // A reserved port counts as an allocation of its user: EVEN-PORT with the R
        // bit needs two slots of the quota (a redeemed token brings its own).
        let slots_needed = if reservation.is_some() {
            0
        } else if reserve_next {
            2
        } else {
            1
        };
        if self.by_client.len() + self.pending.len() >= self.config.max_allocations
            || user_count + slots_needed > self.config.max_allocations_per_user
        {
            reply.error(out, 486, "Allocation Quota Reached");
            return Some(RequestOutcome::Quota);
        }
        let lifetime = self.grant_lifetime(lifetime);
        let even_port = match reservation {
            // The port reserved by an earlier Allocate (RFC 8656 §7.2): its socket is
            // open already; an unknown or lapsed token gets 508.
            Some(token) => {
                // Only the user who reserved the port may redeem it (another user's
                // Allocate gets 508, as for an unknown token, so tokens cannot be
                // probed). The reservation's quota slot becomes the allocation's.
                let relay = match self.reservations.get(&token) {
                    Some(reserved) if reserved.expires > now && *reserved.user == auth.user => {
                        let (relay, made_by) = (reserved.relay, reserved.made_by);
                        self.reservations.remove(&token);
                        // It no longer ends with the allocation that made it.
                        if let Some(maker) = self.slots.get_mut(made_by).and_then(Option::as_mut) {
                            maker.reservation = None;
                        }
                        relay
                    }
                    Some(reserved) if reserved.expires <= now => {
                        self.release_reservation(&token);
                        reply.error(out, 508, "Insufficient Capacity");
                        return Some(RequestOutcome::Capacity);
                    }
                    _ => {
                        reply.error(out, 508, "Insufficient Capacity");
                        return Some(RequestOutcome::Capacity);
                    }
                };
                let pending = PendingAllocation {
                    client,
                    local,
                    username: auth.username.into_boxed_str(),
                    user: auth.user.into_boxed_str(),
                    reply,
                    lifetime,
                    reserve: false,
                    expires: now,
                };
                return Some(self.create_allocation(now, pending, relay, None, out));
            }
            None if reserve_next && self.reservations.len() < self.config.max_allocations => {
                EvenPort::EvenReserveNext
            }
            None if reserve_next => {
                reply.error(out, 508, "Insufficient Capacity");
                return Some(RequestOutcome::Capacity);
            }
            None if even_port => EvenPort::Even,
            None => EvenPort::Any,
        };
        let request = RelayRequestId(self.next_request);
        self.next_request += 1;
        *self.per_user.entry(auth.user.as_str().into()).or_insert(0) += 1;
        self.pending.insert(
            request,
            PendingAllocation {
                client,
                local,
                username: auth.username.into_boxed_str(),
                user: auth.user.into_boxed_str(),
                reply,
                lifetime,
                reserve: even_port == EvenPort::EvenReserveNext,
                expires: now + PENDING_LIFETIME,
            },
        );
        self.pending_by_client.insert(client, request);
        self.next_sweep.get_or_insert(now + SWEEP_INTERVAL);
        self.events.push_back(TurnServerEvent::OpenRelay {
            request,
            family,
            even_port,
            local,
        });
        None
    }

    /// The driver's report on a [`TurnServerEvent::OpenRelay`]: the relay socket's
    /// address (and the reserved one's, for [`EvenPort::EvenReserveNext`]), or why
    /// it could not be opened. Queues the Allocate's answer (success, or 440 / 508 as
    /// a failed open always got) and returns its outcome; `None` when the request is
    /// no longer pending (expired, or its TCP client gone), in which case any socket
    /// reported is closed again through [`TurnServerEvent::CloseRelay`].
    pub fn handle_relay_opened(
        &mut self,
        now: Instant,
        request: RelayRequestId,
        result: Result<(SocketAddr, Option<SocketAddr>), OpenError>,
    ) -> Option<RequestOutcome> {
        let Some(pending) = self.pending.remove(&request) else {
            if let Ok((relay, reserved)) = result {
                self.close_relays(relay, reserved);
            }
            return None;
        };
        self.pending_by_client.remove(&pending.client);
        let (client, local) = (pending.client, pending.local);
        let mut out = Vec::new();
        let result = match result {
            // A pair was asked for and only one socket came: no pair, as if none.
            Ok((relay, None)) if pending.reserve => {
                self.close_relays(relay, None);
                Err(OpenError::NoPort)
            }
            other => other,
        };
        let outcome = match result {
            Ok((relay, reserved)) => {
                let reserved = match reserved {
                    Some(reserved) if pending.reserve => Some(reserved),
                    Some(unasked) => {
                        self.events.push_back(TurnServerEvent::CloseRelay(unasked));
                        None
                    }
                    None => None,
                };
                self.create_allocation(now, pending, relay, reserved, &mut out)
            }
            Err(error) => {
                self.release_user(&pending.user);
                match error {
                    OpenError::FamilyUnavailable => {
                        pending
                            .reply
                            .error(&mut out, 440, "Address Family not Supported");
                        RequestOutcome::Family
                    }
                    OpenError::NoPort => {
                        pending.reply.error(&mut out, 508, "Insufficient Capacity");
                        RequestOutcome::Capacity
                    }
                }
            }
        };
        self.queue_reply(client, local, out);
        Some(outcome)
    }

    fn close_relays(&mut self, relay: SocketAddr, reserved: Option<SocketAddr>) {
        for addr in std::iter::once(relay).chain(reserved) {
            self.events.push_back(TurnServerEvent::CloseRelay(addr));
        }
    }

    /// The allocation of `pending` on `relay` (its user already counted), with a
    /// token for `reserved` when there is one; writes the success answer.
    fn create_allocation(
        &mut self,
        now: Instant,
        pending: PendingAllocation,
        relay: SocketAddr,
        reserved: Option<SocketAddr>,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let new_token = reserved.map(|reserved| (self.next_token(), reserved));
        let PendingAllocation {
            client,
            local,
            username,
            user,
            reply,
            lifetime,
            ..
        } = pending;
        let allocation = Allocation {
            client,
            local,
            relay,
            username,
            user,
            created_by: reply.tid,
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket: TokenBucket {
                tokens: self.config.bandwidth_bytes_per_second,
                last: now,
            },
            reservation: new_token.map(|(token, _)| token),
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index] = Some(allocation);
                index
            }
            None => {
                self.slots.push(Some(allocation));
                self.slots.len() - 1
            }
        };
        if let Some((token, reserved)) = new_token {
            let user = self.slots[index]
                .as_ref()
                .map(|a| a.user.clone())
                .unwrap_or_default();
            *self.per_user.entry(user.clone()).or_insert(0) += 1;
            self.reservations.insert(
                token,
                Reservation {
                    relay: reserved,
                    expires: now + RESERVATION_LIFETIME,
                    user,
                    made_by: index,
                },
            );
        }
        self.by_client.insert(client, index);
        self.by_relay.insert(relay, index);
        self.events
            .push_back(TurnServerEvent::AllocationCreated { client, relay });
        self.next_sweep.get_or_insert(now + SWEEP_INTERVAL);
        reply.success_with(out, |w| {
            xor_address_attribute(w, turn_attr::XOR_RELAYED_ADDRESS, relay, reply.tid);
            w.attribute(
                turn_attr::LIFETIME,
                &(lifetime.as_secs() as u32).to_be_bytes(),
            );
            if let Some((token, _)) = new_token {
                w.attribute(turn_attr::RESERVATION_TOKEN, &token);
            }
            w.xor_mapped_address(client.addr);
        });
        RequestOutcome::Ok
    }

    /// The owner (username) of `client`'s pending Allocate, if it has one.
    pub(super) fn pending_owner(&self, client: ClientAddr) -> Option<&str> {
        let request = self.pending_by_client.get(&client)?;
        self.pending.get(request).map(|p| &*p.username)
    }

    /// Drops a pending Allocate without an answer (its client is gone).
    pub(super) fn forget_pending(&mut self, request: RelayRequestId) {
        if let Some(pending) = self.pending.remove(&request) {
            self.pending_by_client.remove(&pending.client);
            self.release_user(&pending.user);
        }
    }

    /// Forgets the pending Allocates whose report did not come in time; a report
    /// arriving later closes its sockets (see [`TurnServer::handle_relay_opened`]).
    pub(super) fn expire_pending(&mut self, now: Instant) {
        let expired: Vec<RelayRequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(request, _)| *request)
            .collect();
        for request in expired {
            self.forget_pending(request);
        }
    }

    /// A reservation token nobody can guess from the ones before it.
    fn next_token(&mut self) -> [u8; 8] {
        use hmac::{Hmac, Mac};
        self.tid_counter = self.tid_counter.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.token_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(&self.tid_counter.to_be_bytes());
        let tag = mac.finalize().into_bytes();
        let mut token = [0u8; 8];
        token.copy_from_slice(&tag[..8]);
        token
    }

    fn grant_lifetime(&self, requested: Option<u32>) -> Duration {
        let requested = requested
            .map(|s| Duration::from_secs(u64::from(s)))
            .unwrap_or(self.config.default_lifetime);
        requested.clamp(self.config.default_lifetime, self.config.max_lifetime)
    }

    pub(super) fn refresh(
        &mut self,
        now: Instant,
        existing: Option<usize>,
        reply: &Reply,
        message: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> RequestOutcome {
        let Some(index) = existing else {
            reply.error(out, 437, "Allocation Mismatch");
            return RequestOutcome::Mismatch;
        };
        let requested = message
            .attributes()
            .flatten()
            .find(|a| a.ty == turn_attr::LIFETIME)
            .and_then(|a| read_u32(a.value));
        if requested == Some(0) {
            self.remove(index);
            reply.success_with(out, |w| {
                w.attribute(turn_attr::LIFETIME, &0u32.to_be_bytes());
            });
            return RequestOutcome::Ok;
        }
        let lifetime = match requested {
            Some(secs) => Duration::from_secs(u64::from(secs)).min(self.config.max_lifetime),
            None => self.config.default_lifetime,
        };
        if let Some(allocation) = self.slots[index].as_mut() {
            allocation.expires = now + lifetime;
        }
        self.sync_fast_path_of(index, now);
        reply.success_with(out, |w| {
            w.attribute(
                turn_attr::LIFETIME,
                &(lifetime.as_secs() as u32).to_be_bytes(),
            );
        });
        RequestOutcome::Ok
    }
}
