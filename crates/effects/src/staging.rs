//! Staging of a run's internal writes (spec §4: "Internal writes are staged").
//!
//! A [`Stage`] belongs to one run and one workspace. It has a directory of its own, outside the
//! workspace, holding a content-addressed store (`objects/<sha256 hex>`), and an ordered list of
//! staged ops ([`StagedOp`]: write a path to a content digest, or delete a path). Nothing
//! reaches the workspace while a run executes: reads through the stage see the staged view
//! (staged content, deleted files absent, everything else from the workspace), and listings
//! merge the two.
//!
//! The runtime records each staged op as an event (its [`StagedOp::to_json`] and evidence), so
//! after a restart it can rebuild the same stage from the log with [`Stage::from_ops`]; the
//! contents stay in the store, which is written durably before an op is returned.
//!
//! [`Stage::diff`] is the run's whole diff, [`Stage::materialize`] a copy of the workspace with
//! it applied (where validation commands run), [`Stage::discard`] an abort.
//!
//! # Commit
//!
//! [`Stage::commit`] is crash-safe:
//!
//! 1. the diff is computed, which re-checks confinement of every path (a path that became a
//!    symlink or a hard link since it was staged is refused here, before anything changes);
//! 2. a journal (`journal.json`: every change with its before and after digest) is written to
//!    the stage directory under a temporary name, synced, renamed into place and the directory
//!    synced: **that rename being durable is the commit point**;
//! 3. each change is applied: new content written to a temporary file beside the target,
//!    synced, renamed over it, and the directory synced (or the file removed and the directory
//!    synced), each target's confinement checked again as it is applied;
//! 4. the journal is removed (and synced), then the stage directory ([`Stage::apply_with_hook`]
//!    leaves this step to a caller that records the commit elsewhere: it calls [`release`]
//!    once that record is durable, so a journal never disappears before its record exists).
//!
//! Every change is idempotent ("set this path to content X", "make this path absent"), so
//! [`recover`] after a crash rolls a journalled commit forward from the start, and a commit
//! killed at any moment leaves the workspace, once recovered, either exactly as before (no
//! journal yet) or exactly as after. The temporary name of a path is fixed, so a roll-forward
//! also removes any temporary file the crash left.
//!
//! A refusal or an I/O error while applying (after the commit point) leaves the journal in
//! place: the workspace is part-way, and [`recover`] tries again. The runtime should then
//! suspend the run for an operator rather than report it committed.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ice_authority::{Authorization, EffectClass, Resource};
use ice_kernel::{Digest, RunId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::{cap_bytes, require, require_bytes, require_run};
use crate::evidence::{Detail, Digested, Evidence};
use crate::limits::{MAX_JOURNAL_BYTES, MAX_STAGED_FILE_BYTES};
use crate::workspace::{
    Confinement, ConfinementError, Entry, EntryKind, FileRead, FileState, FsError, Listing, Stat,
    Workspace, authorize_stat, check_unreserved, dir_segments, file_segments, hash_reader,
    read_evidence,
};

const OBJECTS: &str = "objects";
const JOURNAL: &str = "journal.json";
const JOURNAL_TEMP: &str = "journal.json.tmp";
const JOURNAL_FORMAT: &str = "ice-commit-journal/1";

/// One staged op, in the order the run staged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum StagedOp {
    /// Set `path` to the content with this digest and size (held in the stage's store).
    Write {
        /// The workspace path.
        path: String,
        /// SHA-256 of the content.
        digest: Digest,
        /// Its size in bytes.
        size: u64,
    },
    /// Make `path` absent.
    Delete {
        /// The workspace path.
        path: String,
    },
}

impl StagedOp {
    /// The path the op acts on.
    pub fn path(&self) -> &str {
        match self {
            StagedOp::Write { path, .. } | StagedOp::Delete { path } => path,
        }
    }

    /// The op as a JSON object (`{"op": "write", "path": …, "digest": …, "size": …}` or
    /// `{"op": "delete", "path": …}`), as recorded in an event and read back for
    /// [`Stage::from_ops`].
    pub fn to_json(&self) -> Value {
        // A derived Serialize of plain strings, a digest and an integer cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// An op from its JSON form.
    pub fn from_json(value: &Value) -> Result<StagedOp, StageError> {
        let op = StagedOp::deserialize(value).map_err(|e| StageError::Op {
            problem: e.to_string(),
        })?;
        file_segments(op.path()).map_err(FsError::from)?;
        Ok(op)
    }
}

/// A path's state in the staged view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staged {
    Written(FileState),
    Deleted,
}

/// How a path changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The path did not exist.
    Added,
    /// The path's content changes.
    Modified,
    /// The path is removed.
    Deleted,
}

impl ChangeKind {
    /// How a path whose content is `before` changes to `after` (`None`: absent); `None` if it
    /// does not change.
    fn between(before: &Option<FileState>, after: &Option<FileState>) -> Option<ChangeKind> {
        match (before, after) {
            (None, None) => None,
            (Some(b), Some(a)) if b == a => None,
            (None, Some(_)) => Some(ChangeKind::Added),
            (Some(_), Some(_)) => Some(ChangeKind::Modified),
            (Some(_), None) => Some(ChangeKind::Deleted),
        }
    }

    /// `added`, `modified` or `deleted`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Modified => "modified",
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// One changed path of a run's diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// The workspace path.
    pub path: String,
    /// How it changes.
    pub kind: ChangeKind,
    /// Its content in the workspace (`None` if absent).
    pub before: Option<FileState>,
    /// Its content after the commit (`None` if deleted).
    pub after: Option<FileState>,
}

