//! Cedar policies: loading and checking policy files, pre-selecting the policies that can apply
//! to a request, and deciding it.
//!
//! # The decision
//!
//! A request is decided by the policies whose scope can match it:
//!
//! 1. a satisfied `forbid` denies ([`DenyReason::Forbidden`]);
//! 2. else a `forbid` that failed to evaluate denies ([`DenyReason::ForbidFailed`]): ICE fails
//!    closed where Cedar alone would skip the policy;
//! 3. else a satisfied `permit` that permits outright gives [`Verdict::Permit`];
//! 4. else a satisfied `permit` that needs approval gives [`Verdict::PermitWithApproval`];
//! 5. else the request is denied ([`DenyReason::NoPermit`]): deny is the default.
//!
//! A permit needs approval when it carries `@approval("required")`. For a request whose effect
//! class is `external`, a permit counts as outright only when it says so with
//! `@external("permit")`; any other satisfied permit needs approval (spec I-006: external effects
//! need an approval or an explicit policy permit for external effects).
//!
//! A permitted decision carries the [`Constraints`] of every satisfied permit (the tightest
//! value of each), which the runtime records in the grant: `@max_bytes("N")` and
//! `@timeout_ms("N")` on a permit bound each use of what it permits (see [`crate::constraint`]).
//!
//! # Pre-selection
//!
//! At load time every policy is indexed by the actions and resource entity types its scope
//! allows, and within those by the agent and the resource entity its scope names, if any; a
//! small Cedar policy set is built for each group. A decision evaluates only the groups that can
//! apply to it and merges their results. Cedar evaluates a policy's scope before its conditions
//! and stops at the first false, so a policy left out could only have been "not satisfied",
//! without error: pre-selection never changes a decision ([`PolicySet::decide_unindexed`] is the
//! reference the tests compare against).
//!
//! # Files
//!
//! Policies are read from the `*.cedar` files of one directory, in name order. A policy's id is
//! its `@id("...")` annotation if it has one, else `FILE#N` for the N-th policy (from 1) in FILE.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy as cedar;
use ice_kernel::Digest;
use sha2::{Digest as _, Sha256};

use crate::capability::EffectClass;
use crate::constraint::{Constraints, MAX_BYTES_ANNOTATION, TIMEOUT_MS_ANNOTATION};
use crate::diagnostic::{Diagnostic, Location, Severity, from_cedar};
use crate::index::PolicyIndex;
use crate::limits::{MAX_POLICIES, MAX_POLICY_FILE_BYTES, MAX_POLICY_FILES, MAX_POLICY_ID_LEN};
use crate::nesting;
use crate::request::{HTTP_CONNECT, Request, literal_problem};
use crate::schema::Schema;

/// The annotation that makes a permit need an operator's approval: `@approval("required")`.
pub const APPROVAL_ANNOTATION: &str = "approval";
/// The annotation that lets a permit permit external effects outright: `@external("permit")`.
pub const EXTERNAL_ANNOTATION: &str = "external";
/// The annotation that names a policy: `@id("...")`.
pub const ID_ANNOTATION: &str = "id";

/// Every annotation ICE acts on (others are kept as documentation, with a warning).
const ACTED_ON: [&str; 5] = [
    ID_ANNOTATION,
    APPROVAL_ANNOTATION,
    EXTERNAL_ANNOTATION,
    MAX_BYTES_ANNOTATION,
    TIMEOUT_MS_ANNOTATION,
];
/// The annotations ICE acts on that are not constraints (checked above).
const KNOWN_ANNOTATIONS: [&str; 3] = [ID_ANNOTATION, APPROVAL_ANNOTATION, EXTERNAL_ANNOTATION];

/// One policy file's name and text (as a run records it: `{"name", "text"}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicySource {
    /// The file's name (within its directory), as diagnostics and policy ids show it.
    pub name: String,
    /// The file's text.
    pub text: String,
}

/// The version of a policy set: SHA-256 over its files' names and texts, so an approval bound to
/// it is void once any policy text changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyVersion(pub Digest);

impl PolicyVersion {
    /// The version of these sources: SHA-256 of a domain tag, then for each file in name order
    /// its name and its text, each prefixed by its length in bytes (8 bytes, big-endian), so no
    /// two different sets of files share a digest by shifting bytes between names and texts.
    pub fn of(sources: &[PolicySource]) -> PolicyVersion {
        let mut sorted: Vec<&PolicySource> = sources.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut hasher = Sha256::new();
        hasher.update(b"ice-policy-set-v1\n");
        for source in sorted {
            for part in [source.name.as_bytes(), source.text.as_bytes()] {
                hasher.update((part.len() as u64).to_be_bytes());
                hasher.update(part);
            }
        }
        PolicyVersion(Digest(hasher.finalize().into()))
    }
}

impl PolicyVersion {
    /// The digest as 64 lower-case hex characters, the form event payloads carry (and the form
    /// `policy:<hex>` authorities name).
    pub fn to_hex(&self) -> String {
        self.0.to_hex()
    }

    /// Parse 64 lower-case hex characters.
    pub fn from_hex(s: &str) -> Result<PolicyVersion, String> {
        Digest::from_hex(s).map(PolicyVersion)
    }
}

