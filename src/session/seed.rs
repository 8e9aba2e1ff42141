//! Connection tracking state in user space: seeding sockets that existed
//! before socklens started, sweeping out ended ones, and finding owners.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libbpf_rs::{Iter, Link, MapCore, MapFlags};
use nix::sched::{setns, CloneFlags};

use crate::attach::loader::Session;
use crate::attach::plan::{SEED_TCP, SEED_UDP};
use crate::error::{Context, Error, Result};
use crate::model::Conn;
use crate::skel::types::{sl_conn, sl_conn_flag, sl_udp_flow, sl_udp_key};

const IPPROTO_UDP: u16 = libc::IPPROTO_UDP as u16;
const IPPROTO_TCP: u16 = libc::IPPROTO_TCP as u16;

/// One path per distinct network namespace: every process's, and the named ones.
fn netns_paths() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    let mut consider = |p: PathBuf| {
        if let Ok(m) = fs::metadata(&p) {
            if seen.insert(m.ino()) {
                paths.push(p);
            }
        }
    };
    consider(PathBuf::from("/proc/self/ns/net"));
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                consider(e.path().join("ns/net"));
            }
        }
    }
    if let Ok(dir) = fs::read_dir("/var/run/netns") {
        for e in dir.flatten() {
            consider(e.path());
        }
    }
    paths
}

/// A socket iterator and the protocol whose table it walks.
struct SeedIter {
    proto: u16,
    link: Link,
}

/// The kernel's per-netns counts of hashed sockets, /proc/net/sockstat{,6},
/// of the current thread's network namespace. The TCP iterator walks the
/// host-wide established hash whatever the netns (about 7 ms with 65,536
/// sockets elsewhere), so a netns without sockets is worth skipping.
struct Sockstat {
    v4: String,
    v6: String,
}

impl Sockstat {
    /// None when either file cannot be read (no IPv6, say): walk then.
    fn read() -> Option<Self> {
        let read = |file: &str| fs::read_to_string(format!("/proc/thread-self/net/{file}")).ok();
        Some(Self {
            v4: read("sockstat")?,
            v6: read("sockstat6")?,
        })
    }

    /// Whether the netns has hashed sockets of `proto`, IPv4 or IPv6; true
    /// when the counts cannot be parsed.
    fn has(&self, proto: u16) -> bool {
        let (v4, v6) = if proto == IPPROTO_TCP {
            ("TCP:", "TCP6:")
        } else {
            ("UDP:", "UDP6:")
        };
        match (sockstat_inuse(&self.v4, v4), sockstat_inuse(&self.v6, v6)) {
            (Some(a), Some(b)) => a + b > 0,
            _ => true,
        }
    }
}

/// The `inuse` count of the line starting with `tag` ("TCP:", "UDP6:").
fn sockstat_inuse(text: &str, tag: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(tag))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "inuse")?;
    words.next()?.parse().ok()
}

fn run_iterators(iters: &[SeedIter]) -> io::Result<()> {
    let stat = Sockstat::read();
    for iter in iters {
        if stat.as_ref().is_some_and(|s| !s.has(iter.proto)) {
            continue;
        }
        let mut it = Iter::new(&iter.link).map_err(io::Error::other)?;
        io::copy(&mut it, &mut io::sink())?;
    }
    Ok(())
}