impl Change {
    /// The evidence of applying this change (an `EffectApplied` event's payload). The
    /// runtime's own act: no grant (the event names the run's commit authority).
    pub fn evidence(&self) -> Evidence {
        let digested = |name: &str, state: &Option<FileState>| {
            state.map(|s| Digested {
                name: name.to_string(),
                digest: s.digest,
                bytes: s.size,
            })
        };
        Evidence {
            effect: EffectClass::InternalWrite,
            capability: match self.kind {
                ChangeKind::Deleted => "fs.delete",
                _ => "fs.write",
            }
            .into(),
            target: Resource::Path(self.path.clone()),
            grant: None,
            inputs: digested("before", &self.before).into_iter().collect(),
            outputs: digested("after", &self.after).into_iter().collect(),
            detail: Detail::Applied {
                change: self.kind.as_str(),
            },
        }
    }
}

/// A staged write or delete, as returned to the runtime to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedEffect {
    /// The op, for the `EffectStaged` event and for [`Stage::from_ops`].
    pub op: StagedOp,
    /// Its evidence.
    pub evidence: Evidence,
    /// The path's content in the workspace when the run last read it there before staging it,
    /// or else when it staged it (`Some(None)`: absent), if it was noted: for the record, so a stage rebuilt after a
    /// restart refuses a commit over someone else's change as the live one does
    /// ([`Stage::remember_seen`]).
    pub seen: Option<Option<FileState>>,
}

/// A materialised copy of the workspace with the staged diff applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Materialized {
    /// Where it is.
    pub dir: PathBuf,
    /// Regular files copied from the workspace.
    pub files: u64,
    /// Directories copied.
    pub dirs: u64,
    /// Symbolic links copied as links.
    pub symlinks: u64,
    /// Special files (FIFOs, sockets, devices) left out.
    pub skipped: Vec<String>,
}

/// A point in a commit, passed to a [`Stage::commit_with_hook`] hook (tests use it to stop a
/// commit at that point).
#[derive(Debug, Clone, Copy)]
pub enum CommitPoint<'a> {
    /// The diff is known and checked; nothing has been written yet.
    Prepared {
        /// The changes about to be journalled.
        changes: &'a [Change],
    },
    /// The journal is durable: the commit will complete, by this process or by recovery.
    JournalDurable,
    /// One change has been applied (and synced).
    Applied {
        /// Its position in the diff.
        index: usize,
        /// The change.
        change: &'a Change,
    },
}

/// What a commit applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// Every change applied, in order.
    pub changes: Vec<Change>,
}

/// What recovery found in a stage directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// No journal: no commit was under way (or it had finished); the workspace was not
    /// touched.
    NothingPending,
    /// A journalled commit was rolled forward; these changes are now applied.
    RolledForward {
        /// The journal's changes.
        changes: Vec<Change>,
    },
}

/// Why a staging operation, a commit or a recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A workspace operation failed (including confinement and authorization refusals).
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The stage's own directory failed.
    #[error("stage {path}: {op}: {source}")]
    Store {
        /// The file or directory.
        path: PathBuf,
        /// What ICE was doing.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A commit journal is present: a commit was interrupted and must be recovered first.
    #[error("stage {dir}: a commit journal is present; run recovery first")]
    PendingCommit {
        /// The stage directory.
        dir: PathBuf,
    },
    /// The journal cannot be used.
    #[error("journal {path}: {problem}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A content the ops name is missing from the store or does not match its digest.
    #[error("stage object {digest}: {problem}")]
    Object {
        /// The content's digest.
        digest: Digest,
        /// What is wrong.
        problem: String,
    },
    /// A recorded op cannot be read.
    #[error("staged op: {problem}")]
    Op {
        /// What is wrong.
        problem: String,
    },
    /// The stage or destination directory is unsuitable.
    #[error("{path}: {problem}")]
    Layout {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A path the commit would change was changed in the workspace by someone else since the
    /// run last read it there (before staging it) or staged it: the commit is refused before its commit point (nothing is
    /// applied), so that other change is not silently overwritten.
    #[error(
        "{path:?} changed in the workspace while the run worked on it: it was {} when the run last read it there or staged it and is {} now, so that change is kept and the commit is refused before anything is applied",
        state_text(seen),
        state_text(now)
    )]
    Conflict {
        /// The workspace path.
        path: String,
        /// Its content when the run last looked at it (`None`: absent).
        seen: Option<FileState>,
        /// Its content now.
        now: Option<FileState>,
    },
    /// The commit journal could not be written (a full disk, say): the commit never reached
    /// its commit point, nothing was applied, and no journal is left for recovery to roll
    /// forward. The stage is used up; what it held is discarded with the run.
    #[error("commit: the journal could not be written, so nothing was applied: {source}")]
    JournalUnwritten {
        /// What failed.
        #[source]
        source: Box<StageError>,
    },
    /// Applying a change after the commit point failed; the journal is kept and [`recover`]
    /// will try again.
    #[error("commit: applying change {index} ({path:?}) failed; the journal is kept: {source}")]
    Apply {
        /// The change's position in the diff.
        index: usize,
        /// Its path.
        path: String,
        /// What failed.
        #[source]
        source: Box<FsError>,
    },
}

