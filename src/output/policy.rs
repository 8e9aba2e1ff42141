//! `policy show`: the policy in force as text or as one JSON object.

use crate::model::policy::{AccelView, PolicyView, RuleTarget};
use crate::output::json::{line, JsonObject};

/// The JSON form: one object; `None` (no policy applied) is `{"policy":null}`,
/// with `draining`: connections still accelerated after a remove.
pub fn json(view: Option<&PolicyView>, draining: Option<&AccelView>) -> String {
    let Some(v) = view else {
        return line(|obj| {
            obj.null("policy");
            match draining {
                Some(a) => obj.object("accelerate", |o| write_accel(o, a)),
                None => obj.null("accelerate"),
            }
        });
    };
    line(|obj| {
        obj.uint("generation", v.generation);
        obj.object("attach", |a| {
            a.uint("cgroup_id", v.attach_cgroup_id);
            a.value("cgroup", &v.attach_cgroup);
        });
        obj.array("links", |list| {
            for (program, cgroup_id) in &v.links {
                list.object(|l| {
                    l.value("program", program);
                    l.uint_or_null("cgroup_id", *cgroup_id);
                });
            }
        });
        obj.uint("events_lost", v.events_lost);
        obj.array("scopes", |list| {
            for s in &v.scopes {
                list.object(|o| {
                    o.uint("index", s.index);
                    o.value("name", &s.name);
                    o.value("cgroup", &s.cgroup);
                    o.uint("cgroups", s.cgroups);
                    o.plain("mode", s.mode);
                    o.plain("default", s.default);
                    o.uint("default_hits", s.default_hits);
                    o.array("rules", |rules| {
                        for r in &s.rules {
                            rules.object(|o| write_rule(o, r));
                        }
                    });
                });
            }
        });
        obj.array("services", |list| {
            for s in &v.services {
                list.object(|o| {
                    o.value("address", &s.address);
                    o.plain("proto", s.proto);
                    o.uint("line", s.line);
                    match s.netns_cookie {
                        Some(cookie) => o.uint("netns", cookie),
                        None => o.plain("netns", "any"),
                    }
                    o.uint("cgroup_id", s.cgroup_id);
                    o.uint("failed_picks", s.failed_picks);
                    o.array("backends", |bl| {
                        for b in &s.backends {
                            bl.object(|o| {
                                o.value("address", &b.address);
                                o.uint("weight", b.weight);
                                o.bool("terminate", b.terminate);
                                o.uint("line", b.line);
                                o.uint("picks", b.picks);
                            });
                        }
                    });
                });
            }
        });
        obj.array("redirects", |list| {
            for r in &v.redirects {
                list.object(|o| {
                    o.uint("line", r.line);
                    o.uint("cgroup_id", r.cgroup_id);
                    o.plain("proto", r.proto);
                    o.value("ports", &r.ports);
                    o.value("proxy", &r.proxy);
                    o.value("proxy6", &r.proxy6);
                    o.uint("redirected", r.redirected);
                });
            }
        });
        obj.object("translated_sockets", |t| {
            t.value("live", &v.translated_live);
            t.value("total", &v.translated_total);
        });
        obj.object("accelerate", |o| write_accel(o, &v.accelerate));
    })
}

fn write_accel(o: &mut JsonObject<'_>, a: &AccelView) {
    o.array("entries", |list| {
        for e in &a.entries {
            list.object(|o| {
                o.value("name", &e.name);
                o.uint("line", e.line);
                o.uint("cgroups", e.cgroups);
                match &e.ports {
                    Some(p) => o.value("ports", p),
                    None => o.plain("ports", "any"),
                }
            });
        }
    });
    o.uint("sockets", a.sockets);
    o.uint("connections", a.sockets / 2);
    o.bool("attached", a.attached);
    o.uint("paired", a.paired);
    o.uint("redirected_msgs", a.redirected_msgs);
    o.uint("redirected_bytes", a.redirected_bytes);
    o.uint("passed_msgs", a.passed_msgs);
    o.uint("unpaired", a.unpaired);
    o.uint("refused_ulp", a.refused_ulp);
    o.uint("skipped_zerocopy", a.skipped_zerocopy);
    o.uint("skipped_ulp", a.skipped_ulp);
    o.uint("skipped_rcvlowat", a.skipped_rcvlowat);
}

fn accel_lines(a: &AccelView, lines: &mut Vec<String>) {
    for e in &a.entries {
        lines.push(format!(
            "accelerate {} (line {}): {} cgroups, ports {}",
            e.name,
            e.line,
            e.cgroups,
            e.ports
                .as_ref()
                .map_or_else(|| "any".to_owned(), |p| p.join(","))
        ));
    }
    lines.push(format!(
        "accelerated connections: {} now ({} paired since the sockhash was made{})",
        a.sockets / 2,
        a.paired,
        if a.attached {
            ""
        } else {
            "; new connections are not accelerated"
        }
    ));
}

fn write_rule(o: &mut JsonObject<'_>, r: &crate::model::policy::RuleView) {
    o.uint("id", r.id);
    o.uint("line", r.line);
    o.plain("action", r.action);
    o.value("on", &r.on);
    o.uint("hits", r.hits);
    match &r.target {
        RuleTarget::Create { family, sock_type } => {
            o.value("family", family);
            o.value("type", sock_type);
        }
        RuleTarget::Addr { cidr, ports } => {
            o.value("cidr", cidr);
            o.value("ports", ports);
        }
    }
    o.value("proto", &r.proto);
}

