//! The address grammar of the policy file: CIDRs and port ranges, shared by
//! rules, services and redirects.

use std::fmt;
use std::net::IpAddr;

use toml::Spanned;

use crate::policy::source::{PolicyError, Src};

/// An address prefix with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A CIDR of `what` ("rule 3", "redirect"): host bits must be clear.
pub(crate) fn cidr(src: &Src<'_>, what: &str, c: &Spanned<String>) -> Result<Cidr, PolicyError> {
    let text = c.get_ref();
    let bad = |why: String| src.err(c.span(), format!("{what}: cidr '{text}': {why}"));
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text.as_str(), None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| bad(format!("'{addr_text}' is not an IPv4 or IPv6 address")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(bad(format!("prefix length '{p}' is not 0 to {max}"))),
        },
    };
    let masked = mask(addr, prefix);
    if masked != addr {
        return Err(bad(format!(
            "host bits set (did you mean {masked}/{prefix}?)"
        )));
    }
    Ok(Cidr { addr, prefix })
}

/// The address with every bit past `prefix` cleared.
pub fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// PORT or "LOW-HIGH" of `what` ("rule 3", "redirect").
pub(crate) fn ports(
    src: &Src<'_>,
    what: &str,
    p: &Spanned<toml::Value>,
) -> Result<(u16, u16), PolicyError> {
    crate::policy::source::port_range(src, what, p.span(), p.get_ref())
}
