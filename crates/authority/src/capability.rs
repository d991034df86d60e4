//! The capability registry: which capability types exist, what kind of target each acts on, and
//! the effect class the runtime assigns to each call (spec I-006).
//!
//! The registry is built once at start-up with [`RegistryBuilder`] and is read-only afterwards:
//! [`Registry`] has no method that changes it. Effect classes are owned by the runtime. A tool
//! server's own hint can only raise a class ([`EffectClass::raise`]), and a capability the
//! registry does not know is always [`EffectClass::External`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// The longest capability name accepted, in bytes.
pub const MAX_CAPABILITY_NAME_LEN: usize = 64;

/// How far an effect reaches beyond ICE-controlled state (spec I-006).
///
/// The order is the order of severity: `Read < InternalWrite < External`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EffectClass {
    /// Observes state and changes nothing.
    Read,
    /// Changes state ICE controls and can discard (a run's staged workspace).
    InternalWrite,
    /// Changes, or may change, something outside ICE's control.
    External,
}

impl EffectClass {
    /// Every class, least severe first.
    pub const ALL: [EffectClass; 3] = [
        EffectClass::Read,
        EffectClass::InternalWrite,
        EffectClass::External,
    ];

    /// The class after taking a tool server's hint into account: the more severe of the two.
    ///
    /// A hint can raise a class and can never lower it, so a tool server that calls a destructive
    /// tool "read-only" changes nothing.
    #[must_use]
    pub fn raise(self, hint: EffectClass) -> EffectClass {
        self.max(hint)
    }

    /// The class's name as policies and events spell it: `read`, `internal-write`, `external`.
    pub fn as_str(self) -> &'static str {
        match self {
            EffectClass::Read => "read",
            EffectClass::InternalWrite => "internal-write",
            EffectClass::External => "external",
        }
    }
}

impl serde::Serialize for EffectClass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for EffectClass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for EffectClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EffectClass {
    type Err = CapabilityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EffectClass::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| CapabilityError::UnknownEffectClass(s.to_string()))
    }
}

/// The kind of target a capability acts on; each is one Cedar resource entity type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// A file in the workspace (`Path::"src/lib.rs"`).
    Path,
    /// A directory in the workspace (`Dir::"src"`; the workspace root is `Dir::"."`).
    Dir,
    /// A network host, by its parsed name (`Host::"api.example.com"`).
    Host,
    /// A tool on a tool server (`Tool::"server/tool"`).
    Tool,
    /// A program to run (`Command::"cargo"`).
    Command,
}

impl ResourceKind {
    /// Every kind, in a fixed order (the index of a kind in this array is its [`Self::index`]).
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Path,
        ResourceKind::Dir,
        ResourceKind::Host,
        ResourceKind::Tool,
        ResourceKind::Command,
    ];

    /// The Cedar entity type name of this kind's resources.
    pub fn entity_type(self) -> &'static str {
        match self {
            ResourceKind::Path => "Path",
            ResourceKind::Dir => "Dir",
            ResourceKind::Host => "Host",
            ResourceKind::Tool => "Tool",
            ResourceKind::Command => "Command",
        }
    }

    /// The position of this kind in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind's name in event payloads: `path`, `dir`, `host`, `tool`, `command` (the entity
    /// type in lower case).
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Path => "path",
            ResourceKind::Dir => "dir",
            ResourceKind::Host => "host",
            ResourceKind::Tool => "tool",
            ResourceKind::Command => "command",
        }
    }

    /// The kind with this payload name ([`Self::name`]), if there is one.
    pub fn from_name(name: &str) -> Option<ResourceKind> {
        ResourceKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.entity_type())
    }
}

/// How a capability's effect class is worked out for one call.
///
/// A classifier is data, not code, so the registry can say what it does (`ice policy explain`)
/// and a test can enumerate every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classifier {
    /// The same class for every call.
    Fixed(EffectClass),
    /// By the `method` argument of an HTTP request: exactly `GET` or `HEAD` is
    /// [`EffectClass::Read`]; any other method, a missing method, a method that is not a string
    /// or one in lower case is [`EffectClass::External`]. Methods are case-sensitive (RFC 9110
    /// §9.1), and a server may treat `get` as something other than `GET`.
    HttpMethod,
    /// The class ICE's own configuration assigns to the target (the operator's per-tool classes
    /// of an MCP tool server); [`EffectClass::External`] when it assigns none. A tool server's
    /// annotations are hints and never assign a class.
    Assigned,
}

impl Classifier {
    /// The class of one call with these arguments, when ICE's configuration assigns the target
    /// no class.
    pub fn classify(self, arguments: &Value) -> EffectClass {
        self.classify_assigned(arguments, None)
    }

