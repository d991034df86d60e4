//! `ice replay RUN [--drive]`: rebuild a run from the log alone and report any divergence;
//! with `--drive`, re-drive its agent with the recorded inferences in place of the model.

use std::io::Write;
use std::path::Path;

use crate::inspect::shown;
use anyhow::{Result, anyhow};
use clap::Args;
use ice_kernel::RunId;
use ice_runtime::replay::{Divergence, ReplayReport};
use serde_json::json;

/// Exit code: the replay diverges from the record.
const EXIT_DIVERGED: u8 = 5;

#[derive(Args)]
pub struct ReplayArgs {
    /// The run.
    run: String,
    /// Also re-drive the run's agent from the record (no model is called) and check that the
    /// runtime makes the same decisions.
    #[arg(long)]
    drive: bool,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

pub async fn replay(home: &Path, url: Option<&str>, a: ReplayArgs) -> Result<u8> {
    let run = RunId::new(a.run.clone()).map_err(|e| anyhow!("run id {:?}: {e}", a.run))?;
    let (_h, rt) = crate::run::runtime_unclaimed(home, url).await?;
    // Why the run's driver could not be built to re-drive it, when it should have been.
    let mut not_driven: Option<String> = None;
    let mut report = if a.drive {
        let recorded = rt.recorded_inferences(&run).await?;
        // Why nothing is re-driven, and whether that is a failure: a run no agent in ICE
        // drove (an operator's memory action, an agent driven from outside ICE) has nothing to
        // re-drive, and its replay from the log is the whole check.
        let replayer = match rt.recorded_spec(&run).await {
            Ok(Some(spec)) => {
                let drivable = matches!(spec.driver.as_str(), "plan" | "llm");
                crate::agents::replayer(&spec, recorded).map_err(|why| (why, drivable))
            }
            Ok(None) => Err((
                "no agent drove this run (it records an operator's memory action)".into(),
                false,
            )),
            Err(e) => Err((format!("the run's spec cannot be read back: {e}"), true)),
        };
        match replayer {
            Ok(mut r) => {
                let mut report = rt.replay_drive(&run, r.agent()).await?;
                for d in r.divergences() {
                    report.divergences.push(Divergence {
                        event: None,
                        what: format!("recorded model: {d}"),
                    });
                }
                report
            }
            Err((why, failure)) => {
                if failure {
                    not_driven = Some(why.clone());
                }
                let mut report = rt.replay(&run).await?;
                report.drive = Some(ice_runtime::replay::DriveReport {
                    unchecked: vec![why],
                    ..Default::default()
                });
                report
            }
        }
    } else {
        rt.replay(&run).await?
    };
    report.divergences.dedup();
    // Asked to re-drive the run, and its driver could not be built (the plan changed, the
    // spec does not read back): not a pass, whatever the rest found.
    let code = if !report.divergences.is_empty() {
        EXIT_DIVERGED
    } else if not_driven.is_some() {
        1
    } else {
        0
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", json!(report))?;
    } else {
        print(&mut out, &report)?;
    }
    if let Some(why) = not_driven {
        eprintln!(
            "error: --drive re-drove nothing, so no decision was re-made: {}",
            shown(&why)
        );
    }
    Ok(code)
}

fn print(out: &mut dyn Write, r: &ReplayReport) -> Result<()> {
    writeln!(
        out,
        "run {}: {} events replayed from the log alone, state {}, {} model calls, {} blobs",
        r.run, r.events, r.state, r.inferences, r.blobs
    )?;
    if !r.compared {
        writeln!(
            out,
            "  the run recorded no projection to compare with (it has not ended, or an older ICE recorded it)"
        )?;
    } else if r.divergences.is_empty() {
        writeln!(
            out,
            "  the rebuilt projection equals the one the run recorded"
        )?;
    }
    if let Some(d) = &r.drive {
        writeln!(
            out,
            "  re-driven: {} proposals, {} model calls from the record, {} decisions re-made",
            d.proposals, d.inferences, d.decisions
        )?;
        for u in &d.unchecked {
            writeln!(out, "  not checked: {}", shown(u))?;
        }
    }
    if r.divergences.is_empty() {
        // What replay compares: the run with its own record. Whether the record is the one
        // that was written (not rewritten and re-hashed) is `ice verify`'s question.
        writeln!(
            out,
            "no divergence (the run agrees with its record; `ice verify` checks the record against the signed checkpoints)"
        )?;
    } else {
        writeln!(out, "{} divergence(s):", r.divergences.len())?;
        for d in &r.divergences {
            match &d.event {
                Some(e) => writeln!(out, "  at {e}: {}", shown(&d.what))?,
                None => writeln!(out, "  {}", shown(&d.what))?,
            }
        }
    }
    Ok(())
}
