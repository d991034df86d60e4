//! `ice policy`: check the installation's Cedar policies against ICE's schema, explain how they
//! decide a request, and create the policy directory of an installation that has none.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use ice_authority::policy::read_policy_dir;
use ice_authority::{
    Decision, DenyReason, Diagnostic, EffectClass, Explanation, LoadError, PolicyInfo, PolicySet,
    PolicySource, PolicyVersion, Registry, Request, RequestError, Resource, ResourceKind, Schema,
    Severity, Verdict,
};
use ice_kernel::RunId;
use serde_json::{Map, Value, json};

use crate::home::{Home, create_policy_dir};

/// The name of the starter policy file `ice init` writes.
pub const STARTER_POLICY_FILE: &str = "default.cedar";

/// The starter policy: reads anywhere in the workspace, writes and deletes with an operator's
/// approval, never `.env` files or `.git`; no connection to this machine or a private network
/// (once some HTTP call is permitted); nothing else (no network, commands or tools). Its
/// comments explain how ICE's Cedar policies work; its examples are checked by a test.
pub const STARTER_POLICY: &str = r#"// ICE policies: the starter policy `ice init` wrote. Edit it, or add more *.cedar files to
// this directory: ICE reads every *.cedar file here (not subdirectories), in name order, as one
// policy set. After a change, run `ice policy check`; to see how a request would be decided,
// run for example
//   ice policy explain --agent coder --action fs.write --resource src/lib.rs
//
// HOW ICE ASKS
// Every capability an agent proposes is one Cedar request, checked against ICE's schema
// (ice.cedarschema in ICE's authority crate; `ice policy check` applies it):
//   principal  the agent, by id: Agent::"coder"
//   action     the capability type: Action::"fs.read", "fs.list", "fs.write", "fs.delete",
//              "http.request", "process.exec" or "mcp.call"
//   resource   the target, one of these kinds:
//     Path::"src/lib.rs"       a file (fs.read, fs.write, fs.delete), by its normalised path
//                              relative to the workspace, `/`-separated
//     Dir::"src"               a directory (fs.list); Dir::"." is the workspace root. Every Path
//                              and Dir is `in` each Dir above it and in Dir::".", so
//                              `resource in Dir::"src"` is src and everything under it
//     Host::"api.example.com"  a host (http.request), by its parsed lower-case name; it is `in`
//                              Domain::"example.com" and Domain::"com" (IP addresses are in no
//                              Domain)
//     Tool::"github/create_issue"  a tool on an MCP tool server (mcp.call), `in`
//                              ToolServer::"github"
//     Command::"cargo"         a program to run (process.exec)
//   context    context.run (the run's id), context.intent (what the agent says it is doing),
//              context.effect (the effect class the runtime assigned: EffectClass::"read",
//              EffectClass::"internal-write" or EffectClass::"external"), context.arguments
//              (the call's arguments: `bytes` for fs.*; `method`, `url`, `scheme`, `host`,
//              `port`, `path`, `query` for http.request, all from the URL as ICE parsed it
//              and will send it, so `..` and `%2e%2e` are already resolved, `%61` is `a`,
//              other escapes are upper case (`%2F`) and `port` is 443 for https://host/;
//              `args` for process.exec) and context.budget (what is left of
//              the run's budget). Optional fields need `has` before use:
//              `context.arguments has method && context.arguments.method == "GET"`.
// Effect classes belong to the runtime: fs.read and fs.list are read; fs.write and fs.delete
// are internal-write (they change the run's staged copy, which ICE can discard); http.request
// is read for GET and HEAD and external for any other method; mcp.call is external, and so is
// process.exec: the command starts in a copy of the workspace, but runs as ICE's user with all
// of that user's access (files, ICE's own home, the network); nothing isolates it.
//
// HOW ICE DECIDES
//   1. A matching `forbid` denies, whatever else matches. A forbid that fails to evaluate
//      denies too: ICE fails closed.
//   2. Else a matching `permit` permits, but
//        - a permit annotated @approval("required") permits only once an operator approves
//          that exact request;
//        - a request whose effect class is external needs an approval unless the permit that
//          matches it is annotated @external("permit").
//   3. If nothing matches, the request is denied: deny is the default.
// A permit can also limit each use of the grant it gives: @max_bytes("N") (the content
// written or read, request and response bodies, tool arguments and result, command output)
// and @timeout_ms("N") (http.request, mcp.call, process.exec). Where several permits match,
// the tightest limit of each applies.
// @id("...") names a policy in decisions; a policy without one is named FILE#N (the N-th
// policy in FILE). Every decision names the policy version, a SHA-256 of these files, that
// made it.

// Read and list anything in the workspace.
@id("read-workspace")
permit (
  principal,
  action in [Action::"fs.read", Action::"fs.list"],
  resource in Dir::"."
);

// Write and delete anywhere in the workspace, each time with an operator's approval.
@id("write-with-approval")
@approval("required")
permit (
  principal,
  action in [Action::"fs.write", Action::"fs.delete"],
  resource in Dir::"."
);

// Never the repository's own metadata, even with an approval.
@id("no-git-writes")
forbid (
  principal,
  action in [Action::"fs.write", Action::"fs.delete"],
  resource in Dir::".git"
);

// Never .env files (.env, .env.local, ...), which commonly hold secrets, anywhere.
@id("no-env-files")
forbid (
  principal,
  action in [Action::"fs.read", Action::"fs.write", Action::"fs.delete"],
  resource
)
when { resource.path like ".env*" || resource.path like "*/.env*" };

