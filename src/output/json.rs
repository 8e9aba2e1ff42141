//! JSON objects written member by member straight into a byte buffer: the
//! per-event path of `trace --json`. Serializing a struct through serde
//! (keys escaped at run time, `#[serde(flatten)]` going through a map) and a
//! `String` per field cost most of the agent's time per event.
//!
//! Strings that may need escaping and floats still go through serde_json
//! (`value`), so they print exactly as before; integers, booleans and text
//! known to need no escaping (names, hex, addresses, timestamps) are written
//! here, in the same form.

use std::fmt::Display;
use std::io::Write as _;
use std::net::IpAddr;

use serde::Serialize;

/// An object being written into `out`; `finish` closes it.
pub struct JsonObject<'o> {
    out: &'o mut Vec<u8>,
    empty: bool,
}

impl<'o> JsonObject<'o> {
    pub fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    pub fn finish(self) {
        self.out.push(b'}');
    }

    /// Starts a member; the caller writes its value. Inlined so that each
    /// constant key is copied with a length known at compile time.
    #[inline(always)]
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        debug_assert!(
            key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "key {key:?} would need escaping"
        );
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// A member as serde_json writes the value (`None` as null).
    #[inline]
    pub fn value<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        let out = self.key(key);
        // Into a Vec, serde_json fails only on what is not JSON at all (a map
        // with non-string keys); strings, numbers and unit enums never do.
        let written = serde_json::to_writer(&mut *out, value);
        debug_assert!(written.is_ok(), "{written:?}");
    }

    /// A string member whose text `write` appends and which never needs
    /// escaping (hex digits, IP addresses, timestamps).
    #[inline]
    pub fn plain_str(&mut self, key: &str, write: impl FnOnce(&mut Vec<u8>)) {
        let out = self.key(key);
        out.push(b'"');
        write(out);
        out.push(b'"');
    }

    /// A string member of text that never needs escaping, such as a name
    /// from a fixed table ("tcp", "ESTABLISHED").
    #[inline]
    pub fn plain(&mut self, key: &str, text: &str) {
        debug_assert!(!needs_escaping(text), "{text:?} needs escaping");
        self.plain_str(key, |out| out.extend_from_slice(text.as_bytes()));
    }

    /// A string member of `value`'s `Display` text, which must never need
    /// escaping (as for `plain_str`).
    pub fn display(&mut self, key: &str, value: impl Display) {
        self.plain_str(key, |out| {
            // Writing into a Vec cannot fail.
            let _ = write!(out, "{value}");
        });
    }

    /// `{:#x}` text ("0x1f") as a string member, without `fmt`'s machinery.
    #[inline]
    pub fn hex(&mut self, key: &str, value: u64) {
        self.plain_str(key, |out| write_hex(out, value));
    }

    /// An address as its `Display` text; IPv4, by far the most common, is
    /// written without `fmt`'s machinery.
    #[inline]
    pub fn ip(&mut self, key: &str, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.plain_str(key, |out| write_ipv4(out, v4.octets())),
            IpAddr::V6(v6) => self.display(key, v6),
        }
    }

    /// An integer member.
    #[inline]
    pub fn uint(&mut self, key: &str, value: impl Into<u64>) {
        write_decimal(self.key(key), value.into());
    }

    /// An integer member, null for `None`.
    #[inline]
    pub fn uint_or_null(&mut self, key: &str, value: Option<impl Into<u64>>) {
        match value {
            Some(v) => self.uint(key, v),
            None => self.null(key),
        }
    }

    #[inline]
    pub fn bool(&mut self, key: &str, value: bool) {
        let out = self.key(key);
        if value {
            out.extend_from_slice(b"true");
        } else {
            out.extend_from_slice(b"false");
        }
    }

    #[inline]
    pub fn null(&mut self, key: &str) {
        self.key(key).extend_from_slice(b"null");
    }

    /// A nested object member whose members `write` adds.
    pub fn object(&mut self, key: &str, write: impl FnOnce(&mut JsonObject<'_>)) {
        let mut inner = JsonObject::new(self.key(key));
        write(&mut inner);
        inner.finish();
    }

    /// An array member whose elements `write` adds.
    pub fn array(&mut self, key: &str, write: impl FnOnce(&mut JsonArray<'_>)) {
        let mut inner = JsonArray::new(self.key(key));
        write(&mut inner);
        inner.finish();
    }
}

/// One JSON object as a `String` (no newline): every JSON line socklens prints
/// is written through [`JsonObject`], the hot per-event ones and the rare ones alike.
pub fn line(write: impl FnOnce(&mut JsonObject<'_>)) -> String {
    let mut out = Vec::with_capacity(256);
    let mut obj = JsonObject::new(&mut out);
    write(&mut obj);
    obj.finish();
    // Only `str`s, serde_json's output and ASCII go in.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// An array being written into `out`; `finish` closes it.
pub struct JsonArray<'o> {
    out: &'o mut Vec<u8>,
    empty: bool,
}

impl<'o> JsonArray<'o> {
    pub fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'[');
        Self { out, empty: true }
    }

    pub fn finish(self) {
        self.out.push(b']');
    }

    fn next(&mut self) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out
    }

    /// An object element whose members `write` adds.
    pub fn object(&mut self, write: impl FnOnce(&mut JsonObject<'_>)) {
        let mut inner = JsonObject::new(self.next());
        write(&mut inner);
        inner.finish();
    }

    /// An element as serde_json writes the value.
    pub fn value<T: Serialize + ?Sized>(&mut self, value: &T) {
        let written = serde_json::to_writer(&mut *self.next(), value);
        debug_assert!(written.is_ok(), "{written:?}");
    }
}

