//! Local TCP acceleration (`[[accelerate]]` in the policy file): which cgroups'
//! loopback TCP connections skip the TCP/IP stack through a sockhash and sk_msg
//! redirect. Design and the kernel traps it avoids: docs/accelerate.md.
//!
//! This module validates the table; `accelmaps` writes it and holds the sockhash.

use std::collections::HashMap;

use serde::Deserialize;
use toml::Spanned;

use crate::policy::source::{
    deepest_owner, match_target, port_range, CgroupDir, CgroupTree, PolicyError, Src,
};
use crate::skel::policy::types::slp_accel_limit;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccelerate {
    cgroup: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    ports: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accelerate {
    /// The cgroup pattern or unit name as written.
    pub name: String,
    pub line: usize,
    pub matched: Vec<CgroupDir>,
    /// Every cgroup this entry accelerates: matched ones and their descendants
    /// no deeper entry matched.
    pub governs: Vec<u64>,
    /// Server ports (inclusive ranges); empty: any.
    pub ports: Vec<(u16, u16)>,
}

fn lim(l: slp_accel_limit) -> usize {
    l.0 as usize
}

/// Validates every `[[accelerate]]`: one line with FILE:LINE and the value on
/// the first problem.
pub(crate) fn parse(
    src: &Src<'_>,
    tree: &CgroupTree,
    raw: &[Spanned<RawAccelerate>],
) -> Result<Vec<Accelerate>, PolicyError> {
    let max = lim(slp_accel_limit::SLP_ACCEL_MAX_SCOPES);
    if raw.len() > max {
        return Err(src.err(
            raw[max].span(),
            format!(
                "accelerate {}: more entries than the maps hold ({max})",
                max + 1
            ),
        ));
    }
    let mut out: Vec<Accelerate> = Vec::new();
    let mut matched_by: HashMap<String, usize> = HashMap::new();
    for (index, r) in raw.iter().enumerate() {
        let a = r.get_ref();
        let (name, span, matched) =
            match_target(src, tree, "accelerate", r.span(), &a.cgroup, &a.unit)?;
        for m in &matched {
            if let Some(&other) = matched_by.get(&m.rel) {
                return Err(src.err(
                    span.clone(),
                    format!(
                        "accelerate '{name}': cgroup {} is already accelerated by '{}' (line {})",
                        m.rel, out[other].name, out[other].line
                    ),
                ));
            }
            matched_by.insert(m.rel.clone(), index);
        }
        let ports = match &a.ports {
            None => Vec::new(),
            Some(p) => ports(src, &name, p)?,
        };
        out.push(Accelerate {
            name,
            line: src.line(span.start),
            matched,
            governs: Vec::new(),
            ports,
        });
    }
    let mut governed = 0usize;
    for (i, id) in deepest_owner(tree, "/", &matched_by) {
        out[i].governs.push(id);
        governed += 1;
    }
    let max_cg = lim(slp_accel_limit::SLP_ACCEL_MAX_CGROUPS);
    if governed > max_cg {
        return Err(src.err(
            0..0,
            format!("the accelerate entries cover {governed} cgroups, more than the maps hold ({max_cg})"),
        ));
    }
    Ok(out)
}

/// `ports = 6379`, `"8000-8100"` or a list of those.
fn ports(
    src: &Src<'_>,
    name: &str,
    p: &Spanned<toml::Value>,
) -> Result<Vec<(u16, u16)>, PolicyError> {
    let owner = format!("accelerate '{name}'");
    let list: Vec<(u16, u16)> = match p.get_ref() {
        toml::Value::Array(items) => items
            .iter()
            .map(|v| port_range(src, &owner, p.span(), v))
            .collect::<Result<_, _>>()?,
        v => vec![port_range(src, &owner, p.span(), v)?],
    };
    let max = lim(slp_accel_limit::SLP_ACCEL_MAX_PORTS);
    if list.is_empty() || list.len() > max {
        return Err(src.err(
            p.span(),
            format!("{owner}: ports: give 1 to {max} ports or ranges (omit the key for any port)"),
        ));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::file::parse as parse_file;

    fn tree() -> CgroupTree {
        CgroupTree {
            dirs: [
                ("/", 1),
                ("/system.slice", 2),
                ("/system.slice/redis-server.service", 3),
                ("/system.slice/app.service", 4),
                ("/system.slice/app.service/worker", 5),
            ]
            .into_iter()
            .map(|(p, i)| (p.to_owned(), i))
            .collect(),
        }
    }

    fn err(text: &str) -> String {
        parse_file("p.toml", text, &tree()).unwrap_err().to_string()
    }

    #[test]
    fn entries_ports_and_descendants() {
        let p = parse_file(
            "p.toml",
            r#"
[[accelerate]]
unit = "redis-server.service"
ports = 6379

[[accelerate]]
cgroup = "system.slice/app.service"
ports = ["8000-8100", 9000]
"#,
            &tree(),
        )
        .unwrap();
        assert_eq!(p.accelerate.len(), 2);
        assert_eq!(p.accelerate[0].governs, vec![3]);
        assert_eq!(p.accelerate[0].ports, vec![(6379, 6379)]);
        let mut g = p.accelerate[1].governs.clone();
        g.sort();
        assert_eq!(g, vec![4, 5]);
        assert_eq!(p.accelerate[1].ports, vec![(8000, 8100), (9000, 9000)]);
        assert_eq!(p.accelerate[1].line, 7);
    }

    #[test]
    fn errors_name_line_and_value() {
        assert_eq!(
            err("[[accelerate]]\ncgroup = \"/nope\"\n"),
            "p.toml:2: cgroup '/nope': no such cgroup"
        );
        assert_eq!(
            err("[[accelerate]]\ncgroup = \"/system.slice\"\nports = \"9-3\"\n"),
            "p.toml:3: accelerate '/system.slice': ports '9-3': the range is inverted (LOW-HIGH with LOW <= HIGH)"
        );
        assert_eq!(
            err("[[accelerate]]\ncgroup = \"/system.slice\"\nports = []\n"),
            "p.toml:3: accelerate '/system.slice': ports: give 1 to 8 ports or ranges (omit the key for any port)"
        );
        assert!(err("[[accelerate]]\nports = 1\n").contains("accelerate: needs a cgroup or a unit"));
        assert!(
            err("[[accelerate]]\ncgroup = \"/\"\n[[accelerate]]\ncgroup = \"/\"\n")
                .starts_with("p.toml:4: accelerate '/': cgroup / is already accelerated")
        );
        assert!(
            err("[[accelerate]]\ncgroup = \"/\"\nkernel = 1\n").contains("unknown field `kernel`")
        );
    }
}
