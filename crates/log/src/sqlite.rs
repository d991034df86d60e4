//! The embedded backend: one SQLite file, WAL journal, `synchronous=FULL` (a commit returns only
//! once it is on disk), and group commit: an append that finds no commit under way commits on
//! its caller's thread; otherwise it queues for the writer thread, which commits all queued
//! appends as one group, so many appenders share one sync.
//!
//! Tables (format `ice-log/2`):
//! - `events`: the record: position, indexed columns, hash, `log_prev` (the hash of the event
//!   before it in the log: a chain over the whole log, which records the order events were
//!   appended in), canonical body;
//! - `tree`: every complete perfect Merkle subtree of at least the file's tree floor (8 unless
//!   created otherwise), keyed by the leaf that completed it. A node below the floor covers
//!   fewer than 256 events and is computed from their hashes when a proof needs it, so an
//!   append writes a tree row once per 256 events instead of two per event, and `verify` reads
//!   one row per event;
//! - `head`: one row, the log's size and last hash as of the last commit (a tail of events
//!   deleted by a careless tool is a log shorter than its head says);
//! - `blobs` (content-addressed payload fields), `checkpoints` (signed notes), `meta` (format,
//!   tree floor).
//!
//! Triggers refuse UPDATE and DELETE on the record tables, and a shrinking head: the file is
//! append-only even to a careless tool, and `verify` detects what a deliberate one does.
//!
//! Files of the first format, `ice-log/1` (every tree node stored, leaves included; no
//! `log_prev`, no `head`), are still read and appended to as they are; `ice migrate` copies one
//! into a new file of the current format.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use ice_kernel::blob::blob_refs;
use ice_kernel::{Digest, EventId, RunId, SealedBatch};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::merkle::{Frontier, NodeId, leaf_hash};
use crate::{
    AppendReceipt, EventLog, EventPage, Extent, LogError, StoredCheckpoint, StoredEvent, StoredRef,
};

/// The format this code writes (and reads).
pub const FORMAT: &str = "ice-log/2";
/// The first format, which this code still reads and appends to.
pub const FORMAT_1: &str = "ice-log/1";
/// The tree floor of a new file (see [`EventLog::tree_floor`]).
pub const DEFAULT_TREE_FLOOR: u8 = 8;
/// The highest tree floor a file may have: a node below it is computed from at most this many
/// events' hashes (`2^16`) when a proof needs it.
pub const MAX_TREE_FLOOR: u8 = 16;
/// Most append requests committed in one group.
pub const MAX_GROUP_REQUESTS: usize = 1024;
/// Most rows one read returns.
pub const MAX_READ_ROWS: usize = 100_000;
/// Most queued write requests before appenders wait (back-pressure, not unbounded memory).
const WRITE_QUEUE: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events(
  log_seq INTEGER PRIMARY KEY,
  run_id TEXT NOT NULL,
  run_seq INTEGER NOT NULL,
  type TEXT NOT NULL,
  hash BLOB NOT NULL,
  log_prev BLOB NOT NULL,
  body BLOB NOT NULL,
  UNIQUE(run_id, run_seq)
);
CREATE TABLE head(one INTEGER PRIMARY KEY CHECK (one = 0), size INTEGER NOT NULL, last BLOB NOT NULL);
INSERT INTO head(one, size, last) VALUES(0, 0, zeroblob(32));
CREATE TRIGGER head_only_grows BEFORE UPDATE ON head WHEN NEW.size < OLD.size BEGIN SELECT RAISE(FAIL, 'the event log only grows'); END;
CREATE TRIGGER head_no_delete BEFORE DELETE ON head BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE INDEX events_run_start ON events(log_seq) WHERE run_seq = 0;
CREATE TABLE tree(leaf_end INTEGER NOT NULL, level INTEGER NOT NULL, hash BLOB NOT NULL,
  PRIMARY KEY(leaf_end, level)) WITHOUT ROWID;
CREATE TABLE blobs(digest BLOB PRIMARY KEY, bytes BLOB NOT NULL);
CREATE TABLE checkpoints(size INTEGER PRIMARY KEY, note TEXT NOT NULL);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER tree_no_update BEFORE UPDATE ON tree BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER tree_no_delete BEFORE DELETE ON tree BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER blobs_no_update BEFORE UPDATE ON blobs BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER blobs_no_delete BEFORE DELETE ON blobs BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
";

/// How to open a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Reads only; nothing in the file can change.
    ReadOnly,
    /// Reads and appends.
    ReadWrite,
}

fn storage(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> LogError {
    // Converted only on the error path: most contexts are static text, and this runs for
    // every statement of every commit.
    move |e| {
        if damaged(&e) {
            LogError::Corrupt {
                what: format!("{}: {e}", context.into()),
            }
        } else {
            LogError::Storage {
                context: context.into(),
                message: e.to_string(),
            }
        }
    }
}

/// Whether SQLite's error says the file is damaged (a malformed page, a value of another type
/// than ICE stores in that column), not that the engine failed (I/O, a lock, a full disk):
/// damage is a verdict on the log (`ice verify` exits 5), a failure is not.
fn damaged(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        }
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => true,
        _ => false,
    }
}

enum WriteReq {
    Append(
        SealedBatch,
        oneshot::Sender<Result<AppendReceipt, LogError>>,
    ),
    Checkpoint(StoredCheckpoint, oneshot::Sender<Result<(), LogError>>),
}

/// How a file stores the tree and the log's order, by its format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// The lowest stored tree level.
    floor: u8,
    /// `ice-log/2`: events carry `log_prev` and the `head` row holds the size.
    linked: bool,
}

impl Layout {
    /// The columns every event read selects, in [`row_event`]'s order.
    fn cols(self) -> &'static str {
        if self.linked {
            "log_seq, run_id, run_seq, type, hash, log_prev, body"
        } else {
            "log_seq, run_id, run_seq, type, hash, NULL, body"
        }
    }
}

