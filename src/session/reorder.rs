//! Time order across event sources: the connection/bind buffer and the cgroup
//! hooks' ring buffer are drained one after the other, so their records
//! interleave only batch by batch. Events wait here until no record older than
//! them can still arrive, and leave sorted by their kernel timestamp.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Duration;

use crate::model::Event;

/// How long after its timestamp a record is surely in a buffer: the time from
/// the program's clock read to its ring buffer submit, with room for the
/// program being interrupted in between.
pub const SUBMIT_SLACK: Duration = Duration::from_millis(10);

impl Event {
    /// The kernel's CLOCK_MONOTONIC stamp of the event.
    pub fn ts_ns(&self) -> u64 {
        match self {
            Self::Sock(e) => e.ts_ns,
            Self::Conn(e) => e.ts_ns,
            Self::Cg(e) => e.ts_ns,
        }
    }
}

struct Pending {
    ts_ns: u64,
    /// Arrival order: equal stamps keep it.
    seq: u64,
    event: Event,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ts_ns, self.seq).cmp(&(other.ts_ns, other.seq))
    }
}

/// A bounded-delay merge of event batches by timestamp.
#[derive(Default)]
pub struct Reorder {
    heap: BinaryHeap<Reverse<Pending>>,
    seq: u64,
}

impl Reorder {
    /// Takes a batch, in any order.
    pub fn push(&mut self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            self.seq += 1;
            self.heap.push(Reverse(Pending {
                ts_ns: event.ts_ns(),
                seq: self.seq,
                event,
            }));
        }
    }

    /// Appends to `out`, oldest first, every event stamped at or before
    /// `horizon_ns`: the time every source was last drained, minus
    /// `SUBMIT_SLACK`. `None` releases everything (the final drain).
    pub fn release(&mut self, horizon_ns: Option<u64>, out: &mut Vec<Event>) {
        while let Some(Reverse(top)) = self.heap.peek() {
            if horizon_ns.is_some_and(|h| top.ts_ns > h) {
                break;
            }
            if let Some(Reverse(p)) = self.heap.pop() {
                out.push(p.event);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// CLOCK_MONOTONIC now, in ns: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The release horizon for a poll that started at `polled_at_ns`.
pub fn horizon(polled_at_ns: u64) -> u64 {
    polled_at_ns.saturating_sub(u64::try_from(SUBMIT_SLACK.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::plan::Tier;
    use crate::model::{Conn, ConnEvent, ConnEventKind};

    const MS: u64 = 1_000_000;

    fn event(ts_ns: u64, sk: u64) -> Event {
        Event::Conn(ConnEvent {
            kind: ConnEventKind::Close,
            tier: Tier::Tracepoint,
            ts_ns,
            conn: Conn::sample(sk, 1, 0, 0),
        })
    }

    /// Two sources (say the connection ring and the cgroup hooks' ring),
    /// each in its own time order, submitting each record up to half the
    /// slack after its stamp; a poll every 100 ms drains one source, then
    /// the other. Arrival order interleaves the sources batch by batch;
    /// what leaves the merge is in stamp order, each event at most one
    /// poll and the slack after its stamp.
    #[test]
    fn two_sources_drained_in_turn_come_out_in_time_order() {
        let slack = u64::try_from(SUBMIT_SLACK.as_nanos()).unwrap();
        let mut sources: Vec<Vec<(u64, u64)>> = vec![Vec::new(), Vec::new()];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut ts = 1_000 * MS;
        for _ in 0..2_000 {
            ts += rand(MS); // bursts: many events within a millisecond
            let submitted = ts + rand(slack / 2);
            sources[usize::from(rand(2) == 1)].push((ts, submitted));
        }
        let end = ts + 200 * MS;
        let mut merge = Reorder::default();
        let mut arrived = Vec::new();
        let mut out = Vec::new();
        let mut released_at = Vec::new();
        let mut poll_start = 1_000 * MS;
        let mut next = [0usize; 2];
        while poll_start < end {
            let drained_at = poll_start + 100 * MS;
            for (i, src) in sources.iter().enumerate() {
                // The second source is drained a little after the first.
                let at = drained_at + i as u64 * 50_000;
                let mut batch = Vec::new();
                while next[i] < src.len() && src[next[i]].1 <= at {
                    let (ts, _) = src[next[i]];
                    batch.push(event(ts, ts));
                    arrived.push(ts);
                    next[i] += 1;
                }
                merge.push(batch);
            }
            let before = out.len();
            merge.release(Some(horizon(poll_start)), &mut out);
            released_at.extend(std::iter::repeat_n(drained_at, out.len() - before));
            poll_start = drained_at;
        }
        merge.release(None, &mut out);
        assert!(merge.is_empty());
        let stamps: Vec<u64> = out.iter().map(Event::ts_ns).collect();
        assert_eq!(stamps.len(), 2_000);
        assert!(
            arrived.windows(2).any(|w| w[0] > w[1]),
            "the sources must interleave out of order for this test to mean anything"
        );
        assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "out of order");
        for (ts, at) in stamps.iter().zip(&released_at) {
            assert!(at - ts <= 200 * MS + slack, "held {} ms", (at - ts) / MS);
        }
    }

    #[test]
    fn equal_stamps_keep_arrival_order_and_the_final_drain_takes_all() {
        let mut merge = Reorder::default();
        merge.push([event(5, 1), event(5, 2), event(3, 3)]);
        merge.push([event(9, 4)]);
        let mut out = Vec::new();
        merge.release(Some(5), &mut out);
        let sks: Vec<u64> = out
            .iter()
            .map(|e| match e {
                Event::Conn(c) => c.conn.sk,
                _ => 0,
            })
            .collect();
        assert_eq!(sks, [3, 1, 2]);
        assert_eq!(merge.len(), 1);
        merge.release(None, &mut out);
        assert_eq!(out.len(), 4);
    }
}
