//! Fuzzes the cluster's decoders (registry entries read from Redis, node-to-node
//! messages read from an inbox stream): no input may panic, and whatever decodes
//! encodes back to something that decodes to the same value.
#![no_main]

use gateway::proto::rendezvous::cluster::{ClusterMessage, PeerEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = PeerEntry::decode(data) {
        assert_eq!(PeerEntry::decode(&entry.encode()).ok(), Some(entry));
    }
    if let Ok(message) = ClusterMessage::decode(data) {
        assert_eq!(ClusterMessage::decode(&message.encode()).ok(), Some(message));
    }
});
