//! Pure: a validated [`Policy`] to the entries of one generation of the BPF
//! policy maps (types from src/bpf/policy.h).
//!
//! Precedence, as the programs apply it:
//! - address rules (bind, connect, sendmsg): the longest matching prefix that has
//!   a rule covering the port and protocol decides; among the rules of one
//!   prefix the narrowest port range decides; on a tie deny wins. No rule: the
//!   scope's default.
//! - create rules: the rule naming the most of family, type and protocol
//!   decides; on a tie deny wins. No rule: the scope's default.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::policy::file::{Action, Mode, Op, Policy, Target};
use crate::policy::services::{gcd, NetnsScope, Service};
use crate::skel::policy::types::{
    slp_action, slp_cgroup_key, slp_create_key, slp_create_rule, slp_limit, slp_lpm_key, slp_mode,
    slp_op, slp_port_rule, slp_prefix_rules, slp_rule_info, slp_scope, slp_scope_info,
};
use crate::skel::policy::types::{
    slp_backend, slp_backend_flags, slp_svc, slp_svc_flags, slp_svc_info, slp_svc_key,
    slp_xlate_kind,
};

/// One generation's map entries.
#[derive(Debug, Default)]
pub struct Tables {
    pub gen: u32,
    pub scope_of: Vec<(slp_cgroup_key, slp_scope)>,
    /// (index within the generation, info)
    pub scopes: Vec<(u32, slp_scope_info)>,
    pub lpm: Vec<(slp_lpm_key, slp_prefix_rules)>,
    pub create: Vec<(slp_create_key, slp_create_rule)>,
    /// (slot within the generation, info)
    pub rules: Vec<(u32, slp_rule_info)>,
}

pub fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => slp_action::SLP_ALLOW.0 as u8,
        Action::Deny => slp_action::SLP_DENY.0 as u8,
    }
}

pub fn mode_code(m: Mode) -> u8 {
    match m {
        Mode::Enforce => slp_mode::SLP_MODE_ENFORCE.0 as u8,
        Mode::Audit => slp_mode::SLP_MODE_AUDIT.0 as u8,
    }
}

/// The (v4, v6) map ops of an address op.
fn addr_ops(op: Op) -> Option<(slp_op, slp_op)> {
    match op {
        Op::Create => None,
        Op::Bind => Some((slp_op::SLP_OP_BIND4, slp_op::SLP_OP_BIND6)),
        Op::Connect => Some((slp_op::SLP_OP_CONNECT4, slp_op::SLP_OP_CONNECT6)),
        Op::Sendmsg => Some((slp_op::SLP_OP_SENDMSG4, slp_op::SLP_OP_SENDMSG6)),
    }
}

/// Bit of an op in slp_rule_info.ops.
pub fn op_bit(op: Op) -> u8 {
    let code = match op {
        Op::Create => slp_op::SLP_OP_CREATE,
        Op::Bind => slp_op::SLP_OP_BIND4,
        Op::Connect => slp_op::SLP_OP_CONNECT4,
        Op::Sendmsg => slp_op::SLP_OP_SENDMSG4,
    };
    1 << code.0
}

fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

