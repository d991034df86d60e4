//! Audit commands: `ice init`, `verify`, `checkpoint`, `prove`, `verify-proof`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ice_kernel::EventId;
use ice_log::proof::{ProofFile, prove_consistency, prove_inclusion};
use ice_log::sqlite::Mode;

use serde_json::json;

use crate::EXIT_INVALID;
use crate::home::{Home, corrupt_in, read_verifier};

pub fn init(dir: &Path, origin: Option<String>, json: bool) -> Result<u8> {
    let h = Home::init(dir, origin)?;
    let vkey = h.verifier()?;
    if json {
        println!(
            "{}",
            json!({"home": h.dir, "log": h.config.log, "origin": h.config.origin, "verifier_key": vkey.to_string(), "policies": h.policy_dir()})
        );
    } else {
        println!("Initialised ICE home {}", h.dir.display());
        println!("  log:           {}", h.config.log);
        println!("  origin:        {}", h.config.origin);
        println!("  verifier key:  {vkey}");
        println!(
            "                 (also in {}; give it to auditors)",
            h.dir.join("keys/checkpoint.pub").display()
        );
        println!(
            "  policies:      {} (a starter policy; check edits with `ice policy check`)",
            h.policy_dir().display()
        );
    }
    Ok(0)
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Verifier key file to check checkpoint signatures with (default: the home's).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Also decode every payload, re-run the structural rules and re-derive every canonical
    /// encoding (slower; the default already checks every stored byte against its hash).
    #[arg(long)]
    deep: bool,
    /// Also check against a signed checkpoint kept outside the log (what `ice checkpoint`
    /// printed, as text or `--json`): the log must have grown from it. The log's own
    /// checkpoints are stored beside its events; a copy kept elsewhere cannot be removed with
    /// them. Repeatable. (The checkpoint this installation signed last, which it keeps in
    /// keys/last-checkpoint, is checked against too, unless --key is given.)
    #[arg(long = "checkpoint", value_name = "FILE")]
    checkpoints: Vec<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// A checkpoint note from a file: the note itself, or `ice checkpoint --json`'s object.
fn read_note(path: &Path) -> Result<String> {
    let text = crate::home::read_text(path, 64 << 10)?;
    if text.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not a checkpoint note, nor JSON: {e}", path.display()))?;
        return v["note"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: a JSON object without a \"note\"", path.display()));
    }
    Ok(text)
}