// Once an HTTP call is permitted, every address its host resolves to is checked before anything
// is sent (action "http.connect": context.address is the IP address, the resource and the rest
// of the context are the call's). Only forbids that name http.connect take part; the call's
// other policies are not asked again. This one keeps calls off loopback, the private, shared
// and link-local networks, the cloud metadata addresses and reserved ranges, whatever name
// leads there (an IPv6 address reaching an IPv4 one, mapped or through NAT64's well-known
// 64:ff9b::/96, is checked as that IPv4 address; the local-use NAT64 prefix 64:ff9b:1::/48 is
// refused whole, and a NAT64 prefix of your own network must be named here); a call to a name
// that resolves to one of them is refused and nothing is sent. It cannot know this machine's own public addresses: name them here if
// agents must not reach them. To let an agent reach a service on a private network, add
// `unless { resource == Host::"…" }` naming it.
@id("no-private-addresses")
forbid (principal, action == Action::"http.connect", resource)
when {
  context.address.isLoopback() ||
  context.address.isMulticast() ||
  context.address.isInRange(ip("0.0.0.0/8")) ||
  context.address.isInRange(ip("10.0.0.0/8")) ||
  context.address.isInRange(ip("100.64.0.0/10")) ||
  context.address.isInRange(ip("168.63.129.16/32")) ||
  context.address.isInRange(ip("169.254.0.0/16")) ||
  context.address.isInRange(ip("172.16.0.0/12")) ||
  context.address.isInRange(ip("192.0.0.0/24")) ||
  context.address.isInRange(ip("192.168.0.0/16")) ||
  context.address.isInRange(ip("240.0.0.0/4")) ||
  context.address.isInRange(ip("::/128")) ||
  context.address.isInRange(ip("64:ff9b:1::/48")) ||
  context.address.isInRange(ip("fc00::/7")) ||
  context.address.isInRange(ip("fe80::/10")) ||
  context.address.isInRange(ip("fec0::/10"))
};

// A call's path is the one sent: dot segments resolved, escaped unreserved characters decoded
// (/%61dmin is /admin), other escapes in upper case; a path escaping an overlong UTF-8
// sequence (%C0%AE, which old servers read as .) is refused before any policy. Some servers read more into a path than
// that: they decode an escaped slash or backslash (%2F, %5C) before routing, decode twice
// (%252F), or drop a segment's ;parameters before resolving dots (/..;/), so that
// /v1/deploy/..%2Fadmin or /v1/deploy/..;/admin would pass a permit for /v1/deploy/* and reach
// /v1/admin. This refuses such paths: an escaped slash or backslash, an escaped % (a literal
// % in a path), and a dot segment with parameters, its ; escaped or not (a proxy that decodes
// once turns /..%3B/ into /..;/ for the server behind it), and an empty segment (// or /;/,
// which servers that merge slashes or drop parameters read as /: //admin past a forbid on
// /admin*). An API that needs one of them (project ids like group%2Fproject, say) can be let
// through with `unless { resource == Host::"…" }`. Servers that ignore case read /ADMIN as
// /admin too: keep a server's paths out with a permit for the ones allowed rather than a
// forbid for the others.
@id("no-ambiguous-paths")
forbid (principal, action == Action::"http.request", resource)
when {
  context.arguments has path &&
  (context.arguments.path like "*%2F*" ||
   context.arguments.path like "*%5C*" ||
   context.arguments.path like "*%25*" ||
   context.arguments.path like "*/..;*" ||
   context.arguments.path like "*/.;*" ||
   context.arguments.path like "*/..%3B*" ||
   context.arguments.path like "*/.%3B*" ||
   context.arguments.path like "*//*" ||
   context.arguments.path like "*/;*" ||
   context.arguments.path like "*/%3B*")
};

// Nothing else is permitted: no network, no commands, no MCP tools. EXAMPLES (to use one,
// remove the leading `//` from its lines, then run `ice policy check`):
//
// The agent "coder" writes under src/ without asking each time:
//   @id("coder-writes-src")
//   permit (principal == Agent::"coder", action == Action::"fs.write", resource in Dir::"src");
//
// Any agent may GET or HEAD (effect class read) over https from docs.rs and its subdomains,
// each response cut at 1 MiB, each request given at most 10 s:
//   @id("read-docs-rs")
//   @max_bytes("1048576")
//   @timeout_ms("10000")
//   permit (principal, action == Action::"http.request", resource in Domain::"docs.rs")
//   when {
//     context.effect == EffectClass::"read" &&
//     context.arguments has scheme && context.arguments.scheme == "https"
//   };
//
// The agent "deployer" may POST to api.example.com under /v1/deploy/ without an approval each
// time (an external effect, so the permit must say @external("permit")). The path is the one
// sent, dot segments resolved, so /v1/deploy/../admin is /v1/admin and does not match:
//   @id("deployer-posts")
//   @external("permit")
//   permit (
//     principal == Agent::"deployer",
//     action == Action::"http.request",
//     resource == Host::"api.example.com"
//   )
//   when {
//     context.arguments has method && context.arguments.method == "POST" &&
//     context.arguments has path && context.arguments.path like "/v1/deploy/*"
//   };
//
// No agent reaches any host on a port other than 443 (port is the one contacted: the URL's,
// else the scheme's default):
//   @id("https-port-only")
//   forbid (principal, action == Action::"http.request", resource)
//   when { context.arguments has port && context.arguments.port != 443 };
//
// Let the agent run `cargo test` without asking each time. A command is external and not
// isolated, so this trusts whatever code the test run executes, including code the agent
// staged (build scripts, tests): permit only programs you would let the agent run as you.
// (A run spec's [[check]] commands are the operator's and need no permit.)
//   @id("cargo-test")
//   @external("permit")
//   permit (principal, action == Action::"process.exec", resource == Command::"cargo")
//   when { context.arguments has args && context.arguments.args.contains("test") };
//
// Call one MCP tool; mcp.call is external, so without @external("permit") each call needs an
// operator's approval:
//   @id("github-issues")
//   permit (principal, action == Action::"mcp.call", resource == Tool::"github/create_issue");
"#;

