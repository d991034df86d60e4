//! A request for a decision: who (the agent), what (the capability), on what (the resource), and
//! the context (run, intent, effect class, arguments, budget left), converted once into Cedar's
//! form.
//!
//! Everything here crosses a boundary (an agent's proposal), so every part is checked and bounded
//! when the request is built: a [`Request`] that exists can be decided without another error.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use cedar_policy as cedar;
use ice_kernel::{Origin, RunId};
use serde_json::Value;

use crate::capability::truncated;
use crate::capability::{
    CapabilityError, EffectClass, Registry, ResourceKind, check_capability_name,
};
use crate::limits::{
    MAX_ARGUMENT_DEPTH, MAX_ARGUMENT_STRING_BYTES, MAX_ARGUMENT_TOTAL_BYTES, MAX_ARGUMENT_VALUES,
    MAX_COMMAND_LEN, MAX_HOST_LEN, MAX_INTENT_LEN, MAX_PATH_LEN, MAX_TOOL_NAME_LEN,
};

/// Cedar entity type names, parsed once: parsing a name runs Cedar's parser, which is too slow
/// for every request.
struct Names {
    agent: cedar::EntityTypeName,
    action: cedar::EntityTypeName,
    path: cedar::EntityTypeName,
    dir: cedar::EntityTypeName,
    host: cedar::EntityTypeName,
    domain: cedar::EntityTypeName,
    tool: cedar::EntityTypeName,
    tool_server: cedar::EntityTypeName,
    command: cedar::EntityTypeName,
    effect_class: cedar::EntityTypeName,
}

fn type_name(name: &str) -> cedar::EntityTypeName {
    // The names are constants of this crate, not input; a test parses each one.
    #[expect(
        clippy::expect_used,
        reason = "constant entity type names always parse"
    )]
    cedar::EntityTypeName::from_str(name).expect("constant entity type name")
}

static NAMES: LazyLock<Names> = LazyLock::new(|| Names {
    agent: type_name("Agent"),
    action: type_name("Action"),
    path: type_name("Path"),
    dir: type_name("Dir"),
    host: type_name("Host"),
    domain: type_name("Domain"),
    tool: type_name("Tool"),
    tool_server: type_name("ToolServer"),
    command: type_name("Command"),
    effect_class: type_name("EffectClass"),
});

fn uid(ty: &cedar::EntityTypeName, id: &str) -> cedar::EntityUid {
    cedar::EntityUid::from_type_name_and_id(ty.clone(), cedar::EntityId::new(id))
}

/// The entity type names that a resource of this kind is `in`, as the runtime builds resource
/// entities. The policy index relies on this to pre-select `resource in E` policies.
pub(crate) fn ancestor_types(kind: ResourceKind) -> &'static [&'static str] {
    match kind {
        ResourceKind::Path | ResourceKind::Dir => &["Dir"],
        ResourceKind::Host => &["Domain"],
        ResourceKind::Tool => &["ToolServer"],
        ResourceKind::Command => &[],
    }
}

/// Why an entity literal of a policy (`Host::"Evil.COM"`, `Dir::"./secret"`) names nothing the
/// runtime ever builds, so that a policy testing for it never applies; `None` where it can
/// match (or is of a type the runtime does not build from requests).
pub(crate) fn literal_problem(uid: &cedar::EntityUid) -> Option<String> {
    let ty = uid.type_name().to_string();
    let id = uid.id().unescaped();
    let never = |e: ResourceError| Some(format!("never matches: {}", e.problem));
    let canonical = |kind: &str, c: &str| {
        (c != id).then(|| {
            format!("never matches: the runtime names it {kind}::{c:?}; write that instead")
        })
    };
    match ty.as_str() {
        "Path" => Resource::path(id).err().and_then(never),
        "Dir" => Resource::dir(id).err().and_then(never),
        "Host" => match canonical_host(id) {
            Err(e) => never(e),
            Ok(c) => canonical("Host", &c),
        },
        "Domain" => match canonical_host(id) {
            Err(e) => never(e),
            Ok(c) if Ipv4Addr::from_str(&c).is_ok() || Ipv6Addr::from_str(&c).is_ok() => Some(
                format!("never matches: an address is in no domain; write Host::{c:?}"),
            ),
            Ok(c) => canonical("Domain", &c),
        },
        "Tool" => Resource::parse(ResourceKind::Tool, id)
            .err()
            .and_then(never),
        "ToolServer" => Resource::tool(id, "x").err().and_then(never),
        "Command" => Resource::command(id).err().and_then(never),
        "Agent" => crate::payload::check_agent(id)
            .err()
            .map(|e| format!("never matches: not an agent id ICE accepts ({e})")),
        _ => None,
    }
}