pub async fn verify(home: &Path, url: Option<&str>, a: VerifyArgs) -> Result<u8> {
    let h = Home::open(home)?;
    let verifier = match &a.key {
        Some(p) => read_verifier(p)?,
        None => h.verifier()?,
    };
    // Damage that stops the store from being read at all is a verdict too (exit 5), not a
    // failure to run: the log is invalid (SQLite finding the file damaged, its first page
    // overwritten included, is `Corrupt`). A store that is not there, or cannot be opened,
    // is not a verdict.
    let corrupt = corrupt_in;
    let invalid = |what: String, json: bool| {
        if json {
            println!(
                "{}",
                json!({"failure": {"log_seq": null, "event_id": null, "problem": format!("the store is damaged: {what}")}})
            );
        } else {
            println!("INVALID: the store is damaged: {what}");
        }
        Ok(EXIT_INVALID)
    };
    let given = a
        .checkpoints
        .iter()
        .map(|p| read_note(p))
        .collect::<Result<Vec<_>>>()?;
    let mut kept: Vec<ice_log::verify::KeptNote> = given
        .iter()
        .enumerate()
        .map(|(i, note)| {
            let source = a.checkpoints[i].display().to_string();
            ice_log::verify::KeptNote::given(note.clone(), i, given.len(), Some(&source))
        })
        .collect();
    // The checkpoint this installation signed last, kept outside the log, unless another key
    // is given (it is signed with the home's). Read before the log is: it covers no more than
    // the log holds then.
    if a.key.is_none()
        && url.is_none_or(|u| u == h.config.log)
        && let Some(record) = h.signed_record()
    {
        kept.extend(record.kept()?);
    }
    let log = match h.log(url, Mode::ReadOnly).await {
        Ok(log) => log,
        Err(e) => match corrupt(&e) {
            Some(what) => return invalid(what, a.json),
            None => return Err(e),
        },
    };
    let tty = std::io::stderr().is_terminal() && !a.json;
    let started = std::time::Instant::now();
    let report =
        match ice_log::verify::verify_kept(log.as_ref(), Some(&verifier), a.deep, &kept, |n| {
            if tty {
                eprint!("\rverifying… {n} events");
            }
        })
        .await
        {
            Ok(r) => r,
            Err(ice_log::LogError::Corrupt { what }) => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return invalid(what, a.json);
            }
            Err(e) => return Err(e.into()),
        };
    if tty {
        eprint!("\r\x1b[K");
    }
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if let Some(f) = &report.failure {
        let at = match (&f.log_seq, &f.event_id) {
            (Some(s), Some(id)) => format!(" at log_seq {s} (event {id})"),
            (Some(s), None) => format!(" at log_seq {s}"),
            _ => String::new(),
        };
        println!("INVALID{at}: {}", f.problem);
        println!("({} events before it verified)", report.events);
        if f.problem.contains("has no signature by key") {
            println!(
                "(the key checked with is {}: if that is not this log's verifier key, the log may be intact; check with the right one, --key FILE)",
                a.key
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "the home's keys/checkpoint.pub".into())
            );
        }
    } else {
        println!(
            "ok: {} events in {} runs; root {}; {} checkpoint(s) verified{}; {} tree nodes, {} blob(s){} checked in {:.2}s",
            report.events,
            report.runs,
            report.root,
            report.checkpoints_verified,
            report
                .latest_checkpoint
                .map(|s| format!(" (latest at size {s})"))
                .unwrap_or_default(),
            report.tree_nodes_checked,
            report.blobs_checked,
            if report.deep {
                " and every canonical encoding"
            } else {
                ""
            },
            secs
        );
        for w in &report.warnings {
            println!("warning: {w}");
        }
    }
    Ok(if report.ok() { 0 } else { EXIT_INVALID })
}

#[derive(Args)]
pub struct CheckpointArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Sign the log's current tree head with the home's key and store the checkpoint, after
/// checking everything the latest checkpoint does not cover yet (a refusal is exit 5).
pub async fn sign_checkpoint(
    h: &Home,
    log: &dyn ice_log::EventLog,
) -> Result<ice_log::verify::Signed> {
    let signer = h.signer()?;
    let memory = h
        .signed_record()
        .map(ice_log::verify::SignerMemory::keeping)
        .unwrap_or_default();
    Ok(ice_log::verify::sign_checkpoint_with(log, &signer, Some(&memory)).await?)
}

pub async fn checkpoint(home: &Path, url: Option<&str>, a: CheckpointArgs) -> Result<u8> {
    let h = Home::open(home)?;
    // A store too damaged to open or to check is a verdict, as for `verify`: nothing is
    // signed, exit 5.
    let damaged = |e: anyhow::Error| match corrupt_in(&e) {
        Some(what) => {
            eprintln!("error: the store is damaged, nothing was signed: {what}");
            Ok(EXIT_INVALID)
        }
        None => Err(e),
    };
    let log = match h.log(url, Mode::ReadWrite).await {
        Ok(log) => log,
        Err(e) => return damaged(e),
    };
    let signed = match sign_checkpoint(&h, log.as_ref()).await {
        Ok(s) => s,
        Err(e) => return damaged(e),
    };
    if a.json {
        println!(
            "{}",
            json!({"size": signed.size, "root": signed.root.to_hex(), "note": signed.note})
        );
    } else {
        print!("{}", signed.note);
    }
    Ok(0)
}

