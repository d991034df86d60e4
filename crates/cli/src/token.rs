//! `ice token add --operator NAME | --agent NAME`: a new bearer token for `ice serve`: an
//! operator's for the operator HTTP API, an agent's for MCP at `/mcp`. The token is 32 random bytes (base64url), printed once; config.toml keeps
//! only its SHA-256, under `[[operators]]` or `[[agents]]`.

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
    /// recorded as operator:NAME) or an agent (who opens MCP sessions at /mcp as agent:NAME;
    /// refused on operator endpoints). The token is printed once; config.toml keeps only its
    /// SHA-256. A running `ice serve` picks it up within seconds.
    Add(AddArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("who").required(true).args(["operator", "agent"])))]
struct AddArgs {
    /// The operator's name (A-Z a-z 0-9 . _ - @).
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// The agent's name (A-Z a-z 0-9 . _ - @).
    #[arg(long, value_name = "NAME")]
    agent: Option<String>,
    /// Print JSON: role, name, token, token_sha256.
    #[arg(long)]
    json: bool,
}

pub fn run(home: &Path, a: TokenArgs) -> Result<u8> {
    match a.command {
        TokenCommand::Add(a) => add(home, a),
    }
}

fn add(home: &Path, a: AddArgs) -> Result<u8> {
    let (role, name) = match (&a.operator, &a.agent) {
        (Some(n), None) => (ice_api::Role::Operator, n.clone()),
        (None, Some(n)) => (ice_api::Role::Agent, n.clone()),
        _ => bail!("name either --operator NAME or --agent NAME"),
    };
    ice_api::check_name(role, &name).map_err(|e| anyhow!("--{}: {e}", role.name()))?;
    let h = Home::open(home)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let digest = ice_api::token_digest(&token);
    let file = h.dir.join("config.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    // Appended as text, so whatever else the file says (and how) stays as it is.
    let table = match role {
        ice_api::Role::Operator => "operators",
        ice_api::Role::Agent => "agents",
    };
    let mut new = text.clone();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&format!(
        "\n[[{table}]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"\n"
    ));
    let check: Config = toml::from_str(&new)
        .with_context(|| format!("{} would not stay a valid ICE config", file.display()))?;
    if !check
        .operators
        .iter()
        .chain(&check.agents)
        .any(|e| e.token_sha256 == digest)
    {
        bail!(
            "{}: the new token did not land in the config",
            file.display()
        );
    }
    let tmp = h.dir.join("config.toml.tmp");
    std::fs::write(&tmp, &new).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("replacing {}", file.display()))?;
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
