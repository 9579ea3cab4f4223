//! Two rounds of the churn soak (tests/src/soak.rs) in the NAT lab: the code path
//! `cargo xtask soak` runs for 30 minutes. Punched and relayed agent pairs and TURN
//! allocations over UDP and TCP carry checked data; nothing may be lost or changed,
//! and the allocations of TURN clients and of agents stopped with SIGTERM must be
//! gone from the gateway.
use std::time::Duration;

use gateway_tests::{
    lab::lab_available,
    soak::{self, SoakConfig},
};

#[test]
fn two_churn_rounds_relay_every_byte_and_delete_what_clients_closed() {
    if !lab_available() {
        return;
    }
    let config = SoakConfig {
        duration: Duration::from_secs(3600),
        max_rounds: 2,
        datagrams: 20,
        turn_clients: 1,
        settle: Duration::ZERO,
    };
    let report = soak::run(&config, |line| eprintln!("{line}")).expect("soak");
    assert_eq!(report.rounds, 2);
    assert_eq!((report.direct_pairs, report.relayed_pairs), (2, 2));
    assert_eq!((report.turn_udp, report.turn_tcp), (2, 2));
    assert_eq!(report.lost, 0, "{report:?}");
    // 20 datagrams each way per pair and client, 16..1115 bytes each.
    assert!(report.bytes_checked >= 8 * 2 * 20 * 16, "{report:?}");
    // The TURN clients deleted their allocations and the agents released theirs
    // on SIGTERM: nothing is left to expire.
    let end = report.end().expect("a reading");
    assert_eq!(end.allocations, 0.0, "{report:?}");
}