/// Check the installation's Cedar policies and explain how they decide a request.
#[derive(Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate every *.cedar policy file against ICE's schema. Prints each problem as
    /// FILE:LINE:COL: error|warning: MESSAGE, then a summary; exit 1 if any error.
    Check(CheckArgs),
    /// Decide one request with the policies and say which policies decided it and why. Exit 0
    /// whatever the decision; 1 if the request or the policies are not valid.
    Explain(Box<ExplainArgs>),
    /// Create the home's policy directory with the commented starter policy, for an
    /// installation made before ICE kept policies in the home.
    Init(InitArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// The policy directory to check (default: the home's policies/). Checking a directory
    /// given here needs no ICE home.
    #[arg(value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print one JSON document: diagnostics, policies (id, effect, annotations) and the
    /// policy version.
    #[arg(long)]
    json: bool,
}

/// The kind of a request's target; each is one Cedar resource entity type.
#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    /// A file in the workspace: Path::"src/lib.rs".
    Path,
    /// A directory in the workspace: Dir::"src" (Dir::"." is the root).
    Dir,
    /// A network host: Host::"api.example.com".
    Host,
    /// A tool on an MCP tool server, given as server/tool: Tool::"github/create_issue".
    Tool,
    /// A program to run: Command::"cargo".
    Command,
}

impl From<KindArg> for ResourceKind {
    fn from(k: KindArg) -> ResourceKind {
        match k {
            KindArg::Path => ResourceKind::Path,
            KindArg::Dir => ResourceKind::Dir,
            KindArg::Host => ResourceKind::Host,
            KindArg::Tool => ResourceKind::Tool,
            KindArg::Command => ResourceKind::Command,
        }
    }
}

#[derive(Args)]
struct ExplainArgs {
    /// The agent making the request (its id: A-Z a-z 0-9 . _ - @); Cedar's principal
    /// Agent::"ID".
    #[arg(long, value_name = "ID")]
    agent: String,
    /// The capability type requested (Cedar's action): fs.read, fs.list, fs.write, fs.delete,
    /// http.request, process.exec or mcp.call.
    #[arg(long, value_name = "CAP")]
    action: String,
    /// The target: a workspace path relative to the workspace (src/lib.rs; . for the root
    /// directory), a host name (api.example.com) or, for http.request, the URL
    /// (https://api.example.com/v1/x: its host is the resource and url, scheme, host, port, path
    /// and query come from it as the runtime derives them), a tool as server/tool, or a program
    /// (cargo).
    #[arg(long, value_name = "R")]
    resource: String,
    /// The kind of the target (default: the kind the capability acts on).
    #[arg(long, value_enum, value_name = "KIND")]
    kind: Option<KindArg>,
    /// The agent's declared intent for the call (context.intent).
    #[arg(long, value_name = "TEXT")]
    intent: Option<String>,
    /// One argument of the call (context.arguments.KEY). VALUE is read as JSON if it is JSON
    /// (443, true, ["test"], "quoted"), else as a string (POST). Repeatable.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    args: Vec<String>,
    /// The call's arguments as one JSON object; --arg adds to it (a key may not be given twice).
    #[arg(long, value_name = "JSON")]
    args_json: Option<String>,
    /// The run the request is made in (context.run).
    #[arg(long, value_name = "RUN", default_value = "explain")]
    run: String,
    /// What is left of the run's budget (context.budget.NAME), as a run gives it: NAME is
    /// wall_time_us, tokens_in, tokens_out, tool_calls, bytes, credits_micro or risk.
    /// Repeatable; without it context.budget is empty, as for a run with no budget.
    #[arg(long = "budget-left", value_name = "NAME=N")]
    budget_left: Vec<String>,
    /// For http.request: also decide the call's connection check (http.connect) to this
    /// address, as the runtime does for each address the host resolves to. Repeatable.
    #[arg(long = "address", value_name = "IP")]
    addresses: Vec<std::net::IpAddr>,
    /// The policy directory to decide with (default: the home's policies/). With it, no ICE
    /// home is needed.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print one JSON document: the decision, the effect class, the deciding policies and why.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InitArgs {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Run an `ice policy` subcommand.
pub fn run(home: &Path, a: PolicyArgs) -> Result<u8> {
    match a.command {
        PolicyCommand::Check(a) => check(home, a),
        PolicyCommand::Explain(a) => explain(home, *a),
        PolicyCommand::Init(a) => init(home, a),
    }
}

fn schema() -> Result<Schema> {
    Schema::ice().map_err(|e| anyhow!("ICE's built-in policy schema: {e}"))
}

/// The policy directory to use: the one given, which must exist, else the home's.
fn policy_dir(home: &Path, given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(dir) => match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => bail!(
                "{} is not a directory: give the directory that holds the *.cedar files",
                dir.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("policy directory {} does not exist", dir.display())
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
        },
        None => Home::open(home)?.existing_policy_dir(),
    }
}

