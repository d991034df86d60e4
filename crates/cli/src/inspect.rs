//! Reading the log: `ice log`, `ice show`, `ice runs`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use ice_kernel::{EventId, EventType, RunId};
use ice_log::StoredEvent;
use ice_log::ledger::fold_run;
use ice_log::sqlite::Mode;
use serde_json::{Value, json};

use crate::home::Home;

const PAGE: usize = 4096;

#[derive(Args)]
pub struct LogArgs {
    /// Only events of this run.
    #[arg(long)]
    run: Option<String>,
    /// Only events of this type (repeatable).
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Start at this global position.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Print at most this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// Keep waiting for new events (stop with Ctrl-C).
    #[arg(long, short = 'f')]
    follow: bool,
    /// JSON Lines: one full event per line, with its log_seq.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    /// The event id, RUN_ID:RUN_SEQ.
    id: String,
    /// Put blob contents in place of their references.
    #[arg(long)]
    blobs: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RunsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn event_json(s: &StoredEvent) -> Result<Value> {
    let e = s.event()?;
    let mut v = serde_json::to_value(&e)?;
    if let Value::Object(m) = &mut v {
        m.insert("log_seq".into(), json!(s.log_seq));
    }
    Ok(v)
}

fn line(s: &StoredEvent) -> Result<String> {
    let e = s.event()?;
    let intent = e
        .intent
        .as_deref()
        .map(|i| format!("  \"{}\"", truncate(i, 80)))
        .unwrap_or_default();
    Ok(format!(
        "{:>8}  {}  {:<14} {:<24} {}{}",
        s.log_seq,
        e.at,
        e.id().to_string(),
        e.event_type,
        e.origin,
        intent
    ))
}

/// Text for a terminal, at most `n` characters of it (see [`shown`]).
pub(crate) fn truncate(s: &str, n: usize) -> String {
    let s = shown(s);
    if s.chars().count() <= n {
        s.into_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// `s` as a terminal should show text an agent, a model or a peer wrote (an intent, a target, a
/// tool's answer): control characters (newline and tab too, DEL, C1) and the invisible
/// bidirectional and zero-width format characters written as `\u{…}`, so no recorded text
/// can move the cursor, clear the screen, draw a line of its own or reorder what is shown
/// beside an approval.
pub(crate) fn shown(s: &str) -> std::borrow::Cow<'_, str> {
    escaped(s, false)
}

/// A line of a file's text as a terminal should show it: [`shown`], with tabs kept.
pub(crate) fn shown_line(s: &str) -> std::borrow::Cow<'_, str> {
    escaped(s, true)
}

fn escaped(s: &str, keep_tabs: bool) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| {
        (c.is_control() && !(keep_tabs && c == '\t'))
            || matches!(
                c,
                '\u{061c}'
                    | '\u{200b}'..='\u{200f}'
                    | '\u{2028}'..='\u{202e}'
                    | '\u{2060}'..='\u{2069}'
                    | '\u{feff}'
            )
    };
    if !s.chars().any(hidden) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

pub async fn log(home: &Path, url: Option<&str>, a: LogArgs) -> Result<u8> {
    let h = Home::open(home)?;
    let log = h.log(url, Mode::ReadOnly).await?;
    for t in &a.types {
        if EventType::from_name(t).is_none() {
            return Err(anyhow!(
                "--type {t:?} is not an event type of taxonomy v{}",
                ice_kernel::TAXONOMY_VERSION
            ));
        }
    }
    let run = a
        .run
        .as_deref()
        .map(RunId::new)
        .transpose()
        .map_err(|e| anyhow!("--run: {e}"))?;
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    let mut next_log = a.from;
    let mut next_run = 0u64;
    loop {
        // Whether the page read was full is decided before `--from` filters a run's page: a
        // full page of a run's events all before `--from` is not its last.
        let (page, full) = match &run {
            Some(r) => {
                let p = log.read_run(r, next_run, PAGE).await?;
                next_run = ice_log::after_page(r.as_str(), next_run, &p)?;
                let full = p.len() == PAGE;
                let p = p
                    .into_iter()
                    .filter(|e| e.log_seq >= a.from)
                    .collect::<Vec<_>>();
                (p, full)
            }
            None => {
                let p = log.scan(next_log, PAGE).await?;
                next_log = ice_log::after_scan(next_log, &p)?;
                let full = p.len() == PAGE;
                (p, full)
            }
        };
        for s in page
            .iter()
            .filter(|s| a.types.is_empty() || a.types.contains(&s.event_type))
        {
            if a.limit.is_some_and(|l| printed >= l) {
                return Ok(0);
            }
            let text = if a.json {
                serde_json::to_string(&event_json(s)?)?
            } else {
                shown(&line(s)?).into_owned()
            };
            if writeln!(out, "{text}").is_err() {
                return Ok(0); // the reader went away (e.g. `| head`)
            }
            printed += 1;
        }
        if full {
            continue;
        }
        if !a.follow {
            return Ok(0);
        }
        let _ = out.flush();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn show(home: &Path, url: Option<&str>, a: ShowArgs) -> Result<u8> {
    let id: EventId = a.id.parse().map_err(|e| anyhow!("{e}"))?;
    let h = Home::open(home)?;
    let log = h.log(url, Mode::ReadOnly).await?;
    let s = log
        .get(&id)
        .await?
        .ok_or_else(|| anyhow!("no event {id} in the log"))?;
    let mut v = event_json(&s)?;
    if a.blobs {
        let e = s.event()?;
        let mut blobs = std::collections::HashMap::new();
        for r in ice_kernel::blob::blob_refs(&e.payload).map_err(|e| anyhow!(e))? {
            if let Some(b) = log.blob(&r.digest).await? {
                blobs.insert(r.digest, b);
            }
        }
        let payload = ice_kernel::blob::inline(&e.payload, |d| blobs.get(d).cloned());
        v["payload"] = Value::Object(payload);
    }
    if a.json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        // JSON escapes C0 controls inside strings, but not C1 or the bidirectional characters.
        for line in serde_json::to_string_pretty(&v)?.lines() {
            println!("{}", shown(line));
        }
    }
    Ok(0)
}

pub async fn runs(home: &Path, url: Option<&str>, a: RunsArgs) -> Result<u8> {
    let h = Home::open(home)?;
    let log = h.log(url, Mode::ReadOnly).await?;
    let mut offset = 0u64;
    let mut out = std::io::stdout().lock();
    let mut all = Vec::new();
    if !a.json {
        let _ = writeln!(
            out,
            "{:<28} {:<22} {:>7} {:>8} {:>8}  last event",
            "run", "state", "events", "effects", "denials"
        );
    }
    loop {
        let ids = log.runs(offset, 1000).await?;
        for id in &ids {
            let v = fold_run(log.as_ref(), id)
                .await
                .with_context(|| format!("folding run {id}"))?;
            let s = v.summary;
            if a.json {
                all.push(s);
                continue;
            }
            let text = {
                format!(
                    "{:<28} {:<22} {:>7} {:>8} {:>8}  {}",
                    s.run_id.as_str(),
                    s.state.name(),
                    s.events,
                    s.effects,
                    s.denials,
                    s.last_at.map(|t| t.to_string()).unwrap_or_default()
                )
            };
            if writeln!(out, "{text}").is_err() {
                return Ok(0);
            }
        }
        if ids.len() < 1000 {
            break;
        }
        offset += ids.len() as u64;
    }
    if a.json {
        let _ = writeln!(out, "{}", serde_json::to_string(&all)?);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_for_a_terminal_has_nothing_that_moves_the_cursor_or_reorders() {
        assert!(matches!(
            shown("plain: ünïcode ✓"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            shown("a\u{1b}[2J\r\n\tb\u{9b}c\u{7f}\u{202e}d\u{2066}\u{200b}\u{feff}"),
            "a\\u{1b}[2J\\u{d}\\u{a}\\u{9}b\\u{9b}c\\u{7f}\\u{202e}d\\u{2066}\\u{200b}\\u{feff}"
        );
        // A file's line keeps its tabs only.
        assert_eq!(shown_line("\tx\u{1b}[31m\r"), "\tx\\u{1b}[31m\\u{d}");
        // Truncation counts what is shown.
        assert_eq!(truncate("\u{1b}abc", 7), "\\u{1b}a…");
    }
}