/// The embedded SQLite log.
pub struct SqliteLog {
    path: PathBuf,
    layout: Layout,
    writer: Option<mpsc::SyncSender<WriteReq>>,
    writer_thread: Option<JoinHandle<()>>,
    /// The write connection and the tree's right edge; held by whoever commits.
    core: Option<Arc<Mutex<Core>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

fn apply_write_pragmas(conn: &Connection, path: &Path) -> Result<(), LogError> {
    let ctx = || format!("configuring {}", path.display());
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| not_a_log(path, e, ctx()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LogError::Storage {
            context: ctx(),
            message: format!("journal_mode is {mode}, not wal"),
        });
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=10000;")
        .map_err(storage(ctx()))?;
    Ok(())
}

fn not_a_log(path: &Path, e: rusqlite::Error, _ctx: String) -> LogError {
    // A file SQLite finds damaged (its header or a page overwritten) is a damaged log, not
    // someone else's file: a verdict for `ice verify`. A file it cannot open (permissions,
    // a read-only directory for the WAL's index) is neither.
    if damaged(&e) {
        return LogError::Corrupt {
            what: format!(
                "{}: not an ICE log, or one too damaged to read: {e}",
                path.display()
            ),
        };
    }
    // One SQLite could not open or read at all says nothing about what the file is: the
    // reason is the machine's (the probe met "not an ICE log" for a lack of file
    // descriptors, a WAL removed under a running process, a directory).
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        use rusqlite::ErrorCode as C;
        if matches!(
            f.code,
            C::CannotOpen
                | C::SystemIoFailure
                | C::PermissionDenied
                | C::ReadOnly
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::OutOfMemory
                | C::DiskFull
        ) {
            let hint = if path.is_dir() {
                " (it is a directory, not a log file)"
            } else if f.code == C::CannotOpen {
                " (a missing or unwritable directory, permissions, or too many open files)"
            } else {
                ""
            };
            return LogError::Storage {
                context: format!("opening the log {}", path.display()),
                message: format!("{e}{hint}"),
            };
        }
    }
    LogError::NotALog {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn check_format(conn: &Connection, path: &Path) -> Result<Layout, LogError> {
    let meta = |key: &str| -> Result<Option<String>, LogError> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| not_a_log(path, e, String::new()))
    };
    match meta("format")? {
        Some(f) if f == FORMAT => {
            let floor = meta("tree_floor")?.unwrap_or_default();
            match floor.parse::<u8>() {
                Ok(floor) if floor <= MAX_TREE_FLOOR => Ok(Layout {
                    floor,
                    linked: true,
                }),
                _ => Err(LogError::NotALog {
                    path: path.display().to_string(),
                    reason: format!(
                        "its tree floor {floor:?} is not a level from 0 to {MAX_TREE_FLOOR}"
                    ),
                }),
            }
        }
        Some(f) if f == FORMAT_1 => {
            // A current file whose format record was set back to the first format would be
            // read without its `log_prev` links and head (a cut tail would pass unnoticed).
            let head: bool = conn
                .query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'head'",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| not_a_log(path, e, String::new()))?;
            let linked: bool = conn
                .query_row(
                    "SELECT count(*) > 0 FROM pragma_table_info('events') WHERE name = 'log_prev'",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| not_a_log(path, e, String::new()))?;
            if head || linked {
                return Err(LogError::Corrupt {
                    what: format!(
                        "{}: its format record says {FORMAT_1:?}, but it has the tables of {FORMAT:?} (the head record, each event's log_prev link): the format record was altered, which would skip those checks",
                        path.display()
                    ),
                });
            }
            Ok(Layout {
                floor: 0,
                linked: false,
            })
        }
        Some(f) => Err(LogError::NotALog {
            path: path.display().to_string(),
            reason: format!("format {f:?}; this ice reads {FORMAT:?} and {FORMAT_1:?}"),
        }),
        None => Err(LogError::NotALog {
            path: path.display().to_string(),
            reason: "no format record".into(),
        }),
    }
}

impl SqliteLog {
    /// Create a new, empty log file (tree floor [`DEFAULT_TREE_FLOOR`]). Fails if the file
    /// exists.
    pub fn create(path: &Path) -> Result<SqliteLog, LogError> {
        SqliteLog::create_with_tree_floor(path, DEFAULT_TREE_FLOOR)
    }

    /// Create a new, empty log file that stores the tree's nodes from level `floor` up (see
    /// [`EventLog::tree_floor`]; at most [`MAX_TREE_FLOOR`]). Fails if the file exists.
    pub fn create_with_tree_floor(path: &Path, floor: u8) -> Result<SqliteLog, LogError> {
        if floor > MAX_TREE_FLOOR {
            return Err(LogError::Invalid(format!(
                "tree floor {floor}: the highest is {MAX_TREE_FLOOR}"
            )));
        }
        if path.exists() {
            return Err(LogError::Invalid(format!(
                "{} already exists",
                path.display()
            )));
        }
        let mut conn =
            Connection::open(path).map_err(storage(format!("creating {}", path.display())))?;
        apply_write_pragmas(&conn, path)?;
        let tx = conn.transaction().map_err(storage("creating schema"))?;
        tx.execute_batch(SCHEMA)
            .map_err(storage("creating schema"))?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES('format', ?1)",
            [FORMAT],
        )
        .map_err(storage("creating schema"))?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES('taxonomy', ?1)",
            [ice_kernel::TAXONOMY_VERSION.to_string()],
        )
        .map_err(storage("creating schema"))?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES('tree_floor', ?1)",
            [floor.to_string()],
        )
        .map_err(storage("creating schema"))?;
        tx.commit().map_err(storage("creating schema"))?;
        drop(conn);
        SqliteLog::open(path, Mode::ReadWrite)
    }

    /// Open an existing log.
    pub fn open(path: &Path, mode: Mode) -> Result<SqliteLog, LogError> {
        if !path.is_file() {
            return Err(LogError::NotALog {
                path: path.display().to_string(),
                reason: if path.is_dir() {
                    "it is a directory, not a log file".into()
                } else {
                    "no such file".into()
                },
            });
        }
        let reader = open_reader(path)?;
        let layout = check_format(&reader, path)?;
        let (writer, writer_thread, core) = match mode {
            Mode::ReadOnly => (None, None, None),
            Mode::ReadWrite => {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| not_a_log(path, e, String::new()))?;
                apply_write_pragmas(&conn, path)?;
                let state = WriterState::load(&conn, layout)?;
                let core = Arc::new(Mutex::new(Core {
                    conn,
                    state,
                    tips: Tips::default(),
                }));
                let (tx, rx) = mpsc::sync_channel(WRITE_QUEUE);
                let thread_core = core.clone();
                let handle = std::thread::Builder::new()
                    .name("ice-log-writer".into())
                    .spawn(move || writer_loop(thread_core, rx))
                    .map_err(|e| LogError::Storage {
                        context: "starting the writer thread".into(),
                        message: e.to_string(),
                    })?;
                (Some(tx), Some(handle), Some(core))
            }
        };
        Ok(SqliteLog {
            path: path.to_path_buf(),
            layout,
            writer,
            writer_thread,
            core,
            readers: Arc::new(Mutex::new(vec![reader])),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let pool = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.lock().ok().and_then(|mut p| p.pop());
            let conn = match conn {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let out = f(&conn);
            if let Ok(mut p) = pool.lock()
                && p.len() < 8
            {
                p.push(conn);
            }
            out
        })
        .await
        .map_err(|e| LogError::Storage {
            context: "reading the log".into(),
            message: e.to_string(),
        })?
    }

    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> WriteReq,
    ) -> Result<T, LogError> {
        let w = self.writer.as_ref().ok_or(LogError::ReadOnly)?;
        let (tx, rx) = oneshot::channel();
        let req = make(tx);
        // When no commit is under way, commit right here: the caller waits for the disk sync
        // anyway, and handing the request to the writer thread and back costs two wake-ups.
        // Under load the writer thread gathers concurrent requests into one group commit.
        let req = match &self.core {
            Some(core) => match core.try_lock() {
                Ok(mut c) => {
                    let commit = move || {
                        let Core { conn, state, tips } = &mut *c;
                        commit_group(conn, state, tips, vec![req]);
                    };
                    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                        // Let the runtime move its other tasks elsewhere meanwhile.
                        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                            tokio::task::block_in_place(commit)
                        }
                        _ => commit(),
                    }
                    None
                }
                Err(_) => Some(req),
            },
            None => Some(req),
        };
        if let Some(req) = req {
            match w.try_send(req) {
                Ok(()) => {}
                Err(mpsc::TrySendError::Disconnected(_)) => return Err(LogError::Closed),
                // The queue is bounded; waiting for room happens off the async threads.
                Err(mpsc::TrySendError::Full(req)) => {
                    let w = w.clone();
                    tokio::task::spawn_blocking(move || w.send(req).map_err(|_| LogError::Closed))
                        .await
                        .map_err(|_| LogError::Closed)??;
                }
            }
        }
        rx.await.map_err(|_| LogError::Closed)?
    }
}