fn name_bytes(name: &str) -> [u8; slp_limit::SLP_NAME_LEN.0 as usize] {
    let mut out = [0u8; slp_limit::SLP_NAME_LEN.0 as usize];
    let n = name.len().min(out.len() - 1);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// Everything the maps must hold fits: Err((line, message)) otherwise.
pub fn check_capacity(policy: &Policy) -> Result<(), (usize, String)> {
    compile(policy, 0).map(|_| ())
}

/// (op, scope, address, prefixlen with header): one `slp_lpm` entry.
type PrefixKey = (u8, u16, [u8; 16], u32);

pub fn compile(policy: &Policy, gen: u32) -> Result<Tables, (usize, String)> {
    let gen8 = gen as u8;
    let mut t = Tables {
        gen,
        ..Tables::default()
    };
    // (key bytes identity) -> (key, rules with their line)
    let mut prefixes: BTreeMap<PrefixKey, Vec<(slp_port_rule, usize)>> = BTreeMap::new();
    let mut create: BTreeMap<(u16, u8, u16, u16), slp_create_rule> = BTreeMap::new();
    let mut slot = 0u32;
    for (si, scope) in policy.scopes.iter().enumerate() {
        let index = si as u16;
        let mut sc = slp_scope {
            index,
            mode: mode_code(scope.mode),
            dflt: action_code(scope.default),
            ..Default::default()
        };
        // Which lookups can hit at all, so the programs skip the others.
        for rule in &scope.rules {
            match &rule.target {
                Target::Create {
                    family,
                    sock_type,
                    proto,
                } => {
                    let shape = 4 * u8::from(*family != 0)
                        + 2 * u8::from(*sock_type != 0)
                        + u8::from(proto.is_some());
                    sc.create_shapes |= 1 << shape;
                }
                Target::Addr { net, .. } => {
                    for &op in &rule.ops {
                        if let Some((op4, op6)) = addr_ops(op) {
                            let v4 = net.is_none_or(|c| c.addr.is_ipv4());
                            let v6 = net.is_none_or(|c| c.addr.is_ipv6());
                            if v4 {
                                sc.ops |= 1 << op4.0;
                            }
                            if v6 {
                                sc.ops |= 1 << op6.0;
                            }
                        }
                    }
                }
            }
        }
        for &cg in &scope.governs {
            t.scope_of.push((
                slp_cgroup_key {
                    cgroup_id: cg,
                    r#gen,
                    ..Default::default()
                },
                sc,
            ));
        }
        t.scopes.push((
            u32::from(index),
            slp_scope_info {
                cgroup_id: scope.matched.first().map_or(0, |m| m.id),
                ncgroups: scope.governs.len() as u32,
                index,
                mode: sc.mode,
                dflt: sc.dflt,
                name: name_bytes(&scope.name),
            },
        ));
        for rule in &scope.rules {
            let mut info = slp_rule_info {
                rule_id: rule.id,
                scope: index,
                action: action_code(rule.action),
                ops: rule.ops.iter().map(|&o| op_bit(o)).fold(0, |a, b| a | b),
                line: rule.line as u32,
                proto: u16::MAX,
                ..Default::default()
            };
            match &rule.target {
                Target::Create {
                    family,
                    sock_type,
                    proto,
                } => {
                    info.family = *family as u8;
                    info.sock_type = *sock_type;
                    info.proto = proto.unwrap_or(u16::MAX);
                    let value = slp_create_rule {
                        slot,
                        rule_id: rule.id,
                        action: action_code(rule.action),
                        ..Default::default()
                    };
                    let key = (index, *sock_type, *family, proto.unwrap_or(u16::MAX));
                    let deny = action_code(Action::Deny);
                    match create.get(&key) {
                        // Same selectors: deny wins, else the first rule.
                        Some(old) if old.action == deny || value.action != deny => {}
                        _ => {
                            create.insert(key, value);
                        }
                    }
                }
                Target::Addr { net, ports, proto } => {
                    info.port_lo = ports.0;
                    info.port_hi = ports.1;
                    info.proto = if *proto == 0 {
                        u16::MAX
                    } else {
                        u16::from(*proto)
                    };
                    let nets: Vec<(IpAddr, u8)> = match net {
                        Some(c) => vec![(c.addr, c.prefix)],
                        None => vec![(IpAddr::V4(0.into()), 0), (IpAddr::V6(0u128.into()), 0)],
                    };
                    match net {
                        Some(c) => {
                            info.addr = addr_bytes(c.addr);
                            info.prefix = c.prefix;
                            info.family = if c.addr.is_ipv4() {
                                libc::AF_INET as u8
                            } else {
                                libc::AF_INET6 as u8
                            };
                        }
                        None => info.prefix = u8::MAX,
                    }
                    let pr = slp_port_rule {
                        slot,
                        rule_id: rule.id,
                        port_lo: ports.0,
                        port_hi: ports.1,
                        proto: *proto,
                        action: action_code(rule.action),
                        ..Default::default()
                    };
                    for &op in &rule.ops {
                        let Some((op4, op6)) = addr_ops(op) else {
                            continue;
                        };
                        for &(addr, prefix) in &nets {
                            let op = if addr.is_ipv4() { op4 } else { op6 };
                            let key = (
                                op.0 as u8,
                                index,
                                addr_bytes(addr),
                                slp_limit::SLP_KEY_HDR_BITS.0 + u32::from(prefix),
                            );
                            prefixes.entry(key).or_default().push((pr, rule.line));
                        }
                    }
                }
            }
            t.rules.push((slot, info));
            slot += 1;
        }
    }

    let per_prefix = slp_limit::SLP_PORT_RULES.0 as usize;
    let max_prefixes = slp_limit::SLP_MAX_PREFIXES.0 as usize;
    if prefixes.len() > max_prefixes {
        return Err((
            0,
            format!(
                "the rules need {} (scope, operation, cidr) entries, more than the maps hold ({max_prefixes})",
                prefixes.len()
            ),
        ));
    }
    for ((op, scope, addr, prefixlen), mut rules) in prefixes {
        if rules.len() > per_prefix {
            let (r, line) = rules[per_prefix];
            let name = &policy.scopes[usize::from(scope)].name;
            return Err((
                line,
                format!(
                    "rule {}: more than {per_prefix} rules of scope '{name}' share one cidr for one operation (more rules than the maps hold)",
                    r.rule_id
                ),
            ));
        }
        // Narrowest port range first, then deny before allow, then file order.
        rules.sort_by_key(|(r, _)| {
            (
                r.port_hi - r.port_lo,
                r.action != action_code(Action::Deny),
                r.slot,
            )
        });
        let mut value = slp_prefix_rules {
            prefixlen,
            count: rules.len() as u32,
            ..Default::default()
        };
        for (dst, (r, _)) in value.rules.iter_mut().zip(rules) {
            *dst = r;
        }
        t.lpm.push((
            slp_lpm_key {
                prefixlen,
                r#gen: gen8,
                op,
                scope,
                addr,
            },
            value,
        ));
    }
    let max_create = slp_limit::SLP_CREATE_ENTRIES.0 as usize;
    if create.len() > max_create {
        return Err((
            0,
            format!(
                "the create rules need {} entries, more than the maps hold ({max_create})",
                create.len()
            ),
        ));
    }
    for ((scope, sock_type, family, proto), value) in create {
        t.create.push((
            slp_create_key {
                r#gen: gen8,
                r#type: sock_type,
                scope,
                family,
                proto,
            },
            value,
        ));
    }
    Ok(t)
}

/// One generation's service entries. Array indexes are within the generation.
#[derive(Debug, Default)]
pub struct SvcTables {
    pub svc: Vec<(slp_svc_key, slp_svc)>,
    pub info: Vec<slp_svc_info>,
    pub backends: Vec<slp_backend>,
    /// slot -> backend index
    pub slots: Vec<u32>,
}

fn family(ip: IpAddr) -> u16 {
    if ip.is_ipv4() {
        libc::AF_INET as u16
    } else {
        libc::AF_INET6 as u16
    }
}

/// Depth of a cgroup below the v2 root ("/" is 0).
fn level(rel: &str) -> u16 {
    rel.split('/').filter(|p| !p.is_empty()).count() as u16
}

/// Pure: services to map entries of generation `gen`; `cookies[i]` is the
/// netns cookie service i is limited to (ignored for NetnsScope::Any).
pub fn compile_services(services: &[Service], gen: u32, cookies: &[u64]) -> SvcTables {
    let mut t = SvcTables::default();
    for (i, s) in services.iter().enumerate() {
        let index = i as u32;
        let first_backend = t.backends.len() as u32;
        let slot_base = t.slots.len() as u32;
        let g = s.backends.iter().fold(0u32, |g, b| gcd(g, b.weight));
        for (j, b) in s.backends.iter().enumerate() {
            let bi = first_backend + j as u32;
            if let Some(n) = b.weight.checked_div(g) {
                t.slots.extend(std::iter::repeat_n(bi, n as usize));
            }
            t.backends.push(slp_backend {
                addr: addr_bytes(b.addr.ip()),
                port: b.addr.port(),
                family: family(b.addr.ip()),
                weight: b.weight as u16,
                flags: if b.terminate {
                    slp_backend_flags::SLP_BE_TERMINATE.0 as u16
                } else {
                    0
                },
                service: index,
                line: b.line as u32,
            });
        }
        let any = s.netns == NetnsScope::Any;
        let flags = if any {
            slp_svc_flags::SLP_SVC_ANY_NETNS.0 as u8
        } else {
            0
        };
        let cookie = if any {
            0
        } else {
            cookies.get(i).copied().unwrap_or(0)
        };
        let value = slp_svc {
            index,
            slot_base,
            nslots: t.slots.len() as u32 - slot_base,
            kind: slp_xlate_kind::SLP_XLATE_SERVICE.0 as u8,
            flags,
            cgroup_level: s.cgroup.as_ref().map_or(0, |c| level(&c.rel)),
            netns_cookie: cookie,
            cgroup_id: s.cgroup.as_ref().map_or(0, |c| c.id),
        };
        for (proto, on) in [(libc::IPPROTO_TCP, s.tcp), (libc::IPPROTO_UDP, s.udp)] {
            if on {
                t.svc.push((
                    slp_svc_key {
                        addr: addr_bytes(s.vip.ip()),
                        port: s.vip.port(),
                        proto: proto as u8,
                        r#gen: gen as u8,
                        family: family(s.vip.ip()),
                        ..Default::default()
                    },
                    value,
                ));
            }
        }
        t.info.push(slp_svc_info {
            addr: addr_bytes(s.vip.ip()),
            port: s.vip.port(),
            family: family(s.vip.ip()),
            protos: u8::from(s.tcp) | (u8::from(s.udp) << 1),
            flags,
            first_backend,
            nbackends: s.backends.len() as u32,
            line: s.line as u32,
            cgroup_id: value.cgroup_id,
            netns_cookie: cookie,
            ..Default::default()
        });
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::file::{parse, CgroupTree};
    use crate::policy::services::tests::svcs;

    fn policy(rules: &str) -> Policy {
        let mut dirs = BTreeMap::new();
        dirs.insert("/".to_owned(), 1);
        dirs.insert("/app".to_owned(), 2);
        let text = format!("[[scope]]\ncgroup = \"app\"\n{rules}");
        parse("p.toml", &text, &CgroupTree { dirs }).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rule(id: u32, action: &str, on: &str, extra: &str) -> String {
        format!("[[scope.rule]]\nid = {id}\naction = \"{action}\"\non = [{on}]\n{extra}\n")
    }

    #[test]
    fn one_prefix_sorts_narrow_ports_then_deny() {
        let p = policy(
            &[
                rule(1, "allow", "\"connect\"", "cidr = \"10.0.0.0/8\""),
                rule(
                    2,
                    "deny",
                    "\"connect\"",
                    "cidr = \"10.0.0.0/8\"\nports = \"1-100\"",
                ),
                rule(
                    3,
                    "allow",
                    "\"connect\"",
                    "cidr = \"10.0.0.0/8\"\nports = \"1-100\"",
                ),
                rule(
                    4,
                    "deny",
                    "\"connect\"",
                    "cidr = \"10.0.0.0/8\"\nports = 80",
                ),
            ]
            .concat(),
        );
        let t = compile(&p, 1).unwrap();
        assert_eq!(t.lpm.len(), 1);
        let (k, v) = &t.lpm[0];
        assert_eq!(k.r#gen, 1);
        assert_eq!(k.prefixlen, 32 + 8);
        assert_eq!(k.op, slp_op::SLP_OP_CONNECT4.0 as u8);
        assert_eq!(&k.addr[..4], &[10, 0, 0, 0]);
        let ids: Vec<u32> = v.rules[..v.count as usize]
            .iter()
            .map(|r| r.rule_id)
            .collect();
        assert_eq!(ids, [4, 2, 3, 1]);
    }

    #[test]
    fn no_cidr_means_both_families_and_each_op() {
        let p = policy(&rule(
            1,
            "deny",
            "\"bind\", \"sendmsg\"",
            "ports = \"1-1023\"",
        ));
        let t = compile(&p, 0).unwrap();
        let ops: Vec<u8> = t.lpm.iter().map(|(k, _)| k.op).collect();
        assert_eq!(ops.len(), 4);
        for op in [
            slp_op::SLP_OP_BIND4,
            slp_op::SLP_OP_BIND6,
            slp_op::SLP_OP_SENDMSG4,
            slp_op::SLP_OP_SENDMSG6,
        ] {
            assert!(ops.contains(&(op.0 as u8)), "{op:?}");
        }
        assert!(t.lpm.iter().all(|(k, _)| k.prefixlen == 32));
        assert_eq!(t.rules[0].1.prefix, u8::MAX);
    }

    #[test]
    fn scope_shortcuts_name_the_lookups_that_can_hit() {
        let p = policy(
            &[
                rule(1, "deny", "\"create\"", "type = \"raw\""),
                rule(2, "deny", "\"create\"", "family = \"inet6\"\nproto = 17"),
                rule(3, "deny", "\"connect\"", "cidr = \"10.0.0.0/8\""),
            ]
            .concat(),
        );
        let t = compile(&p, 0).unwrap();
        let sc = t.scope_of[0].1;
        assert_eq!(sc.create_shapes, (1 << 2) | (1 << 5));
        assert_eq!(sc.ops, 1 << slp_op::SLP_OP_CONNECT4.0);
    }

    #[test]
    fn identical_create_selectors_deny_wins() {
        let p = policy(
            &[
                rule(1, "allow", "\"create\"", "type = \"raw\""),
                rule(2, "deny", "\"create\"", "type = \"raw\""),
                rule(3, "allow", "\"create\"", "type = \"raw\""),
            ]
            .concat(),
        );
        let t = compile(&p, 0).unwrap();
        assert_eq!(t.create.len(), 1);
        assert_eq!(t.create[0].1.rule_id, 2);
        assert_eq!(t.create[0].0.r#type, 3);
        assert_eq!(t.create[0].0.family, 0);
        assert_eq!(t.create[0].0.proto, u16::MAX);
    }

    #[test]
    fn too_many_rules_on_one_prefix() {
        let rules: String = (1..=17)
            .map(|i| {
                rule(
                    i,
                    "deny",
                    "\"connect\"",
                    &format!("cidr = \"10.0.0.0/8\"\nports = {i}"),
                )
            })
            .collect();
        let mut dirs = BTreeMap::new();
        dirs.insert("/".to_owned(), 1);
        dirs.insert("/app".to_owned(), 2);
        let text = format!("[[scope]]\ncgroup = \"app\"\n{rules}");
        let policy = parse("p.toml", &text, &CgroupTree { dirs }).unwrap();
        let (line, msg) = check_capacity(&policy).unwrap_err();
        assert_eq!(line, 100, "{msg}");
        assert!(msg.starts_with("rule 17: more than 16 rules"), "{msg}");
    }

    #[test]
    fn weights_become_slots_divided_by_their_gcd() {
        let s = svcs(
            "[[service]]\naddress = \"198.51.100.1:80\"\nproto = \"both\"\nbackends = [\n{ address = \"127.0.0.2:8080\", weight = 30 },\n{ address = \"127.0.0.3:8080\", weight = 10 },\n{ address = \"127.0.0.4:8080\", weight = 0 },\n]\nunit = \"web.service\"\n",
        );
        assert_eq!(s[0].slots(), 4);
        let t = compile_services(&s, 1, &[77]);
        assert_eq!(t.slots, [0, 0, 0, 1]);
        assert_eq!(t.svc.len(), 2, "tcp and udp keys");
        let (k, v) = &t.svc[0];
        assert_eq!((k.r#gen, k.port, k.proto), (1, 80, 6));
        assert_eq!(&k.addr[..4], &[198, 51, 100, 1]);
        assert_eq!((v.nslots, v.slot_base, v.netns_cookie), (4, 0, 77));
        assert_eq!((v.cgroup_id, v.cgroup_level), (3, 2));
        assert_eq!(t.backends[1].port, 8080);
        assert_eq!(t.backends[2].weight, 0);
        assert_eq!(t.info[0].nbackends, 3);
    }

    #[test]
    fn zero_backends_compile_to_no_slots() {
        let s =
            svcs("[[service]]\naddress = \"[2001:db8::1]:53\"\nproto = \"udp\"\nnetns = \"any\"\n");
        let t = compile_services(&s, 0, &[5]);
        assert_eq!(t.svc[0].1.nslots, 0);
        assert_eq!(t.svc[0].1.netns_cookie, 0);
        assert_eq!(t.svc[0].0.proto, 17);
        assert_eq!(t.svc[0].0.family, libc::AF_INET6 as u16);
    }
}
