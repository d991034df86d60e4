//! Time as the kernel sees it: an injected reading, never the system clock.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::{OffsetDateTime, UtcOffset, format_description::FormatItem, macros::format_description};

/// A UTC instant with microsecond precision.
///
/// Its one text form is `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339, fixed width), so the canonical
/// encoding of an event is byte-stable and text order equals time order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_us: i64,
}

const FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Earliest representable instant: 1970-01-01T00:00:00Z.
const MIN_UNIX_US: i64 = 0;
/// Latest representable instant: 9999-12-31T23:59:59.999999Z.
const MAX_UNIX_US: i64 = 253_402_300_799_999_999;

impl Timestamp {
    /// From microseconds since the Unix epoch; `None` outside years 1970 to 9999.
    pub fn from_unix_us(unix_us: i64) -> Option<Timestamp> {
        (MIN_UNIX_US..=MAX_UNIX_US)
            .contains(&unix_us)
            .then_some(Timestamp { unix_us })
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_us(&self) -> i64 {
        self.unix_us
    }

    /// Parse the one text form; anything else (other offsets, other precision) is refused.
    pub fn parse(s: &str) -> Result<Timestamp, String> {
        let bad = || format!("time {s:?} is not of the form YYYY-MM-DDTHH:MM:SS.ffffffZ (UTC)");
        if s.len() != 27 {
            return Err(bad());
        }
        let dt = time::PrimitiveDateTime::parse(s, FORMAT).map_err(|_| bad())?;
        let odt = dt.assume_offset(UtcOffset::UTC);
        let nanos = odt.unix_timestamp_nanos();
        let us = i64::try_from(nanos / 1000).map_err(|_| bad())?;
        Timestamp::from_unix_us(us).ok_or_else(bad)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let odt = OffsetDateTime::from_unix_timestamp_nanos(self.unix_us as i128 * 1000)
            .map_err(|_| fmt::Error)?;
        let s = odt.format(FORMAT).map_err(|_| fmt::Error)?;
        f.write_str(&s)
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
