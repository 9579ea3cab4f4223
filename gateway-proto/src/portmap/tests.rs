use super::*;

const ROUTER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1));
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2));
const WAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const NONCE: [u8; 12] = [7; 12];

fn router() -> SocketAddr {
    SocketAddr::new(ROUTER, wire::SERVER_PORT)
}

fn client(now: Instant, upnp: bool) -> PortMapClient {
    PortMapClient::new(now, PortMapConfig::udp(ROUTER, CLIENT, 4500), NONCE, upnp)
}

fn sent(client: &mut PortMapClient) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| client.poll_transmit())
        .map(|t| {
            assert_eq!(t.to, router());
            t.payload
        })
        .collect()
}

fn events(client: &mut PortMapClient) -> Vec<PortMapEvent> {
    std::iter::from_fn(|| client.poll_event()).collect()
}

/// The router's PCP answer to `request` granting `external` for `lifetime` s.
fn pcp_grant(request: &[u8], external: SocketAddr, lifetime: u32, epoch: u32) -> Vec<u8> {
    let mut answer = request.to_vec();
    answer[1] |= 0x80;
    answer[3] = 0;
    answer[4..8].copy_from_slice(&lifetime.to_be_bytes());
    answer[8..12].copy_from_slice(&epoch.to_be_bytes());
    answer[12..24].fill(0);
    answer[42..44].copy_from_slice(&external.port().to_be_bytes());
    let IpAddr::V4(v4) = external.ip() else {
        panic!("v4 only here")
    };
    answer[44..60].copy_from_slice(&v4.to_ipv6_mapped().octets());
    answer
}

fn pcp_announce_answer(result: u8, epoch: u32) -> Vec<u8> {
    let mut answer = wire::pcp_announce_request(CLIENT).to_vec();
    answer[1] = 0x80;
    answer[3] = result;
    answer[8..12].copy_from_slice(&epoch.to_be_bytes());
    answer
}

/// Probes answered by PCP: returns the MAP request that follows.
fn pcp_chosen(c: &mut PortMapClient, now: Instant) -> Vec<u8> {
    let probes = sent(c);
    assert_eq!(
        probes.len(),
        2,
        "PCP ANNOUNCE and NAT-PMP's address request"
    );
    assert!(c.handle_datagram(now, router(), &pcp_announce_answer(0, 10)));
    let mut map = sent(c);
    assert_eq!(map.len(), 1);
    assert_eq!(map[0].len(), wire::PCP_MAP_LEN);
    map.remove(0)
}

/// Probes answered by NAT-PMP only (its address; PCP unsupported): the MAP follows.
fn nat_pmp_chosen(c: &mut PortMapClient, now: Instant, epoch: u32) {
    sent(c);
    assert!(c.handle_datagram(now, router(), &[0, 128, 0, 1, 0, 0, 0, 0]));
    assert!(c.handle_datagram(now, router(), &nat_pmp_address(epoch)));
    let map = sent(c);
    assert_eq!(map.len(), 1, "only the MAP: the address is known");
    assert_eq!(map[0][..2], [0, 1]);
}

fn nat_pmp_address(epoch: u32) -> Vec<u8> {
    let mut answer = vec![0, 128, 0, 0];
    answer.extend_from_slice(&epoch.to_be_bytes());
    answer.extend_from_slice(&WAN.octets());
    answer
}

fn nat_pmp_map(result: u16, epoch: u32, external: u16, lifetime: u32) -> Vec<u8> {
    let mut answer = vec![0, 129];
    answer.extend_from_slice(&result.to_be_bytes());
    answer.extend_from_slice(&epoch.to_be_bytes());
    answer.extend_from_slice(&4500u16.to_be_bytes());
    answer.extend_from_slice(&external.to_be_bytes());
    answer.extend_from_slice(&lifetime.to_be_bytes());
    answer
}

