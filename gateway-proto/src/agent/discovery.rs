//! NAT discovery (RFC 5780 ideas): once registered, the agent measures its NAT's
//! filtering with CHANGE-REQUEST tests to the gateway (optional), then its mapping
//! with Bindings to the gateway's other endpoints, classifies both, and predicts the
//! next ports of a NAT that allocates them sequentially.
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Agent, AgentEvent};
use crate::{
    Transmit,
    binding::ChangeRequest,
    earliest,
    rendezvous::{
        client,
        wire::{FilteringClass, NatClass},
    },
    stun::{self, Class, Message},
};

/// State of NAT mapping discovery.
#[derive(Debug, Default)]
pub(super) struct Discovery {
    /// Our public endpoint as the gateway's service endpoint sees it.
    pub(super) primary: Option<SocketAddr>,
    /// Transaction → (gateway endpoint, order sent).
    pending: HashMap<[u8; 12], (SocketAddr, usize)>,
    /// (order sent, gateway endpoint, seen as).
    results: Vec<(usize, SocketAddr, SocketAddr)>,
    /// Predicted next public endpoints (sequential port allocation).
    pub(super) predicted: Vec<SocketAddr>,
    sent_at: Option<Instant>,
    /// The mapping is classified (or there was nothing to classify).
    pub(super) done: bool,
    /// How many times the unanswered mapping tests were sent again.
    mapping_resends: u32,
    /// The filtering tests, run before the mapping tests: their answers must meet a
    /// NAT that has seen this socket talk to nothing but the gateway's service port
    /// (a Binding to a discovery endpoint would open the very filter under test).
    filter: FilterTests,
}

/// State of the RFC 5780 filtering tests.
#[derive(Debug, Default)]
struct FilterTests {
    /// Change port, then change IP and port: (transaction, outcome so far).
    tests: [([u8; 12], Option<FilterTest>); 2],
    started: Option<Instant>,
    transmissions: u32,
    done: bool,
    class: FilteringClass,
}

/// How long discovery waits for answers before classifying with what it has.
const DISCOVERY_WAIT: Duration = Duration::from_secs(1);
/// Unanswered mapping tests are sent again this long after the last sending...
const MAPPING_RESEND_AFTER: Duration = Duration::from_millis(250);
/// ...this many times (within `DISCOVERY_WAIT`).
const MAPPING_RESENDS: u32 = 2;
/// How long the filtering tests wait for answers from the other endpoints.
const FILTER_WAIT: Duration = Duration::from_secs(1);
/// Transmissions of each unanswered filtering test (spread over [`FILTER_WAIT`]).
const FILTER_TRANSMISSIONS: u32 = 3;

/// What came of one RFC 5780 filtering test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterTest {
    /// The answer from the other endpoint got through.
    Answered,
    /// Nothing got through in time.
    Unanswered,
    /// The gateway cannot serve this change (420) or refused the request.
    Unsupported,
}

/// Classifies a NAT's filtering behaviour (RFC 4787 §5, tests of RFC 5780 §4.4) from
/// the two CHANGE-REQUEST tests sent to the gateway's service endpoint: an answer
/// from another port of the same address (`change_port`) and from another address
/// and port (`change_address`). Where a test could not run and the other leaves two
/// classes possible, the stricter is assumed (what punching must plan for).
pub fn classify_filtering(change_port: FilterTest, change_address: FilterTest) -> FilteringClass {
    use FilterTest::{Answered, Unanswered, Unsupported};
    match (change_address, change_port) {
        (Answered, _) => FilteringClass::EndpointIndependent,
        // Endpoint-independent or address-dependent: the stricter.
        (Unsupported, Answered) | (Unanswered, Answered) => FilteringClass::AddressDependent,
        (Unanswered | Unsupported, Unanswered) | (Unanswered, Unsupported) => {
            FilteringClass::AddressAndPortDependent
        }
        (Unsupported, Unsupported) => FilteringClass::Unknown,
    }
}

