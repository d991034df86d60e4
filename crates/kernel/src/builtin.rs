//! ICE's own capabilities as tools an agent calls by name: the LLM driver offers them to the
//! model as functions, the MCP gateway lists them to clients as tools. One definition of each
//! (name, capability, the argument that is its target, description, JSON Schema of its
//! arguments) and of the capability request a call stands for, so every agent interface asks
//! for the same thing the same way.

use serde_json::{Map, Value, json};

use crate::agent::CapabilityProposal;

/// One of ICE's own capabilities, callable as a tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuiltinTool {
    /// The tool's (function's) name: `fs_read`.
    pub name: &'static str,
    /// The capability a call requests: `fs.read`.
    pub capability: &'static str,
    /// The argument that becomes the request's target (`path`, `url`).
    pub target_arg: &'static str,
}

/// The longest a `process.exec` call may ask to run (its schema's `timeout_ms` maximum).
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// The methods an `http.request` may ask for (in any case; sent in upper case). `CONNECT` (a
/// tunnel) and `TRACE` are not among them.
pub const HTTP_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Every built-in tool, by name.
pub const BUILTIN_TOOLS: [BuiltinTool; 6] = [
    BuiltinTool {
        name: "fs_delete",
        capability: "fs.delete",
        target_arg: "path",
    },
    BuiltinTool {
        name: "fs_list",
        capability: "fs.list",
        target_arg: "path",
    },
    BuiltinTool {
        name: "fs_read",
        capability: "fs.read",
        target_arg: "path",
    },
    BuiltinTool {
        name: "fs_write",
        capability: "fs.write",
        target_arg: "path",
    },
    BuiltinTool {
        name: "http_request",
        capability: "http.request",
        target_arg: "url",
    },
    BuiltinTool {
        name: "process_exec",
        capability: "process.exec",
        target_arg: "program",
    },
];

