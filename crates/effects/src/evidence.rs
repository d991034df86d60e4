//! Evidence of an effect: what was done, to what, under which authority, with the digests and
//! sizes of what went in and came out (spec I-001, I-006).
//!
//! [`Evidence::to_json`] gives the JSON object the runtime places in the payload of the effect's
//! event (`FileRead`, `EffectStaged`, `EffectApplied`, `APIRequestExecuted`, `ToolInvoked`).
//! Contents themselves are not evidence: they are named by SHA-256 digest and size, so a payload
//! stays small and a content can be matched later against the blob store or the workspace.
//!
//! Every number in the object is an integer that fits the kernel's canonical range (±(2^53−1));
//! a larger count (which no real file or body reaches) is clamped to that bound.

use ice_authority::{EffectClass, Resource};
use ice_kernel::Digest;
use ice_kernel::limits::MAX_SAFE_INTEGER;
use serde_json::{Map, Value, json};

/// One digested input or output: a name (`content`, `request_body`, `stdout`), its SHA-256 and
/// its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digested {
    /// What this is.
    pub name: String,
    /// SHA-256 of the bytes.
    pub digest: Digest,
    /// How many bytes.
    pub bytes: u64,
}

impl Digested {
    /// The digest and size of `bytes`, under `name`.
    pub fn of(name: &str, bytes: &[u8]) -> Digested {
        Digested {
            name: name.to_string(),
            digest: Digest::of(bytes),
            bytes: bytes.len() as u64,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "digest": self.digest.to_hex(),
            "bytes": safe(self.bytes),
        })
    }
}

/// What an adapter adds beyond digests: the facts particular to its kind of effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    /// A file read: the file's size when opened and whether the content was cut at the limit.
    FileRead {
        /// The file's size in bytes.
        size: u64,
        /// Whether fewer bytes than the file holds were returned.
        truncated: bool,
        /// Whether the content came from the run's stage (`true`) or the workspace.
        staged: bool,
    },
    /// A directory listed.
    Listing {
        /// Entries returned.
        entries: u64,
    },
    /// A write or delete staged for the run.
    Staged {
        /// `write` or `delete`.
        op: &'static str,
    },
    /// A staged change applied to the workspace at commit.
    Applied {
        /// `added`, `modified` or `deleted`.
        change: &'static str,
    },
    /// An HTTP request made.
    Http {
        /// The method, as sent.
        method: String,
        /// The URL, as parsed and sent (no fragment).
        url: String,
        /// The response status; `None` when the request was sent (a connection was made) but
        /// no response came back whole: what the server did with it is unknown.
        status: Option<u16>,
        /// The `Location` of a redirect response (not followed).
        location: Option<String>,
        /// Whether the response body was cut at the limit.
        body_truncated: bool,
        /// The addresses the host resolved to, in the resolver's order (the connection went to
        /// the first that answered), each put before the client's admission check, if it has
        /// one, before any connection was made.
        addresses: Vec<String>,
    },
    /// A command run.
    Exec {
        /// The program.
        program: String,
        /// Its arguments.
        args: Vec<String>,
        /// Whether it was an agent's request (`agent`) or one of the run spec's checks
        /// (`check`).
        origin: &'static str,
        /// Its exit code, if it exited.
        exit_code: Option<i32>,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
        /// Whether it was killed for running out of time.
        timed_out: bool,
        /// Wall time, in milliseconds.
        wall_time_ms: u64,
        /// Whether stdout was cut at the limit.
        stdout_truncated: bool,
        /// Whether stderr was cut at the limit.
        stderr_truncated: bool,
    },
}

/// The evidence of one effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The effect class the effect had.
    pub effect: EffectClass,
    /// The capability used (`fs.read`, `http.request`, …).
    pub capability: String,
    /// The target, in its canonical form.
    pub target: Resource,
    /// The grant that authorised it (`run:seq`), if it was an agent's request; `None` for the
    /// runtime's own acts (commit, validation checks), whose authority the event names.
    pub grant: Option<String>,
    /// What went in.
    pub inputs: Vec<Digested>,
    /// What came out.
    pub outputs: Vec<Digested>,
    /// The adapter's specifics.
    pub detail: Detail,
}

fn safe(n: u64) -> u64 {
    n.min(MAX_SAFE_INTEGER)
}

