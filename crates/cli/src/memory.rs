//! `ice memory`: governed memory (spec §8). Memories are promoted from DOMAIN events of
//! committed runs (by a run spec's `[[memory.promote]]` rules at commit, or here by an operator)
//! and leave `active` once: invalidated (with every memory derived from them), deprecated,
//! superseded or expired. Listing and showing only read the log; promotions and transitions
//! are recorded in short maintenance runs, and a checkpoint is signed after them.

use std::io::Write;
use std::path::Path;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use ice_kernel::{Clock, EventId};
use ice_log::clock::SystemClock;
use ice_log::sqlite::Mode;
use ice_runtime::memory::{
    MemoryAction, MemoryBook, MemoryError, MemoryField, MemoryRecord, MemoryStatus, PromoteRequest,
    TransitionReport, parse_ttl, resolve_content,
};
use serde_json::{Value, json};

use crate::home::Home;
use crate::inspect::{shown, truncate};

#[derive(Args)]
pub struct MemoryArgs {
    #[command(subcommand)]
    command: MemoryCommand,
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// List the active memories (--all: every memory, whatever its status).
    List(ListArgs),
    /// Show one memory: content, provenance, lineage, status and the runs that mounted it.
    Show(ShowArgs),
    /// Promote a DOMAIN event of a committed run to memory (as operator:NAME).
    Promote(PromoteArgs),
    /// Invalidate a memory (also one that expired, or was deprecated or superseded) and every
    /// memory derived from it not invalidated yet; prints the runs that mounted them.
    Invalidate(TransitionArgs),
    /// Mark a memory superseded by another, active one (--by).
    Supersede(SupersedeArgs),
    /// Deprecate a memory: it stays in the record but no longer mounts.
    Deprecate(TransitionArgs),
}

