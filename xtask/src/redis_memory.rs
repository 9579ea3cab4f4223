//! `cargo xtask bench-redis-memory` (also `cargo xtask bench-rendezvous
//! --redis-memory-peers N`): what the cluster's registry costs Redis per registered
//! peer. Starts a fresh `redis-server` (loopback, no persistence), writes N realistic
//! registrations with the driver's own encoding and key naming (`SET gw:peer:<id>
//! <PeerEntry> EX 60`, pipelined), and reports `INFO memory` `used_memory` before and
//! after, divided by N, with `MEMORY USAGE` and the sizes of a sample of keys. No
//! gateway binary is needed.
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use gateway::{
    cluster::peer_key,
    proto::rendezvous::{
        cluster::PeerEntry,
        wire::{Candidate, CandidateKind, NatClass},
    },
};
use gateway_tests::redis::RedisServer;

/// Options of `cargo xtask bench-redis-memory`.
#[derive(Debug, clap::Args)]
pub struct RedisMemoryArgs {
    /// Registrations to write.
    #[arg(long, default_value_t = 1_000_000)]
    pub peers: usize,
    /// Commands per pipelined batch.
    #[arg(long, default_value_t = 2_000)]
    pub batch: usize,
}

/// The TTL the driver gives every key (the default registration lifetime).
const TTL_SECONDS: u64 = 60;

/// A deterministic, well-spread 32-bit value for `i` (a multiplicative hash).
fn spread(i: usize, salt: u32) -> u32 {
    let x = (i as u32).wrapping_add(salt).wrapping_mul(0x9E37_79B1);
    x ^ (x >> 15)
}

/// A public-looking IPv4 address (first octet 11..=200, avoiding the private and
/// reserved ranges' first octets).
fn public_ip(i: usize) -> Ipv4Addr {
    let x = spread(i, 1);
    let first = 11 + (x % 190) as u8;
    let first = if first == 100 || first == 127 || first == 172 {
        first + 1
    } else {
        first
    };
    Ipv4Addr::new(
        first,
        (x >> 8) as u8,
        (x >> 16) as u8,
        1 + (x >> 24) as u8 % 254,
    )
}

fn port(i: usize, salt: u32) -> u16 {
    1_024 + (spread(i, salt) % 64_000) as u16
}

/// Peer `i` as a node would store it: IPv4 behind a NAT, two host candidates (a LAN
/// and a VPN/container address) and the TCP mapping, a NAT class and an RTT.
pub fn realistic_entry(i: usize, nodes: usize, now_unix: u64) -> PeerEntry {
    let public = public_ip(i);
    let lan = Ipv4Addr::new(
        192,
        168,
        (spread(i, 2) % 8) as u8,
        2 + (spread(i, 3) % 250) as u8,
    );
    let vpn = Ipv4Addr::new(
        10,
        (spread(i, 4) % 256) as u8,
        (spread(i, 5) % 256) as u8,
        2,
    );
    let host_port = port(i, 6);
    let nat = match spread(i, 7) % 10 {
        0..=5 => NatClass::EndpointIndependent,
        6 | 7 => NatClass::AddressDependent,
        8 => NatClass::AddressAndPortDependent,
        _ => NatClass::None,
    };
    PeerEntry {
        peer_id: format!("peer-{i:06}"),
        node: format!("gw-eu-{}", 1 + i % nodes.max(1)),
        addr: SocketAddr::V4(SocketAddrV4::new(public, port(i, 8))),
        // Credentials issued for a day, some hours ago.
        expiry_unix: now_unix + 86_400 - u64::from(spread(i, 9) % 43_200),
        candidates: vec![
            Candidate {
                kind: CandidateKind::Host,
                addr: SocketAddr::V4(SocketAddrV4::new(lan, host_port)),
            },
            Candidate {
                kind: CandidateKind::Host,
                addr: SocketAddr::V4(SocketAddrV4::new(vpn, host_port)),
            },
            Candidate {
                kind: CandidateKind::TcpServerReflexive,
                addr: SocketAddr::V4(SocketAddrV4::new(public, port(i, 10))),
            },
        ],
        nat,
        rtt_ms: 5 + spread(i, 11) % 250,
        registered_unix_ms: (now_unix - u64::from(spread(i, 12) % 50)) * 1_000,
    }
}

/// Appends one RESP command.
fn resp(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// `field:value` of an `INFO` answer.
fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines().find_map(|l| {
        let (name, value) = l.trim().split_once(':')?;
        (name == field).then(|| value.trim().parse().ok()).flatten()
    })
}

