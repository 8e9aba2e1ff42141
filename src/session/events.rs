//! The event pipeline's first stage: ring buffer (or perf buffer) records
//! decoded into typed events, with every loss counted.

use std::cell::{Cell, RefCell};
use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::Duration;

use libbpf_rs::{ErrorKind, MapCore, PerfBuffer, PerfBufferBuilder, RingBuffer, RingBufferBuilder};

use crate::model::DecodeError;

use crate::attach::loader::{BufferKind, Session};
use crate::error::{Error, Result};
use crate::model::Losses;
use crate::model::{decode, Event};
use crate::skel::percpu_sum;
use crate::skel::types::sl_stat;

enum Source<'a> {
    Ring(RingBuffer<'a>),
    /// The perf buffer, and a ring buffer for the extra sources if any.
    Perf(PerfBuffer<'a>, Option<RingBuffer<'a>>),
}

/// Another ring buffer polled with the session's own: e.g. the cgroup hook
/// programs' (src/session/cgobserve.rs), each with its own decoder and loss counter.
pub struct ExtraSource<'a> {
    pub map: &'a dyn MapCore,
    pub decode: fn(&[u8]) -> Result<Event, DecodeError>,
    pub lost: Box<dyn Fn() -> u64 + 'a>,
}

pub struct EventStream<'a> {
    source: Source<'a>,
    queue: Rc<RefCell<Vec<Event>>>,
    perf_lost: Rc<Cell<u64>>,
    malformed: Rc<Cell<u64>>,
    session: &'a Session<'a>,
    extra_lost: Vec<Box<dyn Fn() -> u64 + 'a>>,
}

impl<'a> EventStream<'a> {
    pub fn open(session: &'a Session<'a>) -> Result<Self> {
        Self::open_with(session, Vec::new())
    }

    /// The session's buffer and `extras`, polled together.
    pub fn open_with(session: &'a Session<'a>, extras: Vec<ExtraSource<'a>>) -> Result<Self> {
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
        let buf_err = |source| Error::BpfText {
            what: "opening the event buffer".into(),
            source,
        };
        let mut extra_lost = Vec::new();
        let mut extra_builder = RingBufferBuilder::new();
        for extra in extras {
            let queue = Rc::clone(&queue);
            let malformed = Rc::clone(&malformed);
            let decode = extra.decode;
            extra_builder
                .add(extra.map, move |bytes: &[u8]| {
                    match decode(bytes) {
                        Ok(e) => queue.borrow_mut().push(e),
                        Err(_) => malformed.set(malformed.get() + 1),
                    }
                    0
                })
                .map_err(buf_err)?;
            extra_lost.push(extra.lost);
        }
        let has_extras = !extra_lost.is_empty();
        let source = match session.buffer {
            BufferKind::Ring => {
                let mut b = extra_builder;
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
                let rb = if has_extras {
                    Some(extra_builder.build().map_err(buf_err)?)
                } else {
                    None
                };
                Source::Perf(pb, rb)
            }
        };
        Ok(Self {
            source,
            queue,
            perf_lost,
            malformed,
            session,
            extra_lost,
        })
    }

    /// Waits up to `timeout` for records and returns the decoded events.
    pub fn poll(&self, timeout: Duration) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.poll_into(timeout, &mut events)?;
        Ok(events)
    }

    /// `poll` into `events`, replacing what it held. Its allocation takes
    /// the place of the queue's, so a caller that keeps one `Vec` across
    /// polls does not grow a new one each time (under churn, one batch has
    /// thousands of events).
    pub fn poll_into(&self, timeout: Duration, events: &mut Vec<Event>) -> Result<()> {
        let polled = match &self.source {
            // Records come without a wakeup until a batch is waiting
            // (src/bpf/common.bpf.h): drain whatever is there after the wait.
            Source::Ring(rb) => rb.poll(timeout).and_then(|()| rb.consume()),
            Source::Perf(pb, extra) => pb.poll(timeout).and_then(|()| match extra {
                Some(rb) => rb.consume(),
                None => Ok(()),
            }),
        };
        match polled {
            Err(source) if source.kind() != ErrorKind::Interrupted => {
                return Err(Error::BpfText {
                    what: "reading events".into(),
                    source,
                });
            }
            _ => {}
        }
        events.clear();
        std::mem::swap(events, &mut *self.queue.borrow_mut());
        Ok(())
    }

    pub fn losses(&self) -> Losses {
        Losses {
            lost: self.perf_lost.get()
                + kernel_stat(self.session, sl_stat::SL_STAT_EVENTS_LOST)
                + self.extra_lost.iter().map(|f| f()).sum::<u64>(),
            malformed: self.malformed.get(),
            untracked: kernel_stat(self.session, sl_stat::SL_STAT_UNTRACKED),
            missed: recursion_misses(self.session)
                + kernel_stat(self.session, sl_stat::SL_STAT_RET_MISSED),
            udp_untracked: kernel_stat(self.session, sl_stat::SL_STAT_UDP_UNTRACKED),
        }
    }
}

/// The kernel's own count of skipped runs over this session's programs:
/// bpf_prog_info.recursion_misses, and the kprobes' own misses (6.7+;
/// before, the programs count dropped kretprobe runs, SL_STAT_RET_MISSED).
fn recursion_misses(session: &Session<'_>) -> u64 {
    program_recursion_misses(session) + session.kprobe_misses()
}

fn program_recursion_misses(session: &Session<'_>) -> u64 {
    let ids: std::collections::HashSet<u32> = libbpf_rs::skel::Skel::object(&session.skel)
        .progs()
        .filter(|p| p.autoload()) // the others were never loaded: no fd
        .filter_map(|p| libbpf_rs::Program::id_from_fd(p.as_fd()).ok())
        .collect();
    libbpf_rs::query::ProgInfoIter::default()
        .filter(|info| ids.contains(&info.id))
        .map(|info| info.recursion_misses)
        .sum()
}

/// Sum over CPUs of one slot of the BPF side's `stats` counters.
fn kernel_stat(session: &Session<'_>, slot: sl_stat) -> u64 {
    percpu_sum(&session.skel.maps.stats, slot.0)
}