/// The key under which the policy index files a resource anchor: entity type and id.
pub(crate) fn anchor_key(entity_type: &str, id: &str) -> String {
    format!("{entity_type}\0{id}")
}

/// The action of an HTTP call's connection checks: decided for each address its host resolves
/// to, before connecting, by the forbids whose scope names it (see
/// [`PolicySet::refuses_connection`](crate::PolicySet::refuses_connection)). Not a capability
/// an agent can ask for.
pub const HTTP_CONNECT: &str = "http.connect";

/// The target of a request, checked and in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A file: a relative, normalised workspace path (`src/lib.rs`).
    Path(String),
    /// A directory: a relative, normalised workspace path, or `.` for the workspace root.
    Dir(String),
    /// A host: its lower-case name without a trailing dot, or an IP address.
    Host(String),
    /// A tool on a tool server.
    Tool {
        /// The tool server's name.
        server: String,
        /// The tool's name on that server.
        tool: String,
    },
    /// A program to run.
    Command(String),
}

/// Why a resource was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?}: {problem}")]
pub struct ResourceError {
    /// The kind of resource being built.
    pub kind: ResourceKind,
    /// The value given (cut to 80 bytes).
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

fn no_control(kind: ResourceKind, s: &str) -> Result<(), ResourceError> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(ResourceError {
            kind,
            value: truncated(s),
            problem: format!("contains the control character {c:?}"),
        }),
        None => Ok(()),
    }
}

/// A character that is not shown, or reorders or hides what is shown around it: the soft
/// hyphen, the zero-width space, bidirectional marks, embeddings, overrides and isolates, word
/// joiners and invisible operators, line and paragraph separators, the BOM, interlinear
/// annotation marks and tag characters. (The zero-width joiner and non-joiner are left out:
/// names in several scripts, and emoji, need them.)
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// Refuse a target an agent names that holds a character [`invisible`] would hide: an
/// operator reading it in an approval or a diff would see another name. Checked on what agents
/// propose (not on what records hold: a path recorded before this check stays readable).
pub fn check_visible(kind: ResourceKind, target: &str) -> Result<(), ResourceError> {
    match target.chars().find(|&c| invisible(c)) {
        Some(c) => Err(ResourceError {
            kind,
            value: truncated(target),
            problem: format!(
                "contains the invisible formatting character U+{:04X}, which would show an operator another name",
                c as u32
            ),
        }),
        None => Ok(()),
    }
}

/// Check a relative workspace path: `/`-separated, no empty, `.` or `..` segment, not absolute,
/// no backslash, no control character. The authority names targets; it does not resolve them,
/// so a path that would need resolving (`src/../secret`) is refused rather than guessed at.
fn check_relative_path(kind: ResourceKind, path: &str) -> Result<(), ResourceError> {
    let bad = |problem: &str| ResourceError {
        kind,
        value: truncated(path),
        problem: problem.to_string(),
    };
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(bad(&format!("must be 1 to {MAX_PATH_LEN} bytes")));
    }
    no_control(kind, path)?;
    if path.starts_with('/') {
        return Err(bad("is absolute; give a path relative to the workspace"));
    }
    if path.contains('\\') {
        return Err(bad("contains a backslash; separate segments with /"));
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err(bad("has an empty segment (// or a trailing /)")),
            "." | ".." => return Err(bad("has a . or .. segment; give the normalised path")),
            _ => {}
        }
    }
    Ok(())
}

fn check_name(kind: ResourceKind, what: &str, name: &str, max: usize) -> Result<(), ResourceError> {
    if name.is_empty() || name.len() > max {
        return Err(ResourceError {
            kind,
            value: truncated(name),
            problem: format!("{what} must be 1 to {max} bytes"),
        });
    }
    no_control(kind, name)
}

/// The IPv4 address an IPv6 address stands for, if it embeds one: IPv4-mapped
/// (`::ffff:a.b.c.d`, which a dual-stack socket connects to as the IPv4 address) and
/// IPv4-compatible (`::a.b.c.d`, deprecated by RFC 4291), but not `::` (unspecified) or `::1`
/// (loopback), which are IPv6 addresses of their own.
fn embedded_ipv4(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    match ip.segments() {
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => ip.to_ipv4(),
        _ => None,
    }
}