impl Evidence {
    /// The JSON object for an effect event's payload:
    ///
    /// ```json
    /// {"effect": "read", "capability": "fs.read",
    ///  "target": {"kind": "Path", "id": "src/lib.rs"}, "grant": "run-1:7",
    ///  "inputs": [], "outputs": [{"name": "content", "digest": "…", "bytes": 120}],
    ///  "file": {"size": 120, "truncated": false, "staged": false}}
    /// ```
    ///
    /// The adapter's specifics sit under one key named for the adapter: `file`, `listing`,
    /// `staged`, `applied`, `http` or `exec`. `grant` is absent for the runtime's own acts.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("effect".into(), json!(self.effect.as_str()));
        object.insert("capability".into(), json!(self.capability));
        object.insert(
            "target".into(),
            json!({
                "kind": self.target.kind().entity_type(),
                "id": self.target.entity_id(),
            }),
        );
        if let Some(grant) = &self.grant {
            object.insert("grant".into(), json!(grant));
        }
        object.insert(
            "inputs".into(),
            Value::Array(self.inputs.iter().map(Digested::to_json).collect()),
        );
        object.insert(
            "outputs".into(),
            Value::Array(self.outputs.iter().map(Digested::to_json).collect()),
        );
        let (key, detail) = match &self.detail {
            Detail::FileRead {
                size,
                truncated,
                staged,
            } => (
                "file",
                json!({"size": safe(*size), "truncated": truncated, "staged": staged}),
            ),
            Detail::Listing { entries } => ("listing", json!({"entries": safe(*entries)})),
            Detail::Staged { op } => ("staged", json!({"op": op})),
            Detail::Applied { change } => ("applied", json!({"change": change})),
            Detail::Http {
                method,
                url,
                status,
                location,
                body_truncated,
                addresses,
            } => {
                let mut http = json!({
                    "method": method,
                    "url": url,
                    "status": status,
                    "body_truncated": body_truncated,
                    "addresses": addresses,
                });
                if let (Some(location), Some(map)) = (location, http.as_object_mut()) {
                    map.insert("location".into(), json!(location));
                }
                ("http", http)
            }
            Detail::Exec {
                program,
                args,
                origin,
                exit_code,
                signal,
                timed_out,
                wall_time_ms,
                stdout_truncated,
                stderr_truncated,
            } => (
                "exec",
                json!({
                    "program": program,
                    "args": args,
                    "origin": origin,
                    "exit_code": exit_code,
                    "signal": signal,
                    "timed_out": timed_out,
                    "wall_time_ms": safe(*wall_time_ms),
                    "stdout_truncated": stdout_truncated,
                    "stderr_truncated": stderr_truncated,
                }),
            ),
        };
        object.insert(key.into(), detail);
        Value::Object(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_read_evidence_is_a_json_object_with_digests_and_no_content() {
        let evidence = Evidence {
            effect: EffectClass::Read,
            capability: "fs.read".into(),
            target: Resource::path("src/lib.rs").unwrap(),
            grant: Some("run-1:7".into()),
            inputs: vec![],
            outputs: vec![Digested::of("content", b"fn main() {}")],
            detail: Detail::FileRead {
                size: 12,
                truncated: false,
                staged: true,
            },
        };
        let json = evidence.to_json();
        assert_eq!(json["effect"], "read");
        assert_eq!(json["capability"], "fs.read");
        assert_eq!(json["target"], json!({"kind": "Path", "id": "src/lib.rs"}));
        assert_eq!(json["grant"], "run-1:7");
        assert_eq!(
            json["outputs"][0]["digest"],
            Digest::of(b"fn main() {}").to_hex()
        );
        assert_eq!(json["outputs"][0]["bytes"], 12);
        assert_eq!(
            json["file"],
            json!({"size": 12, "truncated": false, "staged": true})
        );
        assert!(!json.to_string().contains("fn main"));
    }

    #[test]
    fn runtime_acts_have_no_grant_and_counts_stay_in_the_canonical_range() {
        let evidence = Evidence {
            effect: EffectClass::InternalWrite,
            capability: "process.exec".into(),
            target: Resource::command("cargo").unwrap(),
            grant: None,
            inputs: vec![],
            outputs: vec![Digested {
                name: "stdout".into(),
                digest: Digest::of(b""),
                bytes: u64::MAX,
            }],
            detail: Detail::Exec {
                program: "cargo".into(),
                args: vec!["test".into()],
                origin: "check",
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                wall_time_ms: 5,
                stdout_truncated: false,
                stderr_truncated: false,
            },
        };
        let json = evidence.to_json();
        assert!(json.get("grant").is_none());
        assert_eq!(json["outputs"][0]["bytes"], MAX_SAFE_INTEGER);
        assert_eq!(json["exec"]["exit_code"], 0);
        assert_eq!(json["exec"]["signal"], Value::Null);
        assert_eq!(json["exec"]["origin"], "check");
    }
}
