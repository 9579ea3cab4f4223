//! WAN conditions for the lab: one-way delay per link and direction, jitter, loss,
//! reordering and a rate cap, applied in the core router by delaying NFQUEUE verdicts.
//!
//! This kernel has neither `sch_netem` nor `sch_fq`, so the lab emulates links itself.
//! Every packet arriving at the core and leaving it is queued to userspace (the
//! xtables `NFQUEUE` target in prerouting and postrouting through `iptables-nft`; the
//! kernel has no native nft `queue`), with its input or output link; the emulator
//! thread, running inside the core's namespace, only ever answers with a verdict
//! (accept now, accept later, drop) and never sends a payload back, so a packet is
//! never changed or created, and it crosses the core as one routing hop (one TTL
//! decrement) exactly as without the emulator. See `docs/lab.md`.
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    fmt, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{LabError, netns};

/// One direction of one link: what a packet crossing it experiences.
#[derive(Debug, Clone, PartialEq)]
pub struct Direction {
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Jitter: the standard deviation of a normal variation added to `delay`,
    /// truncated at ±2 standard deviations (and at zero delay). Jitter alone never
    /// reorders: a packet is never released before the previous one of its path.
    pub jitter: Duration,
    /// Probability (0..=1) that a packet is dropped.
    pub loss: f64,
    /// Probability (0..=1) that a packet is held back by `reorder_gap`, so later
    /// packets of its path overtake it.
    pub reorder: f64,
    /// How long a reordered packet is held back beyond its normal delay.
    pub reorder_gap: Duration,
    /// A rate cap in bits per second (IP packet lengths), if any.
    pub rate_bps: Option<u64>,
    /// With a rate cap: the most packets waiting for the link; more are dropped.
    pub queue_limit: usize,
}

impl Default for Direction {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            reorder_gap: Duration::from_millis(10),
            rate_bps: None,
            queue_limit: 1000,
        }
    }
}

impl Direction {
    /// A direction with a fixed delay and nothing else.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// A direction with a fixed delay of `ms` milliseconds.
    pub fn ms(ms: u64) -> Self {
        Self::delay(Duration::from_millis(ms))
    }

    /// With jitter (standard deviation of the normal variation).
    #[must_use]
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// With a loss probability.
    #[must_use]
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// With a reordering probability and the gap a reordered packet is held back by.
    #[must_use]
    pub fn reorder(mut self, p: f64, gap: Duration) -> Self {
        self.reorder = p;
        self.reorder_gap = gap;
        self
    }

    /// With a rate cap (bits per second) and a queue limit (packets).
    #[must_use]
    pub fn rate(mut self, bits_per_second: u64, queue_limit: usize) -> Self {
        self.rate_bps = Some(bits_per_second);
        self.queue_limit = queue_limit;
        self
    }

    /// Whether this direction changes nothing.
    pub fn is_ideal(&self) -> bool {
        self.delay.is_zero()
            && self.jitter.is_zero()
            && self.loss <= 0.0
            && self.reorder <= 0.0
            && self.rate_bps.is_none()
    }

    fn invalid_reason(&self) -> Option<String> {
        if !(0.0..=1.0).contains(&self.loss) || !(0.0..=1.0).contains(&self.reorder) {
            return Some("loss and reorder are probabilities in 0..=1".into());
        }
        if self.rate_bps == Some(0) {
            return Some("a rate cap of 0 bit/s".into());
        }
        if self.rate_bps.is_some() && self.queue_limit == 0 {
            return Some("a rate cap with a queue limit of 0".into());
        }
        None
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms", self.delay.as_secs_f64() * 1e3)?;
        if !self.jitter.is_zero() {
            write!(f, " ±{:.1} ms", self.jitter.as_secs_f64() * 1e3)?;
        }
        if self.loss > 0.0 {
            write!(f, ", {}% loss", self.loss * 100.0)?;
        }
        if self.reorder > 0.0 {
            write!(
                f,
                ", {}% reordered by {} ms",
                self.reorder * 100.0,
                self.reorder_gap.as_millis()
            )?;
        }
        if let Some(rate) = self.rate_bps {
            write!(f, ", {rate} bit/s (queue {})", self.queue_limit)?;
        }
        Ok(())
    }
}