/// The address a connection check decides: an IPv6 address that reaches an IPv4 one is that
/// IPv4 address, so one set of IPv4 ranges covers it. Besides the forms [`embedded_ipv4`]
/// reads, that is the NAT64 well-known prefix `64:ff9b::/96` (RFC 6052), which a NAT64
/// gateway translates to the IPv4 address in its last 32 bits (a private one included). Other
/// NAT64 prefixes (`64:ff9b:1::/48`, a network's own) cannot be told from IPv6 addresses and
/// stay as they are. A host resource is not mapped this way: the URL goes to the host it
/// names, and a NAT64 address is not its IPv4 address on the wire.
pub fn connection_address(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.segments() {
            [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
                IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
            }
            _ => embedded_ipv4(&v6).map_or(address, IpAddr::V4),
        },
        v4 => v4,
    }
}

/// Canonicalise a host: lower case, one trailing dot removed; IP addresses in their standard
/// text form, an IPv6 address that embeds an IPv4 one as that IPv4 address (one name per
/// address, so `forbid resource == Host::"169.254.169.254"` also holds for
/// `[::ffff:169.254.169.254]`); names as letter-digit-hyphen labels (underscores allowed), in
/// ASCII (give IDNA names in their punycode form).
pub(crate) fn canonical_host(host: &str) -> Result<String, ResourceError> {
    let bad = |problem: &str| ResourceError {
        kind: ResourceKind::Host,
        value: truncated(host),
        problem: problem.to_string(),
    };
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return Err(bad(&format!("must be 1 to {MAX_HOST_LEN} bytes")));
    }
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Ok(ip) = Ipv6Addr::from_str(bracketed.unwrap_or(host)) {
        return Ok(match embedded_ipv4(&ip) {
            Some(v4) => v4.to_string(),
            None => ip.to_string(),
        });
    }
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if let Ok(ip) = Ipv4Addr::from_str(name) {
        return Ok(ip.to_string());
    }
    if !name.is_ascii() {
        return Err(bad("is not ASCII; give the IDNA (punycode) form"));
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("has a label that is empty or longer than 63 bytes"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(bad(&format!("contains {c:?}; give the parsed host name")));
        }
        last = label;
    }
    // No top-level domain is numeric: a name like `127.1` or `0x7f.1` is an address in a form
    // some resolvers accept, and must arrive already parsed into a dotted quad.
    if last.chars().all(|c| c.is_ascii_digit()) || last.starts_with("0x") {
        return Err(bad(
            "looks like a numeric address but is not a dotted quad; give the parsed address",
        ));
    }
    Ok(name.to_string())
}

impl Resource {
    /// A file in the workspace, by its relative, normalised path.
    pub fn path(path: &str) -> Result<Resource, ResourceError> {
        check_relative_path(ResourceKind::Path, path)?;
        Ok(Resource::Path(path.to_string()))
    }

    /// A directory in the workspace, by its relative, normalised path; `.` is the root.
    pub fn dir(path: &str) -> Result<Resource, ResourceError> {
        if path != "." {
            check_relative_path(ResourceKind::Dir, path)?;
        }
        Ok(Resource::Dir(path.to_string()))
    }

    /// A network host, by the host part of a parsed URL. The name is lower-cased and one
    /// trailing dot removed (both name the same host); IP addresses take their standard form.
    pub fn host(host: &str) -> Result<Resource, ResourceError> {
        Ok(Resource::Host(canonical_host(host)?))
    }

    /// A tool on a tool server. The server's name cannot contain `/`.
    pub fn tool(server: &str, tool: &str) -> Result<Resource, ResourceError> {
        check_name(ResourceKind::Tool, "server name", server, MAX_TOOL_NAME_LEN)?;
        check_name(ResourceKind::Tool, "tool name", tool, MAX_TOOL_NAME_LEN)?;
        if server.contains('/') {
            return Err(ResourceError {
                kind: ResourceKind::Tool,
                value: truncated(server),
                problem: "server name contains /".to_string(),
            });
        }
        Ok(Resource::Tool {
            server: server.to_string(),
            tool: tool.to_string(),
        })
    }

    /// A program to run, by the name or path the command line gives.
    pub fn command(program: &str) -> Result<Resource, ResourceError> {
        check_name(ResourceKind::Command, "program", program, MAX_COMMAND_LEN)?;
        Ok(Resource::Command(program.to_string()))
    }

    /// A resource of `kind` from its Cedar entity id, as `ice policy explain` takes it: a path, a
    /// host, `server/tool`, or a program.
    pub fn parse(kind: ResourceKind, id: &str) -> Result<Resource, ResourceError> {
        match kind {
            ResourceKind::Path => Resource::path(id),
            ResourceKind::Dir => Resource::dir(id),
            ResourceKind::Host => Resource::host(id),
            ResourceKind::Command => Resource::command(id),
            ResourceKind::Tool => match id.split_once('/') {
                Some((server, tool)) => Resource::tool(server, tool),
                None => Err(ResourceError {
                    kind,
                    value: truncated(id),
                    problem: "give the tool as server/tool".to_string(),
                }),
            },
        }
    }

