//! A reduced NAT matrix under the `continental` WAN profile (80 ms RTT): one cell of
//! each way of connecting (a cone pair, port prediction, birthday punching, a relayed
//! pair), so CI exercises the timing of introductions, probes and the relay fallback
//! at a real round-trip time. The full matrix under delayed profiles is
//! `cargo xtask wan-matrix` (figures in docs/nat-matrix.md).
use std::time::Duration;

use gateway_tests::{
    lab::{WanProfile, lab_available},
    punch::{self, PathSeen, Topology},
};

fn cell(a: &str, b: &str, expected: PathSeen) {
    let topology = Topology::TwoSites(a.parse().expect("preset"), b.parse().expect("preset"));
    let profile = WanProfile::Continental;
    let mut scenario =
        punch::start_under(topology, profile.conditions(), &[], &[], &[]).expect("punch lab");
    let path = scenario.wait_path(Duration::from_secs(20));
    let seen = format!(
        "alice {:?}\nbob {:?}",
        scenario.alice.seen(),
        scenario.bob.seen()
    );
    println!("{a} | {b} under {}: {path:?}", profile.name());
    assert_eq!(
        path.map(|(kind, _)| kind),
        Some(expected),
        "{a} | {b}: {seen}"
    );
}

#[test]
fn cone_pair_punches_directly_under_continental() {
    if !lab_available() {
        return;
    }
    cell(
        "port-restricted-cone",
        "port-restricted-cone",
        PathSeen::Direct,
    );
}

#[test]
fn prediction_pair_punches_directly_under_continental() {
    if !lab_available() {
        return;
    }
    cell(
        "symmetric-sequential",
        "port-restricted-cone",
        PathSeen::Direct,
    );
}

#[test]
fn birthday_pair_punches_directly_under_continental() {
    if !lab_available() {
        return;
    }
    cell("symmetric", "port-restricted-cone", PathSeen::Direct);
}

#[test]
fn hopeless_pair_is_relayed_under_continental() {
    if !lab_available() {
        return;
    }
    cell("symmetric", "symmetric", PathSeen::Relayed);
}
