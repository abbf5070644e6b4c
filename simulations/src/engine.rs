//! The discrete-event core: virtual time and a priority queue of events.
//!
//! Events are ordered by their time, then by the order in which they were scheduled, so two
//! events at the same instant run first-scheduled-first: the order never depends on the
//! payload, a hash or the heap's internals, and a run is reproducible from its seed.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

/// Virtual time in microseconds since the start of a run.
pub type Micros = u64;

/// Microseconds per millisecond.
pub const MS: Micros = 1_000;
/// Microseconds per second.
pub const SEC: Micros = 1_000_000;

/// Seconds (as a float, from scenario files) to microseconds, rounded.
pub fn secs(s: f64) -> Micros {
    if s.is_finite() && s > 0.0 { (s * 1e6).round() as Micros } else { 0 }
}

/// Microseconds to seconds.
pub fn to_secs(t: Micros) -> f64 {
    t as f64 / 1e6
}

struct Entry<T> {
    at: Micros,
    seq: u64,
    event: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    /// Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A queue of events by virtual time; ties go to the event scheduled first.
pub struct EventQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    next_seq: u64,
    now: Micros,
}

impl<T> fmt::Debug for EventQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventQueue")
            .field("now", &self.now)
            .field("pending", &self.heap.len())
            .finish()
    }
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> EventQueue<T> {
    /// An empty queue at time 0.
    pub fn new() -> Self {
        Self { heap: BinaryHeap::new(), next_seq: 0, now: 0 }
    }

    /// The time of the event popped last (0 before the first).
    pub const fn now(&self) -> Micros {
        self.now
    }

    /// Schedules `event` at `at`; a time in the past is moved to now, so that time never runs
    /// backwards.
    pub fn schedule(&mut self, at: Micros, event: T) {
        let at = at.max(self.now);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Entry { at, seq, event });
    }

    /// Schedules `event` `delay` after now.
    pub fn after(&mut self, delay: Micros, event: T) {
        self.schedule(self.now.saturating_add(delay), event);
    }

    /// The next event and its time, advancing the clock to it.
    pub fn pop(&mut self) -> Option<(Micros, T)> {
        let e = self.heap.pop()?;
        self.now = e.at;
        Some((e.at, e.event))
    }

    /// The time of the next event, if any.
    pub fn peek_time(&self) -> Option<Micros> {
        self.heap.peek().map(|e| e.at)
    }

    /// How many events wait.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// How many events were ever scheduled.
    pub const fn scheduled(&self) -> u64 {
        self.next_seq
    }
}