    /// The class of one call with these arguments and the class ICE's configuration assigns
    /// its target, if any (only [`Classifier::Assigned`] uses it).
    pub fn classify_assigned(
        self,
        arguments: &Value,
        assigned: Option<EffectClass>,
    ) -> EffectClass {
        match self {
            Classifier::Assigned => assigned.unwrap_or(EffectClass::External),
            Classifier::Fixed(class) => class,
            Classifier::HttpMethod => match arguments.get("method").and_then(Value::as_str) {
                Some("GET" | "HEAD") => EffectClass::Read,
                _ => EffectClass::External,
            },
        }
    }

    /// The least severe class this classifier can give.
    pub fn floor(self) -> EffectClass {
        match self {
            Classifier::Fixed(class) => class,
            Classifier::HttpMethod | Classifier::Assigned => EffectClass::Read,
        }
    }
}

impl fmt::Display for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Classifier::Fixed(class) => write!(f, "{class}"),
            Classifier::HttpMethod => f.write_str("read for GET and HEAD, external otherwise"),
            Classifier::Assigned => f.write_str(
                "as the tool server's configuration assigns per tool; external otherwise",
            ),
        }
    }
}

/// One capability type: its name (the Cedar action), the kind of target it acts on, and how
/// its effect class is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    name: String,
    resource: ResourceKind,
    classifier: Classifier,
    summary: String,
}

impl Capability {
    /// Describe a capability type. The name must be a valid capability name
    /// ([`check_capability_name`]).
    pub fn new(
        name: &str,
        resource: ResourceKind,
        classifier: Classifier,
        summary: &str,
    ) -> Result<Capability, CapabilityError> {
        check_capability_name(name)?;
        Ok(Capability {
            name: name.to_string(),
            resource,
            classifier,
            summary: summary.to_string(),
        })
    }

    /// The capability's name, e.g. `fs.write`; in Cedar it is `Action::"fs.write"`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kind of target it acts on.
    pub fn resource(&self) -> ResourceKind {
        self.resource
    }

    /// How its effect class is decided.
    pub fn classifier(&self) -> Classifier {
        self.classifier
    }

    /// One line saying what it does.
    pub fn summary(&self) -> &str {
        &self.summary
    }
}

/// Check a capability name: 1 to [`MAX_CAPABILITY_NAME_LEN`] bytes of dot-separated segments,
/// each starting with a lower-case letter and made of `a-z 0-9 _ -` (`fs.write`, `mcp.call`).
pub fn check_capability_name(name: &str) -> Result<(), CapabilityError> {
    let bad = |why: &str| CapabilityError::InvalidName {
        name: truncated(name),
        why: why.to_string(),
    };
    if name.is_empty() || name.len() > MAX_CAPABILITY_NAME_LEN {
        return Err(bad(&format!(
            "must be 1 to {MAX_CAPABILITY_NAME_LEN} bytes, got {}",
            name.len()
        )));
    }
    for segment in name.split('.') {
        let mut chars = segment.chars();
        match chars.next() {
            Some(c) if c.is_ascii_lowercase() => {}
            Some(_) => return Err(bad("each dot-separated segment starts with a-z")),
            None => return Err(bad("has an empty segment")),
        }
        if let Some(c) = chars.find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
            return Err(bad(&format!(
                "contains {c:?}; allowed are a-z 0-9 _ - and dots"
            )));
        }
    }
    Ok(())
}