/// In event payloads a policy version is its bare hex digest (no `sha256:` prefix).
impl serde::Serialize for PolicyVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for PolicyVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PolicyVersion::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0.to_hex())
    }
}

/// A policy's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyEffect {
    /// `permit`.
    Permit,
    /// `forbid`.
    Forbid,
}

impl fmt::Display for PolicyEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyEffect::Permit => "permit",
            PolicyEffect::Forbid => "forbid",
        })
    }
}

/// What ICE knows about one loaded policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// The policy's id.
    pub id: String,
    /// The file it came from.
    pub file: String,
    /// Where it starts in that file.
    pub location: Location,
    /// Permit or forbid.
    pub effect: PolicyEffect,
    /// It carries `@approval("required")`.
    pub approval_required: bool,
    /// It carries `@external("permit")`.
    pub permits_external: bool,
    /// The limits its annotations put on each use of what it permits.
    pub constraints: Constraints,
}

/// A policy that failed to evaluate for a request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyError {
    /// The policy's id.
    pub policy: String,
    /// Cedar's error.
    pub message: String,
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No permit policy was satisfied (and no forbid): the default.
    NoPermit,
    /// These forbid policies were satisfied.
    Forbidden {
        /// The satisfied forbids, by id, sorted.
        policies: Vec<String>,
    },
    /// No forbid was satisfied, but these forbid policies failed to evaluate, and ICE does not
    /// let a broken forbid permit anything.
    ForbidFailed {
        /// The forbids that failed, by id, sorted.
        policies: Vec<String>,
    },
}

/// The outcome of a decision, with the policies that determined it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Permitted outright.
    Permit {
        /// The satisfied permits that permit outright, by id, sorted.
        policies: Vec<String>,
    },
    /// Permitted once an operator approves this exact request.
    PermitWithApproval {
        /// The satisfied permits, all of which need approval, by id, sorted.
        policies: Vec<String>,
    },
    /// Denied.
    Deny(DenyReason),
}

/// The three kinds of decision, without their reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    /// Denied.
    Deny,
    /// Permitted outright.
    Permit,
    /// Permitted with an operator's approval.
    PermitWithApproval,
}

impl fmt::Display for DecisionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecisionKind::Deny => "deny",
            DecisionKind::Permit => "permit",
            DecisionKind::PermitWithApproval => "permit-with-approval",
        })
    }
}

/// A policy decision: the verdict, every policy that failed to evaluate, and the version of the
/// policy set that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What was decided and by which policies.
    pub verdict: Verdict,
    /// Every policy that failed to evaluate for this request, sorted by id. A failed permit does
    /// not permit; a failed forbid denies unless another forbid was satisfied.
    pub errors: Vec<PolicyError>,
    /// The version of the policy set that decided.
    pub policy_version: PolicyVersion,
    /// For a permit, the limits on each use of the grant it gives: the tightest of every
    /// satisfied permit's. None for a deny.
    pub constraints: Constraints,
}

impl Decision {
    /// Deny, permit or permit-with-approval.
    pub fn kind(&self) -> DecisionKind {
        match self.verdict {
            Verdict::Permit { .. } => DecisionKind::Permit,
            Verdict::PermitWithApproval { .. } => DecisionKind::PermitWithApproval,
            Verdict::Deny(_) => DecisionKind::Deny,
        }
    }

    /// The ids of the policies that determined the decision (none for a default deny).
    pub fn determining_policies(&self) -> &[String] {
        match &self.verdict {
            Verdict::Permit { policies } | Verdict::PermitWithApproval { policies } => policies,
            Verdict::Deny(DenyReason::Forbidden { policies })
            | Verdict::Deny(DenyReason::ForbidFailed { policies }) => policies,
            Verdict::Deny(DenyReason::NoPermit) => &[],
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Permit { policies } => write!(f, "permit by {}", policies.join(", "))?,
            Verdict::PermitWithApproval { policies } => write!(
                f,
                "permit with an operator's approval, by {}",
                policies.join(", ")
            )?,
            Verdict::Deny(DenyReason::NoPermit) => f.write_str("deny: no permit policy matched")?,
            Verdict::Deny(DenyReason::Forbidden { policies }) => {
                write!(f, "deny: forbidden by {}", policies.join(", "))?
            }
            Verdict::Deny(DenyReason::ForbidFailed { policies }) => write!(
                f,
                "deny: forbid policies failed to evaluate: {}",
                policies.join(", ")
            )?,
        }
        // A policy that failed to evaluate decided nothing, but a denial that says only "no
        // permit matched" would hide that a permit meant to match failed.
        if !self.errors.is_empty() {
            let failed: Vec<String> = self
                .errors
                .iter()
                .map(|e| format!("{} ({})", e.policy, e.message))
                .collect();
            write!(f, "; failed to evaluate: {}", failed.join("; "))?;
        }
        write!(f, " (policy version {})", self.policy_version)
    }
}

