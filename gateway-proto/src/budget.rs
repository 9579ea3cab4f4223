//! Reply budgets: how much the gateway may send back to sources it has not
//! authenticated, so a spoofed-source flood can neither reflect traffic at a victim
//! nor use up the replies that new clients need.
//!
//! A [`ReplyBudget`] is two token buckets deep. Every source address (an IPv4
//! address, or an IPv6 /64: what one host can cheaply vary) has its own bucket, so
//! one source, or a victim whose address a flood forges, gets at most its burst and
//! then its rate; and all sources together share a total bucket, which bounds the
//! reflected bandwidth when the flood forges many addresses. Both refill
//! continuously, so after a flood has drained the total, the replies that trickle in
//! go to whoever asks, not to whoever asked first in the second.
//!
//! Memory is fixed: the per-source buckets live in a table of [`SOURCE_SLOTS`] slots
//! chosen by a keyed hash (the key is secret, so a flood cannot aim at a victim's
//! slot). A source whose slot another source holds takes it over with a fresh bucket;
//! a flood of forged sources thereby refreshes others' buckets, but the total bucket
//! still bounds the sum.
use std::{
    hash::{DefaultHasher, Hash, Hasher},
    net::IpAddr,
    time::Instant,
};

/// Slots in the per-source table (each 32 bytes: 128 KiB in all).
pub const SOURCE_SLOTS: usize = 4096;

/// Tokens are counted in thousandths, so rates below one per millisecond refill
/// smoothly.
const MILLI: u64 = 1_000;

/// Replies per second to one source by default (bursts of twice that): room for a
/// carrier-grade NAT's worth of clients behind one address starting at once.
pub const DEFAULT_PER_SOURCE: u32 = 50;

/// The limits of one [`ReplyBudget`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyBudgetConfig {
    /// Replies per second to one source, sustained; 0: no budget at all, neither per
    /// source nor in total (for benchmarks, whose whole load comes from one address
    /// and which compare with servers that have no such budget).
    pub per_source_per_second: u32,
    /// Replies one source may get at once (its bucket's depth).
    pub per_source_burst: u32,
    /// Replies per second to all sources together (also the total bucket's depth:
    /// one second's worth may go at once).
    pub total_per_second: u32,
}

impl ReplyBudgetConfig {
    /// `total_per_second` in all, with the default per-source limits
    /// ([`DEFAULT_PER_SOURCE`] per second, bursts of twice that).
    pub const fn with_total(total_per_second: u32) -> Self {
        Self::new(DEFAULT_PER_SOURCE, total_per_second)
    }