/// Classifies a NAT's mapping behaviour from the public addresses one socket was seen
/// with: `primary` by the gateway's main endpoint `server`, and `others` as
/// (gateway endpoint, seen as) pairs. `local` is the socket's own address when known.
///
/// Another port of the same address tells endpoint-independent from
/// address-and-port-dependent; another address tells endpoint-independent from
/// address-dependent. With only another address and a change, the stricter class is
/// assumed (what punching must plan for).
pub fn classify_mapping(
    local: Option<SocketAddr>,
    server: SocketAddr,
    primary: SocketAddr,
    others: &[(SocketAddr, SocketAddr)],
) -> NatClass {
    if local == Some(primary) {
        return NatClass::None;
    }
    let mut port_test = None;
    let mut address_test = None;
    for &(endpoint, seen) in others {
        if endpoint.ip() == server.ip() && endpoint.port() != server.port() {
            port_test = Some(seen == primary);
        } else if endpoint.ip() != server.ip() {
            address_test = Some(seen == primary);
        }
    }
    match (port_test, address_test) {
        (Some(false), _) => NatClass::AddressAndPortDependent,
        (Some(true), Some(false)) => NatClass::AddressDependent,
        (None, Some(false)) => NatClass::AddressAndPortDependent,
        (Some(true), _) | (None, Some(true)) => NatClass::EndpointIndependent,
        (None, None) => NatClass::Unknown,
    }
}

/// Predicts the next public endpoints of an endpoint-dependent NAT that allocates
/// ports with a constant step: `allocated` are the public endpoints one socket got, in
/// the order its mappings were created. Returns nothing unless at least two steps were
/// seen, all equal, non-zero and at most 64.
pub fn predict_ports(allocated: &[SocketAddr], window: u16) -> Vec<SocketAddr> {
    let Some(&last) = allocated.last() else {
        return Vec::new();
    };
    if allocated.len() < 3 || allocated.iter().any(|a| a.ip() != last.ip()) {
        return Vec::new();
    }
    let steps: Vec<i32> = allocated
        .windows(2)
        .map(|w| i32::from(w[1].port().wrapping_sub(w[0].port()) as i16))
        .collect();
    let step = steps[0];
    if step == 0 || step.abs() > 64 || steps.iter().any(|&s| s != step) {
        return Vec::new();
    }
    (1..=i32::from(window))
        .filter_map(|k| {
            let port = (i32::from(last.port()) + k * step).rem_euclid(65_536);
            let port = u16::try_from(port).ok()?;
            (port >= 1024).then(|| SocketAddr::new(last.ip(), port))
        })
        .collect()
}

impl Discovery {
    /// When discovery next needs [`Agent::handle_timeout`]: a filtering test's
    /// retransmission or end, a mapping tests' resend, or the end of the wait.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        earliest([
            self.sent_at
                .filter(|_| !self.done)
                .map(|sent| sent + DISCOVERY_WAIT),
            self.mapping_resend_at(),
            self.filter_timer(),
        ])
    }

    /// When the filtering tests next need attention (a retransmission or the end).
    fn filter_timer(&self) -> Option<Instant> {
        let filter = &self.filter;
        let started = filter.started.filter(|_| !filter.done)?;
        let sent = filter.transmissions.min(FILTER_TRANSMISSIONS);
        Some(started + FILTER_WAIT * sent / FILTER_TRANSMISSIONS)
    }

    /// When the unanswered mapping tests are next sent again (a lost Binding would
    /// otherwise leave the class unknown, or wrong).
    fn mapping_resend_at(&self) -> Option<Instant> {
        let sent = self.sent_at.filter(|_| !self.done)?;
        (self.mapping_resends < MAPPING_RESENDS && !self.pending.is_empty())
            .then(|| sent + MAPPING_RESEND_AFTER * (self.mapping_resends + 1))
    }
}