#[derive(Args)]
pub struct ProveArgs {
    /// The event to prove (RUN_ID:RUN_SEQ), against the latest checkpoint.
    #[arg(required_unless_present = "from")]
    id: Option<String>,
    /// Instead: prove the checkpoint of this size is a prefix of a later one.
    #[arg(long, value_name = "SIZE", conflicts_with = "id")]
    from: Option<u64>,
    /// With --from: the later checkpoint's size (default: the latest).
    #[arg(long, value_name = "SIZE", requires = "from")]
    to: Option<u64>,
    /// Where to write the proof (default: proof-<what>.json in the current directory).
    #[arg(long, short = 'o', value_name = "FILE")]
    out: Option<PathBuf>,
}

pub async fn prove(home: &Path, url: Option<&str>, a: ProveArgs) -> Result<u8> {
    let h = Home::open(home)?;
    let log = h.log(url, Mode::ReadOnly).await?;
    let cps = log.checkpoints().await?;
    let latest = cps
        .last()
        .ok_or_else(|| anyhow!("the log has no checkpoint yet; run `ice checkpoint` first"))?;
    // A proof is only as good as the checkpoint it ends in: one whose signature does not
    // check with the home's key is refused here rather than written into a proof that
    // `verify-proof` would refuse later.
    let verifier = h.verifier()?;
    let unsigned = |cp: &ice_log::StoredCheckpoint| {
        ice_log::checkpoint::Checkpoint::open(&cp.note, &verifier)
            .err()
            .map(|e| {
                format!(
                    "the checkpoint of size {} stored in the log does not verify with the home's key: {e}; no proof was written (run `ice verify`)",
                    cp.size
                )
            })
    };
    let (file, default_name) = match (&a.id, a.from) {
        (Some(id), _) => {
            let id: EventId = id.parse().map_err(|e| anyhow!("{e}"))?;
            if let Some(why) = unsigned(latest) {
                eprintln!("error: {why}");
                return Ok(EXIT_INVALID);
            }
            let f = prove_inclusion(log.as_ref(), &id, &latest.note).await?;
            (f, format!("proof-{}-{}.json", id.run_id, id.run_seq))
        }
        (None, Some(from)) => {
            let find = |size: u64| {
                cps.iter().find(|c| c.size == size).ok_or_else(|| {
                    anyhow!(
                        "no checkpoint of size {size}; stored sizes: {:?}",
                        cps.iter().map(|c| c.size).collect::<Vec<_>>()
                    )
                })
            };
            let old = find(from)?;
            let new = match a.to {
                Some(t) => find(t)?,
                None => latest,
            };
            if let Some(why) = unsigned(old).or_else(|| unsigned(new)) {
                eprintln!("error: {why}");
                return Ok(EXIT_INVALID);
            }
            let f = prove_consistency(log.as_ref(), &old.note, &new.note).await?;
            (
                f,
                format!("proof-consistency-{}-{}.json", old.size, new.size),
            )
        }
        (None, None) => bail!("name an event id or --from SIZE"),
    };
    let out = a.out.unwrap_or_else(|| PathBuf::from(default_name));
    let text = serde_json::to_string_pretty(&file)?;
    std::fs::write(&out, format!("{text}\n"))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(0)
}

