//! # ice-log: ICE's durable, append-only, verifiable event log
//!
//! - [`EventLog`]: the interface every backend implements (append a sealed batch of one run at
//!   an expected position; read a run; scan in log order; the Merkle tree; blobs; checkpoints).
//! - [`sqlite::SqliteLog`]: the embedded default (one file, WAL, durable group commit).
//! - [`merkle`]: RFC 6962 tree, proofs; [`checkpoint`]: C2SP signed checkpoints.
//! - [`ledger::Ledger`]: the library API that writes events through the kernel's validator.
//! - [`verify`]: streaming verification of a whole log; [`proof`]: offline proof files.
//! - [`postgres::PgLog`], [`nats::NatsLog`]: shared backends (several ICE nodes on one log).
//! - [`migrate`]: copy a whole log between backends; [`conformance`]: the suite every backend
//!   passes.
//!
//! This crate stores and proves; it never interprets events beyond what verification needs,
//! and it never reorders them. It accepts only [`SealedBatch`]es, which only the kernel's
//! validator can make.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod clock;
pub mod conformance;
pub mod ledger;
pub mod merkle;
pub mod migrate;
pub mod nats;
pub mod page;
pub mod postgres;
pub mod proof;
pub mod sqlite;
pub mod verify;

use std::collections::HashSet;

use async_trait::async_trait;
use ice_kernel::{Digest, Event, EventId, RunId, SealedBatch};

pub use merkle::NodeId;
pub use page::{EventPage, StoredRef};

/// An event as stored: its global position, the indexed columns and the canonical body.
///
/// The columns are copies for indexing; the body and hash are the record. Verification checks
/// that they agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Global position (0-based); also the event's leaf index in the Merkle tree.
    pub log_seq: u64,
    /// Run id column.
    pub run_id: String,
    /// Run position column.
    pub run_seq: u64,
    /// Type column.
    pub event_type: String,
    /// Hash column.
    pub hash: Vec<u8>,
    /// Canonical encoding of the event without its hash.
    pub body: Vec<u8>,
}

impl StoredEvent {
    /// Parse the stored record into an event (no validation).
    pub fn event(&self) -> Result<Event, LogError> {
        let hash: [u8; 32] = self
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| LogError::Corrupt {
                what: format!(
                    "event at log_seq {}: hash column is {} bytes, not 32",
                    self.log_seq,
                    self.hash.len()
                ),
            })?;
        Event::from_body(&self.body, Digest(hash)).map_err(|e| LogError::Corrupt {
            what: format!(
                "event at log_seq {}: body does not parse: {e}",
                self.log_seq
            ),
        })
    }
}

/// Where to read `run` on from after `page`, a page of [`EventLog::read_run`] from `from`,
/// having checked that it holds the run's events `from, from + 1, …` with none missing or
/// repeated. Every reader that pages through a run goes on from here: a gap in a run (a row
/// deleted from the store) is an error naming where, never a page read again and again.
pub fn after_page(run: &str, from: u64, page: &[StoredEvent]) -> Result<u64, LogError> {
    let mut want = from;
    for s in page {
        if s.run_seq != want {
            return Err(LogError::Corrupt {
                what: format!(
                    "run {run}: event at log_seq {} is stored at run position {}, where {want} \
                     was expected (an event of the run is missing or repeated); run `ice verify`",
                    s.log_seq, s.run_seq
                ),
            });
        }
        want += 1;
    }
    Ok(want)
}

/// Where to scan the log on from after `page`, a page of [`EventLog::scan`] from `from`,
/// having checked that it holds positions `from, from + 1, …` (log positions are dense: a row
/// missing or stored out of place is damage, an error naming it).
pub fn after_scan(from: u64, page: &[StoredEvent]) -> Result<u64, LogError> {
    let mut want = from;
    for s in page {
        if s.log_seq != want {
            return Err(misplaced(s.log_seq, want));
        }
        want += 1;
    }
    Ok(want)
}

/// The error for an event row at `log_seq` read where `want` was expected.
pub fn misplaced(log_seq: u64, want: u64) -> LogError {
    LogError::Corrupt {
        what: format!(
            "the event row at log_seq {log_seq} is where log_seq {want} was expected (a row is missing or stored out of place); run `ice verify`"
        ),
    }
}

/// What a successful append returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendReceipt {
    /// Global position of the first event appended.
    pub first_log_seq: u64,
    /// Number of events appended.
    pub count: u64,
    /// Size of the log after the append.
    pub tree_size: u64,
}