#[test]
fn probes_both_protocols_without_mapping_then_maps_with_the_first_to_answer() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let probes = sent(&mut c);
    assert_eq!(probes.len(), 2);
    assert_eq!(probes[0].len(), wire::PCP_ANNOUNCE_LEN);
    assert_eq!(probes[0][..2], [2, 0], "PCP ANNOUNCE");
    assert_eq!(probes[1], [0, 0], "NAT-PMP external address");
    assert!(c.handle_datagram(t0, router(), &pcp_announce_answer(0, 10)));
    let map = sent(&mut c);
    assert_eq!(map.len(), 1, "a PCP MAP only: no second mapping by NAT-PMP");
    assert_eq!(map[0][..2], [2, 1]);
    // NAT-PMP answering its probe late changes nothing.
    assert!(c.handle_datagram(t0, router(), &nat_pmp_address(10)));
    assert!(sent(&mut c).is_empty());

    let external: SocketAddr = (WAN, 30000).into();
    assert!(c.handle_datagram(t0, router(), &pcp_grant(&map[0], external, 3600, 10)));
    let mapping = Mapping {
        protocol: MappingProtocol::Pcp,
        external,
        lifetime: Duration::from_secs(3600),
    };
    assert_eq!(events(&mut c), [PortMapEvent::Mapped(mapping)]);
    assert_eq!(c.mapping(), Some(mapping));
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + Duration::from_secs(1800)),
        "refresh"
    );
}

#[test]
fn a_nat_pmp_only_router_maps_through_nat_pmp() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    nat_pmp_chosen(&mut c, t0, 50);
    assert!(c.handle_datagram(t0, router(), &nat_pmp_map(0, 50, 30001, 7200)));
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Mapped(Mapping {
            protocol: MappingProtocol::NatPmp,
            external: (WAN, 30001).into(),
            lifetime: Duration::from_secs(7200),
        })]
    );
}

#[test]
fn a_silent_router_costs_four_tries_each_and_one_report_within_four_seconds() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let mut datagrams = sent(&mut c).len();
    let mut now = t0;
    let mut reported = None;
    while let Some(at) = c.poll_timeout() {
        assert!(at >= now, "timers move forward");
        now = at;
        c.handle_timeout(now);
        datagrams += sent(&mut c).len();
        let seen = events(&mut c);
        if !seen.is_empty() {
            reported = Some((now, seen));
        }
    }
    let (at, seen) = reported.expect("a report");
    assert_eq!(
        seen,
        [PortMapEvent::Unavailable(vec![
            (MappingProtocol::Pcp, ProtocolOutcome::NoAnswer),
            (MappingProtocol::NatPmp, ProtocolOutcome::NoAnswer),
        ])]
    );
    // 250 + 500 + 1000 + 2000 ms after the first send.
    assert_eq!(at - t0, Duration::from_millis(3750));
    assert_eq!(datagrams, 4 * 2, "four tries of two probes");
    assert_eq!(c.poll_timeout(), None, "idle afterwards");
}

#[test]
fn refusals_are_reported_in_words() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let map = pcp_chosen(&mut c, t0);
    let mut refused = pcp_grant(&map, (WAN, 1).into(), 30, 11);
    refused[3] = 2;
    assert!(c.handle_datagram(t0, router(), &refused));
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Unavailable(vec![(
            MappingProtocol::Pcp,
            ProtocolOutcome::Refused {
                code: 2,
                text: "not authorized"
            }
        )])]
    );
    let mut c = client(t0, false);
    nat_pmp_chosen(&mut c, t0, 1);
    assert!(c.handle_datagram(t0, router(), &nat_pmp_map(2, 1, 0, 0)));
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Unavailable(vec![
            (MappingProtocol::Pcp, ProtocolOutcome::UnsupportedVersion),
            (
                MappingProtocol::NatPmp,
                ProtocolOutcome::Refused {
                    code: 2,
                    text: "not authorized or refused"
                }
            ),
        ])]
    );
}

