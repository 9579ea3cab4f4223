//! Fair shares of the service port: every UDP client sends to the one service
//! socket, so a client flooding it faster than the service loop reads fills the
//! socket's kernel queue, and the kernel drops everyone's datagrams alike. Two levers
//! keep a flooding client to its share:
//!
//! - [`FairShare`], per service loop (no lock): while the loop is overloaded (every
//!   batch read is full: the queue has a backlog), it counts the datagrams of each
//!   client (5-tuple). If the kernel dropped datagrams on the socket during such a
//!   window (its SK_MEMINFO_DROPS counter grew: someone is being starved), a client
//!   with more than half of the window is *heavy*; when others sent in that window
//!   too, in the batches that follow its
//!   ChannelData beyond a few per batch is dropped before the relay routes and sends
//!   it (counted in `gateway_relay_throttled_packets_total`), so the queue drains
//!   faster than it did. A client heavy in [`ISOLATE_AFTER`] windows in a row is
//!   isolated. (A quarter of a window without the drop check was tried first: the
//!   benchmark's 20 windowed clients, bursty but well-behaved, were then isolated
//!   now and then; and two clients sharing a loop half and half, each within its
//!   fair share, were throttled.)
//! - Isolation ([`Isolation`], shared by the loops, locked only when a client is
//!   isolated or released): a socket of the client's own, bound to the service
//!   address with SO_REUSEPORT and connected to the client. The kernel delivers a
//!   datagram to the connected socket whose 4-tuple matches it before any unconnected
//!   one, so from then on the flood fills its own queue, read by its own task
//!   (`service::serve_isolated`) like any other loop, and everyone else's datagrams
//!   wait in the service socket's queue as if the flood were not there. The task
//!   closes the socket once the client has been quiet for [`ISOLATION_IDLE`].
//!
//! Throttling alone cannot guarantee the others' share: several threads flooding
//! through one 5-tuple outpace even a loop that only reads and drops. Isolation can:
//! the kernel sorts the datagrams before any queue fills.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::task::AbortHandle;

/// Full batches in a row that make one window of an overloaded loop.
pub(crate) const WINDOW_BATCHES: u32 = 32;
/// Least datagrams a client must send in an overloaded window to be heavy.
const HEAVY_MIN: u32 = 256;
/// A heavy client's ChannelData relayed per full batch; the rest are dropped.
pub(crate) const THROTTLED_PER_BATCH: u32 = 8;
/// Heavy windows in a row (none further apart than [`STRIKE_GAP`]) that get a
/// client isolated.
pub(crate) const ISOLATE_AFTER: u32 = 3;
/// Longest gap between two heavy windows that still counts as "in a row".
const STRIKE_GAP: Duration = Duration::from_secs(1);
/// An isolated client's socket is closed after this long without a datagram.
pub const ISOLATION_IDLE: Duration = Duration::from_secs(5);
/// Most clients isolated at once (each holds a socket; beyond, heavy clients are
/// only throttled). Small: the kernel looks at every connected socket on the
/// service port for each datagram it delivers there.
pub const MAX_ISOLATED: usize = 16;

/// One client's count in the current window.
#[derive(Clone, Copy, Debug)]
struct Seen {
    count: u32,
    /// The gateway address it sent to (IP_PKTINFO), for its isolated socket.
    local: Option<IpAddr>,
}

/// A heavy client: throttled while batches are full.
#[derive(Clone, Copy, Debug)]
struct Heavy {
    client: SocketAddr,
    /// Its ChannelData relayed in the current batch.
    passed: u32,
}

/// A client to isolate, found by [`FairShare::end_batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isolate {
    /// The client's address (its 5-tuple with the service socket's).
    pub client: SocketAddr,
    /// The gateway address it sends to, when known.
    pub local: Option<IpAddr>,
}