/// A link between the core and a site (or the public segment): `up` is the direction
/// toward the core, `down` away from it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkConditions {
    /// Toward the core (a site's or the gateway's outgoing traffic).
    pub up: Direction,
    /// Away from the core (a site's or the gateway's incoming traffic).
    pub down: Direction,
}

impl LinkConditions {
    /// The same conditions both ways.
    pub fn symmetric(d: Direction) -> Self {
        Self {
            up: d.clone(),
            down: d,
        }
    }

    /// Whether the link changes nothing either way.
    pub fn is_ideal(&self) -> bool {
        self.up.is_ideal() && self.down.is_ideal()
    }
}

/// The conditions of every link of a lab: the public segment (the gateway's link),
/// every site's link, and per-site exceptions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WanConditions {
    /// The link between the core and the public segment (servers, Redis host).
    pub gateway: LinkConditions,
    /// Every site's link unless the site is named in `per_site`.
    pub sites: LinkConditions,
    /// Sites with their own conditions.
    pub per_site: Vec<(String, LinkConditions)>,
}

impl WanConditions {
    /// The conditions of the link of the site called `name`.
    pub fn site(&self, name: &str) -> &LinkConditions {
        self.per_site
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&self.sites, |(_, l)| l)
    }

    /// The same conditions, except for site `name`'s link.
    #[must_use]
    pub fn with_site(mut self, name: &str, link: LinkConditions) -> Self {
        self.per_site.retain(|(n, _)| n != name);
        self.per_site.push((name.to_owned(), link));
        self
    }

    /// Whether no link changes anything (the emulator is then not started at all).
    pub fn is_ideal(&self) -> bool {
        self.gateway.is_ideal()
            && self.sites.is_ideal()
            && self.per_site.iter().all(|(_, l)| l.is_ideal())
    }

    pub(crate) fn invalid_reason(&self) -> Option<String> {
        std::iter::once(&self.gateway)
            .chain(std::iter::once(&self.sites))
            .chain(self.per_site.iter().map(|(_, l)| l))
            .flat_map(|l| [&l.up, &l.down])
            .find_map(Direction::invalid_reason)
    }
}

/// Named WAN conditions (`cargo xtask lab up --profile NAME`, docs/lab.md). RTTs are
/// between two site hosts and between a site host and the gateway alike: each link
/// carries a quarter of the round trip each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanProfile {
    /// No emulation: today's sub-millisecond lab.
    Lan,
    /// 10 ms RTT.
    Metro,
    /// 80 ms RTT.
    Continental,
    /// 200 ms RTT, 10 ms jitter.
    Intercontinental,
    /// 40 ms one way from a site to the gateway and between the sites' uplinks, but
    /// 150 ms one way from the gateway (and from the other site) to a site.
    Asymmetric,
    /// 60 ms RTT, 30 ms jitter, 1 % loss and 0.5 % reordering per one-way path.
    Mobile,
}

/// A profile name that is not one of [`WanProfile::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown WAN profile {0:?}; known: lan, metro, continental, intercontinental, asymmetric, mobile"
)]
pub struct UnknownProfile(pub String);

impl WanProfile {
    /// Every profile.
    pub const ALL: [WanProfile; 6] = [
        Self::Lan,
        Self::Metro,
        Self::Continental,
        Self::Intercontinental,
        Self::Asymmetric,
        Self::Mobile,
    ];