#[test]
fn answers_from_elsewhere_or_for_another_mapping_are_not_trusted() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let map = pcp_chosen(&mut c, t0);
    let grant = pcp_grant(&map, (WAN, 30000).into(), 3600, 11);
    let stranger: SocketAddr = "10.0.1.9:5351".parse().expect("addr");
    assert!(!c.handle_datagram(t0, stranger, &grant));
    let mut other_nonce = grant.clone();
    other_nonce[24] ^= 1;
    assert!(c.handle_datagram(t0, router(), &other_nonce));
    assert!(!c.handle_datagram(t0, router(), b"garbage"));
    assert!(events(&mut c).is_empty());
    // A grant of the unspecified address is unusable.
    let mut unspecified = grant.clone();
    unspecified[44..60].copy_from_slice(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    assert!(c.handle_datagram(t0, router(), &unspecified));
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Unavailable(vec![(
            MappingProtocol::Pcp,
            ProtocolOutcome::Unusable
        )])]
    );
    assert_eq!(c.mapping(), None);
}

#[test]
fn refreshes_at_half_life_and_reports_a_changed_endpoint() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let map = pcp_chosen(&mut c, t0);
    c.handle_datagram(t0, router(), &pcp_grant(&map, (WAN, 30000).into(), 100, 11));
    events(&mut c);
    let at = c.poll_timeout().expect("refresh due");
    assert_eq!(at, t0 + Duration::from_secs(50));
    c.handle_timeout(at);
    let refresh = sent(&mut c);
    assert_eq!(refresh.len(), 1, "PCP only");
    assert_eq!(&refresh[0][24..36], &NONCE, "the same mapping");
    assert_eq!(
        &refresh[0][42..44],
        &30000u16.to_be_bytes(),
        "suggests the port held"
    );
    c.handle_datagram(
        at,
        router(),
        &pcp_grant(&refresh[0], (WAN, 30002).into(), 100, 61),
    );
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Refreshed(Mapping {
            protocol: MappingProtocol::Pcp,
            external: (WAN, 30002).into(),
            lifetime: Duration::from_secs(100),
        })]
    );
}

#[test]
fn a_refresh_refused_loses_the_mapping_and_probes_again() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    nat_pmp_chosen(&mut c, t0, 1);
    c.handle_datagram(t0, router(), &nat_pmp_map(0, 1, 30001, 60));
    let [PortMapEvent::Mapped(mapping)] = events(&mut c)[..] else {
        panic!("mapped")
    };
    let at = c.poll_timeout().expect("refresh");
    c.handle_timeout(at);
    assert_eq!(
        sent(&mut c).len(),
        1,
        "only the MAP again: the address is known"
    );
    // The router revoked it: "out of resources".
    c.handle_datagram(at, router(), &nat_pmp_map(4, 31, 0, 0));
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Lost {
            mapping,
            outcome: ProtocolOutcome::Refused {
                code: 4,
                text: "out of resources"
            }
        }]
    );
    assert_eq!(c.mapping(), None);
    // Probing again from scratch in both protocols.
    assert_eq!(
        sent(&mut c),
        vec![wire::pcp_announce_request(CLIENT).to_vec(), vec![0, 0]]
    );
}

#[test]
fn a_refresh_unanswered_loses_the_mapping() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let map = pcp_chosen(&mut c, t0);
    c.handle_datagram(t0, router(), &pcp_grant(&map, (WAN, 30000).into(), 20, 11));
    events(&mut c);
    let mut lost = None;
    for _ in 0..16 {
        let Some(now) = c.poll_timeout() else { break };
        c.handle_timeout(now);
        sent(&mut c);
        for event in events(&mut c) {
            if let PortMapEvent::Lost { outcome, .. } = event {
                lost = Some((now, outcome));
            }
        }
        if lost.is_some() {
            break;
        }
    }
    let (at, outcome) = lost.expect("lost");
    assert_eq!(outcome, ProtocolOutcome::NoAnswer);
    assert_eq!(at - t0, Duration::from_millis(10_000 + 3750));
}