/// One service loop's accounting of who fills its queue (see the module's doc).
/// Costs nothing while batches are not full; a hash-map update per datagram while
/// they are.
#[derive(Default)]
pub struct FairShare {
    /// Whether the batch being handled is full (counting and throttling on).
    overloaded: bool,
    /// Full batches in the current window.
    full_batches: u32,
    /// Datagrams counted in the current window.
    total: u32,
    seen: HashMap<SocketAddr, Seen>,
    /// The throttled heavy clients of the last window (one at most: it had half).
    heavy: Vec<Heavy>,
    /// Heavy windows in a row, and when the last one ended.
    strikes: HashMap<SocketAddr, (u32, Instant)>,
    /// The socket's kernel drop counter at the end of the last window of this run
    /// of full batches (`None`: not read yet in this run).
    drops: Option<u64>,
}

impl FairShare {
    /// Starts a batch of `buffers` read buffers of a possible `capacity`: a full
    /// batch means the loop is overloaded. A batch that is not full ends the window
    /// and every throttle (the queue is empty: nobody is starved).
    pub fn start_batch(&mut self, buffers: usize, capacity: usize) {
        self.overloaded = buffers >= capacity;
        if !self.overloaded {
            self.full_batches = 0;
            self.total = 0;
            self.seen.clear();
            self.heavy.clear();
            self.drops = None;
            return;
        }
        for heavy in &mut self.heavy {
            heavy.passed = 0;
        }
    }

    /// Counts a datagram from `client` (sent to `local`); for ChannelData
    /// (`data`), whether to relay it (`false`: throttled, drop it unrelayed).
    pub fn admit(&mut self, client: SocketAddr, local: Option<IpAddr>, data: bool) -> bool {
        if !self.overloaded {
            return true;
        }
        self.total += 1;
        let seen = self.seen.entry(client).or_insert(Seen { count: 0, local });
        seen.count += 1;
        seen.local = local;
        if !data {
            return true;
        }
        match self.heavy.iter_mut().find(|h| h.client == client) {
            Some(heavy) if heavy.passed >= THROTTLED_PER_BATCH => false,
            Some(heavy) => {
                heavy.passed += 1;
                true
            }
            None => true,
        }
    }

    /// Ends a batch; at the end of a window, reads the socket's kernel drop
    /// counter (`kernel_drops`, called once a window; `None` when it cannot be
    /// read: then every full window counts as starving someone), finds the heavy
    /// clients (throttled in the next window) and adds to `isolate` those heavy
    /// [`ISOLATE_AFTER`] windows in a row.
    pub fn end_batch(
        &mut self,
        now: Instant,
        kernel_drops: impl FnOnce() -> Option<u64>,
        isolate: &mut Vec<Isolate>,
    ) {
        if !self.overloaded {
            return;
        }
        self.full_batches += 1;
        if self.full_batches < WINDOW_BATCHES {
            return;
        }
        self.heavy.clear();
        let total = self.total;
        let drops = kernel_drops();
        let starving = match (drops, self.drops) {
            (Some(now), Some(before)) => now > before,
            // The first window of a run only reads the counter.
            (Some(_), None) => false,
            (None, _) => true,
        };
        self.drops = drops;
        for (client, seen) in self.seen.drain() {
            if !starving || seen.count < HEAVY_MIN || seen.count.saturating_mul(2) <= total {
                continue;
            }
            // Throttled only when it crowded others out: alone, its share is all.
            if seen.count < total {
                self.heavy.push(Heavy { client, passed: 0 });
            }
            let strikes = self.strikes.entry(client).or_insert((0, now));
            let in_a_row = now.saturating_duration_since(strikes.1) <= STRIKE_GAP;
            *strikes = (if in_a_row { strikes.0 + 1 } else { 1 }, now);
            if strikes.0 >= ISOLATE_AFTER {
                strikes.0 = 0;
                isolate.push(Isolate {
                    client,
                    local: seen.local,
                });
            }
        }
        self.strikes
            .retain(|_, (_, last)| now.saturating_duration_since(*last) <= STRIKE_GAP);
        self.full_batches = 0;
        self.total = 0;
    }
}

