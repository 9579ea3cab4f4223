//! The check of a peer's mapped candidate (a port mapping its router granted,
//! [`CandidateKind::Mapped`]) before any introduction carries it: a router may lie
//! about its external address or port, and an unchecked candidate would send the
//! other side punching at nothing. When a Register brings a new mapped endpoint,
//! the gateway sends a Mapped-Check probe there, signed for the peer and carrying
//! a random token, from a discovery socket when it has one (a socket the peer never
//! sent to, so only a mapping that admits unsolicited traffic lets it in); the
//! agent answers with a signed Mapped-Check request echoing the token, through its
//! socket to the service socket. Only then does the candidate join the peer's
//! introducible candidates. Unanswered after [`MAPPED_PROBE_TRIES`] probes
//! [`MAPPED_PROBE_INTERVAL`] apart, it is dropped, counted, and the peer is told.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::Rng;

use super::{
    PeerRecord, Refusal, RendezvousEvent, RendezvousHandled, RendezvousServer,
    auth::{Authenticated, signed_success},
    discovery_socket,
};
use crate::{
    Transmit,
    binding::ChangeRequest,
    rendezvous::{
        cluster::ClusterRequest,
        wire::{Candidate, CandidateKind, MAX_CANDIDATES, attr, encode_candidate, method},
    },
    stun::{Class, MessageType, MessageWriter},
};

/// Probes sent to a mapped endpoint before it counts as unreachable.
pub const MAPPED_PROBE_TRIES: u8 = 3;

/// Time between probes of one mapped endpoint, and after the last before the
/// verdict: a peer gets at most one probe a second, so a registered peer cannot
/// aim more than that at a third party by announcing its address.
pub const MAPPED_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The checks in progress and their verdicts, per registered peer.
#[derive(Debug, Default)]
pub(super) struct MappedChecks {
    /// Checks waiting for an answer (few at a time: only new mapped endpoints).
    pending: HashMap<Box<str>, PendingCheck>,
    /// The pending checks by when they are next due (a timer queue, so the
    /// driver's every `poll_timeout` costs no walk over them).
    due: BTreeSet<(Instant, Box<str>)>,
    /// The last checked mapped endpoint of a peer and whether it answered, so a
    /// refresh with the same candidate is not probed again.
    verdicts: HashMap<Box<str>, Verdict>,
}

/// A check waiting for the peer's answer.
#[derive(Debug)]
struct PendingCheck {
    addr: SocketAddr,
    token: [u8; 16],
    /// Probes sent with this token.
    sent: u8,
    /// When the next probe (or the verdict) is due.
    next_at: Instant,
    /// When the last probe to this peer left, if any.
    last_probe: Option<Instant>,
    /// Whether the peer's latest Register still announces `addr` (a verified
    /// endpoint it withdrew is not introduced).
    announced: bool,
}

/// How a peer's last check ended.
#[derive(Debug)]
struct Verdict {
    addr: SocketAddr,
    answered: bool,
    /// When the last probe to this peer left: the next check's first waits for
    /// [`MAPPED_PROBE_INTERVAL`] after it.
    last_probe: Option<Instant>,
}

impl MappedChecks {
    /// When the next probe or verdict is due.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Forgets the checks of peers no longer registered.
    pub(super) fn retain_registered(&mut self, peers: &HashMap<Box<str>, PeerRecord>) {
        self.pending.retain(|id, _| peers.contains_key(id));
        let pending = &self.pending;
        self.due.retain(|(_, id)| pending.contains_key(id));
        self.verdicts.retain(|id, _| peers.contains_key(id));
        super::shrink_when_sparse(&mut self.pending);
        super::shrink_when_sparse(&mut self.verdicts);
    }

    /// Whether every pending check is in the timer queue once, at its time, and
    /// nothing else is.
    #[cfg(test)]
    pub(super) fn consistent(&self) -> bool {
        self.due.len() == self.pending.len()
            && self
                .pending
                .iter()
                .all(|(id, p)| self.due.contains(&(p.next_at, id.clone())))
    }

    /// Whether `peer_id` has a check waiting for an answer.
    #[cfg(test)]
    pub(super) fn is_pending(&self, peer_id: &str) -> bool {
        self.pending.contains_key(peer_id)
    }
}

