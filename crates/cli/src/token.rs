//! `ice token add --operator NAME | --agent NAME | --metrics NAME`: a new bearer token for
//! `ice serve`: an operator's for the operator HTTP API, an agent's for MCP at `/mcp`, a metrics
//! reader's for `/metrics` (and nothing else). `ice token list` shows the tokens config.toml
//! holds; `ice token revoke` removes a name's. The token is 32 random bytes (base64url), printed
//! once; config.toml keeps only its SHA-256, under `[[operators]]`, `[[agents]]` or
//! `[[metrics_readers]]`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use clap::{ArgGroup, Args, Subcommand};
use serde_json::json;

use crate::home::{Config, Home};

#[derive(Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token for an operator (who may call the operator API; their actions are
    /// recorded as operator:NAME), an agent (who opens MCP sessions at /mcp as agent:NAME;
    /// refused on operator endpoints) or a metrics reader (a Prometheus scraper: /metrics
    /// only). The token is printed once; config.toml keeps only its SHA-256. A running
    /// `ice serve` picks it up within seconds.
    Add(AddArgs),
    /// List the tokens config.toml holds: role, name and the start of each SHA-256 (the
    /// tokens themselves are never stored).
    List(ListArgs),
    /// Remove every token of an operator, an agent or a metrics reader from config.toml. A running `ice serve`
    /// refuses them within seconds, on open MCP sessions too.
    Revoke(RevokeArgs),
}

#[derive(Args)]
struct ListArgs {
    /// Print JSON: a list of {role, name, token_sha256}.
    #[arg(long)]
    json: bool,
}

/// Whose token: exactly one of the three.
#[derive(Args)]
#[command(group(ArgGroup::new("who").required(true).args(["operator", "agent", "metrics"])))]
struct Who {
    /// An operator's name (A-Z a-z 0-9 . _ - @).
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// An agent's name (A-Z a-z 0-9 . _ - @).
    #[arg(long, value_name = "NAME")]
    agent: Option<String>,
    /// A metrics reader's name (A-Z a-z 0-9 . _ - @), e.g. the Prometheus that scrapes
    /// /metrics.
    #[arg(long, value_name = "NAME")]
    metrics: Option<String>,
}

impl Who {
    /// The role, its table in config.toml, and the name.
    fn resolve(&self) -> Result<(ice_api::Role, &'static str, &str)> {
        match (&self.operator, &self.agent, &self.metrics) {
            (Some(n), None, None) => Ok((ice_api::Role::Operator, "operators", n)),
            (None, Some(n), None) => Ok((ice_api::Role::Agent, "agents", n)),
            (None, None, Some(n)) => Ok((ice_api::Role::Metrics, "metrics_readers", n)),
            _ => bail!("name one of --operator NAME, --agent NAME or --metrics NAME"),
        }
    }
}

/// The entries of `table` in a config.
fn entries<'a>(c: &'a Config, table: &str) -> &'a [crate::home::TokenEntry] {
    match table {
        "operators" => &c.operators,
        "agents" => &c.agents,
        _ => &c.metrics_readers,
    }
}

#[derive(Args)]
struct RevokeArgs {
    /// Whose tokens to remove.
    #[command(flatten)]
    who: Who,
}

#[derive(Args)]
struct AddArgs {
    /// Whose token it is.
    #[command(flatten)]
    who: Who,
    /// Print JSON: role, name, token, token_sha256.
    #[arg(long)]
    json: bool,
}

pub fn run(home: &Path, a: TokenArgs) -> Result<u8> {
    match a.command {
        TokenCommand::Add(a) => add(home, a),
        TokenCommand::List(a) => list(home, a),
        TokenCommand::Revoke(a) => revoke(home, a),
    }
}

fn list(home: &Path, a: ListArgs) -> Result<u8> {
    let h = Home::open(home)?;
    let rows: Vec<(&str, &crate::home::TokenEntry)> = h
        .config
        .operators
        .iter()
        .map(|e| ("operator", e))
        .chain(h.config.agents.iter().map(|e| ("agent", e)))
        .chain(h.config.metrics_readers.iter().map(|e| ("metrics", e)))
        .collect();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(role, e)| json!({"role": role, "name": e.name, "token_sha256": e.token_sha256}))
            .collect();
        let _ = writeln!(out, "{}", serde_json::Value::Array(v));
    } else if rows.is_empty() {
        eprintln!(
            "no tokens: `ice token add --operator NAME | --agent NAME | --metrics NAME` makes one"
        );
    } else {
        for (role, e) in rows {
            let short: String = e.token_sha256.chars().take(12).collect();
            let _ = writeln!(out, "{role:<9} {:<24} sha256:{short}…", e.name);
        }
    }
    Ok(0)
}