impl StageError {
    /// Whether this is the workspace refusing the commit (someone else's change, a
    /// confinement refusal, a file where a directory must go), which trying again will not
    /// change; not a failure to read (EIO, EMFILE, a workspace briefly gone) that may pass.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StageError::Conflict { .. }
                | StageError::Fs(
                    FsError::Confinement(_)
                        | FsError::NotADirectory { .. }
                        | FsError::IsADirectory { .. }
                )
        )
    }
}

fn state_text(state: &Option<FileState>) -> String {
    match state {
        Some(s) => format!("{} ({} bytes)", s.digest, s.size),
        None => "absent".into(),
    }
}

fn store_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StageError {
    let path = path.to_path_buf();
    move |source| StageError::Store { path, op, source }
}

fn sync_dir(path: &Path) -> Result<(), StageError> {
    std::fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(store_err(path, "sync directory"))
}

/// Whether `inner` is `outer` or beneath it (both made absolute and resolved).
fn is_within(inner: &Path, outer: &Path) -> Result<bool, StageError> {
    let inner = std::fs::canonicalize(inner).map_err(store_err(inner, "resolve"))?;
    let outer = std::fs::canonicalize(outer).map_err(store_err(outer, "resolve"))?;
    Ok(inner.starts_with(outer))
}

/// The journal: every change of a commit, written before the first is applied.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    format: String,
    run: String,
    changes: Vec<Change>,
}

/// A run's staged writes over a workspace.
#[derive(Debug)]
pub struct Stage {
    dir: PathBuf,
    workspace: Workspace,
    run: RunId,
    ops: Vec<StagedOp>,
    view: BTreeMap<String, Staged>,
    /// Each path's content in the workspace when the run last read it there in full (before
    /// staging it), or else when it first staged it (`None`: absent), to refuse a commit over
    /// someone else's change made since ([`Stage::prepare`]).
    /// Kept in memory; a stage rebuilt from its ops after a restart is told them again from
    /// the record ([`Stage::remember_seen`]).
    seen: std::sync::Mutex<BTreeMap<String, Option<FileState>>>,
}

impl Stage {
    /// A new, empty stage for `run` over `workspace`, keeping its store in `dir` (created if
    /// missing; it must not be inside the workspace, and must not hold a commit journal).
    pub fn create(
        dir: impl AsRef<Path>,
        workspace: Workspace,
        run: RunId,
    ) -> Result<Stage, StageError> {
        Stage::from_ops(dir, workspace, run, Vec::new())
    }

    /// Rebuild a stage from its recorded ops (in the order they were staged), after a restart.
    /// Every write's content must be in the store with its recorded digest and size; each is
    /// read and hashed again.
    pub fn from_ops(
        dir: impl AsRef<Path>,
        workspace: Workspace,
        run: RunId,
        ops: impl IntoIterator<Item = StagedOp>,
    ) -> Result<Stage, StageError> {
        let dir = dir.as_ref().to_path_buf();
        let objects = dir.join(OBJECTS);
        std::fs::create_dir_all(&objects).map_err(store_err(&objects, "create"))?;
        if is_within(&dir, workspace.root())? {
            return Err(StageError::Layout {
                path: dir,
                problem: "a stage directory must be outside its workspace".into(),
            });
        }
        if dir.join(JOURNAL).exists() {
            return Err(StageError::PendingCommit { dir });
        }
        let mut stage = Stage {
            dir,
            workspace,
            run,
            ops: Vec::new(),
            view: BTreeMap::new(),
            seen: Default::default(),
        };
        for op in ops {
            file_segments(op.path()).map_err(FsError::from)?;
            if let StagedOp::Write { digest, size, .. } = &op {
                let found = stage.object_state(digest)?;
                if found.size != *size || found.digest != *digest {
                    return Err(StageError::Object {
                        digest: *digest,
                        problem: format!(
                            "holds {} ({} bytes), recorded as {} bytes",
                            found.digest, found.size, size
                        ),
                    });
                }
            }
            stage.record(op);
        }
        Ok(stage)
    }

    /// The run this stage belongs to.
    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// The stage directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The workspace the stage is over.
    pub fn workspace(&self) -> &Workspace {
        &self.workspace
    }

    /// The ops staged so far, in order.
    pub fn ops(&self) -> &[StagedOp] {
        &self.ops
    }