/// A decision with what a person needs to understand it: which policies were considered and
/// where each policy that mattered is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The decision.
    pub decision: Decision,
    /// The request's agent, capability and resource, as Cedar sees them.
    pub request: String,
    /// The effect class the runtime assigned to the request.
    pub effect: EffectClass,
    /// How many policies pre-selection kept for evaluation.
    pub considered: usize,
    /// How many policies the set holds.
    pub total: usize,
    /// The policies that determined the decision, then those that failed, with their places.
    pub policies: Vec<PolicyInfo>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "request: {} (effect {})", self.request, self.effect)?;
        writeln!(f, "decision: {}", self.decision)?;
        writeln!(
            f,
            "considered {} of {} policies (pre-selected by action and resource type)",
            self.considered, self.total
        )?;
        for p in &self.policies {
            let mut notes = Vec::new();
            if p.approval_required {
                notes.push("@approval(\"required\")".to_string());
            }
            if p.permits_external {
                notes.push("@external(\"permit\")".to_string());
            }
            notes.extend(p.constraints.annotations());
            writeln!(
                f,
                "  {} {} at {}:{} {}",
                p.effect,
                p.id,
                p.file,
                p.location,
                notes.join(" ")
            )?;
        }
        if !self.decision.constraints.is_empty() {
            writeln!(f, "constraints: {}", self.decision.constraints)?;
        }
        for e in &self.decision.errors {
            writeln!(f, "  error in {}: {}", e.policy, e.message)?;
        }
        Ok(())
    }
}

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the policy directory or a file in it failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What ICE was doing.
        what: &'static str,
        /// The directory or file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The policies have errors; each diagnostic names the file, line and column.
    #[error(
        "{} error(s) in the policies; first: {}",
        count_errors(diagnostics),
        first_error(diagnostics)
    )]
    Invalid {
        /// Every error and warning found.
        diagnostics: Vec<Diagnostic>,
    },
}

fn count_errors(diagnostics: &[Diagnostic]) -> usize {
    diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count()
}

fn first_error(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .find(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Whether the loader looks at a directory entry of this name: `*.cedar`, and in another case
/// (`DENY.CEDAR`, which it refuses rather than skip). What notices edits of a policy directory
/// must look at the same entries.
pub fn is_policy_file_name(name: &std::ffi::OsStr) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("cedar"))
}

/// Read the `*.cedar` files of a directory (not its subdirectories), in name order; an entry
/// named `*.cedar` that is not a regular file (a dangling link, a directory) is an error. This is the
/// only I/O the authority layer does.
pub fn read_policy_dir(dir: &Path) -> Result<Vec<PolicySource>, LoadError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { what, path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("reading the policy directory", dir))? {
        let entry = entry.map_err(io("reading the policy directory", dir))?;
        let path = entry.path();
        if !is_policy_file_name(&entry.file_name()) {
            continue;
        }
        let refuse = |message: String| LoadError::Invalid {
            diagnostics: vec![diag(
                Severity::Error,
                &path.display().to_string(),
                None,
                None,
                message,
            )],
        };
        // `DENY.CEDAR` is meant as a policy file; skipped, its forbids would go unread.
        if let Some(e) = path.extension().filter(|e| *e != "cedar") {
            return Err(refuse(format!(
                "ends in .{}, not .cedar: ICE reads only *.cedar files, so its policies would be left out; rename it to *.cedar or move it out of the directory",
                e.to_string_lossy()
            )));
        }
        // A policy file that cannot be read as one (a dangling link, a directory, a pipe) is an
        // error, never skipped: skipping it would drop its forbids without a word.
        let Some(meta) = std::fs::metadata(&path).ok().filter(|m| m.is_file()) else {
            return Err(refuse(
                "is not a regular file (a link to nothing, a directory, a pipe or a device): its policies cannot be read; remove it or rename it to something other than *.cedar".into(),
            ));
        };
        let len = meta.len();
        if len > MAX_POLICY_FILE_BYTES as u64 {
            return Err(refuse(format!(
                "{len} bytes is over the limit of {MAX_POLICY_FILE_BYTES} for a policy file"
            )));
        }
        files.push(path);
        if files.len() > MAX_POLICY_FILES {
            return Err(LoadError::Invalid {
                diagnostics: vec![Diagnostic {
                    severity: Severity::Error,
                    file: dir.display().to_string(),
                    location: None,
                    policy: None,
                    message: format!("more than {MAX_POLICY_FILES} policy files"),
                    help: None,
                }],
            });
        }
    }
    files.sort();
    let mut sources = Vec::with_capacity(files.len());
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&path).map_err(io("reading the policy file", &path))?;
        let text = String::from_utf8(bytes).map_err(|e| LoadError::Io {
            what: "reading the policy file",
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        })?;
        sources.push(PolicySource { name, text });
    }
    Ok(sources)
}

/// A loaded, validated and indexed set of policies. Immutable: a policy change is a new set
/// with a new [`PolicyVersion`].
#[derive(Debug)]
pub struct PolicySet {
    whole: cedar::PolicySet,
    /// Whether some forbid's scope names [`HTTP_CONNECT`] (worked out once, at load).
    checks_connections: bool,
    index: PolicyIndex,
    info: HashMap<cedar::PolicyId, PolicyInfo>,
    version: PolicyVersion,
    warnings: Vec<Diagnostic>,
    authorizer: cedar::Authorizer,
    /// The files it was built from, by name: what a run records so that a replay can rebuild
    /// exactly this set.
    sources: Vec<PolicySource>,
}

/// A parsed policy before indexing.
struct Parsed {
    policy: cedar::Policy,
    info: PolicyInfo,
}