fn revoke(home: &Path, a: RevokeArgs) -> Result<u8> {
    let (role, table, name) = a.who.resolve()?;
    let role = role.name();
    // A bad entry does not stop its own removal (every other command refuses the config),
    // even one whose token_sha256 is missing or not a string, which keeps config.toml from
    // reading as an ICE config at all: the file is edited as TOML.
    let dir = Home::dir_for_edit(home)?;
    let file = dir.join("config.toml");
    let mut removed = 0;
    edit_config(&dir, |text| {
        let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
            crate::home::config_error(&file, text, e.message(), e.span())
        })?;
        // Edited in place, so the rest of the file (and how it is written) stays as it is.
        // `[[agents]]` tables (as `token add` writes them) or an inline array of tables.
        let mut item = doc.get_mut(table);
        let left = if let Some(tables) = item
            .as_deref_mut()
            .and_then(toml_edit::Item::as_array_of_tables_mut)
        {
            let before = tables.len();
            tables.retain(|t| t.get("name").and_then(toml_edit::Item::as_str) != Some(name));
            removed = before - tables.len();
            tables.len()
        } else if let Some(list) = item
            .and_then(toml_edit::Item::as_value_mut)
            .and_then(toml_edit::Value::as_array_mut)
        {
            let before = list.len();
            list.retain(|v| {
                v.as_inline_table()
                    .and_then(|t| t.get("name"))
                    .and_then(toml_edit::Value::as_str)
                    != Some(name)
            });
            removed = before - list.len();
            list.len()
        } else {
            1
        };
        if left == 0 {
            doc.remove(table);
        }
        if removed == 0 {
            bail!(
                "{} holds no token of {role} {name:?} (`ice token list` shows those it holds)",
                file.display()
            );
        }
        let new = doc.to_string();
        // What was a valid ICE config stays one; one that was not (the entry removed may have
        // been why) is written if removing the entry is all that changed, and checked below.
        match toml::from_str::<Config>(&new) {
            Ok(check) => {
                if entries(&check, table).iter().any(|e| e.name == name) {
                    bail!("{}: the token was not removed", file.display());
                }
            }
            Err(e) if toml::from_str::<Config>(text).is_ok() => {
                return Err(crate::home::config_error(
                    &file,
                    &new,
                    e.message(),
                    e.span(),
                ))
                .with_context(|| format!("{} would not stay a valid ICE config", file.display()));
            }
            Err(_) => {}
        }
        Ok(new)
    })?;
    eprintln!(
        "removed {removed} token(s) of {role} {name} from {}; a running `ice serve` refuses them within seconds",
        file.display()
    );
    if let Err(e) = Home::open(&dir) {
        eprintln!("ice token revoke: the config still has a problem: {e:#}");
    }
    Ok(0)
}

fn add(home: &Path, a: AddArgs) -> Result<u8> {
    let (role, table, name) = a.who.resolve()?;
    ice_api::check_name(role, name).map_err(|e| anyhow!("--{}: {e}", role.name()))?;
    let h = Home::open(home)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    // A fixed prefix: the token never starts with `-` (which command lines would take for an
    // option), and secret scanners can recognise it.
    let token = format!(
        "ice_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let digest = ice_api::token_digest(&token);
    let file = h.dir.join("config.toml");
    edit_config(&h.dir, |text| {
        // Appended as text, so whatever else the file says (and how) stays as it is.
        let mut new = text.to_string();
        if !new.is_empty() && !new.ends_with('\n') {
            new.push('\n');
        }
        new.push_str(&format!(
            "\n[[{table}]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"\n"
        ));
        let check: Config = toml::from_str(&new)
            .with_context(|| format!("{} would not stay a valid ICE config", file.display()))?;
        if !entries(&check, table)
            .iter()
            .any(|e| e.token_sha256 == digest && e.name == name)
        {
            bail!(
                "{}: the new token did not land in the config",
                file.display()
            );
        }
        Ok(new)
    })?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let _ = writeln!(
            out,
            "{}",
            json!({"role": role.name(), "name": name, "token": token, "token_sha256": digest})
        );
    } else {
        let _ = writeln!(out, "{token}");
        eprintln!(
            "added a token for {} {name} to {} (only its SHA-256 is kept; this is the only time the token is shown). Use it as `Authorization: Bearer TOKEN`.",
            role.name(),
            file.display()
        );
    }
    Ok(0)
}

/// Replace config.toml with what `edit` makes of its text, under an exclusive lock on
/// `config.toml.lock` (so concurrent `token add` and `token revoke` cannot undo each other),
/// through a temporary file of this process that keeps the original's permissions, renamed
/// over it (readers see the old file or the new one, never half of one).
fn edit_config(dir: &Path, edit: impl FnOnce(&str) -> Result<String>) -> Result<()> {
    let file = dir.join("config.toml");
    let lock_path = dir.join("config.toml.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let text = crate::home::read_text(&file, crate::home::MAX_CONFIG_BYTES)?;
    let new = edit(&text)?;
    let tmp = dir.join(format!("config.toml.{}.tmp", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, &new) {
        // A disk that filled part-way leaves no temporary behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    let kept = std::fs::metadata(&file)
        .and_then(|m| std::fs::set_permissions(&tmp, m.permissions()))
        .and_then(|()| std::fs::rename(&tmp, &file));
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("replacing {}", file.display()));
    }
    Ok(())
}