/// The edges of what a backend stores, read at one moment: what verification checks so that
/// no stored row lies outside the log it verified (rows there are read by nothing that
/// verifies, yet a backend's other readers may see them, or a later append trip over them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The log's size at that moment.
    pub size: u64,
    /// The lowest and the highest position of any stored event row (`None`: no rows).
    /// Signed, as stored: a row outside `0..size` is not part of the log.
    pub events: Option<(i64, i64)>,
    /// The lowest and the highest last leaf of any stored tree node (`None`: none).
    pub nodes: Option<(i64, i64)>,
    /// The hash the log's head records as its last event's (what the next append links to),
    /// where the backend keeps one.
    pub last: Option<Digest>,
    /// How many event rows are stored, where the backend counts them cheaply (a row whose
    /// position is missing is in no scan, but is in this count).
    pub rows: Option<u64>,
}

/// A checkpoint note as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// Tree size it covers.
    pub size: u64,
    /// The signed note.
    pub note: String,
}

/// Errors of the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The run is not where the batch expected (someone appended first, possibly this same
    /// batch in an earlier attempt whose answer was lost); this append wrote nothing. Reload
    /// the run and retry.
    #[error(
        "conflict on run {run_id}: the batch expected to start at run_seq {expected} after {expected_prev}, but the run is at run_seq {actual}; this append wrote nothing (the events at that position, possibly this very batch, were appended before it): read the run"
    )]
    Conflict {
        /// The run.
        run_id: String,
        /// Where the batch wanted to start.
        expected: u64,
        /// The `prev` the batch assumed.
        expected_prev: Digest,
        /// Where the run actually is (its number of events).
        actual: u64,
    },
    /// The store is not an ICE log, or of an unknown format.
    #[error("{path}: not an ICE log: {reason}")]
    NotALog {
        /// The store.
        path: String,
        /// Why not.
        reason: String,
    },
    /// Stored data is damaged.
    #[error("log is corrupt: {what}")]
    Corrupt {
        /// What is damaged.
        what: String,
    },
    /// The storage engine failed.
    #[error("{context}: {message}")]
    Storage {
        /// What ICE was doing.
        context: String,
        /// The engine's message.
        message: String,
    },
    /// A request is out of range or malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The log was opened read-only.
    #[error("the log is open read-only")]
    ReadOnly,
    /// The writer has stopped.
    #[error("the log writer has stopped")]
    Closed,
    /// Another writer holds the run (another ICE node is running it).
    #[error(
        "run {run_id} is being written by {holder} (its claim is live until {until_unix_ms} ms); a run has one writer at a time"
    )]
    Claimed {
        /// The run.
        run_id: String,
        /// Who holds it.
        holder: String,
        /// When the holder's claim lapses unless renewed (Unix time, ms).
        until_unix_ms: i64,
    },
}