/// Appends `len` bytes (at most `MAX`) that `fill` writes in place. Copying
/// a slice whose length is known only at run time calls `memcpy`, and with
/// a short number in most members those calls were a good part of the time
/// per event; a block of constant size, cut back after, is a few stores.
fn append_in_place<const MAX: usize>(out: &mut Vec<u8>, len: usize, fill: impl FnOnce(&mut [u8])) {
    debug_assert!(len <= MAX);
    let start = out.len();
    out.extend_from_slice(&[0; MAX]);
    fill(&mut out[start..start + len]);
    out.truncate(start + len);
}

/// "00", "01", … "99": two digits per division, as itoa does.
const DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0; 200];
    let mut i = 0;
    while i < 100 {
        pairs[2 * i] = b'0' + (i / 10) as u8;
        pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    pairs
};

/// Writes `value`'s last `to.len()` decimal digits, zero-padded, into `to`.
pub(crate) fn put_digits(to: &mut [u8], mut value: u64) {
    let mut end = to.len();
    while end >= 2 {
        // Below 100: the cast cannot truncate.
        let pair = (value % 100) as usize * 2;
        to[end - 2..end].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        value /= 100;
        end -= 2;
    }
    if end == 1 {
        to[0] = b'0' + (value % 10) as u8;
    }
}

/// `value` in decimal, as `Display` (and serde_json) write it.
fn write_decimal(out: &mut Vec<u8>, value: u64) {
    let len = value.checked_ilog10().map_or(1, |l| l as usize + 1);
    append_in_place::<20>(out, len, |digits| put_digits(digits, value));
}

/// What serde_json escapes in a string.
fn needs_escaping(text: &str) -> bool {
    text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `{:#x}` text: "0x" and the digits without leading zeros.
fn write_hex(out: &mut Vec<u8>, value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let len = (value.checked_ilog2().unwrap_or(0) / 4 + 1) as usize;
    out.extend_from_slice(b"0x");
    append_in_place::<16>(out, len, |digits| {
        let mut rest = value;
        for digit in digits.iter_mut().rev() {
            *digit = DIGITS[(rest & 0xf) as usize];
            rest >>= 4;
        }
    });
}

fn write_ipv4(out: &mut Vec<u8>, octets: [u8; 4]) {
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn writes_members_in_order_like_serde_json() {
        let mut out = b"x".to_vec();
        let mut obj = JsonObject::new(&mut out);
        obj.value("s", "a\"b\\c\u{1}\n\u{e9}");
        obj.value("n", &u64::MAX);
        obj.value("f", &2.0_f64);
        obj.value("none", &None::<u32>);
        obj.display("ip", std::net::Ipv6Addr::LOCALHOST);
        obj.plain_str("hex", |o| o.extend_from_slice(b"0x1f"));
        obj.plain("name", "tcp");
        obj.null("z");
        obj.finish();
        let expected = json!({
            "s": "a\"b\\c\u{1}\n\u{e9}",
            "n": u64::MAX,
            "f": 2.0,
            "none": null,
            "ip": "::1",
            "hex": "0x1f",
            "name": "tcp",
            "z": null,
        });
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            format!(
                r#"x{{"s":{},"n":18446744073709551615,"f":2.0,"none":null,"ip":"::1","hex":"0x1f","name":"tcp","z":null}}"#,
                expected["s"]
            )
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&out[1..]).unwrap(),
            expected
        );
    }

    fn member(write: impl FnOnce(&mut JsonObject<'_>)) -> String {
        let mut out = Vec::new();
        let mut obj = JsonObject::new(&mut out);
        write(&mut obj);
        obj.finish();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn integers_and_bools_are_like_serde_json() {
        let mut values = vec![0, 1, 9, 10, 99, 100, u64::from(u32::MAX), u64::MAX];
        values.extend((0..64).map(|shift| 1u64 << shift));
        values.extend((1..20).map(|exp| 10u64.pow(exp) - 1));
        values.extend((1..20).map(|exp| 10u64.pow(exp)));
        for v in values {
            assert_eq!(
                member(|o| o.uint("k", v)),
                format!(r#"{{"k":{}}}"#, serde_json::to_string(&v).unwrap())
            );
        }
        assert_eq!(
            member(|o| {
                o.uint_or_null("a", Some(7u16));
                o.uint_or_null("b", None::<u32>);
                o.bool("t", true);
                o.bool("f", false);
            }),
            r#"{"a":7,"b":null,"t":true,"f":false}"#
        );
    }

    #[test]
    fn hex_is_like_fmt() {
        for v in [
            0,
            1,
            0xf,
            0x10,
            0x1ff,
            0xffff_8880_1234_5678,
            u64::MAX,
            1 << 63,
        ] {
            assert_eq!(member(|o| o.hex("k", v)), format!(r#"{{"k":"{v:#x}"}}"#));
        }
    }

    #[test]
    fn ips_are_like_display() {
        for a in 0..=255u8 {
            let v4 = std::net::Ipv4Addr::new(a, 255 - a, a / 3, a % 10);
            for ip in [IpAddr::V4(v4), IpAddr::V6(v4.to_ipv6_mapped())] {
                assert_eq!(member(|o| o.ip("k", ip)), format!(r#"{{"k":"{ip}"}}"#));
            }
        }
    }

    #[test]
    fn empty_object() {
        let mut out = Vec::new();
        JsonObject::new(&mut out).finish();
        assert_eq!(out, b"{}");
    }
}