/// Where a diagnostic's file is: the policy file's path in `dir`, or the pseudo-file as named
/// (`<policy set>`, or a path the loader already gave in full).
fn diagnostic_path(dir: &Path, sources: &[PolicySource], file: &str) -> String {
    if sources.iter().any(|s| s.name == file) {
        dir.join(file).display().to_string()
    } else {
        file.to_string()
    }
}

/// Read, check and index the policies of `dir` against `schema`; any error refuses the set and
/// lists every diagnostic as `PATH:LINE:COL: error: …`.
pub fn load(dir: &Path, schema: &Schema) -> Result<PolicySet> {
    let sources = read_policy_dir(dir).map_err(|e| load_error(dir, &[], e))?;
    PolicySet::from_sources(&sources, schema).map_err(|e| load_error(dir, &sources, e))
}

fn load_error(dir: &Path, sources: &[PolicySource], e: LoadError) -> anyhow::Error {
    match e {
        LoadError::Invalid { mut diagnostics } => {
            in_place_order(&mut diagnostics);
            let errors: Vec<String> = diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .map(|d| located(dir, sources, d).to_string())
                .collect();
            anyhow!(
                "the policies in {} are not valid ({} error{}):\n{}",
                dir.display(),
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                errors.join("\n")
            )
        }
        e @ LoadError::Io { .. } => anyhow!(e),
    }
}

/// Diagnostics in the order of their places: by file, then line and column.
fn in_place_order(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| (&a.file, a.location).cmp(&(&b.file, b.location)));
}