/// Seeds sockets that existed before start (`adopt_new`), or only refreshes
/// RTT and retransmits of tracked ones, by running the socket iterators in
/// every network namespace. An iterator walks the netns of the thread that
/// opens it, so this thread visits each in turn.
///
/// A refresh also sweeps out TCP entries of sockets the kernel no longer has
/// (see `sweep`).
pub fn seed(session: &Session<'_>, adopt_new: bool) -> Result<usize> {
    let mode = &session.skel.maps.seed_mode;
    let set = |slot: u32, value: u32| {
        mode.update(&slot.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::BpfText {
                what: "setting seed mode".into(),
                source,
            })
    };
    let gen = mode
        .lookup(&1u32.to_ne_bytes(), MapFlags::ANY)
        .ok()
        .flatten()
        .and_then(|v| v.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
        .wrapping_add(1);
    let started = monotonic_ns();
    set(0, u32::from(adopt_new))?;
    set(1, gen)?;
    let track_udp = session.setting(|ro| ro.track_udp);
    let obj = libbpf_rs::skel::Skel::object(&session.skel);
    let mut links = Vec::new();
    for prog in obj.progs_mut() {
        let proto = match prog.name().to_str() {
            Some(SEED_TCP) => IPPROTO_TCP,
            Some(SEED_UDP) if track_udp => IPPROTO_UDP,
            _ => continue,
        };
        let link = prog.attach().map_err(|source| Error::BpfText {
            what: "attaching socket iterator".into(),
            source,
        })?;
        links.push(SeedIter { proto, link });
    }
    let home = fs::File::open("/proc/thread-self/ns/net").ctx("opening own netns")?;
    let mut walked_netns = BTreeSet::new();
    for path in netns_paths() {
        let Ok(ns) = fs::File::open(&path) else {
            continue;
        };
        let Ok(meta) = ns.metadata() else { continue };
        if setns(&ns, CloneFlags::CLONE_NEWNET).is_err() {
            continue;
        }
        let walked = run_iterators(&links);
        setns(&home, CloneFlags::CLONE_NEWNET).ctx("returning to own netns")?;
        if walked.is_ok() {
            walked_netns.insert(meta.ino());
        }
    }
    if !adopt_new {
        sweep(session, gen, started, &walked_netns);
    }
    Ok(walked_netns.len())
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// Drops entries whose socket the iterator pass `gen` did not find in a
/// netns it walked, and the UDP flows of the sockets dropped.
///
/// UDP sockets end without an event, so this is where they go (the flows'
/// counts since the last snapshot go with them). For TCP it is a safety net:
/// a close the state hook missed is reported at the socket's destruction
/// (src/bpf/conn.bpf.h, on_destroy), unless that program was skipped too.
/// Entries younger than a second are left alone (a connect is tracked just
/// before the kernel hashes it), and so are closed TCP sockets still holding
/// unread data (unhashed, but their record waits for the read).
fn sweep(session: &Session<'_>, gen: u32, started_ns: u64, walked_netns: &BTreeSet<u64>) {
    const GRACE_NS: u64 = 1_000_000_000;
    let map = &session.skel.maps.conns;
    // One pass: the entries to drop, and the start of every one kept.
    let mut stale = Vec::new();
    let mut kept_start = HashMap::new();
    for k in map.keys() {
        let Some(v) = map.lookup(&k, MapFlags::ANY).ok().flatten() else {
            continue;
        };
        let mut raw = sl_conn::default();
        let Some(sk) = k
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
        else {
            continue;
        };
        if plain::copy_from_bytes(&mut raw, &v).is_err() {
            continue;
        }
        let draining = u32::from(raw.flags) & sl_conn_flag::SL_CONN_DRAINING.0 != 0;
        if (raw.proto == IPPROTO_TCP || raw.proto == IPPROTO_UDP)
            && raw.seen_gen != gen
            && !draining
            && raw.start_ns + GRACE_NS < started_ns
            && walked_netns.contains(&u64::from(raw.netns))
        {
            stale.push(k);
        } else {
            kept_start.insert(sk, raw.start_ns);
        }
    }
    for k in &stale {
        let _ = map.delete(k);
    }
    sweep_udp_flows(session, &kept_start);
}

/// Drops UDP flows whose socket's entry is gone (the socket ended) or is a
/// newer socket's at the same address; `started`: each entry's start_ns.
fn sweep_udp_flows(session: &Session<'_>, started: &HashMap<u64, u64>) {
    let flows = &session.skel.maps.udp_flows;
    let orphans: Vec<Vec<u8>> = flows
        .keys()
        .filter(|k| {
            let mut key = sl_udp_key::default();
            let mut raw = sl_udp_flow::default();
            let Some(v) = flows.lookup(k, MapFlags::ANY).ok().flatten() else {
                return false;
            };
            plain::copy_from_bytes(&mut key, k).is_ok()
                && plain::copy_from_bytes(&mut raw, &v).is_ok()
                && started.get(&key.sk) != Some(&raw.conn_start_ns)
        })
        .collect();
    for k in orphans {
        let _ = flows.delete(&k);
    }
}

/// Who owns a socket, found from /proc for sockets seeded without one.
#[derive(Debug, Clone)]
pub struct Owner {
    pub pid: u32,
    pub uid: u32,
    pub comm: crate::model::Comm,
    pub cgroup_id: u64,
}

fn cgroup_id_of(pid: u32, cgroup2: Option<&Path>) -> u64 {
    let Some(root) = cgroup2 else { return 0 };
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|rel| fs::metadata(root.join(rel.trim_start_matches('/'))).ok())
        .map_or(0, |m| m.ino())
}

/// Socket inode -> owning process, by reading every /proc/PID/fd link.
pub fn owners_by_inode(cgroup2: Option<&Path>) -> HashMap<u64, Owner> {
    let mut owners = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) else {
                continue;
            };
            let Ok(ino) = ino.parse::<u64>() else {
                continue;
            };
            owners.entry(ino).or_insert_with(|| Owner {
                pid,
                uid: fs::metadata(p.path()).map_or(0, |m| m.uid()),
                comm: fs::read_to_string(p.path().join("comm"))
                    .unwrap_or_default()
                    .trim_end()
                    .into(),
                cgroup_id: cgroup_id_of(pid, cgroup2),
            });
        }
    }
    owners
}

