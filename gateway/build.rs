//! Embeds the eBPF object built by `cargo xtask build-ebpf`, when there is one.
//!
//! The gateway builds without it (a plain `cargo build` needs no eBPF toolchain); the
//! binary then says at run time that eBPF counters are unavailable and names the
//! command that builds them. `GATEWAY_EBPF_OBJECT` points at another object file.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(gateway_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=GATEWAY_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("GATEWAY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/gateway-ebpf")
        });
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("gateway-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) if !bytes.is_empty() => {
            fs::write(&out, bytes).expect("write OUT_DIR/gateway-ebpf.o");
            println!("cargo::rustc-cfg=gateway_ebpf_embedded");
        }
        _ => {
            fs::write(&out, []).expect("write OUT_DIR/gateway-ebpf.o");
            println!(
                "cargo::warning=eBPF object not found at {}: building the gateway without eBPF \
                 counters (run `cargo xtask setup && cargo xtask build-ebpf` to include them)",
                object.display()
            );
        }
    }
}