impl Agent {
    /// Runs discovery's timers: filtering test retransmissions, mapping test resends,
    /// and classification with what came in once the wait is over.
    pub(super) fn discovery_timeout(&mut self, now: Instant) {
        if self.discovery.filter_timer().is_some_and(|t| now >= t) {
            self.filter_timeout(now);
        }
        if self
            .discovery
            .mapping_resend_at()
            .is_some_and(|at| now >= at)
        {
            self.resend_mapping_tests();
        }
        if let (Some(sent), false) = (self.discovery.sent_at, self.discovery.done)
            && now >= sent + DISCOVERY_WAIT
        {
            self.finish_discovery(now);
        }
    }

    /// The gateway confirmed a Register and saw us at `mapped`: announce it when it
    /// moved (or it is the first answer of a node failed over to), and start
    /// discovery after the first one.
    pub(super) fn registered(&mut self, now: Instant, mapped: SocketAddr) {
        // Refreshes are silent unless the public address moved.
        let new_node = std::mem::take(&mut self.servers.announce_registration);
        if new_node || self.discovery.primary != Some(mapped) {
            self.events.push_back(AgentEvent::Registered { mapped });
            if self.discovery.done {
                self.discovery.primary = Some(mapped);
            }
        }
        if self.link.is_stream() {
            // Registered over TCP or TLS: UDP to the gateway does not work, so its
            // UDP tests cannot (and the mapped address is a TCP one).
            self.abandon_discovery(now);
        } else if self.discovery.filter.started.is_none() {
            self.discovery.primary = Some(mapped);
            if !self.discovery_endpoints().is_empty() {
                self.start_discovery(now, mapped);
            }
        }
    }

    /// A failover: discovery belongs to the first server (its endpoints are that
    /// node's), so it is never run against another. Unfinished, it ends with what it
    /// measured (classified when a mapping test was answered, else the class stays
    /// as configured); not started yet, it never starts.
    pub(super) fn abandon_discovery(&mut self, now: Instant) {
        if self.discovery.done {
            return;
        }
        let started = self.discovery.filter.started.is_some();
        self.discovery.filter.started.get_or_insert(now);
        self.discovery.filter.done = true;
        if started && !self.discovery.results.is_empty() {
            self.finish_discovery(now);
        } else {
            self.discovery.done = true;
            self.discovery.pending.clear();
            self.class_registered = true;
        }
    }

    /// Starts discovery: the filtering tests first, then (see
    /// [`Self::finish_filter_tests`]) the mapping tests.
    fn start_discovery(&mut self, now: Instant, primary: SocketAddr) {
        self.discovery.primary = Some(primary);
        let tests = [(self.tid(), None), (self.tid(), None)];
        self.discovery.filter.tests = tests;
        self.discovery.filter.started = Some(now);
        if self.config.filtering {
            self.send_filter_tests(None);
        } else {
            self.finish_filter_tests(now);
        }
    }

    /// Sends the filtering tests still without an outcome (or only test `only`).
    fn send_filter_tests(&mut self, only: Option<usize>) {
        if only.is_none() {
            self.discovery.filter.transmissions += 1;
        }
        for (i, (tid, outcome)) in self.discovery.filter.tests.into_iter().enumerate() {
            if outcome.is_some() || only.is_some_and(|o| o != i) {
                continue;
            }
            let change = ChangeRequest {
                change_ip: i == 1,
                change_port: true,
            };
            let payload = client::change_request(
                tid,
                &self.config.credentials,
                self.nonce.as_deref(),
                change,
            );
            self.send_to_server(payload);
        }
    }

    /// The filtering tests' timer: send the unanswered ones again, or classify.
    fn filter_timeout(&mut self, now: Instant) {
        if self.discovery.filter.transmissions < FILTER_TRANSMISSIONS {
            self.send_filter_tests(None);
        } else {
            self.finish_filter_tests(now);
        }
    }