impl Drop for SqliteLog {
    fn drop(&mut self) {
        self.writer.take();
        if let Some(h) = self.writer_thread.take() {
            let _ = h.join();
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| not_a_log(path, e, String::new()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(storage(format!(
            "configuring a reader of {}",
            path.display()
        )))?;
    // A fixed page cache per reader, and no memory map (mapped pages would count against the
    // process as a scan touches them): memory stays bounded however long the log grows.
    // This reads the file's header: a file SQLite cannot read is not a log.
    conn.execute_batch("PRAGMA mmap_size=0; PRAGMA cache_size=-8192;")
        .map_err(|e| not_a_log(path, e, String::new()))?;
    Ok(conn)
}

/// What the writer keeps in memory: the tree's right edge (O(log n) hashes) and the last
/// event's hash (the next event's `log_prev`).
#[derive(Clone)]
struct WriterState {
    layout: Layout,
    frontier: Frontier,
    last: Digest,
}

/// The log's size as of the last commit: the head row (`ice-log/2`), or one past the last
/// stored position (`ice-log/1`).
fn log_size(conn: &Connection, layout: Layout) -> Result<u64, LogError> {
    Ok(log_head(conn, layout)?.0)
}

fn log_head(conn: &Connection, layout: Layout) -> Result<(u64, Digest), LogError> {
    if !layout.linked {
        let size = conn
            .prepare_cached("SELECT COALESCE(MAX(log_seq) + 1, 0) FROM events")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map_err(storage("reading the log size"))?;
        return Ok((size as u64, Digest::GENESIS));
    }
    let head: Option<(i64, Vec<u8>)> = conn
        .prepare_cached("SELECT size, last FROM head WHERE one = 0")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(storage("reading the log's head"))?;
    match head {
        Some((size, last)) if size >= 0 && last.len() == 32 => Ok((
            size as u64,
            Digest(last.as_slice().try_into().unwrap_or([0; 32])),
        )),
        Some((size, last)) => Err(LogError::Corrupt {
            what: format!(
                "the head record says size {size} with a last hash of {} bytes",
                last.len()
            ),
        }),
        None => Err(LogError::Corrupt {
            what: "the head record (the log's size) is missing".into(),
        }),
    }
}

impl WriterState {
    fn load(conn: &Connection, layout: Layout) -> Result<WriterState, LogError> {
        let (size, last) = log_head(conn, layout)?;
        let mut missing = None;
        let frontier = Frontier::from_nodes(size, |id| match node_at(conn, layout, id) {
            Ok(Some(h)) => Some(h),
            _ => {
                missing = Some(id);
                None
            }
        });
        match frontier {
            Some(frontier) => Ok(WriterState {
                layout,
                frontier,
                last,
            }),
            None => Err(LogError::Corrupt {
                what: format!(
                    "tree node {missing:?} of a log of {size} events is missing; run `ice verify`"
                ),
            }),
        }
    }
}

/// Whether the blob `digest` is stored (`false`: it is not); an error if what is stored under
/// that name is not the bytes it names (the store was altered: nothing may be appended that
/// refers to it).
fn stored_blob_intact(conn: &Connection, digest: &Digest) -> Result<bool, LogError> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached("SELECT bytes FROM blobs WHERE digest = ?1")
        .and_then(|mut s| s.query_row([&digest.0[..]], |r| r.get(0)).optional())
        .map_err(storage("looking up a blob"))?;
    match bytes {
        None => Ok(false),
        Some(b) if Digest::of(&b) == *digest => Ok(true),
        Some(b) => Err(LogError::Corrupt {
            what: format!(
                "blob {digest} is stored with {} bytes that do not hash to its name: the store was altered; nothing was appended (run `ice verify`)",
                b.len()
            ),
        }),
    }
}

/// A perfect subtree's hash: read where it is stored (at or above the floor), computed from
/// the hashes of the events it covers below it. `None` if it is not stored, or an event it
/// covers is missing.
fn node_at(conn: &Connection, layout: Layout, id: NodeId) -> Result<Option<Digest>, LogError> {
    if id.level >= layout.floor {
        return get_node(conn, id);
    }
    let (lo, n) = (id.index << id.level, 1u64 << id.level);
    let mut s = conn
        .prepare_cached(
            "SELECT log_seq, hash FROM events WHERE log_seq >= ?1 ORDER BY log_seq LIMIT ?2",
        )
        .map_err(storage("reading event hashes for a tree node"))?;
    let mut rows = s
        .query(params![lo as i64, n as i64])
        .map_err(storage("reading event hashes for a tree node"))?;
    let mut sub = Frontier::new();
    while let Some(r) = rows
        .next()
        .map_err(storage("reading event hashes for a tree node"))?
    {
        let seq = r
            .get::<_, i64>(0)
            .map_err(storage("reading event hashes for a tree node"))?;
        if seq as u64 != lo + sub.size() {
            return Ok(None);
        }
        let hash = r
            .get_ref(1)
            .ok()
            .and_then(|v| v.as_blob().ok())
            .and_then(crate::merkle::stored_hash)
            .ok_or_else(|| LogError::Corrupt {
                what: format!("the hash of the event at log_seq {seq} is not 32 bytes"),
            })?;
        sub.push_each(leaf_hash(&hash.0), |_, _| {});
    }
    Ok((sub.size() == n).then(|| sub.root()))
}

fn get_node(conn: &Connection, id: NodeId) -> Result<Option<Digest>, LogError> {
    let h: Option<Vec<u8>> = conn
        .prepare_cached("SELECT hash FROM tree WHERE leaf_end = ?1 AND level = ?2")
        .and_then(|mut s| {
            s.query_row(params![id.last_leaf() as i64, id.level], |r| r.get(0))
                .optional()
        })
        .map_err(storage("reading a tree node"))?;
    match h {
        None => Ok(None),
        Some(b) => b
            .as_slice()
            .try_into()
            .map(|a| Some(Digest(a)))
            .map_err(|_| LogError::Corrupt {
                what: format!("tree node {id:?} is not 32 bytes"),
            }),
    }
}

/// The write connection and what the writer keeps in memory; whoever holds it commits.
struct Core {
    conn: Connection,
    state: WriterState,
    tips: Tips,
}

/// Most run tips the writer remembers; past this it starts over (a tip not remembered is read
/// from the log, so this bounds memory, not correctness).
const MAX_TIPS: usize = 10_000;

/// Where each run this writer appended to ends (next `run_seq`, last hash): the check that a
/// batch continues its run then reads nothing. Only what this writer appended is remembered
/// (as it is appended, so later batches of the same group see it, as they see its rows), and
/// all of it is forgotten when the log moved under the writer (another process appended) or a
/// group's transaction failed.
#[derive(Default)]
struct Tips(HashMap<String, (u64, Digest)>);

impl Tips {
    fn remember(&mut self, batch: &SealedBatch) {
        let Some(last) = batch.events().last() else {
            return;
        };
        let (run, e) = (batch.run_id().as_str(), last.event());
        let tip = (e.run_seq + 1, e.hash);
        // A run already remembered (the usual case) costs no key copy.
        if let Some(t) = self.0.get_mut(run) {
            *t = tip;
            return;
        }
        if self.0.len() >= MAX_TIPS {
            self.0.clear();
        }
        self.0.insert(run.to_string(), tip);
    }
}

fn writer_loop(core: Arc<Mutex<Core>>, rx: mpsc::Receiver<WriteReq>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP_REQUESTS {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        // A poisoned lock means a commit panicked mid-way; its transaction rolled back when the
        // connection's guard dropped, and the next group re-reads the log's size anyway.
        let mut c = core.lock().unwrap_or_else(|p| p.into_inner());
        let Core { conn, state, tips } = &mut *c;
        commit_group(conn, state, tips, group);
    }
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendReceipt, LogError>>,
        Result<AppendReceipt, LogError>,
    ),
    Checkpoint(oneshot::Sender<Result<(), LogError>>, Result<(), LogError>),
}

/// The writer's transaction. Its statements (`BEGIN IMMEDIATE`, `COMMIT`, the savepoints) are
/// prepared once per connection and kept, not parsed again for every commit as
/// `Connection::transaction` would. Dropped unfinished (an error or a panic mid-way), it rolls
/// back, so the connection is never left inside a transaction.
struct WriteTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> WriteTx<'c> {
    fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
        conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    fn begin(conn: &'c Connection) -> rusqlite::Result<WriteTx<'c>> {
        Self::run(conn, "BEGIN IMMEDIATE")?;
        Ok(WriteTx { conn, open: true })
    }

    fn savepoint(&self) -> rusqlite::Result<()> {
        Self::run(self.conn, "SAVEPOINT append")
    }

    fn release(&self) -> rusqlite::Result<()> {
        Self::run(self.conn, "RELEASE append")
    }

    /// Undo everything since the savepoint, and end it.
    fn roll_back_savepoint(&self) -> rusqlite::Result<()> {
        Self::run(self.conn, "ROLLBACK TO append")?;
        self.release()
    }

    /// Whether the transaction is still open. SQLite ends it on its own after some errors
    /// (a full disk, an I/O error: "it may roll back the entire transaction"); a statement
    /// run after that would commit on its own, outside the group, though the group fails.
    /// `after` is the last error a request of the group met, if any.
    fn still_open(&self, after: Option<&LogError>) -> Result<(), LogError> {
        if self.conn.is_autocommit() {
            return Err(LogError::Storage {
                context: "committing to disk".into(),
                message: match after {
                    Some(e) => format!(
                        "SQLite rolled the transaction back after an error ({e}); nothing of it was written"
                    ),
                    None => "SQLite rolled the transaction back; nothing of it was written".into(),
                },
            });
        }
        Ok(())
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        Self::run(self.conn, "COMMIT")?;
        self.open = false;
        Ok(())
    }

    fn rollback(mut self) -> rusqlite::Result<()> {
        self.open = false;
        Self::run(self.conn, "ROLLBACK")
    }
}

impl Drop for WriteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // Outside a transaction already (a failed COMMIT may have ended it) this fails
            // harmlessly.
            let _ = Self::run(self.conn, "ROLLBACK");
        }
    }
}