/// Owners of sockets the kernel side saw only from softirq or from the
/// seeding iterator, looked up by socket inode; /proc is rescanned on a miss,
/// at most twice a second.
pub struct Owners {
    cgroup2: Option<PathBuf>,
    by_inode: HashMap<u64, Owner>,
    last_scan: Option<Instant>,
}

impl Owners {
    pub fn new(cgroup2: Option<PathBuf>) -> Self {
        Self {
            cgroup2,
            by_inode: HashMap::new(),
            last_scan: None,
        }
    }

    /// Fills in the owner of `conn` when the kernel side did not know it.
    pub fn adopt(&mut self, conn: &mut Conn) {
        if conn.owner_known || conn.ino == 0 {
            return;
        }
        if !self.by_inode.contains_key(&conn.ino)
            && self
                .last_scan
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
        {
            self.by_inode = owners_by_inode(self.cgroup2.as_deref());
            self.last_scan = Some(Instant::now());
        }
        if let Some(o) = self.by_inode.get(&conn.ino) {
            conn.pid = o.pid;
            conn.uid = o.uid;
            conn.comm.clone_from(&o.comm);
            conn.cgroup_id = o.cgroup_id;
            conn.owner_known = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_inuse_reads_the_protocols_own_line() {
        let v4 = "sockets: used 12\nTCP: inuse 3 orphan 0 tw 1 alloc 65537 mem 5\nUDP: inuse 0 mem 0\nUDPLITE: inuse 7\n";
        assert_eq!(sockstat_inuse(v4, "TCP:"), Some(3));
        assert_eq!(sockstat_inuse(v4, "UDP:"), Some(0));
        assert_eq!(sockstat_inuse(v4, "RAW:"), None);
        let v6 = "TCP6: inuse 2\nUDP6: inuse 1\nUDPLITE6: inuse 0\n";
        assert_eq!(sockstat_inuse(v6, "UDP6:"), Some(1));
    }

    #[test]
    #[ignore = "needs root: ./test.sh"]
    fn a_new_netns_has_no_sockets_until_one_is_bound() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (a network namespace of its own): run the suite as root"
        );
        // unshare moves only this thread; /proc/thread-self/net follows it.
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare");
            let has = |proto| Sockstat::read().expect("sockstat").has(proto);
            assert!(!has(IPPROTO_TCP));
            assert!(!has(IPPROTO_UDP));
            let _tcp = std::net::TcpListener::bind("0.0.0.0:0").expect("listen");
            assert!(has(IPPROTO_TCP));
            assert!(!has(IPPROTO_UDP));
            let _udp6 = std::net::UdpSocket::bind("[::]:0").expect("bind udp6");
            assert!(has(IPPROTO_UDP));
        })
        .join()
        .expect("netns thread");
    }
}