    /// An answer to a filtering test, from the gateway (an error) or from the endpoint
    /// the test asked for. Returns false when `message` belongs to no filtering test.
    pub(super) fn filter_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        message: &Message<'_>,
        datagram: &[u8],
    ) -> bool {
        let filter = &self.discovery.filter;
        let tid = message.transaction_id();
        let Some(index) = filter
            .tests
            .iter()
            .position(|(t, outcome)| *t == tid && outcome.is_none())
            .filter(|_| filter.started.is_some() && !filter.done)
        else {
            return false;
        };
        let Some(response) = client::parse_response(datagram, &self.config.credentials.password)
        else {
            return true;
        };
        let server = self.config.server;
        let outcome = match response.result {
            Ok(()) => {
                // Only an answer from the endpoint asked for tells anything.
                let other_address = from.ip() != server.ip();
                if from.port() == server.port() || other_address != (index == 1) {
                    return true;
                }
                FilterTest::Answered
            }
            Err(_) if from != server => return true,
            Err(401 | 438) if response.nonce.is_some() && response.nonce != self.nonce => {
                // A fresh nonce to echo: ask again at once.
                self.nonce = response.nonce;
                self.send_filter_tests(Some(index));
                return true;
            }
            Err(_) => FilterTest::Unsupported,
        };
        self.discovery.filter.tests[index].1 = Some(outcome);
        if self.discovery.filter.tests.iter().all(|(_, o)| o.is_some()) {
            self.finish_filter_tests(now);
        }
        true
    }

    /// Classifies the filtering, then sends the mapping tests.
    fn finish_filter_tests(&mut self, now: Instant) {
        let filter = &mut self.discovery.filter;
        filter.done = true;
        if !self.config.filtering {
            // Not asked for: the mapping tests at once, filtering unknown.
            self.send_mapping_tests(now);
            return;
        }
        let [port, address] = filter
            .tests
            .map(|(_, outcome)| outcome.unwrap_or(FilterTest::Unanswered));
        filter.class = classify_filtering(port, address);
        tracing::debug!(
            ?port,
            ?address,
            class = filter.class.as_str(),
            "NAT filtering"
        );
        self.send_mapping_tests(now);
    }

    /// Sends every unanswered mapping test again, with its transaction id.
    fn resend_mapping_tests(&mut self) {
        self.discovery.mapping_resends += 1;
        let pending: Vec<([u8; 12], SocketAddr)> = self
            .discovery
            .pending
            .iter()
            .map(|(tid, (endpoint, _))| (*tid, *endpoint))
            .collect();
        for (tid, endpoint) in pending {
            self.send_binding_request(tid, endpoint);
        }
    }

    /// A plain Binding request (a mapping test) from our own socket.
    fn send_binding_request(&mut self, tid: [u8; 12], to: SocketAddr) {
        let mut request = Vec::new();
        crate::binding::binding_request(tid, &mut request);
        self.outgoing.push_back(Transmit::udp(to, request));
    }

    /// Sends one Binding to every discovery endpoint (the mapping tests).
    fn send_mapping_tests(&mut self, now: Instant) {
        self.discovery.sent_at = Some(now);
        for (order, endpoint) in self.discovery_endpoints().to_vec().into_iter().enumerate() {
            let tid = self.tid();
            self.discovery.pending.insert(tid, (endpoint, order));
            self.send_binding_request(tid, endpoint);
        }
    }

    /// An answer to a mapping test from the endpoint it went to. Returns false when
    /// `message` answers no pending mapping test.
    pub(super) fn mapping_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        message: &Message<'_>,
        datagram: &[u8],
    ) -> bool {
        let ty = message.message_type();
        if ty.method != stun::method::BINDING || ty.class != Class::Success {
            return false;
        }
        let Some(&(endpoint, order)) = self.discovery.pending.get(&message.transaction_id()) else {
            return false;
        };
        if endpoint == from
            && let Some(seen) =
                crate::binding::parse_binding_success(datagram, message.transaction_id())
        {
            self.discovery.pending.remove(&message.transaction_id());
            self.discovery.results.push((order, endpoint, seen));
            if self.discovery.pending.is_empty() {
                self.finish_discovery(now);
            }
        }
        true
    }

    /// Classifies the mapping with the answers in (predicting ports when it depends
    /// on the destination), and re-registers at once to tell the gateway.
    fn finish_discovery(&mut self, now: Instant) {
        self.discovery.done = true;
        self.discovery.pending.clear();
        let Some(primary) = self.discovery.primary else {
            // Nothing classified: nothing to wait for before connecting.
            self.class_registered = true;
            return;
        };
        let local = self.config.host_candidates.first().copied();
        self.discovery.results.sort_by_key(|r| r.0);
        let seen: Vec<(SocketAddr, SocketAddr)> = self
            .discovery
            .results
            .iter()
            .map(|&(_, endpoint, seen)| (endpoint, seen))
            .collect();
        let class = classify_mapping(local, self.config.server, primary, &seen);
        if matches!(
            class,
            NatClass::AddressAndPortDependent | NatClass::AddressDependent
        ) {
            let allocated: Vec<SocketAddr> = std::iter::once(primary)
                .chain(seen.iter().map(|&(_, s)| s))
                .collect();
            self.discovery.predicted = predict_ports(&allocated, self.config.prediction_window);
            if !self.discovery.predicted.is_empty() {
                tracing::debug!(predicted = ?self.discovery.predicted, "sequential port allocation");
                self.next_register = now;
            }
        }
        tracing::debug!(?local, %primary, results = ?self.discovery.results, class = class.as_str(), "NAT discovery");
        let port_preserved = local.is_some_and(|l| l.port() == primary.port());
        self.events.push_back(AgentEvent::NatClassified {
            class,
            filtering: self.discovery.filter.class,
            port_preserved,
        });
        self.config.nat = class;
        // Tell the gateway at once, so introductions carry the class (and any
        // predicted ports); connects wait until it confirmed.
        self.next_register = now;
        self.classified_at = Some(now);
        self.class_registered = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::agents::*;
    use crate::{
        agent::AgentConfig,
        credentials::SharedSecret,
        rendezvous::{RendezvousConfig, RendezvousServer, client::PeerCredentials, method},
    };

    #[test]
    fn sequential_ports_are_predicted_and_irregular_ones_are_not() {
        let at = |port: u16| SocketAddr::from(([198, 51, 100, 2], port));
        assert_eq!(
            predict_ports(&[at(30000), at(30001), at(30002)], 3),
            vec![at(30003), at(30004), at(30005)]
        );
        assert_eq!(
            predict_ports(&[at(40000), at(40002), at(40004)], 2),
            vec![at(40006), at(40008)]
        );
        assert_eq!(
            predict_ports(&[at(65534), at(65535), at(0)], 2),
            vec![at(1), at(2)]
                .into_iter()
                .filter(|a| a.port() >= 1024)
                .collect::<Vec<_>>()
        );
        assert!(
            predict_ports(&[at(30000), at(30001), at(30005)], 3).is_empty(),
            "uneven"
        );
        assert!(
            predict_ports(&[at(30000), at(41000), at(52000)], 3).is_empty(),
            "too far apart: random"
        );
        assert!(
            predict_ports(&[at(30000), at(30001)], 3).is_empty(),
            "one step proves nothing"
        );
        assert!(
            predict_ports(&[at(30000), at(30000), at(30000)], 3).is_empty(),
            "EIM needs none"
        );
    }

    #[test]
    fn filtering_classes() {
        use FilterTest::{Answered, Unanswered, Unsupported};
        let cases = [
            (Answered, Answered, FilteringClass::EndpointIndependent),
            // A lost change-port answer does not hide an answer from another address.
            (Unanswered, Answered, FilteringClass::EndpointIndependent),
            (Answered, Unanswered, FilteringClass::AddressDependent),
            (
                Unanswered,
                Unanswered,
                FilteringClass::AddressAndPortDependent,
            ),
            // Without an endpoint on another address: EIF or ADF, the stricter.
            (Answered, Unsupported, FilteringClass::AddressDependent),
            // The change-port answer was filtered: port-dependent, whatever else.
            (
                Unanswered,
                Unsupported,
                FilteringClass::AddressAndPortDependent,
            ),
            // ADF or APDF: the stricter.
            (
                Unsupported,
                Unanswered,
                FilteringClass::AddressAndPortDependent,
            ),
            (Unsupported, Answered, FilteringClass::EndpointIndependent),
            (Unsupported, Unsupported, FilteringClass::Unknown),
        ];
        for (port, address, class) in cases {
            assert_eq!(
                classify_filtering(port, address),
                class,
                "port {port:?} address {address:?}"
            );
        }
    }

    #[test]
    fn discovery_classifies_filtering_before_opening_other_filters() {
        let both = vec![addr("192.0.2.10:3479"), addr("192.0.2.11:3479")];
        for (filter, preserve, expected) in [
            (
                SimFilter::Independent,
                true,
                FilteringClass::EndpointIndependent,
            ),
            (SimFilter::Address, false, FilteringClass::AddressDependent),
            (
                SimFilter::AddressAndPort,
                true,
                FilteringClass::AddressAndPortDependent,
            ),
        ] {
            let (event, took) = discover_behind(filter, preserve, false, both.clone());
            assert_eq!(
                event,
                Some(AgentEvent::NatClassified {
                    class: NatClass::EndpointIndependent,
                    filtering: expected,
                    port_preserved: preserve,
                }),
                "{filter:?}"
            );
            // Answered at once when both answers get in; otherwise after the wait
            // (three transmissions), then the mapping tests.
            let bound = if matches!(filter, SimFilter::Independent) {
                Duration::from_millis(50)
            } else {
                FILTER_WAIT + Duration::from_millis(50)
            };
            assert!(took <= bound, "{filter:?} took {took:?}");
        }
    }

    #[test]
    fn filtering_without_the_gateway_support_is_unknown_or_the_stricter_class() {
        // A gateway with no discovery sockets: every test gets 420 at once.
        let (event, took) = discover_behind(SimFilter::Independent, true, false, Vec::new());
        assert!(
            matches!(
                event,
                Some(AgentEvent::NatClassified {
                    filtering: FilteringClass::Unknown,
                    ..
                })
            ),
            "{event:?}"
        );
        assert!(took < Duration::from_millis(50), "{took:?}");
        // Only another port: a full cone reads as the stricter address-dependent.
        let (event, _) = discover_behind(
            SimFilter::Independent,
            true,
            false,
            vec![addr("192.0.2.10:3479")],
        );
        assert!(
            matches!(
                event,
                Some(AgentEvent::NatClassified {
                    filtering: FilteringClass::AddressDependent,
                    ..
                })
            ),
            "{event:?}"
        );
    }

    #[test]
    fn mapping_classes() {
        let server = addr("192.0.2.10:3478");
        let other_port = addr("192.0.2.10:3479");
        let other_ip = addr("192.0.2.11:3478");
        let seen = addr("198.51.100.2:4000");
        let other = addr("198.51.100.2:4001");
        let local = Some(addr("10.0.1.2:4000"));
        assert_eq!(
            classify_mapping(Some(seen), server, seen, &[]),
            NatClass::None
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[(other_port, seen), (other_ip, seen)]),
            NatClass::EndpointIndependent
        );
        assert_eq!(
            classify_mapping(
                local,
                server,
                seen,
                &[(other_port, seen), (other_ip, other)]
            ),
            NatClass::AddressDependent
        );
        assert_eq!(
            classify_mapping(
                local,
                server,
                seen,
                &[(other_port, other), (other_ip, other)]
            ),
            NatClass::AddressAndPortDependent
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[(other_ip, other)]),
            NatClass::AddressAndPortDependent
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[(other_ip, seen)]),
            NatClass::EndpointIndependent
        );
        assert_eq!(
            classify_mapping(local, server, seen, &[]),
            NatClass::Unknown
        );
    }

    #[test]
    fn lost_mapping_tests_are_sent_again_and_connects_wait_for_the_class_register() {
        let secret = SharedSecret::new(b"sim secret");
        let server_addr = addr("192.0.2.10:3478");
        let discovery = addr("192.0.2.10:3479");
        let me = addr("198.51.100.2:4000");
        let mut server = RendezvousServer::new(secret.clone(), RendezvousConfig::default(), 3);
        let issued = secret.issue("alice", NOW_UNIX + 3600).expect("issue");
        let mut config = AgentConfig::new(
            server_addr,
            PeerCredentials {
                username: issued.username,
                password: issued.password,
            },
        );
        config.discovery = vec![discovery];
        let start = Instant::now();
        let mut agent = Agent::new(config, start, 5);
        agent.connect("bob", start);
        let mut now = start;
        let mut tests_sent = Vec::new();
        let mut drop_next_register_after_classified = true;
        let mut connect_before_class_ack = false;
        let mut connects = 0;
        while now < start + Duration::from_secs(3) {
            if agent.poll_timeout().is_some_and(|at| at <= now) {
                agent.handle_timeout(now);
            }
            while let Some(t) = agent.poll_transmit() {
                if t.to == discovery {
                    // The discovery endpoint is unreachable: every test is lost.
                    tests_sent.push(now);
                    continue;
                }
                let method = Message::parse(&t.payload)
                    .map(|m| m.message_type().method)
                    .ok();
                if method == Some(method::CONNECT) {
                    connects += 1;
                    connect_before_class_ack |= !agent.class_registered;
                }
                if method == Some(method::REGISTER)
                    && agent.classified_at.is_some()
                    && std::mem::take(&mut drop_next_register_after_classified)
                {
                    // The Register carrying the class is lost too.
                    continue;
                }
                server.handle_datagram(now, NOW_UNIX, me, None, &t.payload);
                while let Some(answer) = server.poll_transmit() {
                    agent.handle_datagram(now, server_addr, &answer.payload);
                }
            }
            now += Duration::from_millis(5);
        }
        // One sending and two more, 250 ms apart, then classification without them.
        assert_eq!(tests_sent.len(), 3, "{tests_sent:?}");
        assert!(tests_sent[1] - tests_sent[0] >= MAPPING_RESEND_AFTER);
        assert!(agent.discovery.done);
        assert!(agent.class_registered, "the resent Register was answered");
        assert!(connects > 0, "connects start once the class is registered");
        assert!(
            !connect_before_class_ack,
            "a connect went out before the class was registered"
        );
    }

    #[test]
    fn the_gateway_names_its_endpoints_and_the_agent_classifies_without_flags() {
        // Behind an endpoint-independent NAT that does not keep the port, the
        // Register answer names 192.0.2.10:3479 and 192.0.2.11:3478/3479: classified.
        let (event, took) =
            discover_behind_with(SimFilter::Independent, false, false, Vec::new(), Some(true));
        assert_eq!(
            event,
            Some(AgentEvent::NatClassified {
                class: NatClass::EndpointIndependent,
                filtering: FilteringClass::Unknown,
                port_preserved: false,
            })
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
        // --no-discover: nothing is classified, whatever the gateway says.
        let (event, _) = discover_behind_with(
            SimFilter::Independent,
            false,
            false,
            Vec::new(),
            Some(false),
        );
        assert_eq!(event, None);
    }
}