/// The interface of every log backend.
///
/// Backends store exactly what they are given, in the order they accept it, and never modify
/// or delete it. A run has one writer at a time: [`EventLog::append`] succeeds only if the run
/// ends exactly where the batch begins (`first_seq` and `prev`), so a conflicting append fails
/// and the chain never forks.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Append a sealed batch of one run, atomically and durably.
    async fn append(&self, batch: SealedBatch) -> Result<AppendReceipt, LogError>;
    /// Events of a run from `from_seq`, at most `limit`, in run order.
    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LogError>;
    /// Events from global position `from_log_seq`, at most `limit`, in log order.
    async fn scan(&self, from_log_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError>;
    /// The same as [`EventLog::scan`], in one buffer: what verification and replay stream
    /// through. With `nodes`, the page also holds what [`EventLog::scan_nodes`] returns for the
    /// same leaves (`from_log_seq .. from_log_seq + limit`). `reuse` is a page the caller is
    /// done with, whose memory is reused (`EventPage::default()` for none). The default copies
    /// the other two calls' results; a backend that can fill a page directly should.
    async fn scan_page(
        &self,
        from_log_seq: u64,
        limit: usize,
        nodes: bool,
        reuse: EventPage,
    ) -> Result<EventPage, LogError> {
        let mut page = reuse;
        page.clear();
        for r in self.scan(from_log_seq, limit).await? {
            page.push(r.borrowed());
        }
        if nodes {
            for n in self.scan_nodes(from_log_seq, limit as u64).await? {
                page.push_node(n);
            }
        }
        Ok(page)
    }
    /// One event by id.
    async fn get(&self, id: &EventId) -> Result<Option<StoredEvent>, LogError>;
    /// Number of events in the log (= Merkle tree size).
    async fn size(&self) -> Result<u64, LogError>;
    /// Run ids, in order of first appearance, from the `offset`-th, at most `limit`.
    async fn runs(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError>;
    /// Run ids, newest first (the reverse of [`EventLog::runs`]), from the `offset`-th, at
    /// most `limit`.
    async fn runs_newest_first(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError>;
    /// How many runs the log holds (each run counts from its first event).
    async fn run_count(&self) -> Result<u64, LogError>;
    /// Which of `ids` exist.
    async fn existing(&self, ids: &[EventId]) -> Result<HashSet<EventId>, LogError>;
    /// A blob's bytes.
    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError>;
    /// Perfect-subtree hashes (missing ones are errors). Nodes below [`EventLog::tree_floor`]
    /// are computed from the stored event hashes they cover.
    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Digest>, LogError>;
    /// The lowest level of the tree this backend stores: every perfect subtree of at least
    /// this level is stored once complete; the ones below are computed on demand from the
    /// event hashes (at most `2^floor - 1` of them per node). 0 stores every node, leaves
    /// included. A backend with a floor above 0 links each event to the one before it in the
    /// log ([`StoredRef::log_prev`]), which is what records the order of events inside a
    /// subtree it does not store. A required method, so a wrapper cannot forget to pass it on.
    fn tree_floor(&self) -> u8;
    /// Stored tree nodes completed by leaves `from_leaf .. from_leaf + leaves`, in the order
    /// they were completed (by last leaf, then level): only nodes at or above
    /// [`EventLog::tree_floor`]. Whole leaves only, so a caller paging through never splits
    /// the nodes of one leaf.
    async fn scan_nodes(
        &self,
        from_leaf: u64,
        leaves: u64,
    ) -> Result<Vec<(NodeId, Option<Digest>)>, LogError>;
    /// The edges of what is stored, read at one moment (see [`Extent`]). `None` from a backend
    /// whose positions, tree and head are all derived from its events, so nothing can be
    /// stored outside them. A required method, so a wrapper cannot forget to pass it on.
    async fn extent(&self) -> Result<Option<Extent>, LogError>;
    /// The name (hex) of the first stored blob row whose bytes do not hash to it, whether an
    /// event references it or not: verification checks every blob row with it. `None` when all
    /// are intact, and from a backend that keeps no blob rows apart from its events (NATS: a
    /// blob travels in its batch's message). Required, like [`EventLog::extent`], so wrappers
    /// pass it on.
    async fn altered_blob(&self) -> Result<Option<String>, LogError>;
    /// What is wrong with the store's own indexes (which lookups by run and by id go
    /// through, and which a scan in log order does not read), from the store's own check;
    /// `None` when they agree with the rows, or where the backend has nothing to check.
    /// `verify --deep` asks; it reads the whole store. Required, so wrappers pass it on.
    async fn index_problem(&self) -> Result<Option<String>, LogError>;
    /// Store a signed checkpoint (its size must not exceed the log).
    async fn add_checkpoint(&self, checkpoint: StoredCheckpoint) -> Result<(), LogError>;
    /// Every stored checkpoint, by size.
    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, LogError>;
    /// Claim (or renew) the right to be the one writer of `run` for `holder` (an ICE node's
    /// id) until `until_unix_ms`. Refused with [`LogError::Claimed`] while another holder's
    /// claim has not lapsed at `now_unix_ms`; a lapsed claim (its node died) can be taken over.
    /// Backends one process owns (SQLite: the run's file lock does this) grant every claim.
    async fn claim_run(
        &self,
        _run: &RunId,
        _holder: &str,
        _now_unix_ms: i64,
        _until_unix_ms: i64,
    ) -> Result<(), LogError> {
        Ok(())
    }
    /// Give up `holder`'s claim on `run` (nothing happens if it holds none).
    async fn release_run(&self, _run: &RunId, _holder: &str) -> Result<(), LogError> {
        Ok(())
    }
    /// Whether claims here are shared between nodes and lapse: a claim not renewed within its
    /// lifetime may have been taken by another node (and released since), so its holder has
    /// lost the run whatever a later renewal says. `false` where every claim is granted.
    fn claims_lapse(&self) -> bool {
        false
    }
}

/// The root of the first `size` events.
pub async fn root_at(log: &dyn EventLog, size: u64) -> Result<Digest, LogError> {
    let ids = merkle::range_nodes(0, size);
    let hashes = log.nodes(&ids).await?;
    let mut map: std::collections::HashMap<NodeId, Digest> = ids.into_iter().zip(hashes).collect();
    merkle::root_at(
        &mut |id: NodeId| map.remove(&id).ok_or_else(|| format!("{id:?}")),
        size,
    )
    .map_err(|e| LogError::Corrupt {
        what: format!("tree node missing: {e}"),
    })
}

/// Hashes of the given ranges (for proofs), fetched in one call.
pub async fn range_hashes(
    log: &dyn EventLog,
    ranges: &[(u64, u64)],
) -> Result<Vec<Digest>, LogError> {
    let ids: Vec<NodeId> = ranges
        .iter()
        .flat_map(|&(lo, hi)| merkle::range_nodes(lo, hi))
        .collect();
    let hashes = log.nodes(&ids).await?;
    let map: std::collections::HashMap<NodeId, Digest> = ids.into_iter().zip(hashes).collect();
    merkle::hashes_of(
        &mut |id: NodeId| map.get(&id).copied().ok_or_else(|| format!("{id:?}")),
        ranges,
    )
    .map_err(|e| LogError::Corrupt {
        what: format!("tree node missing: {e}"),
    })
}
