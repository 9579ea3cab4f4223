//! Fuzzes the TURN client with datagrams from its server at every stage (allocating,
//! challenged, allocated with a permission and a channel): no input may panic, and
//! what the client sends must parse.
//!
//! The input is cut into datagrams at 0xFF bytes. A datagram's first byte picks how it
//! is used: as raw bytes; as the body of a STUN message carrying the transaction id of
//! the client's latest request (so the fuzzer reaches the response handling without
//! guessing 96 random bits); or as attributes of a well-formed response signed with the
//! key the client uses after a challenge with realm "fuzz" (so it gets past
//! authentication).
#![no_main]

use std::time::{Duration, Instant};

use gateway::proto::{
    stun::{
        Class, HEADER_LEN, MAGIC_COOKIE, Message, MessageType, MessageWriter, attr as stun_attr,
    },
    turn::{
        attr,
        client::{Client, ClientConfig},
        long_term_key,
    },
};
use libfuzzer_sys::fuzz_target;

const USERNAME: &str = "1900000000:alice";
const PASSWORD: &str = "pw";

/// Attribute types the client reads, indexed by a fuzz byte.
const TYPES: [u16; 9] = [
    attr::XOR_RELAYED_ADDRESS,
    stun_attr::XOR_MAPPED_ADDRESS,
    attr::LIFETIME,
    stun_attr::ERROR_CODE,
    stun_attr::NONCE,
    stun_attr::REALM,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::CHANNEL_NUMBER,
];

fn shaped(latest: &[u8], body: &[u8]) -> Vec<u8> {
    let (ty, rest) = body.split_at(body.len().min(2));
    let mut out = Vec::with_capacity(HEADER_LEN + rest.len());
    let mut type_bytes = [0u8; 2];
    type_bytes[..ty.len()].copy_from_slice(ty);
    type_bytes[0] &= 0x3F;
    out.extend_from_slice(&type_bytes);
    let len = u16::try_from(rest.len() / 4 * 4).unwrap_or(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(latest.get(8..20).unwrap_or(&[0; 12]));
    out.extend_from_slice(&rest[..usize::from(len)]);
    out
}

fn signed(latest: &[u8], body: &[u8]) -> Vec<u8> {
    let Ok(request) = Message::parse(latest) else {
        return Vec::new();
    };
    let class = match body.first().copied().unwrap_or(0) % 3 {
        0 => Class::Success,
        1 => Class::Error,
        _ => Class::Indication,
    };
    let mut out = Vec::new();
    let mut writer = MessageWriter::new(
        &mut out,
        MessageType {
            method: request.message_type().method,
            class,
        },
        request.transaction_id(),
    );
    let mut rest = body.get(1..).unwrap_or_default();
    while let [selector, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let ty = TYPES[usize::from(*selector) % TYPES.len()];
        writer.attribute(ty, &tail[..len]);
        rest = &tail[len..];
    }
    writer
        .attribute(stun_attr::REALM, b"fuzz")
        .message_integrity(&long_term_key(USERNAME, "fuzz", PASSWORD));
    writer.finish_with_fingerprint();
    out
}

fuzz_target!(|data: &[u8]| {
    let server = "192.0.2.10:3478".parse().expect("literal");
    let peer: std::net::SocketAddr = "203.0.113.5:7000".parse().expect("literal");
    let start = Instant::now();
    let mut client = Client::new(ClientConfig::new(server, USERNAME, PASSWORD), 1);
    let _ = client.allocate(start);
    let mut latest: Vec<u8> = Vec::new();
    let mut now = start;
    for chunk in data.split(|&b| b == 0xFF) {
        while let Some(transmit) = client.poll_transmit() {
            assert!(Message::parse(&transmit.payload).is_ok());
            latest = transmit.payload;
        }
        let (mode, body) = chunk.split_first().map_or((0, chunk), |(m, b)| (*m, b));
        let datagram = match mode % 3 {
            0 => body.to_vec(),
            1 => shaped(&latest, body),
            _ => signed(&latest, body),
        };
        if let Some(received) = client.handle_datagram(now, server, &datagram) {
            assert!(received.data.len() <= datagram.len());
        }
        let _ = client.create_permission(now, peer.ip());
        let _ = client.bind_channel(now, peer);
        let mut out = Vec::new();
        if client.encode_send(peer, body, &mut out).is_ok() {
            assert!(out.len() >= body.len());
        }
        now += Duration::from_millis(u64::from(mode) * 100);
        client.handle_timeout(now);
        while client.poll_event().is_some() {}
    }
    client.close(now);
    while let Some(transmit) = client.poll_transmit() {
        assert!(Message::parse(&transmit.payload).is_ok());
    }
});