impl RendezvousServer {
    /// A Register of `peer_id` announced `mapped` (its first mapped candidate, if
    /// any): the endpoint to introduce when it was verified before, else `None`,
    /// with a check started (its first probe sent now) when the endpoint is new.
    pub(super) fn mapped_on_register(
        &mut self,
        now: Instant,
        peer_id: &str,
        mapped: Option<SocketAddr>,
        password: &str,
        local: Option<IpAddr>,
    ) -> Option<SocketAddr> {
        let token: [u8; 16] = self.rng.random();
        let checks = &mut self.mapped;
        let pending = checks.pending.get_mut(peer_id);
        let Some(addr) = mapped else {
            // Withdrawn: a check under way runs out (so withdrawing and announcing
            // again cannot speed probes up), but verifies nothing.
            if let Some(pending) = pending {
                pending.announced = false;
            }
            return None;
        };
        if let Some(pending) = pending {
            if pending.addr != addr {
                // Another endpoint: checked afresh, at the next probe's time.
                *pending = PendingCheck {
                    addr,
                    token,
                    sent: 0,
                    next_at: pending.next_at,
                    last_probe: pending.last_probe,
                    announced: true,
                };
            }
            pending.announced = true;
            return None;
        }
        let last_probe = match checks.verdicts.remove(peer_id) {
            Some(verdict) if verdict.addr == addr => {
                let answered = verdict.answered;
                checks.verdicts.insert(peer_id.into(), verdict);
                return answered.then_some(addr);
            }
            Some(verdict) => verdict.last_probe,
            None => None,
        };
        // At most one probe per peer per interval, whatever it registers.
        let first = last_probe.map_or(now, |at| (at + MAPPED_PROBE_INTERVAL).max(now));
        let now_due = first <= now;
        let next_at = if now_due {
            now + MAPPED_PROBE_INTERVAL
        } else {
            first
        };
        checks.due.insert((next_at, peer_id.into()));
        checks.pending.insert(
            peer_id.into(),
            PendingCheck {
                addr,
                token,
                sent: u8::from(now_due),
                next_at,
                last_probe: if now_due { Some(now) } else { last_probe },
                announced: true,
            },
        );
        if now_due {
            self.send_mapped_probe(addr, &token, password, local);
        }
        None
    }

    /// Sends the probes that are due and gives up on endpoints that never
    /// answered: counted, and the peer told.
    pub(super) fn mapped_timeout(&mut self, now: Instant) {
        while let Some((at, _)) = self.mapped.due.first()
            && *at <= now
        {
            let Some((_, id)) = self.mapped.due.pop_first() else {
                break;
            };
            let Some(record) = self.peers.get(&id) else {
                self.mapped.pending.remove(&id);
                continue;
            };
            let password = self.password_for(&id, record);
            let (to, transport, local) = (record.addr, record.transport, record.local);
            let Some(pending) = self.mapped.pending.get_mut(&id) else {
                continue;
            };
            if pending.next_at > now {
                self.mapped.due.insert((pending.next_at, id));
                continue;
            }
            if pending.sent < MAPPED_PROBE_TRIES {
                pending.sent += 1;
                pending.next_at = now + MAPPED_PROBE_INTERVAL;
                pending.last_probe = Some(now);
                self.mapped.due.insert((pending.next_at, id));
                let (addr, token) = (pending.addr, pending.token);
                self.send_mapped_probe(addr, &token, &password, local);
                continue;
            }
            let (addr, announced) = (pending.addr, pending.announced);
            let verdict = Verdict {
                addr,
                answered: false,
                last_probe: pending.last_probe,
            };
            self.mapped.pending.remove(&id);
            self.mapped.verdicts.insert(id, verdict);
            self.events
                .push_back(RendezvousEvent::MappedCandidate { verified: false });
            if !announced {
                continue;
            }
            let notice = mapped_notice(self.rng.random(), addr, None, &password);
            self.transmits
                .push_back(Transmit::udp(to, notice).from_local(local).over(transport));
        }
    }