    /// The profile's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lan => "lan",
            Self::Metro => "metro",
            Self::Continental => "continental",
            Self::Intercontinental => "intercontinental",
            Self::Asymmetric => "asymmetric",
            Self::Mobile => "mobile",
        }
    }

    /// The nominal round-trip time between two site hosts (and from a site host to the
    /// gateway, except for `asymmetric`, where that one is 190 ms).
    pub fn rtt(self) -> Duration {
        Duration::from_millis(match self {
            Self::Lan => 0,
            Self::Metro => 10,
            Self::Continental => 80,
            Self::Intercontinental => 200,
            Self::Asymmetric => 300,
            Self::Mobile => 60,
        })
    }

    /// The per-link conditions.
    pub fn conditions(self) -> WanConditions {
        // A one-way path crosses two links; jitter per link is the path's / sqrt(2),
        // loss and reordering per link half the path's.
        let quarter = |rtt_ms: u64, jitter_ms: f64| {
            LinkConditions::symmetric(
                Direction::delay(Duration::from_micros(rtt_ms * 250))
                    .jitter(Duration::from_secs_f64(jitter_ms / 1e3 / 2f64.sqrt())),
            )
        };
        match self {
            Self::Lan => WanConditions::default(),
            Self::Metro => WanConditions {
                gateway: quarter(10, 0.0),
                sites: quarter(10, 0.0),
                per_site: Vec::new(),
            },
            Self::Continental => WanConditions {
                gateway: quarter(80, 0.0),
                sites: quarter(80, 0.0),
                per_site: Vec::new(),
            },
            Self::Intercontinental => WanConditions {
                gateway: quarter(200, 10.0),
                sites: quarter(200, 10.0),
                per_site: Vec::new(),
            },
            Self::Asymmetric => WanConditions {
                gateway: LinkConditions::symmetric(Direction::ms(20)),
                sites: LinkConditions {
                    up: Direction::ms(20),
                    down: Direction::ms(130),
                },
                per_site: Vec::new(),
            },
            Self::Mobile => {
                let mut link = quarter(60, 30.0);
                for d in [&mut link.up, &mut link.down] {
                    d.loss = 0.005;
                    d.reorder = 0.0025;
                    d.reorder_gap = Duration::from_millis(30);
                }
                WanConditions {
                    gateway: link.clone(),
                    sites: link,
                    per_site: Vec::new(),
                }
            }
        }
    }

    /// One line for humans.
    pub fn summary(self) -> String {
        let c = self.conditions();
        match self {
            Self::Lan => "no emulation (sub-millisecond RTT)".to_owned(),
            _ => format!(
                "RTT {} ms between sites; site link up {}, down {}; gateway link up {}, down {}",
                self.rtt().as_millis(),
                c.sites.up,
                c.sites.down,
                c.gateway.up,
                c.gateway.down
            ),
        }
    }
}

impl FromStr for WanProfile {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownProfile(s.to_owned()))
    }
}

/// What the emulator did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WanStats {
    /// Packets the core queued to the emulator.
    pub packets: u64,
    /// Dropped by configured loss.
    pub lost: u64,
    /// Dropped because a rate-capped link's queue was full.
    pub queue_drops: u64,
    /// Held back for reordering.
    pub reordered: u64,
}

#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    reordered: AtomicU64,
}

/// The decision for one packet at one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Accept at this instant.
    Release { at: Instant, reordered: bool },
    /// Dropped by loss.
    Lost,
    /// Dropped at a full rate-cap queue.
    QueueFull,
}

struct DirState {
    cfg: Direction,
    busy_until: Option<Instant>,
    backlog: VecDeque<Instant>,
}

impl DirState {
    fn new(cfg: Direction) -> Self {
        Self {
            cfg,
            busy_until: None,
            backlog: VecDeque::new(),
        }
    }
}

/// Where a packet is when the core queues it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Stage {
    /// Arriving at the core (prerouting): the `up` direction of its input link.
    Up,
    /// Leaving the core (postrouting): the `down` direction of its output link.
    Down,
}

struct LinkState {
    dir: DirState,
    /// Last release on this link and direction: jitter never reorders.
    last: Option<Instant>,
}

/// Decides when each packet leaves: the emulator's model, without any I/O (unit-tested).
/// A link direction is a FIFO: a packet is released no earlier than the one before it
/// on the same link and direction, unless it was picked for reordering.
pub(crate) struct Scheduler {
    /// (ifindex in the core, stage) → that link direction's state.
    links: HashMap<(u32, Stage), LinkState>,
    rng: StdRng,
}