/// One isolated client's task, once started.
struct Isolated {
    task: Option<AbortHandle>,
}

/// The clients isolated now, shared by the service loops. Locked only to isolate or
/// release a client (never per datagram), and never across a system call.
#[derive(Clone, Default)]
pub struct Isolation {
    table: Arc<Mutex<HashMap<SocketAddr, Isolated>>>,
}

impl Isolation {
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Isolated>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a place for `client`: `false` when it is isolated already or
    /// [`MAX_ISOLATED`] are. A reservation is either [`Isolation::started`] or
    /// [`Isolation::release`]d.
    pub fn reserve(&self, client: SocketAddr) -> bool {
        let mut table = self.lock();
        if table.len() >= MAX_ISOLATED || table.contains_key(&client) {
            return false;
        }
        table.insert(client, Isolated { task: None });
        true
    }

    /// Records the task serving `client`'s socket.
    pub fn started(&self, client: SocketAddr, task: AbortHandle) {
        if let Some(isolated) = self.lock().get_mut(&client) {
            isolated.task = Some(task);
        }
    }

    /// Forgets `client` (its task has ended, or its socket could not be opened).
    pub fn release(&self, client: SocketAddr) {
        self.lock().remove(&client);
    }

    /// Clients isolated now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Stops every isolated client's task (at shutdown).
    pub fn stop_all(&self) {
        let tasks: Vec<_> = self.lock().drain().filter_map(|(_, i)| i.task).collect();
        for task in tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: usize = 32;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// Ends a batch while the kernel drops datagrams (its counter grows by one
    /// every window).
    fn end(fair: &mut FairShare, now: Instant, isolate: &mut Vec<Isolate>) {
        let drops = fair.drops.map_or(0, |d| d + 1);
        fair.end_batch(now, || Some(drops), isolate);
    }

    /// Feeds one full batch: `flood` datagrams from the flooder, the rest from
    /// `others` in turn; returns how many of the flooder's were admitted.
    fn batch(fair: &mut FairShare, flood: usize, others: &[SocketAddr]) -> usize {
        fair.start_batch(BATCH, BATCH);
        let mut admitted = 0;
        for _ in 0..flood {
            admitted += usize::from(fair.admit(addr(1), None, true));
        }
        for i in 0..BATCH - flood {
            assert!(fair.admit(others[i % others.len()], None, true));
        }
        admitted
    }

    /// Feeds `windows` windows of full batches (`flood` of 32 from the flooder),
    /// ending each batch with `end`; returns what the flooder got admitted in the
    /// last window.
    fn windows(
        fair: &mut FairShare,
        windows: u32,
        flood: usize,
        others: &[SocketAddr],
        isolate: &mut Vec<Isolate>,
    ) -> usize {
        let now = Instant::now();
        let mut admitted = 0;
        for _ in 0..windows {
            admitted = 0;
            for _ in 0..WINDOW_BATCHES {
                admitted += batch(fair, flood, others);
                end(fair, now, isolate);
            }
        }
        admitted
    }

    #[test]
    fn a_client_with_most_of_a_starving_window_is_throttled_then_isolated() {
        let mut fair = FairShare::default();
        let mut isolate = Vec::new();
        let others = [addr(2), addr(3)];
        let full = 30 * WINDOW_BATCHES as usize;
        // The first window reads the drop counter; the second finds the flooder
        // heavy (strike 1): neither throttles it.
        assert_eq!(windows(&mut fair, 2, 30, &others, &mut isolate), full);
        assert!(isolate.is_empty());
        // From the third on it gets a few per batch; ISOLATE_AFTER strikes isolate it.
        for strike in 2..=ISOLATE_AFTER {
            let admitted = windows(&mut fair, 1, 30, &others, &mut isolate);
            let throttled = (THROTTLED_PER_BATCH * WINDOW_BATCHES) as usize;
            assert_eq!(admitted, throttled);
            assert_eq!(isolate.len(), usize::from(strike == ISOLATE_AFTER));
        }
        assert_eq!(isolate[0].client, addr(1));
    }

    #[test]
    fn nobody_is_heavy_while_the_kernel_drops_nothing() {
        let mut fair = FairShare::default();
        let now = Instant::now();
        let mut isolate = Vec::new();
        for _ in 0..WINDOW_BATCHES * 8 {
            assert_eq!(batch(&mut fair, 30, &[addr(2)]), 30);
            fair.end_batch(now, || Some(7), &mut isolate);
        }
        assert!(isolate.is_empty() && fair.heavy.is_empty());
    }

    #[test]
    fn two_clients_half_and_half_are_within_their_share() {
        let mut fair = FairShare::default();
        let mut isolate = Vec::new();
        assert_eq!(windows(&mut fair, 8, 16, &[addr(2)], &mut isolate), 16 * 32);
        assert!(isolate.is_empty() && fair.heavy.is_empty());
    }

    #[test]
    fn nothing_is_counted_or_throttled_while_batches_are_not_full() {
        let mut fair = FairShare::default();
        let now = Instant::now();
        let mut isolate = Vec::new();
        windows(&mut fair, 3, 30, &[addr(2)], &mut isolate);
        assert!(!fair.heavy.is_empty());
        // A batch that is not full: the queue is empty, the throttle lifts.
        fair.start_batch(5, BATCH);
        for _ in 0..5 {
            assert!(fair.admit(addr(1), None, true));
        }
        end(&mut fair, now, &mut isolate);
        assert!(fair.seen.is_empty() && fair.heavy.is_empty());
        // Full again: the flooder is counted afresh, not throttled at once.
        assert_eq!(batch(&mut fair, 30, &[addr(2)]), 30);
    }

    #[test]
    fn many_clients_sharing_an_overloaded_loop_are_none_of_them_heavy() {
        let mut fair = FairShare::default();
        let mut isolate = Vec::new();
        let others: Vec<_> = (2..10).map(addr).collect();
        // The "flooder" sends 15 of 32: less than half.
        let admitted = windows(&mut fair, 6, 15, &others, &mut isolate);
        assert_eq!(admitted, 15 * WINDOW_BATCHES as usize);
        assert!(isolate.is_empty() && fair.heavy.is_empty());
    }

    #[test]
    fn a_client_alone_in_an_overloaded_loop_is_isolated_but_not_throttled() {
        let mut fair = FairShare::default();
        let mut isolate = Vec::new();
        let admitted = windows(&mut fair, 1 + ISOLATE_AFTER, BATCH, &[], &mut isolate);
        assert_eq!(admitted, BATCH * WINDOW_BATCHES as usize);
        assert_eq!(isolate.len(), 1);
    }

    #[test]
    fn control_messages_of_a_throttled_client_pass() {
        let mut fair = FairShare::default();
        let mut isolate = Vec::new();
        windows(&mut fair, 2, 30, &[addr(2)], &mut isolate);
        fair.start_batch(BATCH, BATCH);
        for _ in 0..THROTTLED_PER_BATCH {
            assert!(fair.admit(addr(1), None, true));
        }
        assert!(!fair.admit(addr(1), None, true));
        assert!(fair.admit(addr(1), None, false), "a TURN request passes");
    }

    #[test]
    fn isolation_is_bounded_and_once_per_client() {
        let isolation = Isolation::default();
        assert!(isolation.reserve(addr(1)));
        assert!(!isolation.reserve(addr(1)));
        for port in 2..=MAX_ISOLATED as u16 {
            assert!(isolation.reserve(addr(port)));
        }
        assert!(!isolation.reserve(addr(999)));
        isolation.release(addr(1));
        assert!(isolation.reserve(addr(999)));
        assert_eq!(isolation.count(), MAX_ISOLATED);
    }
}