fn diag(
    severity: Severity,
    file: &str,
    location: Option<Location>,
    policy: Option<&str>,
    message: String,
) -> Diagnostic {
    Diagnostic {
        severity,
        file: file.to_string(),
        location,
        policy: policy.map(str::to_string),
        message,
        help: None,
    }
}

/// Parse one file: Cedar's parse errors, then ICE's own rules for each policy (no templates,
/// known annotation values, unique ids).
fn parse_file(
    source: &PolicySource,
    parsed: &mut Vec<Parsed>,
    ids: &mut HashMap<String, String>,
    out: &mut Vec<Diagnostic>,
) {
    let file = source.name.as_str();
    // A byte-order mark (some editors write one) is not Cedar; the file's text, and so the
    // policy version, keep it.
    let text = source.text.strip_prefix('\u{feff}').unwrap_or(&source.text);
    if text.len() > MAX_POLICY_FILE_BYTES {
        out.push(diag(
            Severity::Error,
            file,
            None,
            None,
            format!(
                "{} bytes is over the limit of {MAX_POLICY_FILE_BYTES} for a policy file",
                text.len()
            ),
        ));
        return;
    }
    // Cedar parses, evaluates and drops policies recursively: a text nested too deeply would
    // overflow the stack (and abort ICE) before Cedar could say anything about it.
    if let Err(deep) = nesting::check_policy_text(text) {
        out.push(Diagnostic {
            help: Some(deep.help),
            ..diag(
                Severity::Error,
                file,
                Some(Location::of_offset(text, deep.offset)),
                None,
                deep.message,
            )
        });
        return;
    }
    let set = match cedar::PolicySet::from_str(text) {
        Ok(set) => set,
        Err(errors) => {
            for e in errors.iter() {
                out.push(from_cedar(Severity::Error, file, text, None, e));
            }
            return;
        }
    };
    // Cedar names a file's statements `policy0`, `policy1`, … in order; its text for each is
    // the exact slice of the file, which locates the statement.
    let mut statements: BTreeMap<usize, StatementText> = BTreeMap::new();
    for p in set.policies() {
        if let Some(n) = statement_index(p.id()) {
            statements.insert(
                n,
                StatementText::Policy(Box::new(p.clone()), p.to_cedar().unwrap_or_default()),
            );
        }
    }
    for t in set.templates() {
        if let Some(n) = statement_index(t.id()) {
            statements.insert(n, StatementText::Template(t.to_cedar()));
        }
    }
    let mut search_from = 0;
    for (n, statement) in statements {
        let body = match &statement {
            StatementText::Policy(_, body) | StatementText::Template(body) => body.clone(),
        };
        let body = body.as_str();
        let start = text[search_from..]
            .find(body)
            .map_or(search_from, |i| search_from + i);
        search_from = start + body.len();
        let at = |needle: &str| {
            let offset = body.find(needle).map_or(start, |i| start + i);
            Some(Location::of_offset(text, offset))
        };
        let location = Location::of_offset(text, start);
        let policy = match statement {
            StatementText::Template(_) => {
                out.push(Diagnostic {
                    help: Some("write the principal and resource out in a static policy".into()),
                    ..diag(
                        Severity::Error,
                        file,
                        Some(location),
                        None,
                        "policy templates (with ?principal or ?resource) are not supported"
                            .to_string(),
                    )
                });
                continue;
            }
            StatementText::Policy(policy, _) => *policy,
        };
        let id = match policy.annotation(ID_ANNOTATION) {
            Some(id) => id.to_string(),
            None => format!("{file}#{}", n + 1),
        };
        if id.is_empty() || id.len() > MAX_POLICY_ID_LEN || id.chars().any(char::is_control) {
            out.push(diag(
                Severity::Error,
                file,
                at("@id"),
                None,
                format!("@id must be 1 to {MAX_POLICY_ID_LEN} bytes without control characters"),
            ));
            continue;
        }
        if let Some(first) = ids.get(&id) {
            out.push(diag(
                Severity::Error,
                file,
                at("@id"),
                Some(&id),
                format!("policy id {id:?} is already used in {first}"),
            ));
            continue;
        }
        ids.insert(id.clone(), file.to_string());
        let effect = match policy.effect() {
            cedar::Effect::Permit => PolicyEffect::Permit,
            cedar::Effect::Forbid => PolicyEffect::Forbid,
        };
        let approval = policy.annotation(APPROVAL_ANNOTATION);
        let external = policy.annotation(EXTERNAL_ANNOTATION);
        let mut ok = true;
        let mut refuse = |needle: &str, message: String| {
            out.push(diag(Severity::Error, file, at(needle), Some(&id), message));
            ok = false;
        };
        match approval {
            None | Some("required") => {}
            Some(other) => refuse(
                "@approval",
                format!("@approval({other:?}) is not understood; write @approval(\"required\")"),
            ),
        }
        match external {
            None | Some("permit") => {}
            Some(other) => refuse(
                "@external",
                format!("@external({other:?}) is not understood; write @external(\"permit\")"),
            ),
        }
        if effect == PolicyEffect::Forbid && (approval.is_some() || external.is_some()) {
            refuse(
                if approval.is_some() {
                    "@approval"
                } else {
                    "@external"
                },
                "@approval and @external apply to permit policies; a forbid always denies"
                    .to_string(),
            );
        }
        if approval.is_some() && external.is_some() {
            refuse(
                "@external",
                "a permit cannot both need approval and permit external effects outright"
                    .to_string(),
            );
        }
        let mut constraints = Constraints::NONE;
        let mut warnings = Vec::new();
        for (name, value) in policy.annotations() {
            match constraints.set_from_annotation(name, value) {
                Ok(true) if effect == PolicyEffect::Forbid => refuse(
                    &format!("@{name}"),
                    format!("@{name} limits what a permit allows; a forbid always denies"),
                ),
                Ok(true) => {}
                Err(problem) => refuse(&format!("@{name}"), problem),
                Ok(false) if KNOWN_ANNOTATIONS.contains(&name) => {}
                Ok(false) => warnings.push(diag(
                    Severity::Warning,
                    file,
                    at(&format!("@{name}")),
                    Some(&id),
                    format!(
                        "@{name} is not an annotation ICE acts on (it acts on @{}); it is ignored",
                        ACTED_ON.join(", @")
                    ),
                )),
            }
        }
        // An entity the runtime never builds (a host in capitals, a directory with a trailing
        // slash) matches nothing: a forbid naming it protects nothing.
        for uid in policy.entity_literals() {
            if let Some(problem) = literal_problem(&uid) {
                warnings.push(diag(
                    Severity::Warning,
                    file,
                    at(uid.id().unescaped()),
                    Some(&id),
                    format!("{uid} {problem}"),
                ));
            }
        }
        // Only a connection check has `context.address`: a policy whose scope does not name it
        // can test for it (`context has address && …`) and validate, but never applies.
        if !names_connect(&policy) && reads_context_address(&policy) {
            warnings.push(diag(
                Severity::Warning,
                file,
                at("address"),
                Some(&id),
                format!(
                    "reads context.address, which only {HTTP_CONNECT} has, but its scope does not name Action::\"{HTTP_CONNECT}\": it never applies to an address; write `action == Action::\"{HTTP_CONNECT}\"`"
                ),
            ));
        }
        // A limit on actions that cannot exceed it is a mistake worth saying.
        if let Some(actions) = actions_of(&policy) {
            if effect == PolicyEffect::Permit && actions.iter().any(|a| a == HTTP_CONNECT) {
                warnings.push(diag(
                    Severity::Warning,
                    file,
                    at(HTTP_CONNECT),
                    Some(&id),
                    format!(
                        "a permit has no effect on {HTTP_CONNECT}: a connection is refused by a forbid naming it, and otherwise made (the call was permitted as http.request)"
                    ),
                ));
            }
            let limits = |of: &[&str]| actions.iter().any(|a| of.contains(&a.as_str()));
            let checks = [
                (
                    constraints.max_bytes.is_some(),
                    MAX_BYTES_ANNOTATION,
                    &[
                        "fs.read",
                        "fs.write",
                        "http.request",
                        "mcp.call",
                        "process.exec",
                    ][..],
                ),
                (
                    constraints.timeout_ms.is_some(),
                    TIMEOUT_MS_ANNOTATION,
                    &["http.request", "mcp.call", "process.exec"][..],
                ),
            ];
            for (set, name, enforced_by) in checks {
                if set && !limits(enforced_by) {
                    warnings.push(diag(
                        Severity::Warning,
                        file,
                        at(&format!("@{name}")),
                        Some(&id),
                        format!(
                            "@{name} limits nothing this permit allows (only {} enforce it)",
                            enforced_by.join(", ")
                        ),
                    ));
                }
            }
        }
        out.extend(warnings);
        if !ok {
            continue;
        }
        parsed.push(Parsed {
            policy: policy.new_id(cedar::PolicyId::new(&id)),
            info: PolicyInfo {
                id,
                file: file.to_string(),
                location,
                effect,
                approval_required: approval.is_some(),
                permits_external: external.is_some(),
                constraints,
            },
        });
    }
}