impl Scheduler {
    pub(crate) fn new(links: Vec<(u32, LinkConditions)>, seed: u64) -> Self {
        let mut map = HashMap::new();
        for (i, l) in links {
            for (stage, d) in [(Stage::Up, l.up), (Stage::Down, l.down)] {
                map.insert(
                    (i, stage),
                    LinkState {
                        dir: DirState::new(d),
                        last: None,
                    },
                );
            }
        }
        Self {
            links: map,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller.
        let u1: f64 = self.rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// The decision for a packet of `len` bytes queued `now` at `stage` on the core
    /// interface `ifindex` (its input link arriving, its output link leaving).
    /// Interfaces without conditions (the core's loopback) pass at once.
    pub(crate) fn schedule(
        &mut self,
        now: Instant,
        stage: Stage,
        ifindex: u32,
        len: usize,
    ) -> Decision {
        let normal = self.normal();
        let (loss_draw, reorder_draw): (f64, f64) = (self.rng.random(), self.rng.random());
        let Some(link) = self.links.get_mut(&(ifindex, stage)) else {
            return Decision::Release {
                at: now,
                reordered: false,
            };
        };
        let dir = &mut link.dir;
        if loss_draw < dir.cfg.loss {
            return Decision::Lost;
        }
        let mut t = now;
        if let Some(rate) = dir.cfg.rate_bps {
            while dir.backlog.front().is_some_and(|&done| done <= now) {
                dir.backlog.pop_front();
            }
            if dir.backlog.len() >= dir.cfg.queue_limit {
                return Decision::QueueFull;
            }
            let start = dir.busy_until.map_or(now, |b| b.max(now));
            let bits = u64::try_from(len).unwrap_or(u64::MAX).saturating_mul(8);
            let done = start + Duration::from_secs_f64(bits as f64 / rate as f64);
            dir.busy_until = Some(done);
            dir.backlog.push_back(done);
            t = done;
        }
        let sigma = dir.cfg.jitter.as_secs_f64();
        let delay = (dir.cfg.delay.as_secs_f64() + sigma * normal.clamp(-2.0, 2.0)).max(0.0);
        t += Duration::from_secs_f64(delay);
        if reorder_draw < dir.cfg.reorder {
            return Decision::Release {
                at: t + dir.cfg.reorder_gap,
                reordered: true,
            };
        }
        let t = link.last.map_or(t, |last| t.max(last));
        link.last = Some(t);
        Decision::Release {
            at: t,
            reordered: false,
        }
    }
}

// Netlink and nfnetlink_queue constants (linux/netlink.h, linux/netfilter/*.h).
const NETLINK_NETFILTER: i32 = 12;
const SOL_NETLINK: i32 = 270;
const NETLINK_NO_ENOBUFS: i32 = 5;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_PAYLOAD: u16 = 10;
const NF_INET_PRE_ROUTING: u8 = 0;
const NF_INET_POST_ROUTING: u8 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// The queue number the core's rule uses (queues are per network namespace).
pub(crate) const QUEUE_NUM: u16 = 0;
/// The kernel's queue length (packets waiting for a verdict); beyond it the kernel drops.
const KERNEL_QUEUE_MAXLEN: u32 = 65536;
/// Bytes of each packet copied to the emulator: the IPv4 header's total length field.
const COPY_RANGE: u32 = 20;

/// A netlink message builder.
struct NlMsg(Vec<u8>);

impl NlMsg {
    fn new(kind: u16, flags: u16, res_id: u16) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        v.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes()); // seq
        v.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        v.extend_from_slice(&[0, 0]); // nfgenmsg: AF_UNSPEC, NFNETLINK_V0
        v.extend_from_slice(&res_id.to_be_bytes());
        Self(v)
    }