/// The diagnostic with its file named by its path.
fn located(dir: &Path, sources: &[PolicySource], d: &Diagnostic) -> Diagnostic {
    Diagnostic {
        file: diagnostic_path(dir, sources, &d.file),
        ..d.clone()
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn check(home: &Path, a: CheckArgs) -> Result<u8> {
    let dir = policy_dir(home, a.dir)?;
    let schema = schema()?;
    let (sources, mut diagnostics, set) = match read_policy_dir(&dir) {
        Ok(sources) => match PolicySet::from_sources(&sources, &schema) {
            Ok(set) => {
                let warnings = set.warnings().to_vec();
                (sources, warnings, Some(set))
            }
            Err(LoadError::Invalid { diagnostics }) => (sources, diagnostics, None),
            Err(e @ LoadError::Io { .. }) => return Err(anyhow!(e)),
        },
        // A file over the size limit, or too many files, is refused before reading.
        Err(LoadError::Invalid { diagnostics }) => (Vec::new(), diagnostics, None),
        Err(e @ LoadError::Io { .. }) => return Err(anyhow!(e)),
    };
    in_place_order(&mut diagnostics);
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diagnostics.len() - errors;
    let version = PolicyVersion::of(&sources);
    let policies: Vec<&PolicyInfo> = set.as_ref().map(PolicySet::policies).unwrap_or_default();
    if a.json {
        let diagnostics: Vec<Value> = diagnostics
            .iter()
            .map(|d| {
                json!({
                    "severity": d.severity.to_string(),
                    "file": d.file,
                    "path": diagnostic_path(&dir, &sources, &d.file),
                    "line": d.location.map(|l| l.line),
                    "column": d.location.map(|l| l.column),
                    "policy": d.policy,
                    "message": d.message,
                    "help": d.help,
                })
            })
            .collect();
        let policies: Vec<Value> = match &set {
            Some(set) => policies.iter().map(|p| policy_json(&dir, set, p)).collect(),
            None => Vec::new(),
        };
        let doc = json!({
            "dir": dir,
            "valid": errors == 0,
            "files": sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            "errors": errors,
            "warnings": warnings,
            "diagnostics": diagnostics,
            "policies": policies,
            "policy_version": version.to_string(),
        });
        println!("{doc}");
    } else {
        for d in &diagnostics {
            println!("{}", located(&dir, &sources, d));
        }
        let files = plural(sources.len(), "file", "files");
        if errors == 0 {
            println!(
                "ok: {} in {files}{}, policy version {version}",
                plural(policies.len(), "policy", "policies"),
                if warnings == 0 {
                    String::new()
                } else {
                    format!(" ({})", plural(warnings, "warning", "warnings"))
                },
            );
            if policies.is_empty() {
                println!(
                    "note: {} holds no policy, so every request will be denied",
                    dir.display()
                );
            }
        } else {
            println!(
                "invalid: {}, {} in {files} ({}); the set would be refused",
                plural(errors, "error", "errors"),
                plural(warnings, "warning", "warnings"),
                dir.display()
            );
        }
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

/// Every annotation a policy carries, by key.
fn annotations(set: &PolicySet, id: &str) -> BTreeMap<String, String> {
    set.cedar()
        .policies()
        .find(|p| AsRef::<str>::as_ref(p.id()) == id)
        .map(|p| {
            p.annotations()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn policy_json(dir: &Path, set: &PolicySet, p: &PolicyInfo) -> Value {
    json!({
        "id": p.id,
        "effect": p.effect.to_string(),
        "file": p.file,
        "path": dir.join(&p.file),
        "line": p.location.line,
        "column": p.location.column,
        "annotations": annotations(set, &p.id),
    })
}

fn init(home: &Path, a: InitArgs) -> Result<u8> {
    let h = Home::open(home)?;
    let dir = h.policy_dir();
    if dir.exists() {
        bail!(
            "{} already exists; nothing was changed (check it with `ice policy check`)",
            dir.display()
        );
    }
    let file = create_policy_dir(&dir)?;
    if a.json {
        println!("{}", json!({"policy_dir": dir, "starter": file}));
    } else {
        println!("Created {} with the starter policy", dir.display());
        println!("  {}", file.display());
        println!("Read its comments, edit it, then run `ice policy check`.");
    }
    Ok(0)
}

/// The call's arguments from `--args-json` and each `--arg KEY=VALUE`.
fn arguments(pairs: &[String], object: Option<&str>) -> Result<Value> {
    let mut map = match object {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(other) => bail!(
                "--args-json must be a JSON object, got {}",
                match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            ),
            Err(e) => bail!("--args-json is not valid JSON: {e}"),
        },
    };
    for pair in pairs {
        let Some((key, text)) = pair.split_once('=') else {
            bail!("--arg {pair:?}: expected KEY=VALUE");
        };
        if key.is_empty() {
            bail!("--arg {pair:?}: the key is empty");
        }
        let value = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()));
        if map.insert(key.to_string(), value).is_some() {
            bail!("--arg {pair:?}: the argument {key:?} is given twice");
        }
    }
    Ok(Value::Object(map))
}

/// `--budget-left NAME=N`, each at most once.
fn budget_left(pairs: &[String]) -> Result<ice_authority::BudgetLeft> {
    let mut left = ice_authority::BudgetLeft::default();
    for pair in pairs {
        let Some((name, n)) = pair.split_once('=') else {
            bail!("--budget-left {pair:?}: expected NAME=N");
        };
        let n: u64 = n.trim().parse().map_err(|_| {
            anyhow!("--budget-left {pair:?}: {n:?} is not a whole number of units left")
        })?;
        let slot = match name.trim() {
            "wall_time_us" => &mut left.wall_time_us,
            "tokens_in" => &mut left.tokens_in,
            "tokens_out" => &mut left.tokens_out,
            "tool_calls" => &mut left.tool_calls,
            "bytes" => &mut left.bytes,
            "credits_micro" => &mut left.credits_micro,
            "risk" => &mut left.risk,
            other => bail!(
                "--budget-left {pair:?}: {other:?} is not a budget attribute (wall_time_us, tokens_in, tokens_out, tool_calls, bytes, credits_micro, risk)"
            ),
        };
        if slot.replace(n).is_some() {
            bail!("--budget-left {pair:?}: {name:?} is given twice");
        }
    }
    Ok(left)
}

/// What was wrong with the request, named by the flag that gave it.
fn request_error(e: RequestError) -> anyhow::Error {
    match e {
        RequestError::Agent(m) => anyhow!("--agent: {m}"),
        e @ RequestError::Capability(_) => anyhow!("--action: {e}"),
        e @ RequestError::WrongResource { .. } => anyhow!("--kind/--resource: {e}"),
        e @ RequestError::IntentTooLong(_) => anyhow!("--intent: {e}"),
        e @ RequestError::Arguments(_) => anyhow!("--arg/--args-json: {e}"),
        e @ RequestError::Cedar(_) => anyhow!(e),
    }
}

/// Why one deciding policy counts the way it does in this decision.
fn why(p: &PolicyInfo, decision: &Decision, effect: EffectClass) -> String {
    let forbid = p.effect == ice_authority::PolicyEffect::Forbid;
    // A policy listed because it failed (the explanation lists those after the deciding
    // ones) did not match: say what its failure counts for, not what the decision was.
    if decision.errors.iter().any(|e| e.policy == p.id) {
        return if forbid {
            "this forbid failed to evaluate, and a forbid that fails denies (ICE fails closed)"
        } else {
            "this permit failed to evaluate, so it permits nothing"
        }
        .to_string();
    }
    if !forbid && matches!(decision.verdict, Verdict::Deny(_)) {
        return "this permit matched, but the request is denied all the same".to_string();
    }
    match &decision.verdict {
        Verdict::Deny(DenyReason::ForbidFailed { .. }) => {
            "this forbid failed to evaluate, and a forbid that fails denies (ICE fails closed)"
                .to_string()
        }
        Verdict::Deny(_) => "this forbid matched, and a matching forbid always denies".to_string(),
        Verdict::Permit { .. } if effect == EffectClass::External => {
            "this permit matched, and it says @external(\"permit\"), so the external effect needs no approval"
                .to_string()
        }
        Verdict::Permit { .. } => "this permit matched and needs no approval".to_string(),
        Verdict::PermitWithApproval { .. } if p.approval_required => {
            "this permit matched; it says @approval(\"required\")".to_string()
        }
        Verdict::PermitWithApproval { .. } => {
            "this permit matched; the effect is external and it does not say @external(\"permit\"), so it needs an approval"
                .to_string()
        }
    }
}

/// One line saying why the decision is what it is.
fn summary(decision: &Decision) -> &'static str {
    match &decision.verdict {
        Verdict::Permit { .. } => "permitted outright",
        Verdict::PermitWithApproval { .. } => {
            "permitted only once an operator approves this exact request"
        }
        Verdict::Deny(DenyReason::NoPermit) => {
            "no permit policy matched the request, and deny is the default"
        }
        Verdict::Deny(DenyReason::Forbidden { .. }) => "denied by a matching forbid",
        Verdict::Deny(DenyReason::ForbidFailed { .. }) => {
            "denied: a forbid policy failed to evaluate, and ICE fails closed"
        }
    }
}

fn reason(decision: &Decision) -> &'static str {
    match &decision.verdict {
        Verdict::Permit { .. } => "permit",
        Verdict::PermitWithApproval { .. } => "approval-required",
        Verdict::Deny(DenyReason::NoPermit) => "no-permit",
        Verdict::Deny(DenyReason::Forbidden { .. }) => "forbidden",
        Verdict::Deny(DenyReason::ForbidFailed { .. }) => "forbid-failed",
    }
}

/// The `http.request` call being explained, parsed as the runtime parses an agent's URL, when
/// it names one (`--resource URL`, or `--arg url=URL` with `--resource` its host): its host is
/// then the resource, and the arguments Cedar sees are the runtime's
/// ([`ice_effects::http::policy_arguments`]), so explain decides as a live run would. An
/// argument given that the runtime would not give, or gives another value, is refused.
fn http_call(
    action: &str,
    kind: ResourceKind,
    resource: &str,
    given: &Value,
) -> Result<Option<ice_effects::http::HttpTarget>> {
    if action != "http.request" || kind != ResourceKind::Host {
        return Ok(None);
    }
    let in_args = match given.get("url") {
        None => None,
        Some(Value::String(u)) => Some(u.as_str()),
        Some(_) => bail!("--arg url: must be a string (the URL)"),
    };
    let as_url = resource.contains("://").then_some(resource);
    let url = match (as_url, in_args) {
        (Some(r), Some(u)) if r != u => {
            bail!("--resource {r:?} and --arg url {u:?} name different URLs; give one")
        }
        (Some(u), _) | (None, Some(u)) => u,
        (None, None) => return Ok(None),
    };
    let target = ice_effects::http::parse_target(url).map_err(|e| anyhow!("the URL: {e}"))?;
    if as_url.is_none() {
        let host = Resource::parse(kind, resource).map_err(|e| anyhow!("--resource: {e}"))?;
        if &host != target.host() {
            bail!(
                "--resource names {host} but the URL's host is {}; the runtime decides on the URL's host",
                target.host()
            );
        }
    }
    let derived = ice_effects::http::policy_arguments(&target, given);
    if let Value::Object(map) = given {
        for (key, value) in map {
            if key == "url" || key == "method" {
                continue;
            }
            match derived.get(key) {
                Some(d) if d == value => {}
                Some(d) => bail!(
                    "--arg {key}: the runtime gives context.arguments.{key} from the URL, as {d}; leave it out"
                ),
                None => bail!(
                    "--arg {key}: the runtime gives http.request no argument {key:?} (it gives method, url, scheme, host, port, path, query)"
                ),
            }
        }
    }
    Ok(Some(target))
}

fn explain(home: &Path, a: ExplainArgs) -> Result<u8> {
    let registry = Registry::standard();
    let Some(capability) = registry.get(&a.action) else {
        let known: Vec<&str> = registry.iter().map(|c| c.name()).collect();
        bail!(
            "--action: unknown capability {:?}; the registry has {}",
            a.action,
            known.join(", ")
        );
    };
    let kind = a.kind.map_or(capability.resource(), ResourceKind::from);
    let run = RunId::new(a.run.as_str()).map_err(|e| anyhow!("--run: {e}"))?;
    let given = arguments(&a.args, a.args_json.as_deref())?;
    let http = http_call(&a.action, kind, &a.resource, &given)?;
    let (resource, args) = match &http {
        Some(t) => (
            t.host().clone(),
            ice_effects::http::policy_arguments(t, &given),
        ),
        None => (
            Resource::parse(kind, &a.resource).map_err(|e| anyhow!("--resource: {e}"))?,
            given,
        ),
    };
    if !a.addresses.is_empty() && (a.action != "http.request" || kind != ResourceKind::Host) {
        bail!("--address: only an http.request call on a host connects to an address");
    }
    let builder = Request::builder(&run, &a.agent, &a.action, resource)
        .intent(a.intent.as_deref().unwrap_or_default())
        .arguments(&args)
        .budget_left(budget_left(&a.budget_left)?);
    let request = builder.clone().build(&registry).map_err(request_error)?;
    let connections = a
        .addresses
        .iter()
        .map(|ip| {
            builder
                .clone()
                .connecting_to(*ip)
                .build(&registry)
                .map(|r| (*ip, r))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(request_error)?;
    let schema = schema()?;
    let (dir, set) = match a.dir {
        Some(dir) => {
            let dir = policy_dir(home, Some(dir))?;
            let set = load(&dir, &schema)?;
            (dir, set)
        }
        None => {
            let h = Home::open(home)?;
            let set = h.policies(&schema)?;
            (h.policy_dir(), set)
        }
    };
    let explanation = set.explain(&request);
    // Each address: the forbids that refuse connecting to it (none: it may be connected to).
    let connections: Vec<(std::net::IpAddr, Option<Decision>)> = connections
        .iter()
        .map(|(ip, r)| (*ip, set.refuses_connection(r)))
        .collect();
    let Explanation {
        decision,
        request: cedar_request,
        effect,
        considered,
        total,
        policies,
    } = &explanation;
    let effect = *effect;
    if a.json {
        let deciding: Vec<Value> = policies
            .iter()
            .map(|p| {
                let mut v = policy_json(&dir, &set, p);
                v["why"] = Value::String(why(p, decision, effect));
                v
            })
            .collect();
        let errors: Vec<Value> = decision
            .errors
            .iter()
            .map(|e| json!({"policy": e.policy, "message": e.message}))
            .collect();
        let doc = json!({
            "decision": decision.kind().to_string(),
            "reason": reason(decision),
            "why": summary(decision),
            "effect": effect.as_str(),
            "request": {
                "agent": request.agent(),
                "action": request.capability(),
                "resource": {
                    "kind": request.resource().kind().entity_type(),
                    "id": request.resource().entity_id(),
                },
                "run": request.run().as_str(),
                "intent": a.intent.unwrap_or_default(),
                "arguments": args,
                "url_given": http.as_ref().map(|t| t.given()),
                "cedar": cedar_request,
            },
            "policies": deciding,
            "errors": errors,
            "considered": considered,
            "total": total,
            "policy_dir": dir,
            "policy_version": decision.policy_version.to_string(),
            "constraints": decision.constraints,
            "connections": connections.iter().map(|(ip, refused)| json!({
                "address": ip.to_string(),
                "decided_as": ice_authority::connection_address(*ip).to_string(),
                "refused": refused.is_some(),
                "policies": refused.as_ref().map_or(&[][..], |d| d.determining_policies()),
                "why": refused.as_ref().map_or("no forbid naming http.connect holds", summary),
            })).collect::<Vec<_>>(),
        });
        println!("{doc}");
        return Ok(0);
    }
    let mut out = String::new();
    let _ = writeln!(out, "decision: {}", decision.kind());
    let _ = writeln!(out, "why:      {}", summary(decision));
    let _ = writeln!(out, "request:  {cedar_request} (run {run})");
    match &http {
        Some(t) if t.given() != t.as_str() => {
            let _ = writeln!(
                out,
                "url:      {} (as parsed and sent; given as {:?})",
                t.as_str(),
                t.given()
            );
        }
        Some(t) => {
            let _ = writeln!(out, "url:      {}", t.as_str());
        }
        None if a.action == "http.request" => {
            let _ = writeln!(
                out,
                "note:     no URL given, so the arguments are only what you gave; the runtime \
                 always gives url, scheme, host, port, path and query from the URL (give \
                 --resource URL or --arg url=URL)"
            );
        }
        None => {}
    }
    let _ = writeln!(
        out,
        "effect:   {effect} (assigned by the runtime: {} is {})",
        capability.name(),
        capability.classifier()
    );
    if !policies.is_empty() {
        let _ = writeln!(out, "decided by:");
        for p in policies {
            let _ = writeln!(
                out,
                "  {} {} at {}:{}: {}",
                p.effect,
                p.id,
                dir.join(&p.file).display(),
                p.location,
                why(p, decision, effect)
            );
        }
    }
    for e in &decision.errors {
        let _ = writeln!(out, "  error in {}: {}", e.policy, e.message);
    }
    let _ = writeln!(
        out,
        "considered {considered} of {} (pre-selected by action, resource type, agent and resource)",
        plural(*total, "policy", "policies")
    );
    if !decision.constraints.is_empty() {
        let _ = writeln!(
            out,
            "limits:   {} (the tightest of every matching permit's @max_bytes, @timeout_ms)",
            decision.constraints
        );
    }
    for (ip, refused) in &connections {
        let decided = ice_authority::connection_address(*ip);
        let ip = if decided == *ip {
            ip.to_string()
        } else {
            format!("{ip} (decided as {decided})")
        };
        let _ = match refused {
            Some(d) => writeln!(
                out,
                "connect:  {ip}: refused, {} ({})",
                summary(d),
                d.determining_policies().join(", ")
            ),
            None => writeln!(
                out,
                "connect:  {ip}: allowed (no forbid naming http.connect holds)"
            ),
        };
    }
    let _ = writeln!(out, "policy version: {}", decision.policy_version);
    print!("{out}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diagnostics(text: &str) -> Vec<Diagnostic> {
        let source = PolicySource {
            name: STARTER_POLICY_FILE.to_string(),
            text: text.to_string(),
        };
        PolicySet::check(&[source], &Schema::ice().unwrap())
    }

    #[test]
    fn the_starter_policy_checks_clean() {
        assert_eq!(diagnostics(STARTER_POLICY), []);
    }

    /// The commented examples, uncommented as the starter tells users to, check clean too.
    #[test]
    fn the_starter_examples_check_clean() {
        let examples = STARTER_POLICY
            .split_once("EXAMPLES")
            .map(|(_, rest)| rest)
            .unwrap();
        let uncommented: String = examples
            .lines()
            .filter_map(|l| l.strip_prefix("//   "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(uncommented.matches("permit (").count(), 5);
        let text = format!("{STARTER_POLICY}\n{uncommented}");
        assert_eq!(diagnostics(&text), []);
    }

    /// The starter's HTTP examples, uncommented, decide as they say once the runtime fills
    /// `scheme`, `port` and `path` from the URL (as explain now does, with the runtime's own
    /// function): the https example permits, the port forbid fires, and a `..` cannot walk
    /// out of the deployer's path.
    #[test]
    fn the_starter_http_examples_decide_as_they_say() {
        let examples = STARTER_POLICY.split_once("EXAMPLES").unwrap().1;
        let uncommented: String = examples
            .lines()
            .filter_map(|l| l.strip_prefix("//   "))
            .map(|l| format!("{l}\n"))
            .collect();
        let source = PolicySource {
            name: STARTER_POLICY_FILE.to_string(),
            text: format!("{STARTER_POLICY}\n{uncommented}"),
        };
        let set = PolicySet::from_sources(&[source], &Schema::ice().unwrap()).unwrap();
        let registry = Registry::standard();
        let run = RunId::new("explain").unwrap();
        let decide = |agent: &str, url: &str, method: &str| {
            let given = json!({ "method": method });
            let target = http_call("http.request", ResourceKind::Host, url, &given)
                .unwrap()
                .unwrap();
            let args = ice_effects::http::policy_arguments(&target, &given);
            let request = Request::builder(&run, agent, "http.request", target.host().clone())
                .arguments(&args)
                .build(&registry)
                .unwrap();
            let d = set.decide(&request);
            (d.kind().to_string(), d.determining_policies().to_vec())
        };
        let said = |kind: &str, id: &str| (kind.to_string(), vec![id.to_string()]);
        assert_eq!(
            decide("coder", "https://docs.rs/serde", "GET"),
            said("permit", "read-docs-rs")
        );
        assert_eq!(
            decide("coder", "http://docs.rs/serde", "GET"),
            said("deny", "https-port-only")
        );
        assert_eq!(
            decide("deployer", "https://api.example.com/v1/deploy/x", "POST"),
            said("permit", "deployer-posts")
        );
        assert_eq!(
            decide(
                "deployer",
                "https://api.example.com/v1/deploy/../admin",
                "POST"
            )
            .1,
            Vec::<String>::new()
        );
        // An escaped unreserved character is the character: not a way around a path...
        assert_eq!(
            decide(
                "deployer",
                "https://api.example.com/v1/%64eploy/%2e%2e/%61dmin",
                "POST"
            )
            .1,
            Vec::<String>::new()
        );
        // ...and the permit sees its path.
        assert_eq!(
            decide("deployer", "https://api.example.com/v1/%64eploy/x", "POST"),
            said("permit", "deployer-posts")
        );
        // An escaped slash, which a server may decode before routing, is refused.
        // So are a path a server decodes twice and a dot segment with parameters.
        for url in [
            "https://api.example.com/v1/deploy/..%2Fadmin",
            "https://api.example.com/v1/deploy/..%2fadmin",
            "https://api.example.com/v1/deploy/..%5cadmin",
            "https://api.example.com/v1/deploy/%2E%2E%2Fadmin",
            "https://api.example.com/v1/deploy/..%252Fadmin",
            "https://api.example.com/v1/deploy/..%252fadmin",
            "https://api.example.com/v1/deploy/..;/admin",
            "https://api.example.com/v1/deploy/.;x=1/..;x=2/admin",
            "https://api.example.com/v1/deploy/%2e%2e;/admin",
            "https://api.example.com/v1/deploy/..%3B/admin",
            "https://api.example.com/v1/deploy/.%3b/..%3b/admin",
            "https://api.example.com//v1/deploy/x",
            "https://api.example.com/v1/deploy//x",
            "https://api.example.com/v1/deploy/;/x",
            "https://api.example.com/v1/deploy/%3B/x",
        ] {
            assert_eq!(
                decide("deployer", url, "POST"),
                said("deny", "no-ambiguous-paths"),
                "{url}"
            );
        }
        // A parameter on a plain segment is nobody's business.
        assert_eq!(
            decide(
                "deployer",
                "https://api.example.com/v1/deploy/x;v=2",
                "POST"
            ),
            said("permit", "deployer-posts")
        );
    }

    /// The starter's connection forbid refuses this machine, the private networks and the
    /// metadata address, in IPv4 and IPv6 and IPv4-mapped forms, and nothing public.
    #[test]
    fn the_starter_keeps_http_calls_off_private_addresses() {
        let source = PolicySource {
            name: STARTER_POLICY_FILE.to_string(),
            text: STARTER_POLICY.to_string(),
        };
        let set = PolicySet::from_sources(&[source], &Schema::ice().unwrap()).unwrap();
        assert!(set.checks_connections());
        let registry = Registry::standard();
        let run = RunId::new("starter").unwrap();
        let given = json!({ "method": "GET" });
        let target = http_call(
            "http.request",
            ResourceKind::Host,
            "https://api.example.com/x",
            &given,
        )
        .unwrap()
        .unwrap();
        let args = ice_effects::http::policy_arguments(&target, &given);
        let refused = |address: &str| {
            let request = Request::builder(
                &run,
                "coder",
                "http.request",
                Resource::host("api.example.com").unwrap(),
            )
            .arguments(&args)
            .connecting_to(address.parse().unwrap())
            .build(&registry)
            .unwrap();
            set.refuses_connection(&request)
                .map(|d| d.determining_policies().to_vec())
        };
        for address in [
            "127.0.0.1",
            "0.0.0.0",
            "10.20.30.40",
            "100.64.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:192.168.0.1",
            "64:ff9b::a00:5",
            "168.63.129.16",
            "192.0.0.192",
            "64:ff9b:1::a00:1",
            "255.255.255.255",
            "224.0.0.1",
            "ff02::1",
            "fec0::1",
        ] {
            assert_eq!(
                refused(address),
                Some(vec!["no-private-addresses".to_string()]),
                "{address}"
            );
        }
        for address in [
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert_eq!(refused(address), None, "{address}");
        }
    }

    #[test]
    fn arguments_merge_json_and_pairs_and_refuse_duplicates() {
        let args = arguments(
            &[
                "method=POST".into(),
                "port=443".into(),
                "args=[\"test\"]".into(),
            ],
            Some(r#"{"url": "https://x/"}"#),
        )
        .unwrap();
        assert_eq!(
            args,
            json!({"url": "https://x/", "method": "POST", "port": 443, "args": ["test"]})
        );
        assert!(arguments(&["a=1".into(), "a=2".into()], None).is_err());
        assert!(arguments(&["novalue".into()], None).is_err());
        assert!(arguments(&["=1".into()], None).is_err());
        assert!(arguments(&[], Some("[1]")).is_err());
        assert!(arguments(&[], Some("{")).is_err());
    }
}