/// Whether a policy's scope names [`HTTP_CONNECT`] (a policy for any action does not).
fn names_connect(policy: &cedar::Policy) -> bool {
    actions_of(policy).is_some_and(|a| a.iter().any(|a| a == HTTP_CONNECT))
}

/// Whether a policy's conditions read or test `context.address` (in Cedar's JSON form: an
/// attribute access or `has` on the variable `context` with attribute `address`).
fn reads_context_address(policy: &cedar::Policy) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(map) => {
                let on_context = [".", "has"].iter().any(|op| {
                    map.get(*op).is_some_and(|access| {
                        access.get("attr").and_then(serde_json::Value::as_str) == Some("address")
                            && access.get("left").and_then(|l| l.get("Var"))
                                == Some(&serde_json::Value::from("context"))
                    })
                });
                on_context || map.values().any(walk)
            }
            serde_json::Value::Array(items) => items.iter().any(walk),
            _ => false,
        }
    }
    policy
        .to_json()
        .ok()
        .and_then(|json| json.get("conditions").map(walk))
        .unwrap_or(false)
}

/// The actions a policy's scope names (`None`: any action). ICE's schema has no action
/// groups, so `action in [...]` is exactly the listed actions.
fn actions_of(policy: &cedar::Policy) -> Option<Vec<String>> {
    let name = |uid: &cedar::EntityUid| uid.id().unescaped().to_string();
    match policy.action_constraint() {
        cedar::ActionConstraint::Any => None,
        cedar::ActionConstraint::Eq(uid) => Some(vec![name(&uid)]),
        cedar::ActionConstraint::In(uids) => Some(uids.iter().map(name).collect()),
    }
}

