//! Time as the kernel sees it: an injected reading, never the system clock.
//!
//! The one text form is fixed-width RFC 3339 in UTC with microseconds,
//! `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so the canonical encoding of an event is byte-stable and text
//! order equals time order. Parsing and formatting are done here, by hand, because the form is
//! ICE's own and sits on the verify and replay hot path (no locale, no offsets, no leap seconds).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A UTC instant with microsecond precision, from 1970-01-01 to 9999-12-31.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_us: i64,
}

/// Latest representable instant: 9999-12-31T23:59:59.999999Z.
const MAX_UNIX_US: i64 = 253_402_300_799_999_999;
const US_PER_DAY: i64 = 86_400_000_000;

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

impl Timestamp {
    /// From microseconds since the Unix epoch; `None` outside years 1970 to 9999.
    pub fn from_unix_us(unix_us: i64) -> Option<Timestamp> {
        (0..=MAX_UNIX_US)
            .contains(&unix_us)
            .then_some(Timestamp { unix_us })
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_us(&self) -> i64 {
        self.unix_us
    }

    /// Parse the one text form; anything else (other offsets, other precision, impossible
    /// dates) is refused.
    pub fn parse(s: &str) -> Result<Timestamp, String> {
        let bad = || format!("time {s:?} is not of the form YYYY-MM-DDTHH:MM:SS.ffffffZ (UTC)");
        let b = s.as_bytes();
        if b.len() != 27 {
            return Err(bad());
        }
        for (i, c) in b.iter().enumerate() {
            let ok = match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'.',
                26 => *c == b'Z',
                _ => c.is_ascii_digit(),
            };
            if !ok {
                return Err(bad());
            }
        }
        let num =
            |r: std::ops::Range<usize>| b[r].iter().fold(0i64, |a, c| a * 10 + i64::from(c - b'0'));
        let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
        let (h, mi, sec, us) = (num(11..13), num(14..16), num(17..19), num(20..26));
        if y < 1970
            || !(1..=12).contains(&mo)
            || d < 1
            || d > days_in_month(y, mo)
            || h > 23
            || mi > 59
            || sec > 59
        {
            return Err(bad());
        }
        let unix_us =
            days_from_civil(y, mo, d) * US_PER_DAY + ((h * 60 + mi) * 60 + sec) * 1_000_000 + us;
        Timestamp::from_unix_us(unix_us).ok_or_else(bad)
    }
}

impl Timestamp {
    /// The one text form, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, as ASCII bytes: written digit by digit
    /// into a fixed array, since every event's encoding carries one.
    pub fn to_text(&self) -> [u8; 27] {
        let days = self.unix_us.div_euclid(US_PER_DAY);
        let rem = self.unix_us.rem_euclid(US_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        let secs = rem / 1_000_000;
        let mut t = *b"0000-00-00T00:00:00.000000Z";
        // Writes `v` as `width` decimal digits ending just before `end` (zero-padded; `v` has
        // no more digits than that: the year is 1970 to 9999).
        let mut put = |end: usize, width: usize, mut v: i64| {
            for c in t[end - width..end].iter_mut().rev() {
                *c = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(4, 4, y);
        put(7, 2, m);
        put(10, 2, d);
        put(13, 2, secs / 3600);
        put(16, 2, secs / 60 % 60);
        put(19, 2, secs % 60);
        put(26, 6, rem % 1_000_000);
        t
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.to_text();
        // Digits and ASCII punctuation only.
        f.write_str(std::str::from_utf8(&t).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A source of time readings. The kernel never reads a clock itself; callers inject one.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants_round_trip() {
        for (s, us) in [
            ("1970-01-01T00:00:00.000000Z", 0i64),
            ("2000-02-29T12:34:56.789012Z", 951_827_696_789_012),
            ("2026-11-26T05:59:17.000001Z", 1_795_672_757_000_001),
            ("9999-12-31T23:59:59.999999Z", MAX_UNIX_US),
        ] {
            let t = Timestamp::parse(s).unwrap();
            assert_eq!(t.unix_us(), us, "{s}");
            assert_eq!(t.to_string(), s);
        }
    }

    /// The text form as `format!` writes it from the parts: what `to_text` replaced.
    fn formatted(t: Timestamp) -> String {
        let days = t.unix_us.div_euclid(US_PER_DAY);
        let rem = t.unix_us.rem_euclid(US_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        let secs = rem / 1_000_000;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            rem % 1_000_000
        )
    }

    #[test]
    fn the_text_form_is_written_digit_by_digit_as_format_writes_it() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut instants = vec![0, 1, 999_999, 1_000_000, US_PER_DAY - 1, MAX_UNIX_US];
        for _ in 0..200_000 {
            // xorshift: instants spread over the whole range, every digit position exercised.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            instants.push((x % (MAX_UNIX_US as u64 + 1)) as i64);
        }
        for us in instants {
            let t = Timestamp::from_unix_us(us).unwrap();
            let text = t.to_text();
            assert_eq!(std::str::from_utf8(&text).unwrap(), formatted(t), "{us}");
            assert_eq!(t.to_string(), formatted(t), "{us}");
        }
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        let mut prev = None;
        for day in (0..146_097 * 2).step_by(7) {
            let t = Timestamp::from_unix_us(day * US_PER_DAY + 1).unwrap();
            let s = t.to_string();
            assert_eq!(Timestamp::parse(&s).unwrap(), t);
            if let Some(p) = prev {
                assert!(s > p, "text order is time order");
            }
            prev = Some(s);
        }
    }

    #[test]
    fn malformed_and_impossible_times_are_refused() {
        for s in [
            "2026-11-26T05:59:17Z",
            "2026-11-26T05:59:17.000000+00:00",
            "2026-02-29T00:00:00.000000Z",
            "2026-13-01T00:00:00.000000Z",
            "2026-11-26T24:00:00.000000Z",
            "1969-12-31T23:59:59.999999Z",
            "2026-11-26t05:59:17.000000Z",
            "2026-11-26T05:59:60.000000Z",
            "２026-11-26T05:59:17.000000Z",
        ] {
            assert!(Timestamp::parse(s).is_err(), "{s} must be refused");
        }
    }
}