    /// The kind of this resource.
    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::Path(_) => ResourceKind::Path,
            Resource::Dir(_) => ResourceKind::Dir,
            Resource::Host(_) => ResourceKind::Host,
            Resource::Tool { .. } => ResourceKind::Tool,
            Resource::Command(_) => ResourceKind::Command,
        }
    }

    /// The Cedar entity id (`src/lib.rs`, `api.example.com`, `server/tool`, `cargo`).
    pub fn entity_id(&self) -> String {
        match self {
            Resource::Path(s) | Resource::Dir(s) | Resource::Host(s) | Resource::Command(s) => {
                s.clone()
            }
            Resource::Tool { server, tool } => format!("{server}/{tool}"),
        }
    }

    /// The resource as a Cedar entity, with its ancestors (directories, domains, tool server) as
    /// parents (a set that is already transitively closed), and the index's anchor keys of the
    /// resource itself and of each ancestor.
    fn entity(&self) -> Result<(cedar::Entity, Vec<String>), RequestError> {
        let names = &*NAMES;
        let string = |s: &str| cedar::RestrictedExpression::new_string(s.to_string());
        let mut parents = HashSet::new();
        let (ty, attrs): (
            &cedar::EntityTypeName,
            Vec<(&str, cedar::RestrictedExpression)>,
        ) = match self {
            Resource::Path(p) | Resource::Dir(p) => {
                if p != "." {
                    parents.insert(uid(&names.dir, "."));
                    let mut end = 0;
                    while let Some(i) = p[end..].find('/') {
                        parents.insert(uid(&names.dir, &p[..end + i]));
                        end += i + 1;
                    }
                }
                let ty = match self {
                    Resource::Dir(_) => &names.dir,
                    _ => &names.path,
                };
                (ty, vec![("path", string(p))])
            }
            Resource::Host(h) => {
                let is_ip = Ipv4Addr::from_str(h).is_ok() || Ipv6Addr::from_str(h).is_ok();
                if !is_ip {
                    let mut rest = h.as_str();
                    loop {
                        parents.insert(uid(&names.domain, rest));
                        match rest.split_once('.') {
                            Some((_, parent)) => rest = parent,
                            None => break,
                        }
                    }
                }
                (&names.host, vec![("name", string(h))])
            }
            Resource::Tool { server, tool } => {
                parents.insert(uid(&names.tool_server, server));
                (
                    &names.tool,
                    vec![("server", string(server)), ("name", string(tool))],
                )
            }
            Resource::Command(c) => (&names.command, vec![("program", string(c))]),
        };
        let attrs: HashMap<String, cedar::RestrictedExpression> =
            attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let id = self.entity_id();
        let mut anchors = Vec::with_capacity(parents.len() + 1);
        anchors.push(anchor_key(self.kind().entity_type(), &id));
        for parent in &parents {
            anchors.push(anchor_key(
                &parent.type_name().to_string(),
                parent.id().unescaped(),
            ));
        }
        let entity = cedar::Entity::new(uid(ty, &id), attrs, parents)
            .map_err(|e| RequestError::Cedar(e.to_string()))?;
        Ok((entity, anchors))
    }
}

/// The payload form of a resource: `{"kind": "path", "id": "src/lib.rs"}`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceRecord<'a> {
    kind: std::borrow::Cow<'a, str>,
    id: std::borrow::Cow<'a, str>,
}

/// A resource in an event payload is `{"kind": "<ResourceKind::name>", "id":
/// "<Resource::entity_id>"}`, e.g. `{"kind": "tool", "id": "github/create_issue"}`.
/// Reading one checks it like [`Resource::parse`] and also requires the canonical form (a host in
/// lower case, an IP address in its standard form), so a resource has one payload form.
impl serde::Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ResourceRecord {
            kind: self.kind().name().into(),
            id: self.entity_id().into(),
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let record = ResourceRecord::deserialize(d)?;
        let kind = ResourceKind::from_name(&record.kind).ok_or_else(|| {
            D::Error::custom(format!(
                "resource kind {:?} is not one of path, dir, host, tool, command",
                truncated(&record.kind)
            ))
        })?;
        let resource = Resource::parse(kind, &record.id).map_err(D::Error::custom)?;
        // Before IPv4-embedding IPv6 addresses were named by their IPv4 address, their IPv6 form
        // was canonical: a record of one still reads, as it was written.
        if let Resource::Host(_) = resource
            && Ipv6Addr::from_str(&record.id).is_ok_and(|ip| ip.to_string() == record.id)
        {
            return Ok(Resource::Host(record.id.into_owned()));
        }
        if resource.entity_id() != record.id {
            return Err(D::Error::custom(format!(
                "{kind} {:?} is not in canonical form; write {:?}",
                truncated(&record.id),
                resource.entity_id()
            )));
        }
        Ok(resource)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}::{:?}", self.kind(), self.entity_id())
    }
}

