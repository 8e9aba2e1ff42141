//! Property tests of every parser of untrusted input: the policy and agent
//! TOML parsers, the metrics endpoint's request parser and the decoders of
//! every kernel record type. Random bytes, and seeds from tests/fuzz-corpus
//! mutated at random, must never panic, and no single input may make a
//! parser allocate more than a fixed multiple of its size (a counting
//! allocator measures every case). Each target runs for
//! SOCKLENS_FUZZ_SECS seconds (default 10). No root needed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use socklens::agent::{config as agent_config, http};
use socklens::model;
use socklens::policy::file::{self as policy_file, CgroupTree};
use socklens::skel::types::{sl_conn, sl_udp_flow, sl_udp_key};

/// Counts live and peak heap bytes per thread (tests run side by side);
/// signed, as a thread may free what another allocated.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.with(|l| {
            l.set(l.get() + layout.size() as isize);
            l.get()
        });
        PEAK.with(|p| p.set(p.get().max(now)));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.with(|l| l.set(l.get() - layout.size() as isize));
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap a parser may use beyond what it holds on entry: a fixed floor plus
/// a multiple of the input (TOML trees and error strings copy the text).
fn alloc_bound(input: usize) -> usize {
    (1 << 20) + 64 * input
}

/// Runs `f` on `input` and fails if the heap grew past [`alloc_bound`].
fn bounded<R>(input: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<(), TestCaseError> {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f(input);
    drop(r);
    let used = (PEAK.with(Cell::get) - base).unsigned_abs();
    prop_assert!(
        used <= alloc_bound(input.len()),
        "{used} bytes for {} input bytes",
        input.len()
    );
    Ok(())
}

fn budget() -> Duration {
    let secs = std::env::var("SOCKLENS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    Duration::from_secs_f64(secs)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{} is empty", dir.display());
    seeds
}

/// A seed with random edits (overwrite, insert, delete, truncate), or plain
/// random bytes.
fn inputs(seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..4u8), 0..16);
    let mutated = (prop::sample::select(seeds), edits).prop_map(|(mut s, edits)| {
        for (at, byte, op) in edits {
            if s.is_empty() {
                s.push(byte);
                continue;
            }
            let i = at.index(s.len());
            match op {
                0 => s[i] = byte,
                1 => s.insert(i, byte),
                2 => {
                    s.remove(i);
                }
                _ => s.truncate(i),
            }
        }
        s
    });
    prop_oneof![
        3 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..4096),
    ]
    .boxed()
}

/// Runs `check` on inputs from `strategy` until the time budget is spent.
fn fuzz(
    name: &str,
    strategy: BoxedStrategy<Vec<u8>>,
    check: impl Fn(&[u8]) -> Result<(), TestCaseError>,
) {
    let deadline = Instant::now() + budget();
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, |input| check(&input)) {
            panic!("{name}: {e}");
        }
        cases += 256;
    }
    eprintln!("{name}: {cases} cases");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn policy_parser_never_panics_nor_allocates_without_bound() {
    let root = std::env::temp_dir().join(format!("sl-fuzz-cg-{}", std::process::id()));
    for d in ["svc/a", "svc/b", "system.slice/web.service"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let tree = CgroupTree::scan(&root);
    fuzz("policy", inputs(corpus("policy")), |b| {
        bounded(b, |b| {
            policy_file::parse("fuzz.toml", &text(b), &tree).is_ok()
        })
    });
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn agent_config_parser_never_panics_nor_allocates_without_bound() {
    let dir = PathBuf::from("/etc/socklens");
    fuzz("agent config", inputs(corpus("agent")), |b| {
        bounded(b, |b| {
            agent_config::parse("fuzz.toml", &text(b), &dir).is_ok()
        })
    });
}

#[test]
fn http_request_parser_never_panics_nor_allocates_without_bound() {
    fuzz("http", inputs(corpus("http")), |b| {
        bounded(b, |b| {
            // The server never hands the parser more than MAX_HEAD + 1 bytes.
            let b = &b[..b.len().min(http::MAX_HEAD + 1)];
            // Every prefix, as the bytes would arrive one by one.
            (1..=b.len())
                .filter(|&n| matches!(http::parse(&b[..n]), http::Parsed::Done(_)))
                .count()
        })
    });
}

/// Seeds for the record decoders: each record size, zeroed, with each kind
/// number the programs write in the first word.
fn record_seeds() -> Vec<Vec<u8>> {
    let sizes = [
        size_of::<socklens::skel::types::sl_sock_event>(),
        size_of::<socklens::skel::types::sl_conn_event>(),
        size_of::<socklens::skel::policy::types::slp_event>(),
        size_of::<sl_conn>(),
        size_of::<sl_udp_key>() + size_of::<sl_udp_flow>(),
    ];
    let mut seeds = Vec::new();
    for size in sizes {
        for kind in 0..8u32 {
            let mut s = vec![0u8; size];
            s[..4].copy_from_slice(&kind.to_ne_bytes());
            seeds.push(s);
        }
    }
    seeds
}

#[test]
fn kernel_record_decoders_never_panic_nor_allocate_without_bound() {
    fuzz("records", inputs(record_seeds()), |b| {
        bounded(b, |b| {
            let events = (model::decode(b).ok(), model::cg::decode(b).ok());
            let mut conn = sl_conn::default();
            let conn = plain::copy_from_bytes(&mut conn, b)
                .ok()
                .map(|()| model::Conn::from_raw(0, &conn));
            let (mut key, mut flow) = (sl_udp_key::default(), sl_udp_flow::default());
            let split = b.len().min(size_of::<sl_udp_key>());
            let flow = (plain::copy_from_bytes(&mut key, &b[..split]).is_ok()
                && plain::copy_from_bytes(&mut flow, &b[split..]).is_ok())
            .then(|| model::UdpFlow::from_raw(&key, &flow));
            format!("{events:?}{conn:?}{flow:?}").len()
        })
    });
}