/// Names in error messages are cut so a hostile name cannot flood a log line.
pub(crate) fn truncated(s: &str) -> String {
    const KEEP: usize = 80;
    if s.len() <= KEEP {
        return s.to_string();
    }
    let mut end = KEEP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Errors from building the registry or reading effect classes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// A capability name breaks the naming rule.
    #[error("capability name {name:?} {why}")]
    InvalidName {
        /// The offending name (cut to 80 bytes).
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The same capability was registered twice.
    #[error("capability {0:?} is registered twice")]
    Duplicate(String),
    /// A string is not `read`, `internal-write` or `external`.
    #[error("{0:?} is not an effect class (read, internal-write, external)")]
    UnknownEffectClass(String),
}

/// Collects capability types at start-up; [`RegistryBuilder::build`] freezes them into a
/// [`Registry`].
#[derive(Debug, Clone, Default)]
pub struct RegistryBuilder {
    capabilities: BTreeMap<String, Capability>,
}

impl RegistryBuilder {
    /// An empty builder.
    pub fn new() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// A builder holding ICE's standard capability types (see [`Registry::standard`]), to which
    /// more can be added.
    pub fn standard() -> RegistryBuilder {
        use Classifier::{Assigned, Fixed, HttpMethod};
        use EffectClass::{External, InternalWrite, Read};
        let standard: [(&str, ResourceKind, Classifier, &str); 7] = [
            (
                "fs.read",
                ResourceKind::Path,
                Fixed(Read),
                "read a file in the workspace",
            ),
            (
                "fs.list",
                ResourceKind::Dir,
                Fixed(Read),
                "list a directory in the workspace",
            ),
            (
                "fs.write",
                ResourceKind::Path,
                Fixed(InternalWrite),
                "write a file in the run's staged workspace",
            ),
            (
                "fs.delete",
                ResourceKind::Path,
                Fixed(InternalWrite),
                "delete a file in the run's staged workspace",
            ),
            (
                "http.request",
                ResourceKind::Host,
                HttpMethod,
                "an HTTP request to a host; GET and HEAD read, other methods are external",
            ),
            // process.exec runs a program in a throw-away copy of the workspace with the
            // staged writes applied. That copy is only where it starts: the command runs as
            // ICE's user, with that user's reach (every file it may open, ICE's own home
            // included, the network, other processes), and nothing isolates it. What it does
            // cannot be discarded, so it is external: a permit needs an operator's approval for
            // each call unless it says @external("permit"). (Found by a probe: classed
            // internal-write, a narrow permit such as `make test` on a Makefile the agent
            // wrote let the command write the real workspace and approve its own requests.)
            (
                "process.exec",
                ResourceKind::Command,
                Fixed(External),
                "run a program, starting in a copy of the staged workspace (not isolated: it has ICE's user's access)",
            ),
            (
                "mcp.call",
                ResourceKind::Tool,
                Assigned,
                "call a tool on an MCP tool server",
            ),
        ];
        let mut builder = RegistryBuilder::new();
        for (name, resource, classifier, summary) in standard {
            let capability = Capability {
                name: name.to_string(),
                resource,
                classifier,
                summary: summary.to_string(),
            };
            builder.capabilities.insert(name.to_string(), capability);
        }
        builder
    }

    /// Add a capability type. Registering a name twice is an error, so a plug-in cannot quietly
    /// replace a standard capability's class.
    pub fn register(mut self, capability: Capability) -> Result<RegistryBuilder, CapabilityError> {
        if self.capabilities.contains_key(capability.name()) {
            return Err(CapabilityError::Duplicate(capability.name));
        }
        self.capabilities
            .insert(capability.name.clone(), capability);
        Ok(self)
    }

    /// Freeze the registry.
    pub fn build(self) -> Registry {
        Registry {
            capabilities: self.capabilities,
        }
    }
}

/// The capability types known to this runtime, read-only once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    capabilities: BTreeMap<String, Capability>,
}

impl Registry {
    /// ICE's standard capability types:
    ///
    /// | capability | target | effect class |
    /// |---|---|---|
    /// | `fs.read` | `Path` | read |
    /// | `fs.list` | `Dir` | read |
    /// | `fs.write` | `Path` | internal-write |
    /// | `fs.delete` | `Path` | internal-write |
    /// | `http.request` | `Host` | read for GET/HEAD, external otherwise |
    /// | `process.exec` | `Command` | external (starts in a staged copy, but is not isolated) |
    /// | `mcp.call` | `Tool` | as configured per tool, external otherwise |
    pub fn standard() -> Registry {
        RegistryBuilder::standard().build()
    }

    /// The capability type with this name, if registered.
    pub fn get(&self, name: &str) -> Option<&Capability> {
        self.capabilities.get(name)
    }

    /// Every registered capability type, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Capability> {
        self.capabilities.values()
    }

    /// The effect class of one call: the capability's classifier applied to the arguments, then
    /// raised by the tool server's hint if there is one. A capability the registry does not know
    /// is [`EffectClass::External`], whatever the hint says.
    pub fn classify(
        &self,
        capability: &str,
        arguments: &Value,
        hint: Option<EffectClass>,
    ) -> EffectClass {
        self.classify_assigned(capability, arguments, None, hint)
    }

    /// [`Self::classify`], with the class ICE's configuration assigns the target (used by
    /// capabilities whose classifier is [`Classifier::Assigned`]; ignored by the others).
    pub fn classify_assigned(
        &self,
        capability: &str,
        arguments: &Value,
        assigned: Option<EffectClass>,
        hint: Option<EffectClass>,
    ) -> EffectClass {
        let class = match self.get(capability) {
            Some(c) => c.classifier.classify_assigned(arguments, assigned),
            None => EffectClass::External,
        };
        match hint {
            Some(hint) => class.raise(hint),
            None => class,
        }
    }
}