    /// `per_source` per second to each source (bursts of twice that) and
    /// `total_per_second` in all; `per_source` 0 lifts the budget altogether.
    pub const fn new(per_source: u32, total_per_second: u32) -> Self {
        Self {
            per_source_per_second: per_source,
            per_source_burst: per_source.saturating_mul(2),
            total_per_second,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Thousandths of a reply.
    milli_tokens: u64,
    last: Instant,
}

impl Bucket {
    fn full(depth: u32, now: Instant) -> Self {
        Self {
            milli_tokens: u64::from(depth) * MILLI,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, per_second: u32, depth: u32) {
        let elapsed = now.saturating_duration_since(self.last);
        // Thousandths of a token per microsecond times rate: rate * µs / 1000.
        let added = u64::from(per_second).saturating_mul(elapsed.as_micros() as u64) / MILLI;
        if added > 0 {
            self.milli_tokens = self
                .milli_tokens
                .saturating_add(added)
                .min(u64::from(depth) * MILLI);
            self.last = now;
        }
    }

    fn has_one(&self) -> bool {
        self.milli_tokens >= MILLI
    }

    fn take_one(&mut self) {
        self.milli_tokens -= MILLI;
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    tag: u64,
    bucket: Bucket,
}

/// Per-source and total reply budgets (see the module documentation).
#[derive(Debug)]
pub struct ReplyBudget {
    config: ReplyBudgetConfig,
    total: Option<Bucket>,
    slots: Vec<Option<Slot>>,
    key: [u8; 16],
}

impl ReplyBudget {
    /// A budget with `config`'s limits; `key` (secret, random per process) picks
    /// the slots.
    pub fn new(config: ReplyBudgetConfig, key: [u8; 16]) -> Self {
        Self {
            config,
            total: None,
            slots: vec![None; SOURCE_SLOTS],
            key,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> ReplyBudgetConfig {
        self.config
    }

    /// Spends one reply to `source` if both its bucket and the total have one; true
    /// when the reply may be sent.
    pub fn allow(&mut self, now: Instant, source: IpAddr) -> bool {
        let config = self.config;
        if config.per_source_per_second == 0 {
            return true;
        }
        let total = self
            .total
            .get_or_insert_with(|| Bucket::full(config.total_per_second, now));
        total.refill(now, config.total_per_second, config.total_per_second);
        if !total.has_one() {
            return false;
        }
        let tag = self.tag(source);
        let index = (tag % SOURCE_SLOTS as u64) as usize;
        let slot = match &mut self.slots[index] {
            Some(slot) if slot.tag == tag => {
                slot.bucket
                    .refill(now, config.per_source_per_second, config.per_source_burst);
                slot
            }
            other => other.insert(Slot {
                tag,
                bucket: Bucket::full(config.per_source_burst, now),
            }),
        };
        if !slot.bucket.has_one() {
            return false;
        }
        slot.bucket.take_one();
        if let Some(total) = &mut self.total {
            total.take_one();
        }
        true
    }

    /// The keyed hash of `source`'s budget unit (IPv4 address or IPv6 /64).
    fn tag(&self, source: IpAddr) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.key.hash(&mut hasher);
        match source.to_canonical() {
            IpAddr::V4(v4) => v4.octets().hash(&mut hasher),
            IpAddr::V6(v6) => v6.octets()[..8].hash(&mut hasher),
        }
        hasher.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn one_source_gets_its_burst_then_its_rate() {
        let mut budget = ReplyBudget::new(ReplyBudgetConfig::with_total(10_000), [1; 16]);
        let start = Instant::now();
        let granted = (0..300)
            .filter(|_| budget.allow(start, ip("198.51.100.7")))
            .count();
        assert_eq!(granted, 100, "the burst, not the 300 asked");
        // Another source is not affected by the first one's flood.
        assert!(budget.allow(start, ip("198.51.100.8")));
        // A second later, one second's rate more.
        let later = start + Duration::from_secs(1);
        let granted = (0..300)
            .filter(|_| budget.allow(later, ip("198.51.100.7")))
            .count();
        assert_eq!(granted, 50);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let mut budget = ReplyBudget::new(ReplyBudgetConfig::with_total(10_000), [2; 16]);
        let now = Instant::now();
        let granted = (0..200u16)
            .filter(|i| {
                let source = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, *i, 0, 0, 1));
                budget.allow(now, source)
            })
            .count();
        assert_eq!(granted, 100, "varying the interface id buys nothing");
        for _ in 0..100 {
            assert!(budget.allow(now, ip("192.0.2.1")));
        }
        assert!(!budget.allow(now, ip("::ffff:192.0.2.1")));
    }

    #[test]
    fn the_total_bounds_a_flood_of_forged_sources_and_refills_smoothly() {
        let mut budget = ReplyBudget::new(ReplyBudgetConfig::with_total(1_000), [3; 16]);
        let start = Instant::now();
        let granted = (0..10_000u32)
            .filter(|i| budget.allow(start, IpAddr::from((0x0A00_0000 + i).to_be_bytes())))
            .count();
        assert_eq!(granted, 1_000);
        // 10 ms later, 10 replies' worth has come back: for anyone.
        let later = start + Duration::from_millis(10);
        let granted = (0..100u32)
            .filter(|i| budget.allow(later, IpAddr::from((0x0B00_0000 + i).to_be_bytes())))
            .count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn zero_per_source_lifts_the_budget() {
        let mut budget = ReplyBudget::new(ReplyBudgetConfig::new(0, 500), [5; 16]);
        let now = Instant::now();
        let granted = (0..1_000)
            .filter(|_| budget.allow(now, ip("127.0.0.1")))
            .count();
        assert_eq!(granted, 1_000);
    }

    proptest! {
        #[test]
        fn never_more_than_the_total_in_any_second(
            sources in proptest::collection::vec(any::<u32>(), 1..2_000),
            step_us in 0u64..2_000,
        ) {
            let config = ReplyBudgetConfig {
                per_source_per_second: 5,
                per_source_burst: 3,
                total_per_second: 100,
            };
            let mut budget = ReplyBudget::new(config, [4; 16]);
            let start = Instant::now();
            let mut granted = Vec::new();
            for (i, source) in sources.iter().enumerate() {
                let now = start + Duration::from_micros(step_us * i as u64);
                if budget.allow(now, IpAddr::from(source.to_be_bytes())) {
                    granted.push(now);
                }
            }
            // Depth plus refill: at most 2 x total in any one-second window.
            for (i, at) in granted.iter().enumerate() {
                let within = granted[i..].iter().take_while(|t| t.saturating_duration_since(*at) < Duration::from_secs(1)).count();
                prop_assert!(within <= 200, "{within} replies within a second");
            }
        }
    }
}