/// A resource as Cedar sees it: its entity (with its ancestors as parents) in an entity set of
/// its own, and the policy index's anchor keys. It depends on the resource alone.
#[derive(Debug)]
struct ResourceEntity {
    entities: cedar::Entities,
    anchors: Vec<String>,
}

impl ResourceEntity {
    fn build(resource: &Resource) -> Result<ResourceEntity, RequestError> {
        let (entity, anchors) = resource.entity()?;
        let entities = cedar::Entities::from_entities([entity], None)
            .map_err(|e| RequestError::Cedar(e.to_string()))?;
        Ok(ResourceEntity { entities, anchors })
    }
}

/// Resource entities built for earlier requests, so a request on a resource named recently
/// skips building its entity set again (Cedar computes the set's transitive closure, the
/// largest part of building a request). An entity depends on its resource alone, so one cache
/// may serve every run. Its memory is bounded by entries and by bytes: an entity over
/// [`EntityCache::MAX_ENTRY_BYTES`] (a deep path names many ancestors, each with its whole
/// path) is built for its request and not kept, and at either limit the cache starts again
/// empty.
#[derive(Debug)]
pub struct EntityCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<Resource, Arc<ResourceEntity>>,
    bytes: usize,
}

impl ResourceEntity {
    /// What keeping it costs, roughly: its ids (each ancestor's id is in the entity's parents
    /// and in the anchors) and a fixed overhead per entity.
    fn weight(&self) -> usize {
        256 + 2 * self.anchors.iter().map(|a| a.len() + 64).sum::<usize>()
    }
}

impl EntityCache {
    /// The largest entity kept, in [`ResourceEntity::weight`] bytes.
    pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

    /// A cache of at most `capacity` resources (at least 1) and about `max_bytes` bytes.
    pub fn new(capacity: usize, max_bytes: usize) -> EntityCache {
        EntityCache {
            inner: Mutex::new(CacheInner::default()),
            capacity: capacity.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // A panic elsewhere while the lock was held leaves the map and its byte count as they
        // were or updated together: still sound, so a poisoned lock is taken as it is.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many resources it holds.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// About how many bytes its entities take.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn get_or_build(&self, resource: &Resource) -> Result<Arc<ResourceEntity>, RequestError> {
        if let Some(hit) = self.lock().map.get(resource) {
            return Ok(hit.clone());
        }
        // Built outside the lock: two requests building the same entity at once both succeed.
        let built = Arc::new(ResourceEntity::build(resource)?);
        let weight = built.weight();
        if weight > Self::MAX_ENTRY_BYTES || weight > self.max_bytes {
            return Ok(built);
        }
        let dropped = {
            let mut inner = self.lock();
            let full = inner.map.len() >= self.capacity || inner.bytes + weight > self.max_bytes;
            let dropped = if full {
                inner.bytes = 0;
                std::mem::take(&mut inner.map)
            } else {
                HashMap::new()
            };
            if let Some(old) = inner.map.insert(resource.clone(), built.clone()) {
                inner.bytes = inner.bytes.saturating_sub(old.weight());
            }
            inner.bytes += weight;
            dropped
        };
        // Freed after the lock is let go.
        drop(dropped);
        Ok(built)
    }
}

impl Default for EntityCache {
    /// A cache of 4096 resources and about 16 MiB.
    fn default() -> EntityCache {
        EntityCache::new(4096, 16 << 20)
    }
}

/// What is left of a run's budget, per cost attribute (names and units as the event's `cost`);
/// `None` where the run has no budget on that attribute. Values above `i64::MAX` reach Cedar as
/// `i64::MAX`, which no comparison a policy can write tells apart from unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetLeft {
    /// Wall-clock time left, in microseconds.
    pub wall_time_us: Option<u64>,
    /// Model input tokens left.
    pub tokens_in: Option<u64>,
    /// Model output tokens left.
    pub tokens_out: Option<u64>,
    /// Tool calls left.
    pub tool_calls: Option<u64>,
    /// Bytes left to read or write.
    pub bytes: Option<u64>,
    /// Credits left, in millionths.
    pub credits_micro: Option<u64>,
    /// Risk points left.
    pub risk: Option<u64>,
}

