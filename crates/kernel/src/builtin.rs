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
                    "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 600000, "description": "how long it may run (60000 when not given)"},
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
                        "enum": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
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
