//! UTC timestamps in RFC 3339, byte for byte as the `time` crate's
//! `Rfc3339` formats an `OffsetDateTime` at UTC offset, but written straight
//! into a buffer: `trace --json` prints up to three per event, and going
//! through `OffsetDateTime` and a `String` each time cost a good part of the
//! agent's time per event.
//!
//! `time` prints the seconds' fraction with its trailing zeros dropped (none
//! at all on a whole second). Instants outside what nanoseconds in a `u64`
//! cover (1970 to 2554) are left to `time` itself.

use std::cell::Cell;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::output::json::put_digits;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// "YYYY-MM-DDTHH:MM:SS", the text of a whole second.
type SecondText = [u8; 19];

/// Writes timestamps, keeping the text of the last whole second it wrote:
/// an event's timestamps, and events in a row, mostly fall in the same one.
#[derive(Debug, Clone, Default)]
pub struct UtcWriter {
    last: Cell<Option<(u64, SecondText)>>,
}

impl UtcWriter {
    /// Appends `unix_ns` (nanoseconds since the Unix epoch) as RFC 3339 UTC.
    pub fn write(&self, unix_ns: i128, out: &mut Vec<u8>) {
        // 1970 to 2554 in u64 nanoseconds, with no 128-bit division.
        let Ok(ns) = u64::try_from(unix_ns) else {
            out.extend_from_slice(with_time_crate(unix_ns).as_bytes());
            return;
        };
        let secs = ns / NANOS_PER_SEC;
        let text = match self.last.get() {
            Some((cached, text)) if cached == secs => text,
            _ => match second_text(secs) {
                Some(text) => {
                    self.last.set(Some((secs, text)));
                    text
                }
                None => {
                    out.extend_from_slice(with_time_crate(unix_ns).as_bytes());
                    return;
                }
            },
        };
        out.extend_from_slice(&text);
        // Below 1e9: fits a u32.
        write_fraction((ns % NANOS_PER_SEC) as u32, out);
        out.push(b'Z');
    }
}

/// The `time` crate's own rendering, with what the renderer always did on
/// its errors: the epoch for an instant it cannot represent, nothing for a
/// year it cannot format.
pub fn with_time_crate(unix_ns: i128) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The text of the whole second `secs` since the epoch. The calendar is
/// `time`'s; this runs once per second of timestamps written.
fn second_text(secs: u64) -> Option<SecondText> {
    let at = OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    let mut text = *b"0000-00-00T00:00:00";
    // Every value fits its digits: years to 2554 here, the rest below 100.
    put_digits(&mut text[0..4], u64::try_from(at.year()).ok()?);
    put_digits(&mut text[5..7], u8::from(at.month()).into());
    put_digits(&mut text[8..10], at.day().into());
    put_digits(&mut text[11..13], at.hour().into());
    put_digits(&mut text[14..16], at.minute().into());
    put_digits(&mut text[17..19], at.second().into());
    Some(text)
}

/// ".5", ".000000123" for `nanos` below 1e9; nothing for 0.
fn write_fraction(nanos: u32, out: &mut Vec<u8>) {
    if nanos == 0 {
        return;
    }
    let mut fraction = *b".000000000";
    put_digits(&mut fraction[1..], u64::from(nanos));
    let zeros = fraction.iter().rev().take_while(|&&b| b == b'0').count();
    // All of it and then cut back: a copy of constant size (see
    // `append_in_place`).
    out.extend_from_slice(&fraction);
    out.truncate(out.len() - zeros);
}

/// Converts CLOCK_MONOTONIC stamps (bpf_ktime_get_ns) to wall-clock time.
#[derive(Debug, Clone)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
    utc: UtcWriter,
}

fn clock_ns(id: nix::time::ClockId) -> i128 {
    nix::time::clock_gettime(id)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
        .unwrap_or(0)
}