impl BudgetLeft {
    fn fields(&self) -> [(&'static str, Option<u64>); 7] {
        [
            ("wall_time_us", self.wall_time_us),
            ("tokens_in", self.tokens_in),
            ("tokens_out", self.tokens_out),
            ("tool_calls", self.tool_calls),
            ("bytes", self.bytes),
            ("credits_micro", self.credits_micro),
            ("risk", self.risk),
        ]
    }

    fn to_cedar(self) -> Result<cedar::RestrictedExpression, RequestError> {
        let fields = self.fields().into_iter().filter_map(|(name, left)| {
            let left = i64::try_from(left?).unwrap_or(i64::MAX);
            Some((
                name.to_string(),
                cedar::RestrictedExpression::new_long(left),
            ))
        });
        cedar::RestrictedExpression::new_record(fields)
            .map_err(|e| RequestError::Cedar(e.to_string()))
    }
}

/// Why a call's arguments cannot be given to Cedar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentProblem {
    /// The arguments are not a JSON object.
    #[error("the arguments must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// Cedar has no null.
    #[error("null has no Cedar value; leave the field out instead")]
    Null,
    /// Cedar has no floating-point numbers.
    #[error("{0} is not an integer; Cedar has integers only")]
    NotAnInteger(String),
    /// Cedar integers are 64-bit signed.
    #[error("{0} is outside Cedar's integer range (-2^63 to 2^63-1)")]
    IntegerOutOfRange(String),
    /// Nested deeper than the limit.
    #[error("nested deeper than {MAX_ARGUMENT_DEPTH} levels")]
    TooDeep,
    /// More values than the limit.
    #[error("more than {MAX_ARGUMENT_VALUES} values")]
    TooManyValues,
    /// A string longer than the limit.
    #[error("a string of {0} bytes, over the limit of {MAX_ARGUMENT_STRING_BYTES}")]
    StringTooLong(usize),
    /// Strings and keys together longer than the limit.
    #[error("strings and keys over {MAX_ARGUMENT_TOTAL_BYTES} bytes in all")]
    TooLarge,
    /// Cedar refused the value for a reason of its own.
    #[error("Cedar refused the value: {0}")]
    Refused(String),
}

/// Arguments that cannot be given to Cedar, with where in them the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("arguments{}: {problem}", if pointer.is_empty() { String::new() } else { format!(" at {pointer}") })]
pub struct ArgumentError {
    /// The JSON pointer (RFC 6901) of the offending value; empty for the whole object.
    pub pointer: String,
    /// What is wrong.
    pub problem: ArgumentProblem,
}

struct Budget {
    values: usize,
    bytes: usize,
}

fn pointer_push(pointer: &str, segment: &str) -> String {
    format!(
        "{pointer}/{}",
        segment.replace('~', "~0").replace('/', "~1")
    )
}

/// Convert a JSON value to a Cedar value. Objects become records and arrays become sets (so
/// policies see neither the order of an array nor its duplicates). Null, fractions and integers
/// beyond 64 bits have no Cedar value and are refused, as is anything over the limits. Keys like
/// `__entity` and `__extn` are ordinary record keys here, never Cedar's JSON escapes: an agent's
/// arguments cannot smuggle in an entity reference.
fn json_to_cedar(
    value: &Value,
    pointer: &str,
    depth: usize,
    budget: &mut Budget,
) -> Result<cedar::RestrictedExpression, ArgumentError> {
    let fail = |pointer: &str, problem| ArgumentError {
        pointer: pointer.to_string(),
        problem,
    };
    if depth > MAX_ARGUMENT_DEPTH {
        return Err(fail(pointer, ArgumentProblem::TooDeep));
    }
    budget.values += 1;
    if budget.values > MAX_ARGUMENT_VALUES {
        return Err(fail(pointer, ArgumentProblem::TooManyValues));
    }
    let mut charge = |pointer: &str, len: usize| {
        if len > MAX_ARGUMENT_STRING_BYTES {
            return Err(fail(pointer, ArgumentProblem::StringTooLong(len)));
        }
        budget.bytes += len;
        if budget.bytes > MAX_ARGUMENT_TOTAL_BYTES {
            return Err(fail(pointer, ArgumentProblem::TooLarge));
        }
        Ok(())
    };
    Ok(match value {
        Value::Null => return Err(fail(pointer, ArgumentProblem::Null)),
        Value::Bool(b) => cedar::RestrictedExpression::new_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cedar::RestrictedExpression::new_long(i),
            None if n.is_u64() => {
                return Err(fail(
                    pointer,
                    ArgumentProblem::IntegerOutOfRange(n.to_string()),
                ));
            }
            None => return Err(fail(pointer, ArgumentProblem::NotAnInteger(n.to_string()))),
        },
        Value::String(s) => {
            charge(pointer, s.len())?;
            cedar::RestrictedExpression::new_string(s.clone())
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let inner = pointer_push(pointer, &i.to_string());
                out.push(json_to_cedar(item, &inner, depth + 1, budget)?);
            }
            cedar::RestrictedExpression::new_set(out)
        }
        Value::Object(map) => {
            let mut fields = Vec::with_capacity(map.len());
            for (key, item) in map {
                let inner = pointer_push(pointer, key);
                budget.bytes += key.len();
                if budget.bytes > MAX_ARGUMENT_TOTAL_BYTES {
                    return Err(fail(&inner, ArgumentProblem::TooLarge));
                }
                fields.push((key.clone(), json_to_cedar(item, &inner, depth + 1, budget)?));
            }
            // JSON object keys are unique once parsed, so this cannot fail; keep the error anyway.
            cedar::RestrictedExpression::new_record(fields)
                .map_err(|e| fail(pointer, ArgumentProblem::Refused(e.to_string())))?
        }
    })
}