enum StatementText {
    Policy(Box<cedar::Policy>, String),
    Template(String),
}

/// A Cedar policy id as the plain string it was made from.
fn pid(id: &cedar::PolicyId) -> &str {
    id.as_ref()
}

fn statement_index(id: &cedar::PolicyId) -> Option<usize> {
    pid(id).strip_prefix("policy")?.parse().ok()
}

fn limit(message: String) -> Diagnostic {
    diag(Severity::Error, "<policy set>", None, None, message)
}

fn internal(message: String) -> Diagnostic {
    diag(
        Severity::Error,
        "<policy set>",
        None,
        None,
        format!("building the policy index: {message}"),
    )
}

impl PolicySet {
    /// Read, check and index the `*.cedar` files of `dir`.
    pub fn load_dir(dir: &Path, schema: &Schema) -> Result<PolicySet, LoadError> {
        PolicySet::from_sources(&read_policy_dir(dir)?, schema)
    }

    /// Check policy sources against the schema and return every diagnostic (errors and
    /// warnings), each with its file, line and column. Empty means the sources load cleanly.
    pub fn check(sources: &[PolicySource], schema: &Schema) -> Vec<Diagnostic> {
        match PolicySet::from_sources(sources, schema) {
            Ok(set) => set.warnings,
            Err(LoadError::Invalid { diagnostics }) => diagnostics,
            Err(e @ LoadError::Io { .. }) => vec![internal(e.to_string())],
        }
    }

    /// Check the `*.cedar` files of `dir` against the schema: [`PolicySet::check`] after reading
    /// them.
    pub fn check_dir(dir: &Path, schema: &Schema) -> Result<Vec<Diagnostic>, LoadError> {
        Ok(PolicySet::check(&read_policy_dir(dir)?, schema))
    }

    /// Parse, validate (Cedar's strict mode against `schema`) and index policy sources. Any
    /// error refuses the whole set; warnings are kept ([`PolicySet::warnings`]).
    pub fn from_sources(sources: &[PolicySource], schema: &Schema) -> Result<PolicySet, LoadError> {
        let mut diagnostics = Vec::new();
        let mut names = HashSet::new();
        let mut parsed = Vec::new();
        let mut ids = HashMap::new();
        let mut sorted: Vec<&PolicySource> = sources.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        if sorted.len() > MAX_POLICY_FILES {
            diagnostics.push(limit(format!("more than {MAX_POLICY_FILES} policy files")));
        }
        for source in sorted {
            if !names.insert(source.name.as_str()) {
                diagnostics.push(diag(
                    Severity::Error,
                    &source.name,
                    None,
                    None,
                    "two policy sources have this name".to_string(),
                ));
                continue;
            }
            parse_file(source, &mut parsed, &mut ids, &mut diagnostics);
        }
        if parsed.len() > MAX_POLICIES {
            diagnostics.push(limit(format!(
                "{} policies is over the limit of {MAX_POLICIES}",
                parsed.len()
            )));
        }
        let whole = match cedar::PolicySet::from_policies(parsed.iter().map(|p| p.policy.clone())) {
            Ok(whole) => whole,
            Err(e) => {
                diagnostics.push(internal(e.to_string()));
                return Err(LoadError::Invalid { diagnostics });
            }
        };
        let texts: HashMap<&str, &str> = sources
            .iter()
            .map(|s| (s.name.as_str(), s.text.as_str()))
            .collect();
        let info: HashMap<cedar::PolicyId, PolicyInfo> = parsed
            .iter()
            .map(|p| (p.policy.id().clone(), p.info.clone()))
            .collect();
        let validation = cedar::Validator::new(schema.cedar().clone())
            .validate(&whole, cedar::ValidationMode::Strict);
        let locate = |id: &cedar::PolicyId| {
            let file = info.get(id).map_or("<unknown>", |i| i.file.as_str());
            (file, texts.get(file).copied().unwrap_or(""))
        };
        for e in validation.validation_errors() {
            let (file, text) = locate(e.policy_id());
            diagnostics.push(from_cedar(
                Severity::Error,
                file,
                text,
                Some(pid(e.policy_id()).to_string()),
                e,
            ));
        }
        for w in validation.validation_warnings() {
            let (file, text) = locate(w.policy_id());
            diagnostics.push(from_cedar(
                Severity::Warning,
                file,
                text,
                Some(pid(w.policy_id()).to_string()),
                w,
            ));
        }
        if diagnostics.iter().any(|d| d.severity == Severity::Error) {
            return Err(LoadError::Invalid { diagnostics });
        }
        let built = PolicySet::index(whole, parsed, info, PolicyVersion::of(sources), diagnostics);
        let mut set = built.map_err(|d| LoadError::Invalid {
            diagnostics: vec![d],
        })?;
        set.sources = sources.to_vec();
        set.sources.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(set)
    }