#[test]
fn a_router_that_restarted_is_noticed_by_its_epoch() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    nat_pmp_chosen(&mut c, t0, 1000);
    c.handle_datagram(t0, router(), &nat_pmp_map(0, 1000, 30001, 60));
    events(&mut c);
    let at = c.poll_timeout().expect("refresh");
    c.handle_timeout(at);
    sent(&mut c);
    // 30 s later the epoch says 3: the router restarted. The refresh re-created the
    // mapping, and the external address is asked again.
    c.handle_datagram(at, router(), &nat_pmp_map(0, 3, 30005, 60));
    assert!(events(&mut c).is_empty());
    assert_eq!(sent(&mut c), Vec::<Vec<u8>>::new());
    c.handle_timeout(at + INITIAL_RTO);
    assert_eq!(sent(&mut c), vec![vec![0, 0]], "the address again");
    c.handle_datagram(at, router(), &nat_pmp_address(3));
    assert!(matches!(
        events(&mut c)[..],
        [PortMapEvent::Refreshed(Mapping { external, .. })] if external.port() == 30005
    ));
}

#[test]
fn close_deletes_with_lifetime_zero() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let map = pcp_chosen(&mut c, t0);
    c.handle_datagram(
        t0,
        router(),
        &pcp_grant(&map, (WAN, 30000).into(), 3600, 11),
    );
    events(&mut c);
    c.close(t0);
    let delete = sent(&mut c);
    assert_eq!(delete.len(), 1);
    assert_eq!(&delete[0][4..8], &0u32.to_be_bytes(), "lifetime 0");
    assert_eq!(&delete[0][24..36], &NONCE);
    assert_eq!(
        &delete[0][42..44],
        &30000u16.to_be_bytes(),
        "names the mapping"
    );
    c.handle_datagram(
        t0,
        router(),
        &pcp_grant(&delete[0], (WAN, 30000).into(), 0, 12),
    );
    assert_eq!(events(&mut c), [PortMapEvent::Closed]);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn close_without_a_mapping_or_answer_ends_anyway() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    sent(&mut c);
    c.close(t0);
    assert!(sent(&mut c).is_empty());
    assert_eq!(events(&mut c), [PortMapEvent::Closed]);
    let mut c = client(t0, false);
    nat_pmp_chosen(&mut c, t0, 1);
    c.handle_datagram(t0, router(), &nat_pmp_map(0, 1, 30001, 3600));
    events(&mut c);
    c.close(t0);
    assert_eq!(
        sent(&mut c),
        vec![wire::nat_pmp_map_request(MappedTransport::Udp, 4500, 0, 0).to_vec()],
        "NAT-PMP's delete: lifetime 0, suggested port 0"
    );
    let mut now = t0;
    while let Some(at) = c.poll_timeout() {
        now = at;
        c.handle_timeout(now);
    }
    assert_eq!(events(&mut c), [PortMapEvent::Closed]);
    assert!(now - t0 < Duration::from_secs(4), "bounded");
}