fn used_memory(redis: &RedisServer) -> Result<u64> {
    let info = redis.cli(&["INFO", "memory"])?;
    info_field(&info, "used_memory").context("no used_memory in INFO memory")
}

/// The target: Redis memory per registered peer, bytes.
const TARGET_BYTES_PER_PEER: f64 = 300.0;

/// Runs the measurement and prints its table.
pub fn bench_redis_memory(args: &RedisMemoryArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("gateway-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let redis = RedisServer::start(&dir)?;
    let version = redis.cli(&["INFO", "server"])?;
    let version = version
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let before = used_memory(&redis)?;

    let stream = TcpStream::connect(redis.addr())?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let ttl = TTL_SECONDS.to_string();
    let started = Instant::now();
    let mut buffer = Vec::with_capacity(args.batch * 128);
    let mut line = String::new();
    let mut value_bytes = 0usize;
    let mut key_bytes = 0usize;
    let mut written = 0;
    while written < args.peers {
        let count = args.batch.max(1).min(args.peers - written);
        buffer.clear();
        for i in written..written + count {
            let entry = realistic_entry(i, 3, now_unix);
            let key = peer_key(&entry.peer_id);
            let value = entry.encode();
            key_bytes += key.len();
            value_bytes += value.len();
            resp(
                &mut buffer,
                &[b"SET", key.as_bytes(), &value, b"EX", ttl.as_bytes()],
            );
        }
        writer.write_all(&buffer)?;
        for _ in 0..count {
            line.clear();
            reader.read_line(&mut line)?;
            if line != "+OK\r\n" {
                bail!("Redis answered {line:?} to a SET");
            }
        }
        written += count;
    }
    let elapsed = started.elapsed();
    drop(writer);
    drop(reader);
    let keys: usize = redis.cli(&["DBSIZE"])?.parse().unwrap_or(0);
    if keys != args.peers {
        bail!(
            "DBSIZE is {keys} after writing {} keys (expired already?)",
            args.peers
        );
    }
    let after = used_memory(&redis)?;
    let n = args.peers.max(1) as f64;
    let per_peer = after.saturating_sub(before) as f64 / n;
    let info = redis.cli(&["INFO", "memory"])?;
    let overhead = info_field(&info, "used_memory_overhead").unwrap_or(0);
    let dataset = info_field(&info, "used_memory_dataset").unwrap_or(0);
    let allocator = info
        .lines()
        .find_map(|l| l.strip_prefix("mem_allocator:"))
        .unwrap_or("?")
        .trim()
        .to_owned();

    // A sample: MEMORY USAGE (key, value, its dict entry; not the hash tables'
    // buckets nor the expires entry) and the encoding.
    let mut samples = Vec::new();
    for i in [
        0,
        args.peers / 3,
        args.peers / 2,
        args.peers.saturating_sub(1),
    ] {
        let entry = realistic_entry(i, 3, now_unix);
        let key = peer_key(&entry.peer_id);
        let usage = redis.cli(&["MEMORY", "USAGE", &key, "SAMPLES", "0"])?;
        let encoding = redis.cli(&["OBJECT", "ENCODING", &key])?;
        samples.push((key, entry.encode().len(), usage, encoding));
    }

    println!(
        "Redis {version} ({allocator}), fresh, no persistence, port {}",
        redis.port
    );
    println!(
        "wrote {} registrations (SET gw:peer:<id> <PeerEntry v1> EX {TTL_SECONDS}, pipelined \
         {} per batch) in {:.2} s ({:.0}/s); mean key {:.1} bytes, mean value {:.1} bytes",
        args.peers,
        args.batch,
        elapsed.as_secs_f64(),
        n / elapsed.as_secs_f64(),
        key_bytes as f64 / n,
        value_bytes as f64 / n,
    );
    println!();
    println!(
        "| peers | used_memory before | used_memory after | bytes per peer | of which overhead (dict, expires) / dataset, per peer |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {:.1} MiB | {:.1} MiB | {per_peer:.1} | {:.1} / {:.1} |",
        args.peers,
        before as f64 / 1_048_576.0,
        after as f64 / 1_048_576.0,
        overhead as f64 / n,
        dataset as f64 / n,
    );
    println!();
    println!("| sample key | value bytes | MEMORY USAGE | encoding |");
    println!("|---|---|---|---|");
    for (key, value, usage, encoding) in samples {
        println!("| `{key}` | {value} | {usage} | {encoding} |");
    }
    println!();
    println!(
        "{per_peer:.0} bytes per registered peer in Redis: {} the target of at most \
         {TARGET_BYTES_PER_PEER:.0}",
        if per_peer <= TARGET_BYTES_PER_PEER {
            "within"
        } else {
            "OVER"
        }
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
