//! The event pipeline's first stage: ring buffer (or perf buffer) records
//! decoded into typed events, with every loss counted.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use libbpf_rs::{
    ErrorKind, MapCore, MapFlags, PerfBuffer, PerfBufferBuilder, RingBuffer, RingBufferBuilder,
};

use crate::error::{Error, Result};
use crate::loader::{BufferKind, Session};
use crate::model::{decode, Event};
use crate::skel::types::sl_stat;

enum Source<'a> {
    Ring(RingBuffer<'a>),
    Perf(PerfBuffer<'a>),
}

/// Counters of what did not make it to the user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Records the kernel could not queue (ring full) or perf reported lost.
    pub lost: u64,
    /// Records that arrived but did not decode.
    pub malformed: u64,
    /// Connections not tracked because the conns map was full.
    pub untracked: u64,
    /// UDP flows not tracked because the udp_flows map was full.
    pub udp_untracked: u64,
}

pub struct EventStream<'a> {
    source: Source<'a>,
    queue: Rc<RefCell<Vec<Event>>>,
    perf_lost: Rc<Cell<u64>>,
    malformed: Rc<Cell<u64>>,
    session: &'a Session<'a>,
}

impl<'a> EventStream<'a> {
    pub fn open(session: &'a Session<'a>) -> Result<Self> {
        let queue = Rc::new(RefCell::new(Vec::new()));
        let perf_lost = Rc::new(Cell::new(0));
        let malformed = Rc::new(Cell::new(0));
        let sink = {
            let queue = Rc::clone(&queue);
            let malformed = Rc::clone(&malformed);
            move |bytes: &[u8]| match decode(bytes) {
                Ok(e) => queue.borrow_mut().push(e),
                Err(_) => malformed.set(malformed.get() + 1),
            }
        };
        let map = &session.skel.maps.events;
        let buf_err = |e: libbpf_rs::Error| Error::kernel("opening the event buffer", e);
        let source = match session.buffer {
            BufferKind::Ring => {
                let mut b = RingBufferBuilder::new();
                b.add(map, move |bytes: &[u8]| {
                    sink(bytes);
                    0
                })
                .map_err(buf_err)?;
                Source::Ring(b.build().map_err(buf_err)?)
            }
            BufferKind::Perf => {
                let lost = Rc::clone(&perf_lost);
                let pb = PerfBufferBuilder::new(map)
                    .sample_cb(move |_cpu: i32, bytes: &[u8]| sink(bytes))
                    .lost_cb(move |_cpu: i32, n: u64| lost.set(lost.get() + n))
                    .build()
                    .map_err(buf_err)?;
                Source::Perf(pb)
            }
        };
        Ok(Self {
            source,
            queue,
            perf_lost,
            malformed,
            session,
        })
    }

    /// Waits up to `timeout` for records and returns the decoded events.
    pub fn poll(&self, timeout: Duration) -> Result<Vec<Event>> {
        let polled = match &self.source {
            Source::Ring(rb) => rb.poll(timeout),
            Source::Perf(pb) => pb.poll(timeout),
        };
        match polled {
            Err(e) if e.kind() != ErrorKind::Interrupted => {
                return Err(Error::kernel("reading events", e));
            }
            _ => {}
        }
        Ok(std::mem::take(&mut *self.queue.borrow_mut()))
    }

    pub fn losses(&self) -> Losses {
        Losses {
            lost: self.perf_lost.get() + kernel_stat(self.session, sl_stat::SL_STAT_EVENTS_LOST),
            malformed: self.malformed.get(),
            untracked: kernel_stat(self.session, sl_stat::SL_STAT_UNTRACKED),
            udp_untracked: kernel_stat(self.session, sl_stat::SL_STAT_UDP_UNTRACKED),
        }
    }
}

/// Sum over CPUs of one slot of the BPF side's `stats` counters.
fn kernel_stat(session: &Session<'_>, slot: sl_stat) -> u64 {
    let key = slot.0.to_ne_bytes();
    session
        .skel
        .maps
        .stats
        .lookup_percpu(&key, MapFlags::ANY)
        .ok()
        .flatten()
        .map(|cpus| {
            cpus.iter()
                .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
                .map(u64::from_ne_bytes)
                .sum()
        })
        .unwrap_or(0)
}