#[derive(Args)]
struct ListArgs {
    /// Every memory, not only the active ones.
    #[arg(long)]
    all: bool,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ShowArgs {
    /// The memory's id (the id of its MemoryPromoted event, RUN_ID:RUN_SEQ).
    id: String,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PromoteArgs {
    /// The DOMAIN event to promote (RUN_ID:RUN_SEQ); its run must have committed.
    event: String,
    /// The memory's type (fact, file, …).
    #[arg(long)]
    kind: String,
    /// The scope later runs mount it by.
    #[arg(long)]
    scope: String,
    /// Confidence, 0 to 1.
    #[arg(long, default_value_t = 1.0)]
    confidence: f64,
    /// Expire this long after promotion (ms, s, m, h, d: 90s, 12h, 30d).
    #[arg(long)]
    ttl: Option<String>,
    /// Why (recorded).
    #[arg(long)]
    reason: String,
    /// Who (recorded as operator:NAME); default $USER.
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TransitionArgs {
    /// The memory's id (RUN_ID:RUN_SEQ).
    id: String,
    /// Why (recorded).
    #[arg(long)]
    reason: String,
    /// Who (recorded as operator:NAME); default $USER.
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SupersedeArgs {
    #[command(flatten)]
    t: TransitionArgs,
    /// The active memory that replaces it (RUN_ID:RUN_SEQ).
    #[arg(long, value_name = "NEW_ID")]
    by: String,
}

pub async fn run(home: &Path, url: Option<&str>, a: MemoryArgs) -> Result<u8> {
    match a.command {
        MemoryCommand::List(a) => list(home, url, a).await,
        MemoryCommand::Show(a) => show(home, url, a).await,
        MemoryCommand::Promote(a) => promote(home, url, a).await,
        MemoryCommand::Invalidate(a) => transition(home, url, a, MemoryAction::Invalidate).await,
        MemoryCommand::Deprecate(a) => transition(home, url, a, MemoryAction::Deprecate).await,
        MemoryCommand::Supersede(a) => {
            let by = memory_id(&a.by, "--by")?;
            transition(home, url, a.t, MemoryAction::Supersede { by }).await
        }
    }
}

/// The flag that sets a field of a memory request.
fn flag(field: MemoryField) -> &'static str {
    match field {
        MemoryField::Kind => "--kind",
        MemoryField::Scope => "--scope",
        MemoryField::Confidence => "--confidence",
        MemoryField::TtlMs => "--ttl",
        MemoryField::Reason => "--reason",
        MemoryField::By => "--by",
    }
}

/// The runtime's refusal as the command line reads it: a refused field is named by its flag
/// (the runtime names it as its request does, `ttl_ms`, as the API's callers send it).
fn refusal(e: MemoryError) -> anyhow::Error {
    match e {
        MemoryError::Field { .. } => anyhow!(e.message_naming(|f| flag(f).to_string())),
        other => other.into(),
    }
}

fn memory_id(s: &str, what: &str) -> Result<EventId> {
    s.parse()
        .map_err(|e| anyhow!("{what} {s:?} is not a memory id (RUN_ID:RUN_SEQ): {e}"))
}

/// A memory's status as a person reads it: an active memory past its expiry says so (its
/// `MemoryExpired` is recorded when a run's mount or a memory command finds it).
fn status_text(r: &MemoryRecord, now: ice_kernel::Timestamp) -> String {
    if r.due_to_expire(now) {
        "expired (not yet recorded)".into()
    } else {
        r.status.to_string()
    }
}

fn summary_json(r: &MemoryRecord, now: ice_kernel::Timestamp) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("content");
        m.insert("live".into(), json!(r.is_live(now)));
        m.insert("due_to_expire".into(), json!(r.due_to_expire(now)));
    }
    v
}

async fn list(home: &Path, url: Option<&str>, a: ListArgs) -> Result<u8> {
    let h = Home::open(home)?;
    let log = h.log(url, Mode::ReadOnly).await?;
    let book = MemoryBook::load(log.as_ref()).await?;
    let now = SystemClock.now();
    let shown: Vec<&MemoryRecord> = book.iter().filter(|r| a.all || r.is_live(now)).collect();
    let mut out = std::io::stdout().lock();
    if a.json {
        let doc: Vec<Value> = shown.iter().map(|r| summary_json(r, now)).collect();
        let _ = writeln!(out, "{}", serde_json::to_string(&doc)?);
        return Ok(0);
    }
    if shown.is_empty() {
        let _ = writeln!(
            out,
            "no {}memories{}",
            if a.all { "" } else { "active " },
            if a.all || book.is_empty() {
                String::new()
            } else {
                format!(" ({} in all: ice memory list --all)", book.len())
            }
        );
        return Ok(0);
    }
    let _ = writeln!(
        out,
        "{:<24} {:<10} {:<16} {:<28} {:>5}  {:<12}  source",
        "memory", "kind", "scope", "status", "conf", "digest"
    );
    for r in shown {
        let line = format!(
            "{:<24} {:<10} {:<16} {:<28} {:>5}  {:<12}  {}{}",
            r.id.to_string(),
            truncate(&r.kind, 10),
            truncate(&r.scope, 16),
            truncate(&status_text(r, now), 28),
            format!("{:.2}", r.confidence),
            &r.digest.to_hex()[..12],
            r.sources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            r.expires_at
                .map(|t| format!("  (expires {t})"))
                .unwrap_or_default(),
        );
        if writeln!(out, "{line}").is_err() {
            return Ok(0);
        }
    }
    Ok(0)
}

async fn show(home: &Path, url: Option<&str>, a: ShowArgs) -> Result<u8> {
    let id = memory_id(&a.id, "memory")?;
    let h = Home::open(home)?;
    let log = h.log(url, Mode::ReadOnly).await?;
    let book = MemoryBook::load(log.as_ref()).await?;
    let r = book
        .get(&id)
        .ok_or_else(|| MemoryError::Unknown(id.clone()))?;
    let content = resolve_content(log.as_ref(), r).await?;
    let now = SystemClock.now();
    let derived: Vec<String> = book.derived(&id).iter().map(ToString::to_string).collect();
    if a.json {
        let mut v = summary_json(r, now);
        v["content"] = content;
        v["derived"] = json!(derived);
        println!("{}", serde_json::to_string(&v)?);
        return Ok(0);
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let ids = |v: &[EventId]| list(&v.iter().map(ToString::to_string).collect::<Vec<_>>());
    println!("memory {}", r.id);
    println!("  kind:         {}", shown(&r.kind));
    println!("  scope:        {}", shown(&r.scope));
    println!("  status:       {}", shown(&status_text(r, now)));
    let by = |t: &ice_runtime::memory::Transition| {
        println!(
            "                by {} at {}{}: {}",
            t.event,
            t.at,
            t.operator
                .as_deref()
                .map(|o| format!(" ({})", shown(o)))
                .unwrap_or_default(),
            shown(&t.reason)
        );
    };
    if let Some(t) = &r.transition {
        by(t);
    }
    if let Some(e) = &r.earlier {
        println!("                after it was {}", e.status);
        by(&e.transition);
    }
    println!("  confidence:   {}", r.confidence);
    println!(
        "  promoted:     {} by {}: {}",
        r.promoted_at,
        shown(&r.promoted_by),
        shown(&r.reason)
    );
    println!(
        "  expires:      {}",
        r.expires_at.map_or("never".to_string(), |t| t.to_string())
    );
    println!(
        "  sources:      {} ({} of run {})",
        ids(&r.sources),
        r.source_type,
        r.source_run
    );
    println!("  derived from: {}", ids(&r.derived_from));
    println!("  derived:      {}", list(&derived));
    println!(
        "  mounted by:   {}",
        list(
            &r.mounted_by
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        )
    );
    println!("  schema:       v{}", r.schema_version);
    println!("  digest:       sha256:{}", r.digest);
    println!("  content:");
    // JSON escapes C0 controls inside strings, but not C1 or the bidirectional characters.
    for line in serde_json::to_string_pretty(&content)?.lines() {
        println!("    {}", shown(line));
    }
    Ok(0)
}

async fn promote(home: &Path, url: Option<&str>, a: PromoteArgs) -> Result<u8> {
    let source = a
        .event
        .parse::<EventId>()
        .map_err(|e| anyhow!("event {:?}: {e}", a.event))?;
    let ttl_ms = a
        .ttl
        .as_deref()
        .map(parse_ttl)
        .transpose()
        .map_err(|e| anyhow!("--ttl: {e}"))?;
    let (h, rt) = crate::run::runtime(home, url).await?;
    let report = rt
        .promote_memory(&PromoteRequest {
            source,
            kind: a.kind,
            scope: a.scope,
            confidence: a.confidence,
            ttl_ms,
            reason: a.reason,
            operator: crate::run::operator(&a.operator)?,
        })
        .await
        .map_err(refusal)?;
    let size = crate::run::seal(&h, &rt).await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(0);
    }
    println!(
        "promoted memory {} (sha256:{})",
        report.memory,
        &report.digest.to_hex()[..12]
    );
    if !report.derived_from.is_empty() {
        println!(
            "  derived from: {}",
            report
                .derived_from
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(t) = report.expires_at {
        println!("  expires:      {t}");
    }
    for (m, e) in &report.expired {
        println!("  expired:      {m} (recorded as {e})");
    }
    println!("  recorded in:  maintenance run {}", report.run);
    println!("  sealed:       checkpoint signed at log size {size}");
    Ok(0)
}

async fn transition(
    home: &Path,
    url: Option<&str>,
    a: TransitionArgs,
    action: MemoryAction,
) -> Result<u8> {
    let id = memory_id(&a.id, "memory")?;
    let (h, rt) = crate::run::runtime(home, url).await?;
    let report = rt
        .transition_memory(&id, action, &a.reason, &crate::run::operator(&a.operator)?)
        .await
        .map_err(refusal)?;
    let size = crate::run::seal(&h, &rt).await?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["mounting_runs"] = json!(report.mounting_runs());
        println!("{}", serde_json::to_string(&v)?);
        return Ok(0);
    }
    print_transition(&report);
    println!("  sealed:       checkpoint signed at log size {size}");
    Ok(0)
}

fn print_transition(r: &TransitionReport) {
    let runs = |v: &[ice_kernel::RunId]| {
        if v.is_empty() {
            "no run".to_string()
        } else {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!(
        "memory {} {} ({})",
        r.memory.memory, r.status, r.memory.event
    );
    println!("  mounted by:   {}", runs(&r.memory.mounted_by));
    for c in &r.cascaded {
        println!(
            "  invalidated:  {} ({}), derived from {}; mounted by {}",
            c.memory,
            c.event,
            c.via.as_ref().map(ToString::to_string).unwrap_or_default(),
            runs(&c.mounted_by)
        );
    }
    if r.status == MemoryStatus::Invalidated.name() {
        let all = r.mounting_runs();
        println!(
            "  runs that mounted the invalidated memories: {}",
            runs(&all)
        );
    }
    for (m, e) in &r.expired {
        println!("  expired:      {m} (recorded as {e})");
    }
    println!("  recorded in:  maintenance run {}", r.run);
}