impl BuiltinTool {
    /// The built-in tool called `name`.
    pub fn named(name: &str) -> Option<&'static BuiltinTool> {
        BUILTIN_TOOLS.iter().find(|b| b.name == name)
    }

    /// The built-in tool for `capability`.
    pub fn for_capability(capability: &str) -> Option<&'static BuiltinTool> {
        BUILTIN_TOOLS.iter().find(|b| b.capability == capability)
    }

    /// What it does, for the agent. (Part of what the LLM driver sends, so of its recorded
    /// request digests: changing it makes older runs replay as divergent.)
    pub fn description(&self) -> &'static str {
        match self.capability {
            "fs.read" => "Read a file of the workspace.",
            "fs.list" => "List a directory of the workspace.",
            "fs.write" => "Write a file of the workspace (created or replaced whole).",
            "fs.delete" => "Delete a file of the workspace.",
            "process.exec" => {
                "Run a program in a throw-away copy of the workspace with the run's staged writes \
                 applied (what it changes there is discarded); returns its exit code and output."
            }
            _ => "Make an HTTP request.",
        }
    }

    /// The JSON Schema of its arguments.
    pub fn input_schema(&self) -> Value {
        let path = |what: &str| json!({"type": "string", "description": what});
        match self.capability {
            "fs.list" => json!({
                "type": "object",
                "properties": {"path": path("the directory's path, relative to the workspace; . for its root")},
                "required": ["path"],
                "additionalProperties": false,
            }),
            "fs.write" => json!({
                "type": "object",
                "properties": {
                    "path": path("the file's path, relative to the workspace"),
                    "content": {"type": "string", "description": "the file's whole new content"},
                },
                "required": ["path", "content"],
                "additionalProperties": false,
            }),
            "process.exec" => json!({
                "type": "object",
                "properties": {
                    "program": {"type": "string", "description": "the program: a name looked up on PATH, or a path relative to the workspace"},
                    "args": {"type": "array", "items": {"type": "string"}, "description": "its arguments"},
                    "timeout_ms": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS, "description": "how long it may run (60000 when not given)"},
                },
                "required": ["program"],
                "additionalProperties": false,
            }),
            "http.request" => json!({
                "type": "object",
                "properties": {
                    "url": {"type": "string", "description": "the absolute http or https URL"},
                    "method": {
                        "type": "string",
                        "enum": HTTP_METHODS,
                        "description": "the method (GET when not given)",
                    },
                    "body": {"type": "string", "description": "the request body, if any"},
                },
                "required": ["url"],
                "additionalProperties": false,
            }),
            _ => json!({
                "type": "object",
                "properties": {"path": path("the file's path, relative to the workspace")},
                "required": ["path"],
                "additionalProperties": false,
            }),
        }
    }

    /// Whether the arguments of a request for this capability (its target given apart) are
    /// what [`Self::input_schema`] allows, or what is wrong with them: a required argument
    /// missing, one of the wrong type or out of range, one the schema does not name. The
    /// runtime checks every request for a built-in capability with this before anything
    /// decides on it, so a write whose `content` is missing or misspelled is refused, never
    /// performed as an empty file.
    pub fn check_arguments(&self, arguments: &Map<String, Value>) -> Result<(), String> {
        self.check_types(arguments)?;
        let schema = self.input_schema();
        let known: Vec<&str> = schema["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let takes = || {
            let others: Vec<String> = known
                .iter()
                .filter(|k| **k != self.target_arg)
                .map(|k| format!("`{k}`"))
                .collect();
            if others.is_empty() {
                "it takes no other argument".to_string()
            } else {
                format!("its other arguments are {}", others.join(", "))
            }
        };
        for key in arguments.keys() {
            if key == self.target_arg {
                return Err(format!(
                    "`{key}` is the request's target, given apart from its arguments"
                ));
            }
            if !known.contains(&key.as_str()) {
                return Err(format!(
                    "`{key}` is not an argument of {} ({})",
                    self.capability,
                    takes()
                ));
            }
        }
        if let Some(m) = arguments.get("method").and_then(Value::as_str)
            && !HTTP_METHODS.iter().any(|k| k.eq_ignore_ascii_case(m))
        {
            return Err(format!(
                "`method` {m:?} is not one of {} (in any case)",
                HTTP_METHODS.join(", ")
            ));
        }
        if let Some(t) = arguments.get("timeout_ms").and_then(Value::as_u64)
            && !(1..=MAX_TIMEOUT_MS).contains(&t)
        {
            return Err(format!(
                "`timeout_ms` must be from 1 to {MAX_TIMEOUT_MS} milliseconds, not {t}"
            ));
        }
        Ok(())
    }

    /// The checks of argument types every caller makes (the model's and MCP clients' calls,
    /// through [`Self::proposal`], and the runtime's, through [`Self::check_arguments`]).
    fn check_types(&self, arguments: &Map<String, Value>) -> Result<(), String> {
        let strings: &[&str] = match self.capability {
            "fs.write" => &["content"],
            "http.request" => &["method", "body"],
            _ => &[],
        };
        for key in strings {
            if arguments.get(*key).is_some_and(|v| !v.is_string()) {
                return Err(format!("`{key}` must be a string"));
            }
        }
        if self.capability == "process.exec" {
            let strings = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
            if arguments.get("args").is_some_and(|v| !strings(v)) {
                return Err("`args` must be an array of strings".into());
            }
            if arguments.get("timeout_ms").is_some_and(|v| !v.is_u64()) {
                return Err("`timeout_ms` must be a whole number of milliseconds".into());
            }
        }
        if self.capability == "fs.write" && !arguments.contains_key("content") {
            return Err("`content` is required and must be a string".into());
        }
        Ok(())
    }

    /// The capability request a call with `arguments` stands for, or why the arguments do not
    /// make one (the target argument missing or not a string, a string argument that is not).
    pub fn proposal(
        &self,
        mut arguments: Map<String, Value>,
        intent: &str,
    ) -> Result<CapabilityProposal, String> {
        let target = match arguments.remove(self.target_arg) {
            Some(Value::String(s)) if !s.is_empty() => s,
            None if self.capability == "fs.list" => ".".to_string(),
            Some(Value::String(_)) if self.capability == "fs.list" => ".".to_string(),
            _ => {
                return Err(format!(
                    "`{}` is required and must be a string",
                    self.target_arg
                ));
            }
        };
        self.check_types(&arguments)?;
        Ok(CapabilityProposal {
            capability: self.capability.to_string(),
            target,
            arguments: Value::Object(arguments),
            intent: intent.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn each_tool_names_its_capability_and_its_schema_requires_its_target() {
        for b in &BUILTIN_TOOLS {
            assert_eq!(BuiltinTool::named(b.name), Some(b));
            assert_eq!(BuiltinTool::for_capability(b.capability), Some(b));
            assert_eq!(b.name, b.capability.replace('.', "_"));
            let schema = b.input_schema();
            assert_eq!(schema["required"][0], b.target_arg, "{}", b.name);
            assert!(schema["properties"][b.target_arg].is_object());
        }
        assert_eq!(BuiltinTool::named("mcp_call"), None);
    }

    #[test]
    fn the_runtime_refuses_arguments_the_schema_does_not_take() {
        let check =
            |name: &str, v: Value| BuiltinTool::named(name).unwrap().check_arguments(&args(v));
        assert_eq!(check("fs_write", json!({"content": ""})), Ok(()));
        assert_eq!(
            check("fs_write", json!({"contents": "x"})),
            Err("`content` is required and must be a string".into())
        );
        assert_eq!(
            check("fs_write", json!({"content": "x", "mode": 7})),
            Err("`mode` is not an argument of fs.write (its other arguments are `content`)".into())
        );
        assert_eq!(
            check("fs_read", json!({"x": 1})),
            Err("`x` is not an argument of fs.read (it takes no other argument)".into())
        );
        assert_eq!(
            check("fs_read", json!({"path": "a"})),
            Err("`path` is the request's target, given apart from its arguments".into())
        );
        assert_eq!(check("fs_list", json!({})), Ok(()));
        assert_eq!(
            check(
                "process_exec",
                json!({"args": ["-l"], "timeout_ms": 600000})
            ),
            Ok(())
        );
        for t in [0, MAX_TIMEOUT_MS + 1] {
            assert_eq!(
                check("process_exec", json!({"timeout_ms": t})),
                Err(format!(
                    "`timeout_ms` must be from 1 to 600000 milliseconds, not {t}"
                ))
            );
        }
        assert_eq!(
            check("process_exec", json!({"args": "-l"})),
            Err("`args` must be an array of strings".into())
        );
        assert_eq!(
            check("http_request", json!({"method": "POST", "body": "{}"})),
            Ok(())
        );
        assert_eq!(
            check("http_request", json!({"method": null})),
            Err("`method` must be a string".into())
        );
        assert_eq!(check("http_request", json!({"method": "patch"})), Ok(()));
        for m in ["CONNECT", "TRACE", "", "GET "] {
            assert_eq!(
                check("http_request", json!({"method": m})),
                Err(format!(
                    "`method` {m:?} is not one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS (in any case)"
                ))
            );
        }
        // What a model or MCP client may send, the runtime takes (the schemas agree).
        for b in &BUILTIN_TOOLS {
            let schema = b.input_schema();
            let mut full = Map::new();
            for (key, p) in schema["properties"].as_object().unwrap() {
                if key != b.target_arg {
                    let v = match p["type"].as_str() {
                        Some("array") => json!(["a"]),
                        Some("integer") => json!(1),
                        _ => json!("GET"),
                    };
                    full.insert(key.clone(), v);
                }
            }
            assert_eq!(b.check_arguments(&full), Ok(()), "{}", b.name);
        }
    }

    #[test]
    fn a_call_becomes_the_request_it_stands_for_or_says_what_is_wrong() {
        let write = BuiltinTool::named("fs_write").unwrap();
        let p = write
            .proposal(args(json!({"path": "a.txt", "content": "x"})), "why")
            .unwrap();
        assert_eq!(
            p,
            CapabilityProposal {
                capability: "fs.write".into(),
                target: "a.txt".into(),
                arguments: json!({"content": "x"}),
                intent: "why".into(),
            }
        );
        assert_eq!(
            write
                .proposal(args(json!({"path": "a.txt"})), "")
                .unwrap_err(),
            "`content` is required and must be a string"
        );
        assert_eq!(
            write
                .proposal(args(json!({"path": 3, "content": "x"})), "")
                .unwrap_err(),
            "`path` is required and must be a string"
        );
        let list = BuiltinTool::named("fs_list").unwrap();
        assert_eq!(list.proposal(Map::new(), "").unwrap().target, ".");
        let exec = BuiltinTool::named("process_exec").unwrap();
        let p = exec
            .proposal(args(json!({"program": "cargo", "args": ["test"]})), "")
            .unwrap();
        assert_eq!(
            (p.capability.as_str(), p.target.as_str()),
            ("process.exec", "cargo")
        );
        assert_eq!(p.arguments, json!({"args": ["test"]}));
        assert_eq!(
            exec.proposal(args(json!({"program": "ls", "args": [1]})), "")
                .unwrap_err(),
            "`args` must be an array of strings"
        );
        assert_eq!(
            exec.proposal(args(json!({"program": "ls", "timeout_ms": "5"})), "")
                .unwrap_err(),
            "`timeout_ms` must be a whole number of milliseconds"
        );
        let http = BuiltinTool::named("http_request").unwrap();
        assert_eq!(
            http.proposal(args(json!({"url": "https://a.example/", "method": 1})), "")
                .unwrap_err(),
            "`method` must be a string"
        );
    }
}