/// Convert a call's arguments (a JSON object) into the Cedar record policies see as
/// `context.arguments`, or say exactly why it cannot be done.
pub fn arguments_to_cedar(arguments: &Value) -> Result<cedar::RestrictedExpression, ArgumentError> {
    let kind = match arguments {
        Value::Object(_) => None,
        Value::Null => Some("null"),
        Value::Bool(_) => Some("a boolean"),
        Value::Number(_) => Some("a number"),
        Value::String(_) => Some("a string"),
        Value::Array(_) => Some("an array"),
    };
    if let Some(kind) = kind {
        return Err(ArgumentError {
            pointer: String::new(),
            problem: ArgumentProblem::NotAnObject(kind),
        });
    }
    let mut budget = Budget {
        values: 0,
        bytes: 0,
    };
    json_to_cedar(arguments, "", 0, &mut budget)
}

/// Why a request could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The agent id breaks the kernel's rule for principal ids.
    #[error("agent: {0}")]
    Agent(String),
    /// The capability name breaks the naming rule.
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    /// The resource is of a kind the capability does not act on.
    #[error("{capability} acts on a {expected}, not on {got}")]
    WrongResource {
        /// The capability requested.
        capability: String,
        /// The kind it acts on.
        expected: ResourceKind,
        /// The resource given.
        got: String,
    },
    /// The intent is longer than the limit.
    #[error("intent of {0} bytes is over the limit of {MAX_INTENT_LEN}")]
    IntentTooLong(usize),
    /// The arguments cannot be given to Cedar.
    #[error(transparent)]
    Arguments(#[from] ArgumentError),
    /// Cedar refused a value built from checked parts; a bug in this crate if it happens.
    #[error("building the Cedar request: {0}")]
    Cedar(String),
}

/// Builds a [`Request`]. Arguments default to `{}`, intent to empty, budget to none.
#[derive(Debug, Clone)]
pub struct RequestBuilder<'a> {
    run: &'a RunId,
    agent: &'a str,
    capability: &'a str,
    resource: Resource,
    intent: &'a str,
    arguments: Option<&'a Value>,
    budget_left: BudgetLeft,
    effect_hint: Option<EffectClass>,
    assigned: Option<EffectClass>,
    cache: Option<&'a EntityCache>,
    address: Option<IpAddr>,
}

