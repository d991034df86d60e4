//! Grant constraints: limits on each use of a grant beyond its scope, set by the policies that
//! permitted it and enforced by the effects layer at the moment of use.
//!
//! A permit policy sets them with annotations:
//!
//! ```text
//! @max_bytes("65536")   // one use moves at most 65536 bytes
//! @timeout_ms("5000")   // one use takes at most 5 s
//! permit(principal, action == Action::"http.request", resource);
//! ```
//!
//! - `max_bytes`: the most bytes one use may move, counted as the `bytes` cost attribute counts
//!   them: the content written (`fs.write`, refused if larger), the content read (`fs.read`, cut
//!   and marked truncated), the request body plus the response body (`http.request`: a larger
//!   body is refused before sending, the response is cut and marked truncated), the arguments
//!   plus the result (`mcp.call`: larger arguments are refused before sending, a larger result
//!   is an oversized result), the output kept (`process.exec`: stdout, then stderr, cut).
//! - `timeout_ms`: the longest one use may run (`http.request`, `mcp.call`, `process.exec`;
//!   filesystem effects on the stage are not timed).
//!
//! The grant carries the tightest value of each constraint among the permits that determined
//! the decision: a constraint an operator wrote is never loosened by another permit. The
//! values are recorded in the `CapabilityGranted` event, so an audit shows what bounded each
//! use; a recorded constraint ICE does not know makes the grant unreadable rather than
//! ignored.

use serde::{Deserialize, Serialize};

use ice_kernel::limits::MAX_SAFE_INTEGER;

/// The limits a grant puts on each of its uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// The most bytes one use may move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// The longest one use may run, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The policy annotation that sets [`Constraints::max_bytes`].
pub const MAX_BYTES_ANNOTATION: &str = "max_bytes";
/// The policy annotation that sets [`Constraints::timeout_ms`].
pub const TIMEOUT_MS_ANNOTATION: &str = "timeout_ms";

impl Constraints {
    /// No constraint.
    pub const NONE: Constraints = Constraints {
        max_bytes: None,
        timeout_ms: None,
    };

    /// Whether no constraint is set.
    pub fn is_empty(&self) -> bool {
        *self == Constraints::NONE
    }

    /// The tightest of both: each constraint at the smaller of the values set.
    pub fn tightest(self, other: Constraints) -> Constraints {
        fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Constraints {
            max_bytes: min(self.max_bytes, other.max_bytes),
            timeout_ms: min(self.timeout_ms, other.timeout_ms),
        }
    }

    /// Set the constraint an annotation names from its value. `Ok(false)`: the annotation is
    /// not a constraint; an error says why the value is not one.
    pub fn set_from_annotation(&mut self, name: &str, value: &str) -> Result<bool, String> {
        let slot = match name {
            MAX_BYTES_ANNOTATION => &mut self.max_bytes,
            TIMEOUT_MS_ANNOTATION => &mut self.timeout_ms,
            _ => return Ok(false),
        };
        let parsed = Some(value)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| (1..=MAX_SAFE_INTEGER).contains(v))
            .ok_or_else(|| {
                format!(
                    "@{name}({value:?}) is not understood; write a whole number from 1 to \
                     {MAX_SAFE_INTEGER}, e.g. @{name}(\"1000\")"
                )
            })?;
        *slot = Some(parsed);
        Ok(true)
    }

    /// Check recorded values: each set one is from 1 to 2^53-1.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            (MAX_BYTES_ANNOTATION, self.max_bytes),
            (TIMEOUT_MS_ANNOTATION, self.timeout_ms),
        ] {
            if let Some(v) = v
                && !(1..=MAX_SAFE_INTEGER).contains(&v)
            {
                return Err(format!(
                    "constraint {name} = {v} is not from 1 to {MAX_SAFE_INTEGER}"
                ));
            }
        }
        Ok(())
    }

    /// The annotations that set these constraints, as a policy would carry them.
    pub fn annotations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(v) = self.max_bytes {
            out.push(format!("@{MAX_BYTES_ANNOTATION}(\"{v}\")"));
        }
        if let Some(v) = self.timeout_ms {
            out.push(format!("@{TIMEOUT_MS_ANNOTATION}(\"{v}\")"));
        }
        out
    }
}

impl std::fmt::Display for Constraints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(v) = self.max_bytes {
            parts.push(format!("at most {v} bytes"));
        }
        if let Some(v) = self.timeout_ms {
            parts.push(format!("at most {v} ms"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            write!(f, "each use {}", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tightest_value_of_each_constraint_wins() {
        let a = Constraints {
            max_bytes: Some(100),
            timeout_ms: None,
        };
        let b = Constraints {
            max_bytes: Some(50),
            timeout_ms: Some(7),
        };
        let both = Constraints {
            max_bytes: Some(50),
            timeout_ms: Some(7),
        };
        assert_eq!(a.tightest(b), both);
        assert_eq!(b.tightest(a), both);
        assert_eq!(a.tightest(Constraints::NONE), a);
        assert_eq!(
            Constraints::NONE.tightest(Constraints::NONE),
            Constraints::NONE
        );
    }

    #[test]
    fn annotations_set_constraints_and_bad_values_are_named() {
        let mut c = Constraints::default();
        assert_eq!(c.set_from_annotation("max_bytes", "10"), Ok(true));
        assert_eq!(c.set_from_annotation("timeout_ms", "250"), Ok(true));
        assert_eq!(c.set_from_annotation("id", "x"), Ok(false));
        assert_eq!(
            c,
            Constraints {
                max_bytes: Some(10),
                timeout_ms: Some(250)
            }
        );
        for bad in ["0", "-1", "+5", " 5", "ten", "1.5", "", "9007199254740992"] {
            let e = c.set_from_annotation("max_bytes", bad).unwrap_err();
            assert!(
                e.contains("@max_bytes") && e.contains("whole number"),
                "{e}"
            );
        }
        assert_eq!(
            c.annotations(),
            ["@max_bytes(\"10\")", "@timeout_ms(\"250\")"]
        );
    }

    #[test]
    fn recorded_constraints_read_back_and_unknown_ones_are_refused() {
        let c: Constraints = serde_json::from_str(r#"{"max_bytes":5}"#).unwrap();
        assert_eq!(c.max_bytes, Some(5));
        assert_eq!(serde_json::to_string(&Constraints::NONE).unwrap(), "{}");
        assert!(serde_json::from_str::<Constraints>(r#"{"max_rows":5}"#).is_err());
        let zero = Constraints {
            max_bytes: Some(0),
            timeout_ms: None,
        };
        assert!(zero.check().unwrap_err().contains("max_bytes"));
    }
}