    /// A Mapped-Check request: the peer's answer to a probe. The token must be the
    /// one of its pending check; then its mapped candidate is introducible (and
    /// stored for the cluster). A repeated answer for a verified endpoint is
    /// answered again; anything else is 404.
    pub(super) fn mapped_answer(
        &mut self,
        auth: &Authenticated<'_>,
    ) -> Result<(RendezvousHandled, Option<Vec<u8>>), Refusal> {
        let token = auth
            .message
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == attr::MAPPED_TOKEN)
            .and_then(|a| <[u8; 16]>::try_from(a.value).ok())
            .ok_or((RendezvousHandled::BadRequest, 400, "Bad Request"))?;
        let id = auth.peer_id.as_str();
        let reply = signed_success(method::MAPPED_CHECK, auth.message.transaction_id(), auth);
        let Some(record) = self.peers.get_mut(id) else {
            return Err((RendezvousHandled::Forbidden, 403, "Not Registered Here"));
        };
        let Some(pending) = self
            .mapped
            .pending
            .get(id)
            .filter(|p| p.token == token && p.sent > 0)
        else {
            return match self.mapped.verdicts.get(id) {
                Some(verdict) if verdict.answered => {
                    Ok((RendezvousHandled::MappedChecked, Some(reply)))
                }
                _ => Err((RendezvousHandled::NotFound, 404, "Unknown Check")),
            };
        };
        let (addr, announced) = (pending.addr, pending.announced);
        let verdict = Verdict {
            addr,
            answered: true,
            last_probe: pending.last_probe,
        };
        self.mapped.due.remove(&(pending.next_at, id.into()));
        self.mapped.pending.remove(id);
        self.mapped.verdicts.insert(id.into(), verdict);
        self.events
            .push_back(RendezvousEvent::MappedCandidate { verified: true });
        if !announced {
            return Ok((RendezvousHandled::MappedChecked, Some(reply)));
        }
        let mut candidates: Vec<Candidate> = record
            .host_candidates
            .iter()
            .filter(|c| c.kind != CandidateKind::Mapped)
            .copied()
            .collect();
        candidates.insert(
            0,
            Candidate {
                kind: CandidateKind::Mapped,
                addr,
            },
        );
        candidates.truncate(MAX_CANDIDATES);
        record.host_candidates = candidates.into_boxed_slice();
        if let Some(cluster) = &self.cluster {
            let entry = cluster.entry(id, record);
            self.events
                .push_back(RendezvousEvent::Cluster(ClusterRequest::Store(entry)));
        }
        Ok((RendezvousHandled::MappedChecked, Some(reply)))
    }

    /// Queues a probe to mapped endpoint `to`, from a discovery socket of the
    /// endpoint's family when there is one (another port first), else from the
    /// service socket.
    fn send_mapped_probe(
        &mut self,
        to: SocketAddr,
        token: &[u8; 16],
        password: &str,
        local: Option<IpAddr>,
    ) {
        let payload = mapped_notice(self.rng.random(), to, Some(token), password);
        let other_port = ChangeRequest {
            change_ip: false,
            change_port: true,
        };
        let other_both = ChangeRequest {
            change_ip: true,
            change_port: true,
        };
        let selected = self
            .alternates
            .select(local, to, other_port)
            .or_else(|| self.alternates.select(local, to, other_both))
            .and_then(|s| Some((s.endpoint?, s.from_local)));
        let transmit = match selected {
            Some((endpoint, from_local)) => Transmit::udp(to, payload)
                .from_local(from_local)
                .on_socket(discovery_socket(endpoint)),
            None => Transmit::udp(to, payload).from_local(local),
        };
        self.transmits.push_back(transmit);
    }
}

/// A Mapped-Check indication for endpoint `addr`, signed with the peer's
/// `password`: the probe (with `token`), or the "not reachable" notice (without).
pub(crate) fn mapped_notice(
    tid: [u8; 12],
    addr: SocketAddr,
    token: Option<&[u8; 16]>,
    password: &str,
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(96);
    let mut writer = MessageWriter::new(
        &mut payload,
        MessageType {
            method: method::MAPPED_CHECK,
            class: Class::Indication,
        },
        tid,
    );
    let (value, len) = encode_candidate(
        Candidate {
            kind: CandidateKind::Mapped,
            addr,
        },
        tid,
    );
    writer.attribute(attr::CANDIDATE, &value[..len]);
    if let Some(token) = token {
        writer.attribute(attr::MAPPED_TOKEN, token);
    }
    writer.message_integrity_sha256(password.as_bytes());
    writer.finish_with_fingerprint();
    payload
}

#[cfg(test)]
mod tests;