#[test]
fn upnp_wins_only_while_nothing_native_may_be_mapping() {
    let t0 = Instant::now();
    let upnp = Mapping {
        protocol: MappingProtocol::Upnp,
        external: (WAN, 4500).into(),
        lifetime: Duration::from_secs(3600),
    };
    // While probing: UPnP first, the probes stop.
    let mut c = client(t0, true);
    sent(&mut c);
    assert!(c.handle_upnp_mapping(t0, Ok(upnp)));
    assert_eq!(events(&mut c), [PortMapEvent::Mapped(upnp)]);
    c.handle_datagram(t0, router(), &pcp_announce_answer(0, 1));
    assert!(sent(&mut c).is_empty(), "no PCP MAP after UPnP won");

    // A PCP MAP in flight: UPnP's mapping is not taken (the driver deletes it).
    let mut c = client(t0, true);
    pcp_chosen(&mut c, t0);
    assert!(!c.handle_upnp_mapping(t0, Ok(upnp)));

    // Nothing native: Unavailable waits for UPnP's outcome.
    let mut c = client(t0, true);
    sent(&mut c);
    c.handle_datagram(t0, router(), &[0, 128, 0, 1]);
    c.handle_datagram(t0, router(), &[2, 0x80, 0, 1]);
    assert!(events(&mut c).is_empty(), "UPnP is still out");
    assert!(!c.handle_upnp_mapping(t0, Err(ProtocolOutcome::NoAnswer)));
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Unavailable(vec![
            (MappingProtocol::Pcp, ProtocolOutcome::UnsupportedVersion),
            (MappingProtocol::NatPmp, ProtocolOutcome::UnsupportedVersion),
            (MappingProtocol::Upnp, ProtocolOutcome::NoAnswer),
        ])]
    );
}

#[test]
fn a_failed_upnp_renewal_loses_the_mapping() {
    let t0 = Instant::now();
    let upnp = Mapping {
        protocol: MappingProtocol::Upnp,
        external: (WAN, 4500).into(),
        lifetime: Duration::from_secs(3600),
    };
    let mut c = client(t0, true);
    sent(&mut c);
    assert!(c.handle_upnp_mapping(t0, Ok(upnp)));
    events(&mut c);
    // Renewed: kept.
    let t1 = t0 + Duration::from_secs(1800);
    c.handle_upnp_renewal(t1, Ok(upnp));
    assert_eq!(events(&mut c), [PortMapEvent::Refreshed(upnp)]);
    assert_eq!(c.mapping(), Some(upnp));
    // The next renewal fails: lost, and asked again natively.
    let t2 = t1 + Duration::from_secs(1800);
    c.handle_upnp_renewal(t2, Err(ProtocolOutcome::NoAnswer));
    assert_eq!(
        events(&mut c),
        [PortMapEvent::Lost {
            mapping: upnp,
            outcome: ProtocolOutcome::NoAnswer
        }]
    );
    assert_eq!(c.mapping(), None);
    assert_eq!(sent(&mut c).len(), 2, "PCP and NAT-PMP probed again");
    // A renewal's late result for a mapping no longer held changes nothing.
    c.handle_upnp_renewal(t2, Ok(upnp));
    assert!(events(&mut c).is_empty());
    assert_eq!(c.mapping(), None);
}

#[test]
fn a_upnp_renewal_result_does_not_touch_a_native_mapping() {
    let t0 = Instant::now();
    let mut c = client(t0, false);
    let map = pcp_chosen(&mut c, t0);
    let external: SocketAddr = (WAN, 30000).into();
    c.handle_datagram(t0, router(), &pcp_grant(&map, external, 120, 2));
    events(&mut c);
    c.handle_upnp_renewal(t0, Err(ProtocolOutcome::NoAnswer));
    assert!(events(&mut c).is_empty());
    assert_eq!(c.mapping().map(|m| m.external), Some(external));
}

proptest::proptest! {
    #[test]
    fn any_answer_sequence_keeps_the_machine_sane(
        answers in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..20)
    ) {
        let t0 = Instant::now();
        let mut c = client(t0, false);
        let mut now = t0;
        for answer in answers {
            c.handle_datagram(now, router(), &answer);
            if let Some(at) = c.poll_timeout() {
                now = now.max(at);
                c.handle_timeout(now);
            }
            while c.poll_transmit().is_some() {}
            while c.poll_event().is_some() {}
        }
        // Left alone, it always comes to rest: bounded retries.
        let mut steps = 0;
        while let Some(at) = c.poll_timeout() {
            if c.mapping().is_some() {
                break;
            }
            now = now.max(at);
            c.handle_timeout(now);
            steps += 1;
            proptest::prop_assert!(steps < 64, "no end to the retries");
        }
    }
}
