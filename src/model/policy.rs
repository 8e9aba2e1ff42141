//! The policy in force as `policy show` reports it: read back from the pinned
//! maps by `policy`, rendered by `output::policy`.

/// Everything `policy show` prints.
#[derive(Debug, Clone, Default)]
pub struct PolicyView {
    pub generation: u32,
    pub attach_cgroup_id: u64,
    pub attach_cgroup: Option<String>,
    /// Pinned links: program name and the cgroup it is attached at.
    pub links: Vec<(String, Option<u64>)>,
    pub events_lost: u64,
    pub scopes: Vec<ScopeView>,
    pub services: Vec<ServiceView>,
    pub redirects: Vec<RedirectView>,
    pub accelerate: AccelView,
    /// Sockets holding translation state now, and since apply.
    pub translated_live: i64,
    pub translated_total: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ScopeView {
    pub index: u32,
    pub name: String,
    pub cgroup: Option<String>,
    pub cgroups: u32,
    pub mode: &'static str,
    pub default: &'static str,
    pub default_hits: u64,
    pub rules: Vec<RuleView>,
}

#[derive(Debug, Clone)]
pub struct RuleView {
    pub id: u32,
    pub line: u32,
    pub action: &'static str,
    pub on: Vec<&'static str>,
    pub hits: u64,
    pub target: RuleTarget,
    pub proto: String,
}

/// What a rule matches besides the protocol.
#[derive(Debug, Clone)]
pub enum RuleTarget {
    /// Socket creation: family and type ("any" or a name).
    Create { family: String, sock_type: String },
    /// Addresses: a CIDR ("any") and a port range.
    Addr { cidr: String, ports: String },
}

#[derive(Debug, Clone)]
pub struct ServiceView {
    pub address: String,
    pub proto: &'static str,
    pub line: u32,
    /// None: sockets of every network namespace.
    pub netns_cookie: Option<u64>,
    pub cgroup_id: u64,
    pub failed_picks: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone)]
pub struct BackendView {
    pub address: String,
    pub weight: u32,
    pub terminate: bool,
    pub line: u32,
    pub picks: u64,
}

/// One `[[redirect]]` rule in force, with how many sockets it sent to its proxy.
#[derive(Debug, Clone)]
pub struct RedirectView {
    pub line: u32,
    pub cgroup_id: u64,
    pub proto: &'static str,
    pub ports: String,
    pub proxy: Option<String>,
    pub proxy6: Option<String>,
    pub redirected: u64,
}

/// Local TCP acceleration: the `[[accelerate]]` entries in force and the
/// sockhash's counters (which outlive a `remove` while connections drain).
#[derive(Debug, Clone, Default)]
pub struct AccelView {
    pub entries: Vec<AccelEntryView>,
    /// Sockets in the sockhash now (two per accelerated connection).
    pub sockets: u64,
    /// Whether new connections are accelerated (the sock_ops link is there).
    pub attached: bool,
    pub paired: u64,
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    pub passed_msgs: u64,
    pub unpaired: u64,
    /// setsockopt(TCP_ULP) calls refused on hashed sockets.
    pub refused_ulp: u64,
    pub skipped_zerocopy: u64,
    pub skipped_ulp: u64,
    pub skipped_rcvlowat: u64,
}

#[derive(Debug, Clone)]
pub struct AccelEntryView {
    pub name: String,
    pub line: u64,
    pub cgroups: u64,
    /// None: every port.
    pub ports: Option<Vec<String>>,
}