/// One transaction, one sync, for every request in the group. Each request runs in its own
/// savepoint, so a conflicting batch fails alone and leaves nothing behind.
fn commit_group(conn: &Connection, state: &mut WriterState, tips: &mut Tips, group: Vec<WriteReq>) {
    let saved = state.clone();
    let mut replies = Vec::with_capacity(group.len());
    // Requests not yet taken when the group fails are answered with its error below (dropped
    // unanswered, their callers were told the writer had stopped: a database another process
    // held locked read as a dead writer).
    let mut pending = group.into_iter();
    let outcome = (|| -> Result<(), LogError> {
        let tx = WriteTx::begin(conn).map_err(storage("beginning a commit"))?;
        // Holding the write lock now. Another process may have appended since this writer last
        // committed (two `ice` processes on one home): continue from the log as it is.
        if log_size(tx.conn, state.layout)? != state.frontier.size() {
            *state = WriterState::load(tx.conn, state.layout)?;
            tips.0.clear();
        }
        // A group of one (the idle case) needs no savepoint: if its append fails, the whole
        // transaction is rolled back instead, which parses and runs two statements fewer.
        let single = pending.len() == 1;
        let mut roll_back = false;
        let mut failed: Option<LogError> = None;
        loop {
            // Checked before each request and before the commit: a request run after SQLite
            // ended the transaction would be written alone, and answered as failed.
            tx.still_open(failed.as_ref())?;
            let Some(req) = pending.next() else {
                break;
            };
            match req {
                WriteReq::Append(batch, reply) if single => {
                    let mut next = state.clone();
                    let r = append_batch(tx.conn, &mut next, tips, &batch);
                    if r.is_ok() {
                        *state = next;
                        tips.remember(&batch);
                    } else {
                        roll_back = true;
                        failed = r.clone().err();
                    }
                    replies.push(Reply::Append(reply, r));
                }
                WriteReq::Append(batch, reply) => {
                    // Answered whatever fails: the group's error replaces this result.
                    if let Err(e) = tx.savepoint() {
                        let e = storage("beginning an append")(e);
                        replies.push(Reply::Append(reply, Err(e.clone())));
                        return Err(e);
                    }
                    let mut next = state.clone();
                    let r = append_batch(tx.conn, &mut next, tips, &batch);
                    let settled = match &r {
                        Ok(_) => tx.release().map_err(storage("finishing an append")),
                        Err(e) => tx.still_open(Some(e)).and_then(|()| {
                            tx.roll_back_savepoint()
                                .map_err(storage("undoing a failed append"))
                        }),
                    };
                    if let Err(e) = settled {
                        replies.push(Reply::Append(reply, Err(e.clone())));
                        return Err(e);
                    }
                    if r.is_ok() {
                        *state = next;
                        // Later batches of the group see it, as they see its rows.
                        tips.remember(&batch);
                    }
                    replies.push(Reply::Append(reply, r));
                }
                WriteReq::Checkpoint(cp, reply) => {
                    let r = add_checkpoint(tx.conn, state, &cp);
                    if let Err(e) = &r {
                        failed = Some(e.clone());
                    }
                    replies.push(Reply::Checkpoint(reply, r));
                }
            }
        }
        if roll_back {
            tx.rollback().map_err(storage("undoing a failed append"))
        } else {
            tx.commit().map_err(storage("committing to disk"))
        }
    })();
    if let Err(e) = outcome {
        // Nothing of the group is on disk: every request fails, and the writer forgets it all.
        *state = saved;
        tips.0.clear();
        for r in replies {
            match r {
                Reply::Append(tx, _) => {
                    let _ = tx.send(Err(e.clone()));
                }
                Reply::Checkpoint(tx, _) => {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
        for req in pending {
            match req {
                WriteReq::Append(_, tx) => {
                    let _ = tx.send(Err(e.clone()));
                }
                WriteReq::Checkpoint(_, tx) => {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
        return;
    }
    for r in replies {
        match r {
            Reply::Append(tx, res) => {
                let _ = tx.send(res);
            }
            Reply::Checkpoint(tx, res) => {
                let _ = tx.send(res);
            }
        }
    }
}

fn append_batch(
    conn: &Connection,
    state: &mut WriterState,
    tips: &Tips,
    batch: &SealedBatch,
) -> Result<AppendReceipt, LogError> {
    if batch.is_empty() {
        return Err(LogError::Invalid("an empty batch".into()));
    }
    let run = batch.run_id().as_str();
    let (actual_next, actual_prev) = match tips.0.get(run) {
        Some(&tip) => tip,
        None => read_tip(conn, run)?,
    };
    if batch.first_seq() != actual_next || batch.prev() != actual_prev {
        return Err(LogError::Conflict {
            run_id: run.to_string(),
            expected: batch.first_seq(),
            expected_prev: batch.prev(),
            actual: actual_next,
        });
    }
    let mut have: HashSet<Digest> = HashSet::new();
    {
        let mut ins = conn
            .prepare_cached("INSERT OR IGNORE INTO blobs(digest, bytes) VALUES(?1, ?2)")
            .map_err(storage("storing a blob"))?;
        for b in batch.blobs() {
            // Assert in pairs: the digest names the bytes, here as when verified.
            if Digest::of(&b.bytes) != b.digest {
                return Err(LogError::Invalid(format!(
                    "blob {} does not hash to its name",
                    b.digest
                )));
            }
            let added = ins
                .execute(params![&b.digest.0[..], &b.bytes])
                .map_err(storage("storing a blob"))?;
            // Already stored: under that name must be these very bytes, or the event would
            // name bytes the store does not hold (and the real ones would be lost).
            if added == 0 {
                stored_blob_intact(conn, &b.digest)?;
            }
            have.insert(b.digest);
        }
    }
    let first_log_seq = state.frontier.size();
    let (linked, floor) = (state.layout.linked, state.layout.floor);
    let mut ins_event = conn
        .prepare_cached(if linked {
            "INSERT INTO events(log_seq, run_id, run_seq, type, hash, log_prev, body) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        } else {
            "INSERT INTO events(log_seq, run_id, run_seq, type, hash, body) VALUES(?1, ?2, ?3, ?4, ?5, ?6)"
        })
        .map_err(storage("appending an event"))?;
    let mut ins_node = conn
        .prepare_cached("INSERT INTO tree(leaf_end, level, hash) VALUES(?1, ?2, ?3)")
        .map_err(storage("appending a tree node"))?;
    // Each body is not hashed again here: a `SealedEvent`'s hash is its body's by construction
    // (the kernel makes one only by sealing a draft or admitting a checked event), and that
    // hash, the `prev` chain and the tree are what `verify` recomputes from the stored bytes.
    for se in batch.events() {
        let e = se.event();
        for r in blob_refs(&e.payload).map_err(LogError::Invalid)? {
            if !have.contains(&r.digest) && !stored_blob_intact(conn, &r.digest)? {
                return Err(LogError::Invalid(format!(
                    "event {} references blob {} that is not stored",
                    e.id(),
                    r.digest
                )));
            }
        }
        let log_seq = state.frontier.size();
        if linked {
            ins_event.execute(params![
                log_seq as i64,
                run,
                e.run_seq as i64,
                &e.event_type,
                &e.hash.0[..],
                &state.last.0[..],
                se.body()
            ])
        } else {
            ins_event.execute(params![
                log_seq as i64,
                run,
                e.run_seq as i64,
                &e.event_type,
                &e.hash.0[..],
                se.body()
            ])
        }
        .map_err(|err| storage(format!("appending event {}", e.id()))(err))?;
        state.last = e.hash;
        let mut stored = Ok(());
        state.frontier.push_each(leaf_hash(&e.hash.0), |id, h| {
            if id.level >= floor && stored.is_ok() {
                stored = ins_node
                    .execute(params![id.last_leaf() as i64, id.level, &h.0[..]])
                    .map(|_| ())
                    .map_err(storage("appending a tree node"));
            }
        });
        stored?;
    }
    let tree_size = state.frontier.size();
    if linked {
        conn.prepare_cached("UPDATE OR FAIL head SET size = ?1, last = ?2 WHERE one = 0")
            .and_then(|mut s| s.execute(params![tree_size as i64, &state.last.0[..]]))
            .map_err(storage("recording the log's head"))?;
    }
    Ok(AppendReceipt {
        first_log_seq,
        count: tree_size - first_log_seq,
        tree_size,
    })
}

/// Where run `run` ends in the log: its next `run_seq` and its last event's hash.
fn read_tip(conn: &Connection, run: &str) -> Result<(u64, Digest), LogError> {
    let tip: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT run_seq, hash FROM events WHERE run_id = ?1 ORDER BY run_seq DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([run], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(storage(format!("reading the tip of run {run}")))?;
    Ok(match tip {
        None => (0u64, Digest::GENESIS),
        Some((seq, h)) => (
            seq as u64 + 1,
            Digest(h.as_slice().try_into().map_err(|_| LogError::Corrupt {
                what: format!("hash of {run}:{seq}"),
            })?),
        ),
    })
}

fn add_checkpoint(
    conn: &Connection,
    state: &WriterState,
    cp: &StoredCheckpoint,
) -> Result<(), LogError> {
    if cp.size > state.frontier.size() {
        return Err(LogError::Invalid(format!(
            "checkpoint covers {} events but the log has {}",
            cp.size,
            state.frontier.size()
        )));
    }
    let existing: Option<String> = conn
        .query_row(
            "SELECT note FROM checkpoints WHERE size = ?1",
            [cp.size as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(storage("reading checkpoints"))?;
    match existing {
        Some(n) if n == cp.note => Ok(()),
        Some(_) => Err(LogError::Invalid(format!(
            "a different checkpoint of size {} is already stored",
            cp.size
        ))),
        None => conn
            .execute(
                "INSERT INTO checkpoints(size, note) VALUES(?1, ?2)",
                params![cp.size as i64, &cp.note],
            )
            .map(|_| ())
            .map_err(storage("storing a checkpoint")),
    }
}

/// An event row, selected as [`Layout::cols`] lists its columns.
fn row_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        log_seq: r.get::<_, i64>(0)? as u64,
        run_id: r.get(1)?,
        run_seq: r.get::<_, i64>(2)? as u64,
        event_type: r.get(3)?,
        hash: r.get(4)?,
        body: r.get(6)?,
    })
}

/// An index lookup that found another row than the one it was asked for: the file's indexes
/// were altered (verification reads the table in log order, not its indexes; `--deep` checks
/// them too). Refused, so no reader serves another event than the one asked for.
fn index_altered(run: &str, wanted: &str, found_run: &str, found_seq: i64) -> LogError {
    LogError::Corrupt {
        what: format!(
            "looking up {wanted} of run {run}, the row found holds {found_run}:{found_seq}: the file's indexes, or that row's columns, were altered (`ice verify` checks the columns, `ice verify --deep` the indexes too)"
        ),
    }
}

/// The stored event in `body` must be `run:seq`. Judged by the body (which verification
/// checks against its hash), not by the `run_id` and `run_seq` columns: SQLite reads those
/// from the index a lookup went through, which is what is in question.
fn check_body_is(run: &str, seq: u64, body: &[u8]) -> Result<(), LogError> {
    let h = ice_kernel::Header::parse(body).map_err(|e| LogError::Corrupt {
        what: format!("the stored event read as {run}:{seq} does not parse: {e}"),
    })?;
    if h.run_id != run || h.run_seq != seq {
        return Err(index_altered(
            run,
            &format!("{run}:{seq}"),
            h.run_id,
            h.run_seq as i64,
        ));
    }
    Ok(())
}

/// Rows read through the `(run_id, run_seq)` index from `from_seq` on must be run `run`'s, in
/// order. Up to the first gap in positions: a gap is the callers' to report (their fold names
/// the event out of place), and past it nothing is where it is expected.
fn check_run_rows(run: &str, from_seq: u64, rows: &[StoredEvent]) -> Result<(), LogError> {
    for (i, e) in rows.iter().enumerate() {
        let want = from_seq + i as u64;
        if e.run_seq != want {
            break;
        }
        check_body_is(run, want, &e.body)?;
    }
    Ok(())
}

/// The same columns as [`row_event`], borrowed from SQLite's row (the text columns checked to
/// be UTF-8, as reading them into `String`s checks).
/// In a file whose events are linked (`linked`), a NULL `log_prev` is read as an empty link,
/// which matches no event: verification reports it, instead of skipping the link check as for
/// a file of the format before links.
fn row_ref<'r>(r: &'r rusqlite::Row<'_>, linked: bool) -> rusqlite::Result<StoredRef<'r>> {
    let text = |i: usize| -> rusqlite::Result<&'r str> {
        let v = r.get_ref(i)?;
        v.as_str()
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e)))
    };
    let blob_of = |i: usize, v: rusqlite::types::ValueRef<'r>| -> rusqlite::Result<&'r [u8]> {
        v.as_blob()
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e)))
    };
    let blob = |i: usize| blob_of(i, r.get_ref(i)?);
    Ok(StoredRef {
        log_seq: r.get::<_, i64>(0)? as u64,
        run_id: text(1)?,
        run_seq: r.get::<_, i64>(2)? as u64,
        event_type: text(3)?,
        hash: blob(4)?,
        log_prev: match r.get_ref(5)? {
            rusqlite::types::ValueRef::Null if linked => Some(&[]),
            rusqlite::types::ValueRef::Null => None,
            v => Some(blob_of(5, v)?),
        },
        body: blob(6)?,
    })
}