    fn attr(mut self, kind: u16, payload: &[u8]) -> Self {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// A queued packet's metadata.
#[derive(Debug, Clone, Copy)]
struct Queued {
    id: u32,
    /// The netfilter hook (0 prerouting, 4 postrouting).
    hook: u8,
    indev: u32,
    outdev: u32,
    len: usize,
}

/// An nfnetlink_queue socket bound to [`QUEUE_NUM`] in the namespace it was opened in.
struct Nfq {
    fd: OwnedFd,
    buf: Vec<u8>,
}

fn cvt(rc: libc::c_long) -> io::Result<usize> {
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

impl Nfq {
    fn open() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        // SAFETY: a zeroed sockaddr_nl is valid (kernel picks the port id).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                raw,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        for (level, name, value) in [
            (SOL_NETLINK, NETLINK_NO_ENOBUFS, 1i32),
            (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20),
        ] {
            // SAFETY: setsockopt(2) with an int option value.
            let rc = unsafe {
                libc::setsockopt(
                    raw,
                    level,
                    name,
                    (&raw const value).cast(),
                    std::mem::size_of::<i32>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let mut q = Self {
            fd,
            buf: vec![0; 1 << 16],
        };
        q.config(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])?;
        let mut params = COPY_RANGE.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_PACKET);
        q.config(NFQA_CFG_PARAMS, &params)?;
        q.config(NFQA_CFG_QUEUE_MAXLEN, &KERNEL_QUEUE_MAXLEN.to_be_bytes())?;
        Ok(q)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) from a valid buffer.
        let rc = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        cvt(rc as libc::c_long).map(|_| ())
    }

    fn recv(&mut self, flags: i32) -> io::Result<usize> {
        // SAFETY: recv(2) into our buffer.
        let rc = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                flags,
            )
        };
        cvt(rc as libc::c_long)
    }

    /// Sends a config message and waits for its acknowledgement.
    fn config(&mut self, attr: u16, payload: &[u8]) -> io::Result<()> {
        let msg = NlMsg::new(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, QUEUE_NUM)
            .attr(attr, payload)
            .finish();
        self.send(&msg)?;
        loop {
            let n = self.recv(0)?;
            for (kind, body) in messages(&self.buf[..n]) {
                if kind == NLMSG_ERROR {
                    let errno = body
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, i32::from_ne_bytes);
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
            }
        }
    }

    /// Every packet waiting in the socket (none if it would block).
    fn drain(&mut self, out: &mut Vec<Queued>) -> io::Result<()> {
        loop {
            let n = match self.recv(libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for (kind, body) in messages(&self.buf[..n]) {
                if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    continue;
                }
                let mut q = Queued {
                    id: 0,
                    hook: u8::MAX,
                    indev: 0,
                    outdev: 0,
                    len: 0,
                };
                let mut have_id = false;
                for (a, v) in attrs(body.get(4..).unwrap_or_default()) {
                    let be32 = || {
                        v.get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(u32::from_be_bytes)
                    };
                    match a {
                        NFQA_PACKET_HDR => {
                            if let Some(id) = be32() {
                                q.id = id;
                                have_id = true;
                            }
                            // packet_id (4), hw_protocol (2), hook (1).
                            q.hook = v.get(6).copied().unwrap_or(u8::MAX);
                        }
                        NFQA_IFINDEX_INDEV => q.indev = be32().unwrap_or(0),
                        NFQA_IFINDEX_OUTDEV => q.outdev = be32().unwrap_or(0),
                        NFQA_PAYLOAD => {
                            q.len = v
                                .get(2..4)
                                .map_or(v.len(), |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
                        }
                        _ => {}
                    }
                }
                if have_id {
                    out.push(q);
                }
            }
        }
    }
}

/// A verdict message for packet `id`.
fn verdict(id: u32, verdict: u32) -> Vec<u8> {
    let mut hdr = verdict.to_be_bytes().to_vec();
    hdr.extend_from_slice(&id.to_be_bytes());
    NlMsg::new(NFQNL_MSG_VERDICT, NLM_F_REQUEST, QUEUE_NUM)
        .attr(NFQA_VERDICT_HDR, &hdr)
        .finish()
}

/// (type, body after the 16-byte header) of each netlink message in `buf`.
fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[16..len]));
        let aligned = len.div_ceil(4) * 4;
        buf = buf.get(aligned..).unwrap_or_default();
    }
    out
}

/// (type, payload) of each netlink attribute in `buf`.
fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        let aligned = len.div_ceil(4) * 4;
        buf = buf.get(aligned..).unwrap_or_default();
    }
    out
}

