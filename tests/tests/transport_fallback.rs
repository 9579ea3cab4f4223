//! Agents at sites that drop UDP: they fall back to TCP (then TLS) toward the
//! gateway by themselves, register over the stream, relay through an allocation
//! made over it, and carry an application's datagrams both ways. Real `gateway
//! serve` and `gateway peer` binaries in the NAT lab.
use std::time::Duration;

use gateway_tests::{
    lab::{Lab, LabError, NatPreset, WanConditions, lab_available},
    punch::{self, PunchLab, Topology},
    tls::TestCa,
};

/// Waits for `prefix` on `who`'s status lines, or panics with both agents' lines.
fn line(scenario: &mut PunchLab, alice: bool, prefix: &str, timeout: Duration) -> String {
    let found = if alice {
        scenario.alice.wait_for(prefix, timeout)
    } else {
        scenario.bob.wait_for(prefix, timeout)
    };
    found.unwrap_or_else(|| {
        panic!(
            "no `{prefix}` from {}:\nalice {:?}\nbob {:?}",
            if alice { "alice" } else { "bob" },
            scenario.alice.seen(),
            scenario.bob.seen()
        )
    })
}

/// Alice behind `a`, bob behind `b`, both forwarding a UDP port; the sides without
/// UDP must say they moved to TCP and registered over it, and the pair must get a
/// relayed path that carries data both ways.
fn relayed_over_tcp(a: NatPreset, b: NatPreset) {
    let (a_blocked, b_blocked) = (a.udp_blocked, b.udp_blocked);
    let mut scenario = punch::start_under(
        Topology::TwoSites(a, b),
        WanConditions::default(),
        &[],
        &["--forward-listen", "127.0.0.1:5000"],
        &["--forward-to", "127.0.0.1:6000"],
    )
    .expect("punch lab");
    for (alice, blocked) in [(true, a_blocked), (false, b_blocked)] {
        if blocked {
            let moved = line(
                &mut scenario,
                alice,
                "no answer from",
                Duration::from_secs(8),
            );
            assert!(
                moved.contains("over udp for 3 s; trying tcp to 192.0.2.10:3478"),
                "{moved}"
            );
            let registered = line(&mut scenario, alice, "registered", Duration::from_secs(5));
            assert!(registered.ends_with(" over tcp"), "{registered}");
        }
    }
    let up = line(&mut scenario, true, "path-up", Duration::from_secs(15));
    assert!(up.contains(" relayed "), "{up}");
    let up = line(&mut scenario, false, "path-up", Duration::from_secs(5));
    assert!(up.contains(" relayed "), "{up}");
    punch::udp_forward_both_ways(&scenario.lab, "through the relay over TCP");
    // The gateway counts the registrations by transport (as of its last sweep of
    // the registry, at most a second old).
    let on_tcp = (usize::from(a_blocked) + usize::from(b_blocked)) as f64;
    let want = [("udp", 2.0 - on_tcp), ("tcp", on_tcp), ("tls", 0.0)];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let text = scenario.gateway.scrape().expect("metrics");
        let counted = want.iter().all(|(transport, count)| {
            gateway_tests::daemon::metric_value(
                &text,
                "gateway_registered_peers_by_transport",
                &format!("transport=\"{transport}\""),
            ) == Some(*count)
        });
        if counted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "registrations by transport, want {want:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The sides with UDP never left it.
    for (alice, blocked) in [(true, a_blocked), (false, b_blocked)] {
        let lines = if alice {
            scenario.alice.seen()
        } else {
            scenario.bob.seen()
        };
        if !blocked {
            assert!(!lines.iter().any(|l| l.contains("trying tcp")), "{lines:?}");
        }
    }
}

#[test]
fn an_initiator_without_udp_is_relayed_over_tcp() {
    if !lab_available() {
        return;
    }
    relayed_over_tcp(NatPreset::udp_blocked(), NatPreset::port_restricted_cone());
}

#[test]
fn a_responder_without_udp_is_relayed_over_tcp() {
    if !lab_available() {
        return;
    }
    relayed_over_tcp(NatPreset::port_restricted_cone(), NatPreset::udp_blocked());
}

#[test]
fn two_sites_without_udp_meet_through_two_allocations() {
    if !lab_available() {
        return;
    }
    relayed_over_tcp(NatPreset::udp_blocked(), NatPreset::udp_blocked());
}