/// The stored tree nodes completed by leaves `from_leaf .. from_leaf + leaves`, in the order
/// they were completed, each handed to `out`.
fn nodes_into(
    c: &Connection,
    from_leaf: u64,
    leaves: u64,
    out: &mut dyn FnMut((NodeId, Option<Digest>)),
) -> Result<(), LogError> {
    let end = from_leaf
        .saturating_add(leaves.min(MAX_READ_ROWS as u64))
        .min(i64::MAX as u64);
    let mut s = c
        .prepare_cached(
            "SELECT leaf_end, level, hash FROM tree WHERE leaf_end >= ?1 AND leaf_end < ?2 ORDER BY leaf_end, level",
        )
        .map_err(storage("scanning the tree"))?;
    let mut rows = s
        .query(params![pos(from_leaf), end as i64])
        .map_err(storage("scanning the tree"))?;
    while let Some(r) = rows.next().map_err(storage("scanning the tree"))? {
        let leaf_end = r.get::<_, i64>(0).map_err(storage("scanning the tree"))? as u64;
        let level = r.get::<_, i64>(1).map_err(storage("scanning the tree"))?;
        if !(0..64).contains(&level) {
            return Err(LogError::Corrupt {
                what: format!("tree row at leaf {leaf_end} has level {level}"),
            });
        }
        let level = level as u8;
        // A stored value that is not 32 bytes is kept as `None`: verification reports it as a
        // node that does not match.
        let hash = r
            .get_ref(2)
            .map_err(storage("scanning the tree"))?
            .as_blob()
            .ok()
            .and_then(crate::merkle::stored_hash);
        // The inverse of NodeId::last_leaf; a row whose key is not a node's last leaf maps to a
        // node verification will not expect, and is reported there.
        let id = NodeId {
            level,
            index: ((leaf_end + 1) >> level).wrapping_sub(1),
        };
        out((id, hash));
    }
    Ok(())
}