    fn index(
        whole: cedar::PolicySet,
        parsed: Vec<Parsed>,
        info: HashMap<cedar::PolicyId, PolicyInfo>,
        version: PolicyVersion,
        warnings: Vec<Diagnostic>,
    ) -> Result<PolicySet, Diagnostic> {
        let policies: Vec<cedar::Policy> = parsed.into_iter().map(|p| p.policy).collect();
        let index = PolicyIndex::build(&policies).map_err(internal)?;
        let checks_connections = policies
            .iter()
            .any(|p| p.effect() == cedar::Effect::Forbid && names_connect(p));
        Ok(PolicySet {
            whole,
            checks_connections,
            index,
            info,
            version,
            warnings,
            authorizer: cedar::Authorizer::new(),
            sources: Vec::new(),
        })
    }

    /// The files the set was built from, ordered by name: loading them again gives a set of
    /// the same version.
    pub fn sources(&self) -> &[PolicySource] {
        &self.sources
    }

    /// The policy set's version (a digest of its files), for approvals to bind to.
    pub fn version(&self) -> PolicyVersion {
        self.version
    }

    /// Cedar's warnings about the policies (they did not stop loading).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// How many policies the set holds.
    pub fn len(&self) -> usize {
        self.info.len()
    }

    /// Whether the set holds no policy (then every request is denied).
    pub fn is_empty(&self) -> bool {
        self.info.is_empty()
    }

    /// Whether some permit policy could apply to `agent` asking for `capability`, whatever the
    /// resource and the conditions (a scope that names another agent or other actions cannot):
    /// what an agent is offered as a tool (a capability no permit could allow is not listed).
    /// A forbid is not considered; a capability it always denies may still be listed.
    pub fn may_permit(&self, agent: &str, capability: &str) -> bool {
        self.whole.policies().any(|p| {
            let permit = self
                .info
                .get(p.id())
                .is_some_and(|i| i.effect == PolicyEffect::Permit);
            let is_this = |uid: &cedar::EntityUid, kind: &str, id: &str| {
                uid.type_name().to_string() == kind && uid.id().unescaped() == id
            };
            let principal = match p.principal_constraint() {
                cedar::PrincipalConstraint::Eq(uid) => is_this(&uid, "Agent", agent),
                // `in`/`is` constraints: assume they may hold (an agent has no parents today,
                // but listing a tool that is then denied is the safe error).
                _ => true,
            };
            // The schema has no action groups: a scope names its actions outright.
            let action = actions_of(p).is_none_or(|a| a.iter().any(|a| a == capability));
            permit && principal && action
        })
    }

    /// What is known about a policy, by id.
    pub fn policy(&self, id: &str) -> Option<&PolicyInfo> {
        self.info.get(&cedar::PolicyId::new(id))
    }

    /// Every policy, sorted by file and place.
    pub fn policies(&self) -> Vec<&PolicyInfo> {
        let mut all: Vec<&PolicyInfo> = self.info.values().collect();
        all.sort_by(|a, b| (&a.file, a.location).cmp(&(&b.file, b.location)));
        all
    }

    /// The whole set as Cedar holds it, for tools and benchmarks that call Cedar directly.
    pub fn cedar(&self) -> &cedar::PolicySet {
        &self.whole
    }

    /// Whether some forbid's scope names [`HTTP_CONNECT`]: otherwise no connection can be
    /// refused, and an HTTP call need not check the addresses it connects to.
    pub fn checks_connections(&self) -> bool {
        self.checks_connections
    }

    /// Decide a connection check (a request built with
    /// [`RequestBuilder::connecting_to`](crate::RequestBuilder::connecting_to)): `Some` deny
    /// if a forbid whose scope names [`HTTP_CONNECT`] holds, or fails to evaluate (a broken
    /// forbid refuses, as everywhere); `None` if the connection may be made. Permits play no
    /// part, and a policy for any action does not apply: its author wrote it about calls, not
    /// about the addresses their hosts resolve to.
    pub fn refuses_connection(&self, request: &Request) -> Option<Decision> {
        if request.capability() != HTTP_CONNECT {
            return Some(Decision {
                verdict: Verdict::Deny(DenyReason::NoPermit),
                errors: Vec::new(),
                policy_version: self.version,
                constraints: Constraints::NONE,
            });
        }
        let decision = self.decide(request);
        match decision.verdict {
            Verdict::Deny(DenyReason::Forbidden { .. } | DenyReason::ForbidFailed { .. }) => {
                Some(decision)
            }
            _ => None,
        }
    }

    /// Decide a request, evaluating only the pre-selected policies.
    pub fn decide(&self, request: &Request) -> Decision {
        self.explain_inner(request).0
    }

