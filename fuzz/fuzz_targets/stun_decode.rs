//! Fuzzes the STUN decoder and the Binding service: no input may panic, and any reply
//! must itself parse and stay small.
#![no_main]

use gateway::proto::{binding::BindingService, stun::Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::parse(data) {
        for attribute in message.attributes() {
            let _ = attribute;
        }
    }
    let mut out = Vec::new();
    let from = "203.0.113.9:4000".parse().expect("literal");
    BindingService.handle(from, data, &mut out);
    if !out.is_empty() {
        assert!(Message::parse(&out).is_ok());
        assert!(out.len() <= 80);
    }
});