fn clamp(limit: usize) -> i64 {
    limit.min(MAX_READ_ROWS) as i64
}

/// A position or offset as SQLite stores it: past the largest it can store is past the end
/// (a plain cast would wrap to a negative number and read from the start).
fn pos(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Each event row from `from_log_seq` on, at most `limit`, in log order, handed to `each`
/// (what `scan` and `scan_page` read, into their different containers).
fn scan_rows(
    c: &Connection,
    layout: Layout,
    from_log_seq: u64,
    limit: usize,
    each: &mut dyn FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()>,
) -> Result<(), LogError> {
    let mut s = c
        .prepare_cached(&format!(
            "SELECT {} FROM events WHERE log_seq >= ?1 ORDER BY log_seq LIMIT ?2",
            layout.cols()
        ))
        .map_err(storage("scanning the log"))?;
    let mut rows = s
        .query(params![pos(from_log_seq), clamp(limit)])
        .map_err(storage("scanning the log"))?;
    while let Some(r) = rows.next().map_err(storage("scanning the log"))? {
        if let Err(e) = each(r) {
            let at = r
                .get::<_, i64>(0)
                .map_or_else(|_| String::new(), |s| format!(" at the row of log_seq {s}"));
            return Err(storage(format!("scanning the log{at}"))(e));
        }
    }
    Ok(())
}

impl SqliteLog {
    /// Runs by their first event, in log order (`ASC`) or newest first (`DESC`).
    async fn list_runs(
        &self,
        order: &'static str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<RunId>, LogError> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT run_id, run_seq, log_seq FROM events WHERE run_seq = 0 ORDER BY log_seq {order} LIMIT ?1 OFFSET ?2"
                ))
                .map_err(storage("listing runs"))?;
            let rows = s
                .query_map(params![clamp(limit), pos(offset)], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(storage("listing runs"))?;
            let mut out = Vec::new();
            let mut last: Option<i64> = None;
            for r in rows {
                let (s, seq, at) = r.map_err(storage("listing runs"))?;
                // Each row the index of runs' first events leads to must be a first event, each
                // once, in log order.
                let in_order = last.is_none_or(|l| if order == "ASC" { at > l } else { at < l });
                if seq != 0 || !in_order {
                    return Err(index_altered(&s, "the first event", &s, seq));
                }
                last = Some(at);
                out.push(RunId::new(s).map_err(|e| LogError::Corrupt {
                    what: format!("run id column: {e}"),
                })?);
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl EventLog for SqliteLog {
    async fn append(&self, batch: SealedBatch) -> Result<AppendReceipt, LogError> {
        self.write(|tx| WriteReq::Append(batch, tx)).await
    }

    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LogError> {
        let run = run_id.as_str().to_string();
        let cols = self.layout.cols();
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {cols} FROM events WHERE run_id = ?1 AND run_seq >= ?2 ORDER BY run_seq LIMIT ?3"
                ))
                .map_err(storage("reading a run"))?;
            let rows = s.query_map(params![run, pos(from_seq), clamp(limit)], row_event).map_err(storage("reading a run"))?;
            let rows = rows.collect::<Result<Vec<_>, _>>().map_err(storage("reading a run"))?;
            check_run_rows(&run, from_seq, &rows)?;
            Ok(rows)
        })
        .await
    }

    async fn scan(&self, from_log_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        let layout = self.layout;
        self.read(move |c| {
            let mut out = Vec::with_capacity(limit.min(MAX_READ_ROWS));
            scan_rows(c, layout, from_log_seq, limit, &mut |r| {
                out.push(row_event(r)?);
                Ok(())
            })?;
            Ok(out)
        })
        .await
    }

    async fn scan_page(
        &self,
        from_log_seq: u64,
        limit: usize,
        nodes: bool,
        reuse: EventPage,
    ) -> Result<EventPage, LogError> {
        let layout = self.layout;
        self.read(move |c| {
            let mut page = reuse;
            page.clear();
            scan_rows(c, layout, from_log_seq, limit, &mut |r| {
                page.push(row_ref(r, layout.linked)?);
                Ok(())
            })?;
            if nodes {
                nodes_into(c, from_log_seq, limit as u64, &mut |n| page.push_node(n))?;
            }
            Ok(page)
        })
        .await
    }

    async fn get(&self, id: &EventId) -> Result<Option<StoredEvent>, LogError> {
        let (run, seq) = (id.run_id.as_str().to_string(), pos(id.run_seq));
        let cols = self.layout.cols();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {cols} FROM events WHERE run_id = ?1 AND run_seq = ?2"
            ))
            .and_then(|mut s| s.query_row(params![run, seq], row_event).optional())
            .map_err(storage("reading an event"))?
            .map(|e| {
                check_run_rows(&run, seq as u64, std::slice::from_ref(&e))?;
                Ok(e)
            })
            .transpose()
        })
        .await
    }

    async fn size(&self) -> Result<u64, LogError> {
        let layout = self.layout;
        self.read(move |c| log_size(c, layout)).await
    }

    async fn runs(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.list_runs("ASC", offset, limit).await
    }

    async fn runs_newest_first(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.list_runs("DESC", offset, limit).await
    }

    async fn run_count(&self) -> Result<u64, LogError> {
        self.read(|c| {
            // Counted on the partial index of runs' first events.
            c.prepare_cached("SELECT count(*) FROM events WHERE run_seq = 0")
                .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
                .map(|n| n.max(0) as u64)
                .map_err(storage("counting runs"))
        })
        .await
    }

    async fn existing(&self, ids: &[EventId]) -> Result<HashSet<EventId>, LogError> {
        let ids = ids.to_vec();
        self.read(move |c| {
            let mut s = c
                .prepare_cached("SELECT body FROM events WHERE run_id = ?1 AND run_seq = ?2")
                .map_err(storage("looking up causes"))?;
            let mut out = HashSet::new();
            for id in ids {
                let found = s
                    .query_row(params![id.run_id.as_str(), id.run_seq as i64], |r| {
                        r.get::<_, Vec<u8>>(0)
                    })
                    .optional()
                    .map_err(storage("looking up causes"))?;
                if let Some(body) = found {
                    check_body_is(id.run_id.as_str(), id.run_seq, &body)?;
                    out.insert(id);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError> {
        let d = *digest;
        self.read(move |c| {
            c.query_row(
                "SELECT bytes FROM blobs WHERE digest = ?1",
                [&d.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(storage("reading a blob"))
        })
        .await
    }

    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Digest>, LogError> {
        let ids = ids.to_vec();
        let layout = self.layout;
        self.read(move |c| {
            ids.iter()
                .map(|id| {
                    node_at(c, layout, *id)?.ok_or_else(|| LogError::Corrupt {
                        what: format!("tree node {id:?} is missing"),
                    })
                })
                .collect()
        })
        .await
    }

    fn tree_floor(&self) -> u8 {
        self.layout.floor
    }

    async fn scan_nodes(
        &self,
        from_leaf: u64,
        leaves: u64,
    ) -> Result<Vec<(NodeId, Option<Digest>)>, LogError> {
        self.read(move |c| {
            let mut out = Vec::new();
            nodes_into(c, from_leaf, leaves, &mut |n| out.push(n))?;
            Ok(out)
        })
        .await
    }

    async fn index_problem(&self) -> Result<Option<String>, LogError> {
        self.read(move |c| {
            // SQLite's own check of every index against its table (and of the file's pages).
            let mut s = c
                .prepare("PRAGMA integrity_check(8)")
                .map_err(storage("checking the indexes"))?;
            let found = s
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(storage("checking the indexes"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(storage("checking the indexes"))?;
            Ok(match found.as_slice() {
                [ok] if ok == "ok" => None,
                problems => Some(format!(
                    "SQLite's integrity check of the file: {}: its indexes or pages were altered",
                    problems.join("; ")
                )),
            })
        })
        .await
    }

    async fn altered_blob(&self) -> Result<Option<String>, LogError> {
        self.read(move |c| {
            // Row by row, in the reader: memory stays one blob, however many there are.
            let mut s = c
                .prepare("SELECT digest, bytes FROM blobs ORDER BY digest")
                .map_err(storage("reading blobs"))?;
            let mut rows = s.query([]).map_err(storage("reading blobs"))?;
            while let Some(r) = rows.next().map_err(storage("reading blobs"))? {
                let name = r.get_ref(0).map_err(storage("reading blobs"))?;
                let name = name.as_blob().unwrap_or_default();
                let bytes = r.get_ref(1).map_err(storage("reading blobs"))?;
                let intact = bytes
                    .as_blob()
                    .is_ok_and(|b| Digest::of(b).0.as_slice() == name);
                if !intact {
                    return Ok(Some(name.iter().map(|b| format!("{b:02x}")).collect()));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn extent(&self) -> Result<Option<Extent>, LogError> {
        let layout = self.layout;
        self.read(move |c| {
            // One statement: one snapshot of all of it. Each edge is an index lookup.
            let head = if layout.linked {
                "(SELECT size FROM head WHERE one = 0), (SELECT last FROM head WHERE one = 0)"
            } else {
                "(SELECT COALESCE(MAX(log_seq) + 1, 0) FROM events), NULL"
            };
            let sql = format!(
                "SELECT {head}, (SELECT MIN(log_seq) FROM events), (SELECT MAX(log_seq) FROM events), \
                 (SELECT MIN(leaf_end) FROM tree), (SELECT MAX(leaf_end) FROM tree), (SELECT count(*) FROM events)"
            );
            let row = c
                .query_row(&sql, [], |r| {
                    let int = |i: usize| r.get::<_, Option<i64>>(i);
                    Ok((
                        int(0)?,
                        r.get::<_, Option<Vec<u8>>>(1)?,
                        int(2)?,
                        int(3)?,
                        int(4)?,
                        int(5)?,
                        int(6)?,
                    ))
                })
                .map_err(|e| LogError::Corrupt {
                    what: format!("the log's edges (head, lowest and highest event and tree rows) do not read: {e}"),
                })?;
            let (size, last, ev_lo, ev_hi, node_lo, node_hi, rows) = row;
            let size = match size {
                Some(n) if n >= 0 => n as u64,
                Some(n) => {
                    return Err(LogError::Corrupt {
                        what: format!("the head record says size {n}"),
                    });
                }
                None => {
                    return Err(LogError::Corrupt {
                        what: "the head record (the log's size) is missing".into(),
                    });
                }
            };
            let last = match last {
                None => None,
                Some(b) => Some(Digest(<[u8; 32]>::try_from(b.as_slice()).map_err(|_| {
                    LogError::Corrupt {
                        what: format!("the head record's last hash is {} bytes, not 32", b.len()),
                    }
                })?)),
            };
            Ok(Some(Extent {
                size,
                events: ev_lo.zip(ev_hi),
                nodes: node_lo.zip(node_hi),
                last,
                rows: rows.map(|n| n.max(0) as u64),
            }))
        })
        .await
    }

    async fn add_checkpoint(&self, checkpoint: StoredCheckpoint) -> Result<(), LogError> {
        self.write(|tx| WriteReq::Checkpoint(checkpoint, tx)).await
    }

    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, LogError> {
        self.read(|c| {
            let mut s = c
                .prepare_cached("SELECT size, note FROM checkpoints ORDER BY size")
                .map_err(storage("reading checkpoints"))?;
            let rows = s
                .query_map([], |r| {
                    Ok(StoredCheckpoint {
                        size: r.get::<_, i64>(0)? as u64,
                        note: r.get(1)?,
                    })
                })
                .map_err(storage("reading checkpoints"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(storage("reading checkpoints"))
        })
        .await
    }
}