    fn object_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(OBJECTS).join(digest.to_hex())
    }

    fn object_state(&self, digest: &Digest) -> Result<FileState, StageError> {
        let path = self.object_path(digest);
        let file = std::fs::File::open(&path).map_err(|e| StageError::Object {
            digest: *digest,
            problem: format!("cannot be opened: {e}"),
        })?;
        hash_reader(file).map_err(store_err(&path, "read"))
    }

    /// Forget every op after the first `len` (say, a write whose record could not be made):
    /// the view becomes what those `len` ops stage. Their content stays in the store.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.ops.len() {
            return;
        }
        let kept: Vec<StagedOp> = self.ops.drain(..len).collect();
        self.ops.clear();
        self.view.clear();
        for op in kept {
            self.record(op);
        }
    }

    fn record(&mut self, op: StagedOp) {
        let state = match &op {
            StagedOp::Write { digest, size, .. } => Staged::Written(FileState {
                digest: *digest,
                size: *size,
            }),
            StagedOp::Delete { .. } => Staged::Deleted,
        };
        self.view.insert(op.path().to_string(), state);
        self.ops.push(op);
    }

    /// Note the workspace's content at `path` as the run stages it, unless already noted.
    /// (A path it cannot state, a parent that is a file say, is left unnoted: the commit
    /// checks it again anyway.)
    fn note_seen(&self, path: &str) {
        if self.lock_seen().contains_key(path) || self.view.contains_key(path) {
            return;
        }
        if let Ok(state) = self.workspace.check_writable(path) {
            self.seen_is(path, state);
        }
    }

    /// Note what the run saw at `path` (`None`: absent), as the record of an earlier
    /// process says (a read's digest, a staged op's [`StagedEffect::seen`]), unless already
    /// noted: a stage rebuilt after a restart then refuses a commit over a change made while
    /// the run was stopped.
    pub fn remember_seen(&self, path: &str, state: Option<FileState>) {
        self.seen_is(path, state);
    }

    /// What the run saw at `path` in the workspace (`Some(None)`: absent), if noted: what it
    /// last read there before staging it, or else what was there when it staged it.
    pub fn seen_of(&self, path: &str) -> Option<Option<FileState>> {
        self.lock_seen().get(path).copied()
    }

    fn seen_is(&self, path: &str, state: Option<FileState>) {
        self.lock_seen().entry(path.to_string()).or_insert(state);
    }

    /// The run was shown `path` read from the workspace in full (its digest and size; `None`:
    /// it was told nothing is there), so it has seen what is there now, whatever it saw before:
    /// an edit it read (an operator's, made while the run was suspended, say) is no change made
    /// behind its back. [`Stage::read`] does not note it itself: the caller does, once the
    /// read is on record and its output shown (a read nobody saw changes nothing here).
    pub fn saw(&self, path: &str, state: Option<FileState>) {
        self.lock_seen().insert(path.to_string(), state);
    }

    fn lock_seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<FileState>>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store `content` durably under its digest.
    fn store(&self, content: &[u8]) -> Result<FileState, StageError> {
        let state = FileState {
            digest: Digest::of(content),
            size: content.len() as u64,
        };
        let path = self.object_path(&state.digest);
        if path.exists() {
            return Ok(state);
        }
        let objects = self.dir.join(OBJECTS);
        let temp = objects.join(format!(".{}.{}.tmp", state.digest, std::process::id()));
        let mut file = std::fs::File::create(&temp).map_err(store_err(&temp, "create"))?;
        file.write_all(content).map_err(store_err(&temp, "write"))?;
        file.sync_all().map_err(store_err(&temp, "sync"))?;
        drop(file);
        std::fs::rename(&temp, &path).map_err(store_err(&path, "rename into place"))?;
        sync_dir(&objects)?;
        Ok(state)
    }

    /// Whether some staged write lies beneath `dir` (so `dir` exists in the staged view).
    fn implies_dir(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.view
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .any(|(_, s)| matches!(s, Staged::Written(_)))
    }

    /// Refuse if a proper prefix of `segs` is a file in the staged view (staged, or in the
    /// workspace and not deleted), a symlink, or anything but a directory. Returns whether every
    /// parent exists in the workspace.
    fn check_parents(&self, path: &str, segs: &[&str]) -> Result<(), FsError> {
        let mut in_workspace = true;
        for i in 0..segs.len() - 1 {
            let prefix = segs[..=i].join("/");
            // A file the run deletes is still a file where the workspace has it: a commit
            // cannot turn it into a directory (it would delete and create in one step), so
            // writing beneath it is refused like writing beneath any file.
            if let Some(Staged::Written(_)) = self.view.get(&prefix) {
                return Err(FsError::NotADirectory { path: prefix });
            }
            if !in_workspace {
                continue;
            }
            match self.workspace.kind_of(&prefix)? {
                Some(EntryKind::Dir) => {}
                Some(EntryKind::Symlink) => {
                    return Err(FsError::Confinement(ConfinementError {
                        path: path.to_string(),
                        problem: Confinement::Symlink { component: prefix },
                    }));
                }
                Some(_) => return Err(FsError::NotADirectory { path: prefix }),
                None => in_workspace = false,
            }
        }
        Ok(())
    }

    /// Check `path` can hold a staged file: its parents are directories in the staged view,
    /// it is not a directory there, and in the workspace it is absent or a regular file with
    /// one link.
    fn check_file_target(&self, path: &str, segs: &[&str]) -> Result<(), FsError> {
        check_unreserved(path, segs)?;
        self.check_parents(path, segs)?;
        if self.implies_dir(path) {
            return Err(FsError::IsADirectory {
                path: path.to_string(),
            });
        }
        if self.view.contains_key(path) {
            return Ok(());
        }
        match self.workspace.stat_path(path) {
            Ok(stat) => match stat.kind {
                EntryKind::File if stat.links > 1 => Err(FsError::Confinement(ConfinementError {
                    path: path.to_string(),
                    problem: Confinement::HardLink { links: stat.links },
                })),
                EntryKind::File => Ok(()),
                EntryKind::Dir => Err(FsError::IsADirectory {
                    path: path.to_string(),
                }),
                EntryKind::Symlink => Err(FsError::Confinement(ConfinementError {
                    path: path.to_string(),
                    problem: Confinement::Symlink {
                        component: path.to_string(),
                    },
                })),
                EntryKind::Other => Err(FsError::Confinement(ConfinementError {
                    path: path.to_string(),
                    problem: Confinement::Special("special file"),
                })),
            },
            Err(FsError::NotFound { .. } | FsError::NotADirectory { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stage writing `content` to `path` (`fs.write`, this run). The content is stored durably
    /// before the op is returned, so the runtime can record it and rebuild from the record.
    pub fn write(
        &mut self,
        auth: &Authorization,
        path: &str,
        content: &[u8],
    ) -> Result<StagedEffect, StageError> {
        let segs = file_segments(path).map_err(FsError::from)?;
        require(auth, "fs.write", &Resource::Path(path.to_string())).map_err(FsError::from)?;
        require_run(auth, &self.run).map_err(FsError::from)?;
        require_bytes(auth, "the content", content.len() as u64).map_err(FsError::from)?;
        if content.len() > MAX_STAGED_FILE_BYTES {
            return Err(StageError::Fs(FsError::Limit {
                path: path.to_string(),
                what: format!(
                    "content of {} bytes is over the {MAX_STAGED_FILE_BYTES}-byte limit",
                    content.len()
                ),
            }));
        }
        self.check_file_target(path, &segs)?;
        self.note_seen(path);
        let state = self.store(content)?;
        let op = StagedOp::Write {
            path: path.to_string(),
            digest: state.digest,
            size: state.size,
        };
        self.record(op.clone());
        Ok(StagedEffect {
            evidence: staged_evidence(auth, path, "write", Some(&state)),
            op,
            seen: self.seen_of(path),
        })
    }

    /// Stage deleting the file at `path` (`fs.delete`, this run). It must exist in the staged
    /// view as a regular file.
    pub fn delete(&mut self, auth: &Authorization, path: &str) -> Result<StagedEffect, StageError> {
        let segs = file_segments(path).map_err(FsError::from)?;
        require(auth, "fs.delete", &Resource::Path(path.to_string())).map_err(FsError::from)?;
        require_run(auth, &self.run).map_err(FsError::from)?;
        self.check_file_target(path, &segs)?;
        self.note_seen(path);
        let exists = match self.view.get(path) {
            Some(Staged::Written(_)) => true,
            Some(Staged::Deleted) => false,
            None => self.workspace.kind_of(path)? == Some(EntryKind::File),
        };
        if !exists {
            return Err(StageError::Fs(FsError::NotFound {
                path: path.to_string(),
            }));
        }
        let op = StagedOp::Delete {
            path: path.to_string(),
        };
        self.record(op.clone());
        Ok(StagedEffect {
            evidence: staged_evidence(auth, path, "delete", None),
            op,
            seen: self.seen_of(path),
        })
    }

    /// Whether `path` is written or deleted in this stage: a read of it sees the stage, not the
    /// workspace (a "not found" then says nothing of the workspace).
    pub fn is_staged(&self, path: &str) -> bool {
        self.view.contains_key(path)
    }

    /// Read `path` in the staged view (`fs.read`, this run), at most `limit` bytes.
    pub fn read(
        &self,
        auth: &Authorization,
        path: &str,
        limit: u64,
    ) -> Result<FileRead, StageError> {
        let segs = file_segments(path).map_err(FsError::from)?;
        require(auth, "fs.read", &Resource::Path(path.to_string())).map_err(FsError::from)?;
        require_run(auth, &self.run).map_err(FsError::from)?;
        let limit = cap_bytes(auth, 0, limit);
        self.check_parents(path, &segs)?;
        let (content, size, truncated, staged) = match self.view.get(path) {
            Some(Staged::Deleted) => {
                return Err(StageError::Fs(FsError::NotFound {
                    path: path.to_string(),
                }));
            }
            Some(Staged::Written(state)) => {
                let object = self.object_path(&state.digest);
                let file = std::fs::File::open(&object).map_err(store_err(&object, "open"))?;
                let mut content = Vec::new();
                file.take(limit.saturating_add(1))
                    .read_to_end(&mut content)
                    .map_err(store_err(&object, "read"))?;
                let truncated = content.len() as u64 > limit;
                if truncated {
                    content.truncate(limit as usize);
                }
                (content, state.size, truncated, true)
            }
            None => {
                // Found nothing: once the run is told so, the caller notes the path seen
                // absent ([`Stage::saw`]): a file someone adds before the run writes its own
                // there is a change the commit must not overwrite unseen.
                let (content, size, truncated) = self.workspace.read_file(path, limit)?;
                (content, size, truncated, false)
            }
        };
        let evidence = read_evidence(auth, path, &content, size, truncated, staged);
        Ok(FileRead {
            evidence,
            path: path.to_string(),
            content,
            size,
            truncated,
        })
    }

    /// List `dir` in the staged view (`fs.list`, this run): the workspace's entries with
    /// staged files added or replaced, deleted files left out, and directories that only staged
    /// files create shown as directories.
    pub fn list(&self, auth: &Authorization, dir: &str) -> Result<Listing, StageError> {
        let segs = dir_segments(dir).map_err(FsError::from)?;
        require(auth, "fs.list", &Resource::Dir(dir.to_string())).map_err(FsError::from)?;
        require_run(auth, &self.run).map_err(FsError::from)?;
        if !segs.is_empty() {
            // The directory itself must not be a staged file.
            let mut with_child = segs.clone();
            with_child.push("_");
            self.check_parents(dir, &with_child)?;
        }
        let listing = self.list_merged(dir)?;
        Ok(listing)
    }

    fn list_merged(&self, dir: &str) -> Result<Listing, StageError> {
        let (mut entries, non_utf8_names, found) = match self.workspace.list_dir(dir) {
            Ok(listing) => (
                listing
                    .entries
                    .into_iter()
                    .map(|e| (e.name.clone(), e))
                    .collect::<BTreeMap<_, _>>(),
                listing.non_utf8_names,
                true,
            ),
            Err(FsError::NotFound { .. }) => (BTreeMap::new(), 0, false),
            Err(e) => return Err(e.into()),
        };
        let prefix = if dir == "." {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut staged_any = false;
        for (path, state) in self
            .view
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
        {
            let rest = &path[prefix.len()..];
            match (rest.split_once('/'), state) {
                (Some((child, _)), Staged::Written(_)) => {
                    staged_any = true;
                    entries.entry(child.to_string()).or_insert(Entry {
                        name: child.to_string(),
                        kind: EntryKind::Dir,
                        size: 0,
                    });
                }
                (Some(_), Staged::Deleted) => {}
                (None, Staged::Written(file)) => {
                    staged_any = true;
                    entries.insert(
                        rest.to_string(),
                        Entry {
                            name: rest.to_string(),
                            kind: EntryKind::File,
                            size: file.size,
                        },
                    );
                }
                (None, Staged::Deleted) => {
                    entries.remove(rest);
                }
            }
        }
        if !found && !staged_any {
            return Err(StageError::Fs(FsError::NotFound {
                path: dir.to_string(),
            }));
        }
        Ok(Listing {
            dir: dir.to_string(),
            entries: entries.into_values().collect(),
            non_utf8_names,
        })
    }

    /// What is at `path` in the staged view (`fs.read` on a file path, `fs.list` on a
    /// directory path; this run).
    pub fn stat(&self, auth: &Authorization, path: &str) -> Result<Stat, StageError> {
        authorize_stat(auth, path)?;
        require_run(auth, &self.run).map_err(FsError::from)?;
        if path != "." {
            let segs = dir_segments(path).map_err(FsError::from)?;
            self.check_parents(path, &segs)?;
        }
        match self.view.get(path) {
            Some(Staged::Written(state)) => {
                return Ok(Stat {
                    path: path.to_string(),
                    kind: EntryKind::File,
                    size: state.size,
                    links: 1,
                });
            }
            Some(Staged::Deleted) if !self.implies_dir(path) => {
                return Err(StageError::Fs(FsError::NotFound {
                    path: path.to_string(),
                }));
            }
            _ => {}
        }
        match self.workspace.stat_path(path) {
            Ok(stat) => Ok(stat),
            Err(FsError::NotFound { .. }) if self.implies_dir(path) => Ok(Stat {
                path: path.to_string(),
                kind: EntryKind::Dir,
                size: 0,
                links: 1,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The run's diff: every path whose content the commit would change, in path order, with
    /// its state in the workspace now and after the commit. Every path's confinement is checked
    /// again (reading the workspace side).
    pub fn diff(&self) -> Result<Vec<Change>, StageError> {
        let mut changes = Vec::new();
        for (path, state) in &self.view {
            let before = self.workspace.check_writable(path)?;
            let after = match state {
                Staged::Written(s) => Some(*s),
                Staged::Deleted => None,
            };
            let Some(kind) = ChangeKind::between(&before, &after) else {
                continue;
            };
            changes.push(Change {
                path: path.clone(),
                kind,
                before,
                after,
            });
        }
        Ok(changes)
    }

    /// Make a copy of the workspace with the staged diff applied at `dest` (created if missing;
    /// it must be empty and outside the workspace), for validation commands. The workspace is
    /// not changed.
    pub fn materialize(&self, dest: impl AsRef<Path>) -> Result<Materialized, StageError> {
        let dest = dest.as_ref().to_path_buf();
        std::fs::create_dir_all(&dest).map_err(store_err(&dest, "create"))?;
        if std::fs::read_dir(&dest)
            .map_err(store_err(&dest, "list"))?
            .next()
            .is_some()
        {
            return Err(StageError::Layout {
                path: dest,
                problem: "the destination of a materialised copy must be empty".into(),
            });
        }
        if is_within(&dest, self.workspace.root())? {
            return Err(StageError::Layout {
                path: dest,
                problem: "a materialised copy must be outside the workspace".into(),
            });
        }
        let (counts, skipped) = self.workspace.copy_into(&dest)?;
        let copy = Workspace::open(&dest)?;
        for (path, state) in &self.view {
            match state {
                Staged::Written(file) => {
                    copy.apply_write(path, &self.object_path(&file.digest), file, false)?;
                }
                Staged::Deleted => copy.apply_delete(path, false)?,
            }
        }
        Ok(Materialized {
            dir: dest,
            files: counts.files,
            dirs: counts.dirs,
            symlinks: counts.symlinks,
            skipped,
        })
    }

    /// Abort: remove the stage directory and everything staged. The workspace is not touched.
    /// Refused while a commit journal is present (an interrupted commit must be recovered).
    pub fn discard(self) -> Result<(), StageError> {
        if self.dir.join(JOURNAL).exists() {
            return Err(StageError::PendingCommit { dir: self.dir });
        }
        std::fs::remove_dir_all(&self.dir).map_err(store_err(&self.dir, "remove"))
    }

    /// Apply the staged diff to the workspace, crash-safely (see the module documentation).
    pub fn commit(self) -> Result<CommitReport, StageError> {
        self.commit_with_hook(&mut |_| {})
    }

    /// [`Stage::commit`], calling `hook` at each [`CommitPoint`]: when the diff is checked,
    /// when the journal is durable, and after each change is applied.
    pub fn commit_with_hook(
        self,
        hook: &mut dyn FnMut(CommitPoint<'_>),
    ) -> Result<CommitReport, StageError> {
        let dir = self.dir.clone();
        let report = self.apply_with_hook(hook)?;
        finish(&dir)?;
        Ok(report)
    }

    /// [`Stage::commit_with_hook`] without its last step: the journal stays in the stage
    /// directory once every change is applied, so a caller that records the commit elsewhere
    /// removes it ([`release`]) only after that record is durable. Until then a crash leaves
    /// the journal, and [`roll_forward`] completes the commit again (its changes are
    /// idempotent) rather than anyone taking it for a commit that never happened.
    pub fn apply_with_hook(
        self,
        hook: &mut dyn FnMut(CommitPoint<'_>),
    ) -> Result<CommitReport, StageError> {
        let changes = self.prepare()?;
        self.apply_prepared(changes, hook)
    }

    /// What a commit would apply, checked before its commit point: the diff ([`Stage::diff`]),
    /// refused if a path changed in the workspace since the run last read it or staged it
    /// ([`StageError::Conflict`]), or if something other than a file stands where a write's
    /// temporary goes. An error here leaves the workspace and the stage as they were.
    pub fn prepare(&self) -> Result<Vec<Change>, StageError> {
        let changes = self.diff()?;
        let seen = self.lock_seen();
        for c in &changes {
            if let Some(first) = seen.get(&c.path)
                && *first != c.before
            {
                return Err(StageError::Conflict {
                    path: c.path.clone(),
                    seen: *first,
                    now: c.before,
                });
            }
            if c.after.is_some() {
                self.workspace.check_temp_slot(&c.path)?;
            }
        }
        Ok(changes)
    }

    /// [`Stage::apply_with_hook`] with the changes [`Stage::prepare`] gave.
    pub fn apply_prepared(
        self,
        changes: Vec<Change>,
        hook: &mut dyn FnMut(CommitPoint<'_>),
    ) -> Result<CommitReport, StageError> {
        hook(CommitPoint::Prepared { changes: &changes });
        let journal = Journal {
            format: JOURNAL_FORMAT.into(),
            run: self.run.to_string(),
            changes,
        };
        if let Err(e) = write_journal(&self.dir, &journal) {
            return Err(unwrite_journal(&self.dir, e));
        }
        hook(CommitPoint::JournalDurable);
        let objects = self.dir.join(OBJECTS);
        for (index, change) in journal.changes.iter().enumerate() {
            apply_change(&self.workspace, &objects, change, true).map_err(|source| {
                StageError::Apply {
                    index,
                    path: change.path.clone(),
                    source: Box::new(source),
                }
            })?;
            hook(CommitPoint::Applied { index, change });
        }
        Ok(CommitReport {
            changes: journal.changes,
        })
    }
}

fn staged_evidence(
    auth: &Authorization,
    path: &str,
    op: &'static str,
    content: Option<&FileState>,
) -> Evidence {
    Evidence {
        effect: EffectClass::InternalWrite,
        capability: if op == "delete" {
            "fs.delete"
        } else {
            "fs.write"
        }
        .into(),
        target: Resource::Path(path.to_string()),
        grant: Some(auth.grant().to_string()),
        inputs: content
            .map(|s| Digested {
                name: "content".into(),
                digest: s.digest,
                bytes: s.size,
            })
            .into_iter()
            .collect(),
        outputs: vec![],
        detail: Detail::Staged { op },
    }
}

fn write_journal(dir: &Path, journal: &Journal) -> Result<(), StageError> {
    let temp = dir.join(JOURNAL_TEMP);
    let path = dir.join(JOURNAL);
    let bytes = serde_json::to_vec(journal).map_err(|e| StageError::Journal {
        path: path.clone(),
        problem: e.to_string(),
    })?;
    let mut file = std::fs::File::create(&temp).map_err(store_err(&temp, "create"))?;
    file.write_all(&bytes).map_err(store_err(&temp, "write"))?;
    file.sync_all().map_err(store_err(&temp, "sync"))?;
    drop(file);
    std::fs::rename(&temp, &path).map_err(store_err(&path, "rename into place"))?;
    sync_dir(dir)
}

/// After a journal failed to be written: take away whatever of it reached the directory (a
/// renamed journal whose directory sync failed would otherwise be rolled forward by recovery,
/// after the run was told its commit failed). [`StageError::JournalUnwritten`] once no journal
/// is left; the write's own error when that cannot be made sure of (recovery then decides by
/// what it finds).
fn unwrite_journal(dir: &Path, failed: StageError) -> StageError {
    let gone = |name: &str| match std::fs::remove_file(dir.join(name)) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    };
    if gone(JOURNAL_TEMP) && gone(JOURNAL) && sync_dir(dir).is_ok() {
        StageError::JournalUnwritten {
            source: Box::new(failed),
        }
    } else {
        failed
    }
}

fn apply_change(
    workspace: &Workspace,
    objects: &Path,
    change: &Change,
    durable: bool,
) -> Result<(), FsError> {
    match &change.after {
        Some(state) => workspace.apply_write(
            &change.path,
            &objects.join(state.digest.to_hex()),
            state,
            durable,
        ),
        None => workspace.apply_delete(&change.path, durable),
    }
}

/// Remove the journal (durably), then the rest of the stage directory.
fn finish(dir: &Path) -> Result<(), StageError> {
    let journal = dir.join(JOURNAL);
    std::fs::remove_file(&journal).map_err(store_err(&journal, "remove"))?;
    sync_dir(dir)?;
    std::fs::remove_dir_all(dir).map_err(store_err(dir, "remove"))
}

/// Whether the stage directory holds a commit journal: a commit passed its commit point and
/// did not finish. Such a commit can only be completed ([`recover`]), never discarded.
pub fn commit_pending(stage_dir: impl AsRef<Path>) -> bool {
    stage_dir.as_ref().join(JOURNAL).exists()
}

/// After a crash: if the stage directory holds a commit journal, roll that commit forward
/// (apply every change again; they are idempotent) and finish it; otherwise report nothing
/// pending, touching neither the workspace nor the stage (a partly written journal, never
/// renamed into place, is removed).
pub fn recover(stage_dir: impl AsRef<Path>, workspace: &Workspace) -> Result<Recovery, StageError> {
    let dir = stage_dir.as_ref();
    let rec = roll_forward(dir, workspace)?;
    if matches!(rec, Recovery::RolledForward { .. }) {
        finish(dir)?;
    }
    Ok(rec)
}

/// Remove a stage directory once its commit is recorded: the journal first (durably), then
/// the rest. A directory that is already gone is not an error.
pub fn release(stage_dir: impl AsRef<Path>) -> Result<(), StageError> {
    let dir = stage_dir.as_ref();
    if dir.join(JOURNAL).exists() {
        return finish(dir);
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(store_err(dir, "remove")(e)),
        _ => Ok(()),
    }
}

/// The changes of the commit pending in a stage directory, as its journal names them, without
/// applying anything. Fails if no commit is pending or its journal cannot be read.
pub fn pending_changes(stage_dir: impl AsRef<Path>) -> Result<Vec<Change>, StageError> {
    let path = stage_dir.as_ref().join(JOURNAL);
    if !path.exists() {
        return Err(StageError::Journal {
            path,
            problem: "no commit is pending".to_string(),
        });
    }
    read_journal(&path).map(|j| j.changes)
}

/// Give up a commit that passed its commit point and cannot be completed (its workspace is
/// gone, say): the workspace may hold any part of it. Nothing is deleted: the whole stage
/// directory, journal and staged contents, is moved (durably) to `keep_as`, which must not
/// exist, so the operator keeps what the commit would have written and nothing completes it
/// later by accident. Fails before moving anything if no commit is pending or `keep_as`
/// exists; a failure to sync the directories after the move is reported, the move stands.
pub fn abandon(stage_dir: impl AsRef<Path>, keep_as: impl AsRef<Path>) -> Result<(), StageError> {
    let (dir, keep_as) = (stage_dir.as_ref(), keep_as.as_ref());
    if !commit_pending(dir) {
        return Err(StageError::Journal {
            path: dir.join(JOURNAL),
            problem: "no commit is pending: nothing to abandon".to_string(),
        });
    }
    if keep_as.exists() {
        return Err(store_err(keep_as, "keep the abandoned commit at")(
            io::Error::new(io::ErrorKind::AlreadyExists, "the path exists"),
        ));
    }
    std::fs::rename(dir, keep_as).map_err(store_err(keep_as, "move the stage to"))?;
    for parent in [keep_as.parent(), dir.parent()].into_iter().flatten() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// [`recover`] without its last step: the journal's changes are applied (again) and the
/// journal is kept until the caller has recorded the commit and calls [`release`].
pub fn roll_forward(
    stage_dir: impl AsRef<Path>,
    workspace: &Workspace,
) -> Result<Recovery, StageError> {
    let dir = stage_dir.as_ref();
    let path = dir.join(JOURNAL);
    if !path.exists() {
        let temp = dir.join(JOURNAL_TEMP);
        if temp.exists() {
            std::fs::remove_file(&temp).map_err(store_err(&temp, "remove"))?;
        }
        return Ok(Recovery::NothingPending);
    }
    let mut journal = read_journal(&path)?;
    let objects = dir.join(OBJECTS);
    let failed = |index: usize, path: &str, source| StageError::Apply {
        index,
        path: path.to_string(),
        source: Box::new(source),
    };
    // What each change replaces now: the journal's `before` if the crash came before it was
    // applied, its `after` if after. Anything else was put there since the crash, and is what
    // the completed commit replaces: the journal is rewritten to say so before anything is
    // applied, so a second crash does not lose it.
    let mut corrected = false;
    for (index, change) in journal.changes.iter_mut().enumerate() {
        let now = workspace
            .check_writable(&change.path)
            .map_err(|e| failed(index, &change.path, e))?;
        if now != change.after && now != change.before {
            change.before = now;
            if let Some(kind) = ChangeKind::between(&change.before, &change.after) {
                change.kind = kind;
            }
            corrected = true;
        }
    }
    if corrected {
        write_journal(dir, &journal)?;
    }
    for (index, change) in journal.changes.iter().enumerate() {
        apply_change(workspace, &objects, change, true)
            .map_err(|e| failed(index, &change.path, e))?;
    }
    Ok(Recovery::RolledForward {
        changes: journal.changes,
    })
}

fn read_journal(path: &Path) -> Result<Journal, StageError> {
    let bad = |problem: String| StageError::Journal {
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(store_err(path, "open"))?;
    let mut bytes = Vec::new();
    file.take(MAX_JOURNAL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(store_err(path, "read"))?;
    if bytes.len() as u64 > MAX_JOURNAL_BYTES {
        return Err(bad(format!("larger than {MAX_JOURNAL_BYTES} bytes")));
    }
    let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if journal.format != JOURNAL_FORMAT {
        return Err(bad(format!("unknown format {:?}", journal.format)));
    }
    for change in &journal.changes {
        file_segments(&change.path).map_err(|e| bad(e.to_string()))?;
    }
    Ok(journal)
}