#[derive(Args)]
pub struct VerifyProofArgs {
    /// The proof file.
    file: PathBuf,
    /// The log's verifier key file (default: the home's keys/checkpoint.pub).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn verify_proof(home: &Path, a: VerifyProofArgs) -> Result<u8> {
    let verifier = match &a.key {
        Some(p) => read_verifier(p)?,
        None => {
            let h = Home::open(home)
                .context("no --key given and no ICE home to take the verifier key from")?;
            h.verifier()?
        }
    };
    let bytes = crate::home::read_regular(&a.file, ice_log::proof::MAX_PROOF_BYTES as u64)?;
    let outcome = ProofFile::parse(&bytes).and_then(|p| p.verify(&verifier));
    match outcome {
        Ok(v) => {
            if a.json {
                println!(
                    "{}",
                    json!({"valid": true, "statement": v.statement, "tree_size": v.tree_size})
                );
            } else {
                println!("valid: {}", v.statement);
            }
            Ok(0)
        }
        Err(e) => {
            if a.json {
                println!("{}", json!({"valid": false, "problem": e}));
            } else {
                println!("INVALID: {}: {e}", a.file.display());
            }
            Ok(EXIT_INVALID)
        }
    }
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The log to copy: sqlite:PATH, postgres://… or nats://… (see README).
    #[arg(long, value_name = "URL")]
    from: String,
    /// An empty log to copy into (an absent sqlite:PATH is created).
    #[arg(long, value_name = "URL")]
    to: String,
    /// Verifier key file to check the copied checkpoints' signatures with (default: the
    /// home's `keys/checkpoint.pub`, if there is one).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// `ice migrate`: copy a whole log (events in order, blobs, checkpoints) into an empty one on
/// another backend, then verify the copy, checkpoint signatures included when a key is at
/// hand. Exit 5 if the copy does not verify.
pub async fn migrate(home: &Path, a: MigrateArgs) -> Result<u8> {
    // The key before anything is written: a key that cannot be read stops the copy.
    let home_key = home.join("keys/checkpoint.pub");
    let verifier = match &a.key {
        Some(p) => Some(read_verifier(p)?),
        None if home_key.is_file() => Some(read_verifier(&home_key)?),
        None => None,
    };
    let from = crate::home::open_log_url(&a.from, Mode::ReadOnly, None).await?;
    let to: std::sync::Arc<dyn ice_log::EventLog> = match a.to.strip_prefix("sqlite:") {
        Some(p) if !Path::new(p).exists() => std::sync::Arc::new(
            ice_log::sqlite::SqliteLog::create(Path::new(p))
                .with_context(|| format!("creating {}", a.to))?,
        ),
        _ => crate::home::open_log_url(&a.to, Mode::ReadWrite, None).await?,
    };
    // Refused before anything is written: said as such (the advice for a partial copy below
    // would have the user remove a full log, the source itself if both URLs name one file).
    let existing = to.size().await.context("reading the destination log")?;
    if existing != 0 {
        let same = if a.from == a.to {
            " (it is the source: --from and --to name the same log)"
        } else {
            ""
        };
        bail!(
            "the destination log {} already holds {existing} events{same}; a copy needs an empty one. Nothing was written.",
            crate::home::redact(&a.to)
        );
    }
    let verbose = !a.json && std::io::stderr().is_terminal();
    let mut copied = 0;
    let report = ice_log::migrate::copy_log(from.as_ref(), to.as_ref(), |n| {
        copied = n;
        if verbose {
            eprint!("\rcopied {n} events");
        }
    })
    .await;
    if verbose {
        eprintln!();
    }
    // A copy that stopped part way leaves what it wrote: say so, or the next attempt finds a
    // destination that is not empty (and that alone would verify, as a shorter log).
    let report = report.with_context(|| {
        format!(
            "copying the log (the destination now holds a partial copy, about {copied} events: it is not the source; remove it before copying again)"
        )
    })?;
    let v = ice_log::verify::verify(to.as_ref(), verifier.as_ref(), |_| {})
        .await
        .context("verifying the copy")?;
    if a.json {
        println!(
            "{}",
            json!({"copied": report, "verified": v.ok(), "root": v.root, "failure": v.failure, "warnings": v.warnings})
        );
    } else {
        println!(
            "copied {} events of {} runs, {} blobs, {} checkpoints",
            report.events, report.runs, report.blobs, report.checkpoints
        );
        for w in &v.warnings {
            println!("warning: {w}");
        }
        if verifier.is_none() {
            println!(
                "warning: to check them, give --key FILE (the source installation's keys/checkpoint.pub)"
            );
        }
        match &v.failure {
            None => println!("the copy verifies: root {}", v.root),
            Some(f) => println!(
                "the copy does NOT verify: {} (log_seq {:?})",
                f.problem, f.log_seq
            ),
        }
    }
    Ok(if v.ok() { 0 } else { EXIT_INVALID })
}