impl Clock {
    pub fn now() -> Self {
        let mono = clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
        let real = clock_ns(nix::time::ClockId::CLOCK_REALTIME);
        Self::with_offset(real - mono)
    }

    pub(crate) fn with_offset(realtime_minus_monotonic_ns: i128) -> Self {
        Self {
            realtime_minus_monotonic_ns,
            utc: UtcWriter::default(),
        }
    }

    fn unix_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.realtime_minus_monotonic_ns
    }

    pub fn wall(&self, mono_ns: u64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(self.unix_ns(mono_ns))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// RFC 3339 UTC with nanoseconds, trailing zeros dropped.
    pub fn iso(&self, mono_ns: u64) -> String {
        let mut out = Vec::with_capacity(32);
        self.write_iso(mono_ns, &mut out);
        String::from_utf8(out).unwrap_or_default() // ASCII only
    }

    /// `iso`, appended to `out`.
    pub fn write_iso(&self, mono_ns: u64, out: &mut Vec<u8>) {
        self.utc.write(self.unix_ns(mono_ns), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i128 = 1_000_000_000;

    /// With nothing cached.
    fn fast(unix_ns: i128) -> String {
        let mut out = Vec::new();
        UtcWriter::default().write(unix_ns, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn assert_same(unix_ns: i128) {
        assert_eq!(fast(unix_ns), with_time_crate(unix_ns), "at {unix_ns} ns");
    }

    #[test]
    fn known_instants() {
        assert_eq!(fast(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            fast(1_700_000_000_000_001_000),
            "2023-11-14T22:13:20.000001Z"
        );
        assert_eq!(fast(951_782_400_500_000_000), "2000-02-29T00:00:00.5Z");
        assert_eq!(fast(i128::from(u64::MAX)), "2554-07-21T23:34:33.709551615Z");
    }

    #[test]
    fn fractions_drop_trailing_zeros_like_time() {
        let base = 1_700_000_000 * SEC;
        let mut nanos = 1;
        while nanos < SEC {
            for digit in 1..10 {
                assert_same(base + nanos * digit);
                assert_same(base + nanos * digit + 1);
            }
            nanos *= 10;
        }
        assert_same(base + 999_999_999);
        assert_same(base + 100_000_001);
    }

    #[test]
    fn every_day_of_four_centuries_matches_time() {
        // 1970 to 2370: every leap rule (4, 100, 400 years) and month end.
        for day in 0..146_097 {
            let secs = i128::from(day) * 86_400;
            assert_same(secs * SEC);
            assert_same((secs + 86_399) * SEC + 999_999_999);
        }
    }

    #[test]
    fn pseudo_random_instants_match_time() {
        // xorshift64: reproducible, spread over the u64 range (to 2554).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            assert_same(i128::from(x));
            // Around now, where real timestamps are.
            assert_same(1_700_000_000 * SEC + i128::from(x % (1 << 50)));
        }
    }

    #[test]
    fn the_cached_second_is_only_used_within_it() {
        let writer = UtcWriter::default();
        let base = 1_700_000_000 * SEC;
        // Within a second, to the next, back, and far away.
        for ns in [
            base,
            base + 999_999_999,
            base + SEC,
            base + 5,
            base - 1,
            base + 86_400 * SEC,
            -SEC,
            base + 86_400 * SEC + 7,
            base,
        ] {
            let mut out = Vec::new();
            writer.write(ns, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                with_time_crate(ns),
                "at {ns} ns"
            );
        }
    }

    #[test]
    fn outside_u64_nanoseconds_is_times_own() {
        assert_eq!(fast(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(
            fast(i128::from(u64::MAX) + 1),
            "2554-07-21T23:34:33.709551616Z"
        );
        assert_eq!(fast(-62_167_219_201 * SEC), "", "year -1: not formatted");
        assert_eq!(
            fast(253_402_300_800 * SEC),
            "1970-01-01T00:00:00Z",
            "year 10000: no instant"
        );
    }
}