    /// Decide a request by evaluating every policy, without pre-selection. Slower; it is the
    /// reference [`PolicySet::decide`] is tested against. A connection check evaluates every
    /// policy whose scope names [`HTTP_CONNECT`], picked here from each scope afresh.
    pub fn decide_unindexed(&self, request: &Request) -> Decision {
        let mut outcome = Outcome::default();
        if request.capability() == HTTP_CONNECT {
            let names_connect = |uid: &cedar::EntityUid| {
                uid.type_name().to_string() == "Action" && uid.id().unescaped() == HTTP_CONNECT
            };
            let written_for_it = self
                .whole
                .policies()
                .filter(|p| match p.action_constraint() {
                    cedar::ActionConstraint::Any => false,
                    cedar::ActionConstraint::Eq(uid) => names_connect(&uid),
                    cedar::ActionConstraint::In(uids) => uids.iter().any(names_connect),
                });
            match cedar::PolicySet::from_policies(written_for_it.cloned()) {
                Ok(set) => outcome.add(self, &set, request),
                // Cannot happen (the ids were unique in the whole set); fail closed if it does.
                Err(e) => outcome.failed_forbids.push(format!("<policy set>: {e}")),
            }
        } else {
            outcome.add(self, &self.whole, request);
        }
        outcome.decide(self)
    }

    /// Evaluate the pre-selected groups; the decision and how many policies were evaluated.
    fn explain_inner(&self, request: &Request) -> (Decision, usize) {
        let mut outcome = Outcome::default();
        let mut considered = 0;
        self.index.candidates(request, |set| {
            considered += set.num_of_policies();
            outcome.add(self, set, request);
        });
        (outcome.decide(self), considered)
    }

    /// Decide a request and say which policies decided it and where they are written.
    pub fn explain(&self, request: &Request) -> Explanation {
        let (decision, considered) = self.explain_inner(request);
        let mut policies: Vec<PolicyInfo> = decision
            .determining_policies()
            .iter()
            .chain(decision.errors.iter().map(|e| &e.policy))
            .filter_map(|id| self.policy(id).cloned())
            .collect();
        let mut seen = HashSet::new();
        policies.retain(|p| seen.insert(p.id.clone()));
        let (cedar_request, _) = request.cedar();
        let request_text = format!(
            "{} {} {}",
            cedar_request
                .principal()
                .map_or_else(String::new, ToString::to_string),
            cedar_request
                .action()
                .map_or_else(String::new, ToString::to_string),
            request.resource()
        );
        Explanation {
            considered,
            total: self.len(),
            request: request_text,
            effect: request.effect(),
            policies,
            decision,
        }
    }
}

/// What the evaluated policy sets said, merged. Cedar reports for each set the satisfied
/// forbids if there are any, else the satisfied permits, and every evaluation error; merging
/// those over disjoint sets gives what one evaluation of their union reports.
#[derive(Default)]
struct Outcome {
    forbids: Vec<String>,
    outright: Vec<String>,
    with_approval: Vec<String>,
    failed_forbids: Vec<String>,
    errors: Vec<PolicyError>,
    /// The tightest constraints of the satisfied permits.
    constraints: Constraints,
}

impl Outcome {
    fn add(&mut self, set: &PolicySet, policies: &cedar::PolicySet, request: &Request) {
        let (cedar_request, entities) = request.cedar();
        let response = set
            .authorizer
            .is_authorized(cedar_request, policies, entities);
        for e in response.diagnostics().errors() {
            let cedar::AuthorizationError::PolicyEvaluationError(e) = e;
            let id = pid(e.policy_id());
            let is_permit =
                set.info.get(e.policy_id()).map(|i| i.effect) == Some(PolicyEffect::Permit);
            if !is_permit {
                self.failed_forbids.push(id.to_string());
            }
            self.errors.push(PolicyError {
                policy: id.to_string(),
                message: e.inner().to_string(),
            });
        }
        for id in response.diagnostics().reason() {
            let Some(info) = set.info.get(id) else {
                // Every policy in every set came from `info`; treat a stranger as a forbid.
                self.forbids.push(pid(id).to_string());
                continue;
            };
            match info.effect {
                PolicyEffect::Forbid => self.forbids.push(info.id.clone()),
                PolicyEffect::Permit => {
                    self.constraints = self.constraints.tightest(info.constraints);
                    let needs_approval = info.approval_required
                        || (request.effect() == EffectClass::External && !info.permits_external);
                    if needs_approval {
                        self.with_approval.push(info.id.clone());
                    } else {
                        self.outright.push(info.id.clone());
                    }
                }
            }
        }
    }

    fn decide(mut self, set: &PolicySet) -> Decision {
        self.errors.sort();
        for list in [
            &mut self.forbids,
            &mut self.outright,
            &mut self.with_approval,
            &mut self.failed_forbids,
        ] {
            list.sort();
        }
        let verdict = if !self.forbids.is_empty() {
            Verdict::Deny(DenyReason::Forbidden {
                policies: self.forbids,
            })
        } else if !self.failed_forbids.is_empty() {
            Verdict::Deny(DenyReason::ForbidFailed {
                policies: self.failed_forbids,
            })
        } else if !self.outright.is_empty() {
            Verdict::Permit {
                policies: self.outright,
            }
        } else if !self.with_approval.is_empty() {
            Verdict::PermitWithApproval {
                policies: self.with_approval,
            }
        } else {
            Verdict::Deny(DenyReason::NoPermit)
        };
        let constraints = match verdict {
            Verdict::Permit { .. } | Verdict::PermitWithApproval { .. } => self.constraints,
            Verdict::Deny(_) => Constraints::NONE,
        };
        Decision {
            verdict,
            errors: self.errors,
            policy_version: set.version,
            constraints,
        }
    }
}