impl<'a> RequestBuilder<'a> {
    /// Take the resource's entity from `cache` (or build it and keep it there).
    pub fn entity_cache(mut self, cache: &'a EntityCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The agent's declared intent for this call.
    pub fn intent(mut self, intent: &'a str) -> Self {
        self.intent = intent;
        self
    }

    /// The call's arguments, a JSON object.
    pub fn arguments(mut self, arguments: &'a Value) -> Self {
        self.arguments = Some(arguments);
        self
    }

    /// What is left of the run's budget.
    pub fn budget_left(mut self, budget_left: BudgetLeft) -> Self {
        self.budget_left = budget_left;
        self
    }

    /// A tool server's own effect-class hint; it can raise the class, never lower it.
    pub fn effect_hint(mut self, hint: EffectClass) -> Self {
        self.effect_hint = Some(hint);
        self
    }

    /// The class ICE's own configuration assigns the target (an MCP tool's configured class).
    pub fn assigned_class(mut self, class: EffectClass) -> Self {
        self.assigned = Some(class);
        self
    }

    /// Make this `http.request` call's connection check instead: the request for
    /// [`HTTP_CONNECT`] on the same host, with the same context and `context.address` the
    /// address about to be contacted, as [`connection_address`] gives it. Decide it with [`PolicySet::refuses_connection`](crate::PolicySet::refuses_connection).
    pub fn connecting_to(mut self, address: IpAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// Check every part, classify the effect with the registry, and convert to Cedar's form.
    pub fn build(self, registry: &Registry) -> Result<Request, RequestError> {
        let names = &*NAMES;
        Origin::from_str(&format!("agent:{}", self.agent)).map_err(RequestError::Agent)?;
        check_capability_name(self.capability)?;
        if self.address.is_some()
            && (self.capability != "http.request" || self.resource.kind() != ResourceKind::Host)
        {
            return Err(RequestError::Cedar(format!(
                "a connection check is made of an http.request call on a host, not of {} on {}",
                self.capability, self.resource
            )));
        }
        if let Some(capability) = registry.get(self.capability)
            && capability.resource() != self.resource.kind()
        {
            return Err(RequestError::WrongResource {
                capability: self.capability.to_string(),
                expected: capability.resource(),
                got: self.resource.to_string(),
            });
        }
        if self.intent.len() > MAX_INTENT_LEN {
            return Err(RequestError::IntentTooLong(self.intent.len()));
        }
        let empty = Value::Object(serde_json::Map::new());
        let arguments = self.arguments.unwrap_or(&empty);
        let effect =
            registry.classify_assigned(self.capability, arguments, self.assigned, self.effect_hint);
        let mut pairs = vec![
            (
                "run".to_string(),
                cedar::RestrictedExpression::new_string(self.run.as_str().to_string()),
            ),
            (
                "intent".to_string(),
                cedar::RestrictedExpression::new_string(self.intent.to_string()),
            ),
            (
                "effect".to_string(),
                cedar::RestrictedExpression::new_entity_uid(uid(
                    &names.effect_class,
                    effect.as_str(),
                )),
            ),
            ("budget".to_string(), self.budget_left.to_cedar()?),
            ("arguments".to_string(), arguments_to_cedar(arguments)?),
        ];
        let capability = match self.address {
            Some(address) => {
                let address = connection_address(address);
                pairs.push((
                    "address".to_string(),
                    cedar::RestrictedExpression::new_ip(address.to_string()),
                ));
                HTTP_CONNECT
            }
            None => self.capability,
        };
        let context =
            cedar::Context::from_pairs(pairs).map_err(|e| RequestError::Cedar(e.to_string()))?;
        let cedar_request = cedar::Request::new(
            uid(&names.agent, self.agent),
            uid(&names.action, capability),
            uid(self.resource.kind_type_name(), &self.resource.entity_id()),
            context,
            None,
        )
        .map_err(|e| RequestError::Cedar(e.to_string()))?;
        let resource_entity = match self.cache {
            Some(cache) => cache.get_or_build(&self.resource)?,
            None => Arc::new(ResourceEntity::build(&self.resource)?),
        };
        Ok(Request {
            run: self.run.clone(),
            agent: self.agent.to_string(),
            capability: capability.to_string(),
            resource: self.resource,
            effect,
            cedar_request,
            resource_entity,
        })
    }
}

impl Resource {
    fn kind_type_name(&self) -> &'static cedar::EntityTypeName {
        let names = &*NAMES;
        match self.kind() {
            ResourceKind::Path => &names.path,
            ResourceKind::Dir => &names.dir,
            ResourceKind::Host => &names.host,
            ResourceKind::Tool => &names.tool,
            ResourceKind::Command => &names.command,
        }
    }
}

/// A checked request, with its effect class decided and its Cedar form built.
#[derive(Debug, Clone)]
pub struct Request {
    run: RunId,
    agent: String,
    capability: String,
    resource: Resource,
    effect: EffectClass,
    cedar_request: cedar::Request,
    resource_entity: Arc<ResourceEntity>,
}

impl Request {
    /// Start building a request from `agent` in `run` to use `capability` on `resource`.
    pub fn builder<'a>(
        run: &'a RunId,
        agent: &'a str,
        capability: &'a str,
        resource: Resource,
    ) -> RequestBuilder<'a> {
        RequestBuilder {
            run,
            agent,
            capability,
            resource,
            intent: "",
            arguments: None,
            budget_left: BudgetLeft::default(),
            effect_hint: None,
            assigned: None,
            cache: None,
            address: None,
        }
    }

    /// The run the request is made in.
    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// The agent making the request.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The capability requested (the Cedar action).
    pub fn capability(&self) -> &str {
        &self.capability
    }

    /// The target.
    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// The effect class the runtime assigned (after any hint).
    pub fn effect(&self) -> EffectClass {
        self.effect
    }

    /// The index keys of the resource and its ancestors.
    pub(crate) fn anchors(&self) -> &[String] {
        &self.resource_entity.anchors
    }

    /// The Cedar request and entities this was converted to, for tools and benchmarks that call
    /// Cedar directly.
    pub fn cedar(&self) -> (&cedar::Request, &cedar::Entities) {
        (&self.cedar_request, &self.resource_entity.entities)
    }
}
