//! Proof files: an inclusion proof of one event, or a consistency proof between two
//! checkpoints, carrying everything needed to check it offline with only the log's public key.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ice_kernel::{Digest, Event, EventId};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, NoteVerifier};
use crate::merkle::{self, verify_consistency, verify_inclusion};
use crate::{EventLog, LogError, range_hashes};

/// Largest proof file accepted (a proof has at most 64 hashes; the event at most a few
/// hundred KiB inline).
pub const MAX_PROOF_BYTES: usize = 4 * 1024 * 1024;

/// A proof file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", deny_unknown_fields)]
pub enum ProofFile {
    /// The event is leaf `log_seq` of the tree the checkpoint signs.
    #[serde(rename = "ice-inclusion-proof/1")]
    Inclusion {
        /// The whole event (its hash is recomputed from it).
        event: Box<Event>,
        /// Its position in the log.
        log_seq: u64,
        /// The signed checkpoint.
        checkpoint: String,
        /// Sibling hashes, base64, bottom-up.
        proof: Vec<String>,
    },
    /// The older checkpoint's tree is a prefix of the newer one's.
    #[serde(rename = "ice-consistency-proof/1")]
    Consistency {
        /// The older signed checkpoint.
        old_checkpoint: String,
        /// The newer signed checkpoint.
        new_checkpoint: String,
        /// Proof hashes, base64.
        proof: Vec<String>,
    },
}

/// What a proof established.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProofVerdict {
    /// A sentence for people.
    pub statement: String,
    /// The checkpoint size the proof is against.
    pub tree_size: u64,
}

fn b64(ds: &[Digest]) -> Vec<String> {
    ds.iter().map(|d| B64.encode(d.0)).collect()
}

fn unb64(ss: &[String]) -> Result<Vec<Digest>, String> {
    if ss.len() > 64 {
        return Err(format!(
            "{} proof hashes; a tree of under 2^64 leaves needs at most 64",
            ss.len()
        ));
    }
    ss.iter()
        .enumerate()
        .map(|(i, s)| {
            let raw = B64
                .decode(s)
                .map_err(|_| format!("proof hash {i} is not base64"))?;
            raw.try_into()
                .map(Digest)
                .map_err(|_| format!("proof hash {i} is not 32 bytes"))
        })
        .collect()
}

/// Build the inclusion proof of event `id` against a stored signed checkpoint note.
pub async fn prove_inclusion(
    log: &dyn EventLog,
    id: &EventId,
    checkpoint_note: &str,
) -> Result<ProofFile, LogError> {
    let cp = Checkpoint::parse_unverified(checkpoint_note)
        .map_err(|e| LogError::Invalid(e.to_string()))?;
    let stored = log
        .get(id)
        .await?
        .ok_or_else(|| LogError::Invalid(format!("no event {id} in the log")))?;
    if stored.log_seq >= cp.size {
        return Err(LogError::Invalid(format!(
            "event {id} (log_seq {}) is newer than the latest checkpoint (size {}); run `ice checkpoint` first",
            stored.log_seq, cp.size
        )));
    }
    let proof = range_hashes(log, &merkle::inclusion_ranges(stored.log_seq, cp.size)).await?;
    Ok(ProofFile::Inclusion {
        event: Box::new(stored.event()?),
        log_seq: stored.log_seq,
        checkpoint: checkpoint_note.to_string(),
        proof: b64(&proof),
    })
}

/// Build the consistency proof between two stored signed checkpoint notes.
pub async fn prove_consistency(
    log: &dyn EventLog,
    old_note: &str,
    new_note: &str,
) -> Result<ProofFile, LogError> {
    let old =
        Checkpoint::parse_unverified(old_note).map_err(|e| LogError::Invalid(e.to_string()))?;
    let new =
        Checkpoint::parse_unverified(new_note).map_err(|e| LogError::Invalid(e.to_string()))?;
    if old.size > new.size {
        return Err(LogError::Invalid(format!(
            "checkpoint {} is newer than {}",
            old.size, new.size
        )));
    }
    // Every log extends the empty one; RFC 9162 defines no proof from size 0 and verifiers
    // (ours included) reject one, so do not make a proof nobody can check.
    if old.size == 0 {
        return Err(LogError::Invalid(
            "the old checkpoint is of the empty log (size 0): there is nothing to prove consistent; pick a later one".into(),
        ));
    }
    let proof = range_hashes(log, &merkle::consistency_ranges(old.size, new.size)).await?;
    Ok(ProofFile::Consistency {
        old_checkpoint: old_note.to_string(),
        new_checkpoint: new_note.to_string(),
        proof: b64(&proof),
    })
}

impl ProofFile {
    /// Parse a proof file, with a size limit and a clear error.
    pub fn parse(bytes: &[u8]) -> Result<ProofFile, String> {
        if bytes.len() > MAX_PROOF_BYTES {
            return Err(format!(
                "proof file is {} bytes; at most {MAX_PROOF_BYTES}",
                bytes.len()
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("not an ICE proof file: {e}"))
    }

    /// Check the proof offline with the log's public key.
    pub fn verify(&self, verifier: &NoteVerifier) -> Result<ProofVerdict, String> {
        match self {
            ProofFile::Inclusion {
                event,
                log_seq,
                checkpoint,
                proof,
            } => {
                let cp = Checkpoint::open(checkpoint, verifier)
                    .map_err(|e| format!("checkpoint: {e}"))?;
                let computed = event.compute_hash();
                if computed != event.hash {
                    return Err(format!(
                        "the event's content hashes to {computed}, not to its stated hash {}: the event was altered",
                        event.hash
                    ));
                }
                let proof = unb64(proof)?;
                verify_inclusion(&event.hash.0, *log_seq, cp.size, &cp.root, &proof)?;
                Ok(ProofVerdict {
                    statement: format!(
                        "event {} (hash {}) is at log_seq {log_seq} of the log {} signed at size {}",
                        event.id(),
                        event.hash,
                        cp.origin,
                        cp.size
                    ),
                    tree_size: cp.size,
                })
            }
            ProofFile::Consistency {
                old_checkpoint,
                new_checkpoint,
                proof,
            } => {
                let old = Checkpoint::open(old_checkpoint, verifier)
                    .map_err(|e| format!("old checkpoint: {e}"))?;
                let new = Checkpoint::open(new_checkpoint, verifier)
                    .map_err(|e| format!("new checkpoint: {e}"))?;
                if old.size > new.size {
                    return Err(format!(
                        "the old checkpoint ({}) is larger than the new one ({})",
                        old.size, new.size
                    ));
                }
                let proof = unb64(proof)?;
                verify_consistency(old.size, &old.root, new.size, &new.root, &proof)?;
                Ok(ProofVerdict {
                    statement: format!(
                        "the log {} at size {} is a prefix of itself at size {}: nothing signed was rewritten",
                        new.origin, old.size, new.size
                    ),
                    tree_size: new.size,
                })
            }
        }
    }
}
