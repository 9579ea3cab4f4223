//! The rendezvous core's cost per request, next to the plain STUN Binding service as
//! the baseline measured in the same run (see docs/benchmarks.md).
use std::{
    hint::black_box,
    net::SocketAddr,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway::proto::{
    binding::{BindingService, binding_request},
    credentials::SharedSecret,
    rendezvous::{
        RendezvousConfig, RendezvousHandled, RendezvousServer,
        client::{self, PeerCredentials},
        wire::NatClass,
    },
};

const NOW_UNIX: u64 = 1_800_000_000;
const PAIRS: usize = 1_000;

fn creds(secret: &SharedSecret, peer: &str) -> PeerCredentials {
    let issued = secret.issue(peer, NOW_UNIX + 3600).expect("issue");
    PeerCredentials {
        username: issued.username,
        password: issued.password,
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from((
        [198, 51, (i >> 8) as u8, i as u8],
        40_000 + (i % 1000) as u16,
    ))
}

/// Takes everything the server queued, as the driver does after each batch.
fn drain(server: &mut RendezvousServer) {
    while let Some(transmit) = server.poll_transmit() {
        black_box(transmit);
    }
    while let Some(event) = server.poll_event() {
        black_box(event);
    }
}

/// Handles one datagram at `now` and takes what it produced.
fn handle(
    server: &mut RendezvousServer,
    now: Instant,
    from: SocketAddr,
    datagram: &[u8],
) -> RendezvousHandled {
    let handled = server.handle_datagram(now, NOW_UNIX, from, None, datagram);
    drain(server);
    handled
}

fn bench(c: &mut Criterion) {
    let secret = SharedSecret::new(b"bench secret");
    let config = RendezvousConfig {
        max_connects_per_second: u32::MAX,
        ..RendezvousConfig::default()
    };
    let mut server = RendezvousServer::new(secret.clone(), config, 1);
    let now = Instant::now();
    let mut registers = Vec::new();
    let mut connects = Vec::new();
    for i in 0..2 * PAIRS {
        let c = creds(&secret, &format!("peer{i}"));
        // First contact brings the nonce bound to this address; then register.
        let hello = client::register([1; 12], &c, None, &[], NatClass::EndpointIndependent, 20);
        server.handle_datagram(now, NOW_UNIX, addr(i), None, &hello);
        let nonce = server
            .poll_transmit()
            .and_then(|t| client::parse_response(&t.payload, &c.password))
            .and_then(|r| r.nonce)
            .expect("a nonce on first contact");
        let register = client::register(
            [1; 12],
            &c,
            Some(&nonce),
            &[],
            NatClass::EndpointIndependent,
            20,
        );
        handle(&mut server, now, addr(i), &register);
        registers.push((addr(i), register));
        if i % 2 == 0 {
            connects.push((
                addr(i),
                client::connect([2; 12], &c, Some(&nonce), &format!("peer{}", i + 1)),
            ));
        }
    }
    assert_eq!(server.peer_count(), 2 * PAIRS);

    let mut group = c.benchmark_group("rendezvous_core");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    let mut request = Vec::new();
    binding_request([3; 12], &mut request);
    let mut reply = Vec::new();
    group.bench_function("stun_binding (baseline)", |b| {
        b.iter(|| BindingService.handle(black_box(addr(1)), black_box(&request), &mut reply))
    });
    let mut i = 0;
    group.bench_function("register_refresh", |b| {
        b.iter(|| {
            i = (i + 1) % registers.len();
            let (from, datagram) = &registers[i];
            handle(&mut server, now, *from, black_box(datagram))
        })
    });
    let mut j = 0;
    group.bench_function("connect_introduction", |b| {
        b.iter(|| {
            j = (j + 1) % connects.len();
            let (from, datagram) = &connects[j];
            handle(&mut server, now, *from, black_box(datagram))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