/// Drops TCP to the gateway's service port from site a's public address at the
/// gateway itself: only TLS on 443 passes (a network that allows HTTPS alone).
fn block_tcp_service_port(lab: &Lab) -> Result<(), LabError> {
    let wan = lab
        .site("a")
        .ok_or_else(|| LabError::Invalid("no site a".into()))?
        .wan_addr();
    lab.server().sh(&format!(
        "nft add table inet https_only && \
         nft add chain inet https_only input '{{ type filter hook input priority -10; }}' && \
         nft add rule inet https_only input ip saddr {wan} tcp dport 3478 drop"
    ))?;
    Ok(())
}

/// Alice's site drops UDP and, at the gateway, her TCP to the service port: only
/// TLS on 443 passes. The gateway's certificate (from a test CA alice trusts with
/// `--tls-ca`) names `sans`; alice gets `--server-tls 192.0.2.10` and `alice_args`.
/// The directory holding the certificates comes back too: keep it while the
/// scenario runs (the agent may not have read its CA file yet).
fn https_only(sans: &str, alice_args: &[&str], bob_args: &[&str]) -> (PunchLab, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = TestCa::new(dir.path());
    let (cert, key) = ca.leaf_with_names("gateway", 1, sans);
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let ca_pem = ca.cert.to_string_lossy().into_owned();
    let alice: Vec<&str> = ["--server-tls", "192.0.2.10", "--tls-ca", &ca_pem]
        .into_iter()
        .chain(alice_args.iter().copied())
        .collect();
    let scenario = punch::start_prepared(
        Topology::TwoSites(NatPreset::udp_blocked(), NatPreset::port_restricted_cone()),
        WanConditions::default(),
        &block_tcp_service_port,
        &[
            "--tls-listen",
            "0.0.0.0:443",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &alice,
        bob_args,
    )
    .expect("punch lab");
    (scenario, dir)
}

#[test]
fn a_site_that_allows_only_https_reaches_the_gateway_over_tls_on_443() {
    if !lab_available() {
        return;
    }
    let (mut scenario, _certificates) = https_only(
        "IP:192.0.2.10",
        &["--forward-listen", "127.0.0.1:5000"],
        &["--forward-to", "127.0.0.1:6000"],
    );
    let first = line(
        &mut scenario,
        true,
        "no answer from",
        Duration::from_secs(8),
    );
    assert!(first.contains("trying tcp"), "{first}");
    // TCP gets no answer either (its SYNs are dropped): TLS on 443 next.
    let tls = line(
        &mut scenario,
        true,
        "no answer from 192.0.2.10:3478 over tcp",
        Duration::from_secs(8),
    );
    assert!(
        tls.ends_with("over tcp for 3 s; trying tls to 192.0.2.10:443"),
        "{tls}"
    );
    let registered = line(&mut scenario, true, "registered", Duration::from_secs(5));
    assert!(registered.ends_with(" over tls"), "{registered}");
    let up = line(&mut scenario, true, "path-up", Duration::from_secs(15));
    assert!(up.contains(" relayed "), "{up}");
    punch::udp_forward_both_ways(&scenario.lab, "through the relay over TLS");
}

#[test]
fn a_certificate_for_another_name_is_refused_and_said() {
    if !lab_available() {
        return;
    }
    // The gateway's certificate names another address than the agent dials.
    let (mut scenario, _certificates) = https_only("IP:192.0.2.99", &[], &[]);
    let failed = line(
        &mut scenario,
        true,
        "tls connection to the gateway failed",
        Duration::from_secs(15),
    );
    assert!(failed.contains("trying udp"), "{failed}");
    assert!(
        !scenario
            .alice
            .seen()
            .iter()
            .any(|l| l.starts_with("registered")),
        "{:?}",
        scenario.alice.seen()
    );
}

#[test]
fn a_site_without_udp_still_gets_tcp_hole_punching() {
    if !lab_available() {
        return;
    }
    // Introduced over its TCP connection, the UDP-less side runs TCP punching like
    // any other (both NATs map endpoint-independently and drop unsolicited SYNs:
    // simultaneous open works, docs/tcp-splicing.md).
    let tcp = ["--tcp", "simultaneous-open"];
    let mut scenario = punch::start_under(
        Topology::TwoSites(NatPreset::udp_blocked(), NatPreset::port_restricted_cone()),
        WanConditions::default(),
        &[],
        &tcp,
        &tcp,
    )
    .expect("punch lab");
    let registered = line(&mut scenario, true, "registered", Duration::from_secs(8));
    assert!(registered.ends_with(" over tcp"), "{registered}");
    let up = line(&mut scenario, true, "tcp-path-up", Duration::from_secs(15));
    assert!(up.contains("technique simultaneous-open"), "{up}");
    line(&mut scenario, false, "tcp-path-up", Duration::from_secs(5));
}