/// The running emulator of one lab: a thread inside the core's namespace. Stopped and
/// joined on drop (the lab drops it before deleting its namespaces).
pub(crate) struct Emulator {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Emulator {
    /// Starts the emulator in `core` for `links` (ifindex in the core → conditions),
    /// bound to its queue before returning, so the caller can then add the rule.
    pub(crate) fn start(
        core: &str,
        links: Vec<(u32, LinkConditions)>,
        seed: u64,
    ) -> Result<Self, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = std::path::Path::new(netns::NETNS_DIR).join(core);
        let file = std::fs::File::open(&path).map_err(|source| LabError::Setns {
            netns: core.to_owned(),
            source,
        })?;
        let (stop2, counters2) = (stop.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name(format!("wan-{core}"))
            .spawn(move || -> io::Result<()> {
                // SAFETY: setns(2) on an open namespace fd; only this thread moves.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
                drop(file);
                let q = match Nfq::open() {
                    Ok(q) => q,
                    Err(e) => {
                        let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let _ = ready_tx.send(Ok(()));
                run(q, Scheduler::new(links, seed), &stop2, &counters2)
            })
            .map_err(|source| LabError::Io {
                what: "spawning the WAN emulator".into(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                counters,
                thread: Some(thread),
            }),
            Ok(Err(source)) => {
                let _ = thread.join();
                Err(LabError::Io {
                    what: format!("opening the WAN emulator's queue in {core}"),
                    source,
                })
            }
            Err(_) => Err(LabError::Io {
                what: format!("starting the WAN emulator in {core}"),
                source: io::Error::other("its thread ended"),
            }),
        }
    }

    /// What it did so far.
    pub(crate) fn stats(&self) -> WanStats {
        WanStats {
            packets: self.counters.packets.load(Ordering::Relaxed),
            lost: self.counters.lost.load(Ordering::Relaxed),
            queue_drops: self.counters.queue_drops.load(Ordering::Relaxed),
            reordered: self.counters.reordered.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("NAT lab: the WAN emulator failed: {e}"),
                Err(_) => eprintln!("NAT lab: the WAN emulator panicked"),
            }
        }
    }
}

/// The emulator's loop: read queued packets, decide, answer verdicts when due.
fn run(
    mut q: Nfq,
    mut scheduler: Scheduler,
    stop: &AtomicBool,
    counters: &Counters,
) -> io::Result<()> {
    let mut pending: BinaryHeap<Reverse<(Instant, u64, u32)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut arrived = Vec::new();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while let Some(Reverse((at, _, id))) = pending.peek().copied() {
            if at > now {
                break;
            }
            pending.pop();
            out.extend_from_slice(&verdict(id, NF_ACCEPT));
        }
        flush(&q, &mut out)?;
        let wait = pending
            .peek()
            .map_or(Duration::from_millis(50), |Reverse((at, _, _))| {
                at.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::c_long::try_from(wait.as_nanos()).unwrap_or(50_000_000),
        };
        let mut pfd = libc::pollfd {
            fd: q.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: ppoll(2) on one valid pollfd with a valid timeout.
        let rc = unsafe { libc::ppoll(&raw mut pfd, 1, &raw const ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            continue;
        }
        arrived.clear();
        q.drain(&mut arrived)?;
        let now = Instant::now();
        for p in &arrived {
            counters.packets.fetch_add(1, Ordering::Relaxed);
            let decision = match p.hook {
                NF_INET_PRE_ROUTING => scheduler.schedule(now, Stage::Up, p.indev, p.len),
                NF_INET_POST_ROUTING => scheduler.schedule(now, Stage::Down, p.outdev, p.len),
                _ => Decision::Release {
                    at: now,
                    reordered: false,
                },
            };
            match decision {
                Decision::Lost => {
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(&verdict(p.id, NF_DROP));
                }
                Decision::QueueFull => {
                    counters.queue_drops.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(&verdict(p.id, NF_DROP));
                }
                Decision::Release { at, reordered } => {
                    if reordered {
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    if at <= now {
                        out.extend_from_slice(&verdict(p.id, NF_ACCEPT));
                    } else {
                        seq += 1;
                        pending.push(Reverse((at, seq, p.id)));
                    }
                }
            }
        }
        flush(&q, &mut out)?;
    }
    // Whatever still waits is released now: the lab is going away.
    for Reverse((_, _, id)) in pending.drain() {
        out.extend_from_slice(&verdict(id, NF_ACCEPT));
    }
    flush(&q, &mut out)
}

/// Sends the batched verdicts (several netlink messages per datagram, in order).
fn flush(q: &Nfq, out: &mut Vec<u8>) -> io::Result<()> {
    let mut start = 0;
    while start < out.len() {
        // Whole messages, at most about 32 KiB per datagram.
        let mut end = start;
        while end < out.len() && end - start < 32 << 10 {
            let len = u32::from_ne_bytes([out[end], out[end + 1], out[end + 2], out[end + 3]]);
            end += len as usize;
        }
        q.send(&out[start..end.min(out.len())])?;
        start = end;
    }
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Link 1 with `up`, link 2 with `down`; a packet from 1 to 2 crosses both.
    fn two_links(up: Direction, down: Direction) -> Scheduler {
        Scheduler::new(
            vec![
                (
                    1,
                    LinkConditions {
                        up,
                        down: Direction::default(),
                    },
                ),
                (
                    2,
                    LinkConditions {
                        up: Direction::default(),
                        down,
                    },
                ),
            ],
            7,
        )
    }

    /// Both stages of a packet forwarded from link `from` to link `to`.
    fn forward(s: &mut Scheduler, now: Instant, from: u32, to: u32, len: usize) -> Decision {
        match s.schedule(now, Stage::Up, from, len) {
            Decision::Release { at, reordered } => match s.schedule(at, Stage::Down, to, len) {
                Decision::Release { at, reordered: r } => Decision::Release {
                    at,
                    reordered: reordered || r,
                },
                other => other,
            },
            other => other,
        }
    }

    #[test]
    fn delays_add_up_per_direction() {
        let mut s = two_links(Direction::ms(30), Direction::ms(20));
        let now = Instant::now();
        let Decision::Release { at, .. } = forward(&mut s, now, 1, 2, 100) else {
            panic!("dropped")
        };
        assert_eq!(at - now, Duration::from_millis(50));
        // The other way crosses link 2 up and link 1 down: both ideal.
        let Decision::Release { at, .. } = forward(&mut s, now, 2, 1, 100) else {
            panic!("dropped")
        };
        assert_eq!(at, now);
        // A packet the core answers itself (an ICMP error) crosses link 1 up and back
        // down: only the up direction is set.
        let Decision::Release { at, .. } = s.schedule(now, Stage::Up, 1, 60) else {
            panic!("dropped")
        };
        assert_eq!(at - now, Duration::from_millis(30));
        // The core's loopback has no conditions.
        assert_eq!(
            s.schedule(now, Stage::Down, 99, 60),
            Decision::Release {
                at: now,
                reordered: false
            }
        );
    }

    #[test]
    fn jitter_is_bounded_and_never_reorders() {
        let mut s = two_links(
            Direction::ms(50).jitter(Duration::from_millis(10)),
            Direction::default(),
        );
        let start = Instant::now();
        let mut prev = start;
        let mut delays = Vec::new();
        for i in 0..5000u32 {
            let now = start + Duration::from_micros(u64::from(i) * 500);
            let Decision::Release { at, reordered } = forward(&mut s, now, 1, 2, 100) else {
                panic!("dropped")
            };
            assert!(!reordered);
            assert!(at >= prev, "packet {i} overtook its predecessor");
            prev = at;
            delays.push((at - now).as_secs_f64() * 1e3);
        }
        let min = delays.iter().copied().fold(f64::MAX, f64::min);
        assert!(min >= 30.0 - 1e-6, "{min}");
        // Spread well beyond zero: jitter is applied.
        let max = delays.iter().copied().fold(0.0, f64::max);
        assert!(max - min > 20.0, "{min}..{max}");
    }

    #[test]
    fn rate_cap_serialises_and_drops_at_the_queue_limit() {
        // 1 Mbit/s, 1250-byte packets: 10 ms each; queue of 5.
        let mut s = two_links(
            Direction::default().rate(1_000_000, 5),
            Direction::default(),
        );
        let now = Instant::now();
        let mut released = Vec::new();
        let mut dropped = 0;
        for _ in 0..20 {
            match forward(&mut s, now, 1, 2, 1250) {
                Decision::Release { at, .. } => released.push(at - now),
                Decision::QueueFull => dropped += 1,
                Decision::Lost => panic!("no loss configured"),
            }
        }
        assert_eq!(released.len(), 5);
        assert_eq!(dropped, 15);
        for (i, d) in released.iter().enumerate() {
            assert_eq!(d.as_millis(), 10 * (i as u128 + 1));
        }
    }

    #[test]
    fn profiles_parse_and_have_their_round_trips() {
        for p in WanProfile::ALL {
            assert_eq!(p.name().parse::<WanProfile>().ok(), Some(p));
            let c = p.conditions();
            assert!(c.invalid_reason().is_none());
            // Site to site: up one site link, down the other, and back.
            let rtt = 2 * (c.sites.up.delay + c.sites.down.delay);
            assert_eq!(rtt, p.rtt(), "{}", p.name());
        }
        let a = WanProfile::Asymmetric.conditions();
        assert_eq!(
            a.sites.up.delay + a.gateway.down.delay,
            Duration::from_millis(40)
        );
        assert_eq!(
            a.gateway.up.delay + a.sites.down.delay,
            Duration::from_millis(150)
        );
        assert!(WanProfile::Lan.conditions().is_ideal());
        assert!("nope".parse::<WanProfile>().is_err());
    }

    #[test]
    fn netlink_messages_round_trip() {
        let m = verdict(42, NF_ACCEPT);
        let parsed = messages(&m);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT);
        let a = attrs(&parsed[0].1[4..]);
        assert_eq!(a, vec![(NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 42][..])]);
    }
}
