//! Copying a whole log between backends (`ice migrate`).
//!
//! Every event is read from the source in log order, re-checked by the kernel's validator
//! (`RunHead::admit`: law, chain and hash, so a damaged source stops the copy at the first bad
//! event), and appended to an empty destination in the same order, with its blobs; then the
//! signed checkpoints are copied. Positions are the same, so the Merkle tree is the same and the
//! checkpoints' signatures hold; each event's hash is the same because its canonical body is.

use std::collections::HashMap;

use ice_kernel::{Blob, RunHead, RunId};

use crate::verify::Seen;
use crate::{EventLog, LogError};

/// Events read from the source per page.
const PAGE: usize = 2048;
/// Most events appended in one batch.
const BATCH: usize = 256;

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// Events copied.
    pub events: u64,
    /// Runs seen.
    pub runs: u64,
    /// Blobs copied.
    pub blobs: u64,
    /// Checkpoints copied.
    pub checkpoints: u64,
}

/// Copy every event, blob and checkpoint of `from` into `to`, which must be empty.
/// `progress` is called with the number of events copied after each page.
pub async fn copy_log(
    from: &dyn EventLog,
    to: &dyn EventLog,
    mut progress: impl FnMut(u64),
) -> Result<CopyReport, LogError> {
    let existing = to.size().await?;
    if existing != 0 {
        return Err(LogError::Invalid(format!(
            "the destination log already holds {existing} events; a copy needs an empty one"
        )));
    }
    let mut heads: HashMap<RunId, RunHead> = HashMap::new();
    let mut report = CopyReport::default();
    let mut next = 0u64;
    loop {
        let page = from.scan(next, PAGE).await?;
        if page.is_empty() {
            break;
        }
        // Consecutive events of one run go in one batch; order across runs is kept.
        let mut i = 0;
        while i < page.len() {
            let run = RunId::new(page[i].run_id.clone()).map_err(|e| LogError::Corrupt {
                what: format!("event at log_seq {}: run id: {e}", page[i].log_seq),
            })?;
            let mut events = Vec::new();
            let mut blobs = Vec::new();
            while i < page.len() && page[i].run_id == run.as_str() && events.len() < BATCH {
                let stored = &page[i];
                if stored.log_seq != next {
                    return Err(LogError::Corrupt {
                        what: format!("expected log_seq {next}, read {}", stored.log_seq),
                    });
                }
                let event = stored.event()?;
                for r in
                    ice_kernel::blob::blob_refs(&event.payload).map_err(|e| LogError::Corrupt {
                        what: format!("event {}: {e}", event.id()),
                    })?
                {
                    let bytes = from
                        .blob(&r.digest)
                        .await?
                        .ok_or_else(|| LogError::Corrupt {
                            what: format!(
                                "event {}: blob {} of field {:?} is missing",
                                event.id(),
                                r.digest.to_hex(),
                                r.field
                            ),
                        })?;
                    let blob = Blob::new(bytes);
                    if blob.digest != r.digest {
                        return Err(LogError::Corrupt {
                            what: format!(
                                "event {}: blob {} does not hash to its name",
                                event.id(),
                                r.digest.to_hex()
                            ),
                        });
                    }
                    blobs.push(blob);
                }
                let mut head = heads
                    .remove(&run)
                    .unwrap_or_else(|| RunHead::new(run.clone()));
                let admitted = head
                    .admit(event, &Seen(&heads))
                    .map_err(|e| LogError::Corrupt {
                        what: format!("event at log_seq {}: {e}", stored.log_seq),
                    });
                heads.insert(run.clone(), head);
                events.push(admitted?);
                next += 1;
                i += 1;
            }
            report.blobs += blobs.len() as u64;
            let n = events.len() as u64;
            let batch = RunHead::batch_of(run, events, blobs).map_err(LogError::Invalid)?;
            to.append(batch).await?;
            report.events += n;
        }
        progress(report.events);
    }
    for cp in from.checkpoints().await? {
        to.add_checkpoint(cp).await?;
        report.checkpoints += 1;
    }
    report.runs = heads.len() as u64;
    Ok(report)
}