/// The text form, one line per scope, rule, service, backend, redirect and
/// acceleration entry.
pub fn text(view: Option<&PolicyView>, draining: Option<&AccelView>) -> Vec<String> {
    let Some(v) = view else {
        let mut lines = vec!["no policy is applied".to_owned()];
        if let Some(a) = draining {
            lines.push(format!(
                "accelerated connections: {} still open",
                a.sockets / 2
            ));
        }
        return lines;
    };
    let mut lines = vec![format!(
        "policy in force: generation {}, attached at {} ({} links), {} events lost",
        v.generation,
        v.attach_cgroup.as_deref().unwrap_or("?"),
        v.links.len(),
        v.events_lost
    )];
    for sc in &v.scopes {
        lines.push(format!(
            "scope {} ({} cgroups): mode {}, default {} (hits {})",
            sc.name, sc.cgroups, sc.mode, sc.default, sc.default_hits
        ));
        for r in &sc.rules {
            let target = match &r.target {
                RuleTarget::Addr { cidr, ports } => {
                    format!("{cidr} ports {ports} proto {}", r.proto)
                }
                RuleTarget::Create { family, sock_type } => {
                    format!("family {family} type {sock_type} proto {}", r.proto)
                }
            };
            lines.push(format!(
                "  rule {:>6} line {:>5}  {:<5} {:<22} {target}  hits {}",
                r.id,
                r.line,
                r.action,
                r.on.join(","),
                r.hits
            ));
        }
    }
    for sv in &v.services {
        let netns = sv
            .netns_cookie
            .map_or_else(|| "any".to_owned(), |c| c.to_string());
        lines.push(format!(
            "service {} {} (line {}): netns {netns}, failed picks {}",
            sv.address, sv.proto, sv.line, sv.failed_picks
        ));
        for b in &sv.backends {
            lines.push(format!(
                "  backend {:<40} weight {:>5}  picks {}",
                b.address, b.weight, b.picks
            ));
        }
    }
    for r in &v.redirects {
        lines.push(format!(
            "redirect (line {}): {} ports {} -> proxy {} proxy6 {}: redirected {}",
            r.line,
            r.proto,
            r.ports,
            r.proxy.as_deref().unwrap_or("-"),
            r.proxy6.as_deref().unwrap_or("-"),
            r.redirected
        ));
    }
    lines.push(format!(
        "translated sockets: {} open, {} since apply",
        v.translated_live, v.translated_total
    ));
    accel_lines(&v.accelerate, &mut lines);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{BackendView, RuleView, ScopeView, ServiceView};

    fn view() -> PolicyView {
        PolicyView {
            generation: 1,
            attach_cgroup_id: 9,
            attach_cgroup: Some("/w".into()),
            links: vec![("slp_connect4".into(), Some(9))],
            events_lost: 0,
            scopes: vec![ScopeView {
                index: 0,
                name: "web".into(),
                cgroup: Some("/w/web".into()),
                cgroups: 1,
                mode: "enforce",
                default: "deny",
                default_hits: 2,
                rules: vec![RuleView {
                    id: 7,
                    line: 12,
                    action: "allow",
                    on: vec!["connect"],
                    hits: 3,
                    target: RuleTarget::Addr {
                        cidr: "10.0.0.0/8".into(),
                        ports: "80-80".into(),
                    },
                    proto: "tcp".into(),
                }],
            }],
            services: vec![ServiceView {
                address: "[2001:db8::1]:80".into(),
                proto: "tcp",
                line: 20,
                netns_cookie: None,
                cgroup_id: 0,
                failed_picks: 1,
                backends: vec![BackendView {
                    address: "[2001:db8::2]:8080".into(),
                    weight: 3,
                    terminate: false,
                    line: 21,
                    picks: 4,
                }],
            }],
            redirects: Vec::new(),
            accelerate: AccelView::default(),
            translated_live: 1,
            translated_total: 5,
        }
    }

    #[test]
    fn json_nests_rules_in_scopes_and_backends_in_services() {
        let v: serde_json::Value = serde_json::from_str(&json(Some(&view()), None)).unwrap();
        assert_eq!(v["attach"]["cgroup"], "/w");
        assert_eq!(v["links"][0]["program"], "slp_connect4");
        assert_eq!(v["scopes"][0]["rules"][0]["cidr"], "10.0.0.0/8");
        assert_eq!(v["scopes"][0]["rules"][0]["on"][0], "connect");
        assert_eq!(v["services"][0]["netns"], "any");
        assert_eq!(v["services"][0]["backends"][0]["picks"], 4);
        assert_eq!(v["translated_sockets"]["total"], 5);
        let none: serde_json::Value = serde_json::from_str(&json(None, None)).unwrap();
        assert_eq!(
            none,
            serde_json::json!({"policy": null, "accelerate": null})
        );
    }

    #[test]
    fn text_has_a_line_per_scope_rule_service_and_backend() {
        let t = text(Some(&view()), None);
        assert_eq!(t.len(), 7, "{t:#?}");
        assert!(
            t[2].contains("10.0.0.0/8 ports 80-80 proto tcp  hits 3"),
            "{}",
            t[2]
        );
        assert!(t[3].starts_with("service [2001:db8::1]:80 tcp (line 20): netns any"));
    }
}
