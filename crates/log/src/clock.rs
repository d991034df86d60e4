//! The system clock, injected into the kernel wherever an event needs a time.

use ice_kernel::{Clock, Timestamp};

/// Reads the operating system's UTC clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        // A clock before 1970 or after 9999 is broken; the epoch keeps events valid and the
        // ledger's monotonic clamp keeps each run's time non-decreasing.
        Timestamp::from_unix_us(us)
            .or_else(|| Timestamp::from_unix_us(0))
            .expect("epoch is representable")
    }
}
