//! The shared backend: one PostgreSQL schema that several ICE nodes (processes) append to and
//! read from at once (spec §10).
//!
//! [`PgLog::connect`] takes a connection URL and a schema (default `public`), creates the tables
//! if the schema holds none of them, and refuses ([`LogError::NotALog`]) a schema whose `meta`
//! table does not say `ice-log/1` or that holds tables of the same names without one.
//! [`PgLog::connect_existing`] opens only a log that is already there: it creates and changes
//! nothing, and a schema without one is [`LogError::NotALog`] (for read-only uses, where a
//! mistyped schema must not become a new, empty log).
//!
//! Tables, as in [`crate::sqlite`]: `events` (the record: `log_seq`, indexed columns, hash,
//! canonical body), `tree` (every complete perfect Merkle subtree, keyed by the leaf that
//! completed it), `blobs`, `checkpoints`, `meta`; plus `head` (one row: the log's size, locked
//! by every append) and `claims` (which node writes which run, until when). Triggers refuse
//! UPDATE, DELETE and TRUNCATE on the record tables.
//!
//! **Order.** Every append locks the `head` row, so appends from every node are serialized
//! there, and the lock is released only when the commit is durable. The careful path takes it
//! with `SELECT … FOR UPDATE` inside a transaction, then reads the log's size and the runs'
//! tips (READ COMMITTED: each statement sees what committed before it), assigns `log_seq`s from
//! that size, and writes the events, their tree nodes, the blobs and the new size. A writer
//! whose last commit found the log as it had left it (no other writer lately) first tries the
//! short path: one statement, its own transaction, that updates `head` only if the size is
//! still the one its tree edge is for (re-checked once the row is locked, so any append
//! committed in between makes it write nothing) and each run's tip is where the batch starts,
//! and inserts the rows only if `head` was updated; if it wrote nothing, the careful path runs.
//! `log_seq` is one global order with no gaps, and the unique keys (`log_seq`,
//! `(run_id, run_seq)`, `(leaf_end, level)`) refuse anything that would slip past it.
//!
//! **Conflicts.** A batch is written only if it starts exactly at its run's stored tip
//! (`first_seq` and `prev`); otherwise [`LogError::Conflict`] and nothing of it is written.
//! An append that finds no commit under way on its node commits on its caller's task; appends
//! that find one queue, and the node's writer task commits them together in one transaction
//! (group commit): each is judged in turn against the tips as the earlier ones leave them, and
//! a refused batch fails alone. Different nodes' commits are serialized by the lock, so they
//! cannot share a disk sync: a run's appends are meant to come from the one node that claimed
//! it.
//!
//! **Claims.** [`EventLog::claim_run`] is one `INSERT … ON CONFLICT DO UPDATE … WHERE` (same
//! holder, or the other's claim lapsed: `until_unix_ms <= now_unix_ms`) `RETURNING`: atomic.
//!
//! **Connection loss.** Every call first reconnects a connection it finds closed. A read whose
//! connection is lost is retried once on a new one. An append that loses its connection before
//! its commit was sent (nothing can have been written) is retried once too. One that loses it
//! after its write and `COMMIT` were sent has an unknown outcome and is never blindly retried:
//! the writer reconnects, makes sure the old server process is gone (so its transaction cannot
//! still commit), re-reads the batch's first event and answers from what is stored: the receipt
//! if it landed, [`LogError::Storage`] saying that nothing was written if it did not.
//!
//! **Time bounds** ([`Options`]). A server that stops answering (frozen, or cut off by the
//! network without the connection being closed) makes every call fail with
//! [`LogError::Storage`] saying what timed out, never hang. Opening a session (TCP connect,
//! startup, authentication, session setup) is bounded by [`Options::connect_timeout`] per host;
//! a read, a claim or a checkpoint by [`Options::request_timeout`] in all (waiting for the
//! shared session, reconnecting and its one retry included). An append has
//! [`Options::request_timeout`] for everything up to its commit's answer; one that times out
//! before its `COMMIT` was sent wrote nothing and says so, one whose `COMMIT` (or one-statement
//! write) got no answer in time is an unknown outcome, settled as a lost commit reply is, within
//! one more [`Options::request_timeout`]. Appends queued behind a commit wait for it first. A
//! session that timed out is closed at once and never used again (it may be half-way through an
//! exchange with the server). Reading sessions run with `statement_timeout` at the request
//! timeout, so the server stops a read this side gave up on (closing the session alone does not
//! stop a server process waiting on a lock); a writer's server process is ended instead.
//!
//! **Durability.** A commit returns after PostgreSQL reports it committed; writer sessions run
//! with `synchronous_commit` at least `on` (a server default of `off` or `local` is raised).
//!
//! Needs PostgreSQL 11 or later.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::{BoxFuture, try_join_all};
use ice_kernel::blob::blob_refs;
use ice_kernel::{Digest, EventId, RunId, SealedBatch};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::{Instant, timeout_at};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use crate::merkle::{Frontier, NodeId, leaf_hash};
use crate::sqlite::MAX_READ_ROWS;

/// The format of a PostgreSQL log's schema (every tree node stored, as SQLite's first format).
pub const FORMAT: &str = "ice-log/1";
use crate::{AppendReceipt, EventLog, Extent, LogError, StoredCheckpoint, StoredEvent};

/// The schema used when none is given.
pub const DEFAULT_SCHEMA: &str = "public";
/// Most append requests committed in one group.
pub const MAX_GROUP_REQUESTS: usize = 1024;
/// A group stops growing once it holds this many bytes of bodies and blobs (a single larger
/// append still goes alone).
pub const MAX_GROUP_BYTES: usize = 32 << 20;
/// Most queued append requests before appenders wait (back-pressure, not unbounded memory).
const WRITE_QUEUE: usize = 4096;
/// Default of [`Options::connect_timeout`]: how long opening a session may take (TCP connect,
/// startup, authentication, session setup), per host of the URL.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Options::request_timeout`]: how long one call may wait for the server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a session that is no longer used may take to close politely (the server's answers
/// to what it still had under way, then a Terminate message) before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Most bytes of blobs one request hashes when checking them (`altered_blob`): one request's
/// work stays bounded however large the store grows.
const BLOB_CHECK_BYTES: i64 = 64 << 20;
/// Most blobs one such request looks at.
const BLOB_CHECK_ROWS: i64 = 4096;
/// A writer session idle inside a transaction this long (its node hung while holding the
/// log's write lock) is ended by the server, so one stuck node cannot stop every other.
const IDLE_IN_TRANSACTION_MS: u32 = 30_000;
/// How long to wait for a lost writer session's server process to end before deciding
/// whether its commit landed.
const FENCE_TIMEOUT: Duration = Duration::from_secs(15);
/// Every relation ICE creates in its schema.
const TABLES: [&str; 7] = [
    "meta",
    "head",
    "events",
    "tree",
    "blobs",
    "checkpoints",
    "claims",
];
/// First key of the advisory lock that serializes schema creation (ASCII "ICEl").
const SETUP_LOCK_CLASS: i32 = 0x4943_456c;

fn ddl(s: &str) -> String {
    let mut out = format!(
        "
CREATE TABLE {s}.meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE {s}.head(id SMALLINT PRIMARY KEY CHECK (id = 0), size BIGINT NOT NULL CHECK (size >= 0));
CREATE TABLE {s}.events(
  log_seq BIGINT PRIMARY KEY CHECK (log_seq >= 0),
  run_id TEXT NOT NULL,
  run_seq BIGINT NOT NULL CHECK (run_seq >= 0),
  type TEXT NOT NULL,
  hash BYTEA NOT NULL,
  body BYTEA NOT NULL,
  UNIQUE (run_id, run_seq)
);
CREATE INDEX events_run_start ON {s}.events(log_seq) WHERE run_seq = 0;
CREATE TABLE {s}.tree(leaf_end BIGINT NOT NULL, level SMALLINT NOT NULL, hash BYTEA NOT NULL,
  PRIMARY KEY (leaf_end, level));
CREATE TABLE {s}.blobs(digest BYTEA PRIMARY KEY, bytes BYTEA NOT NULL);
CREATE TABLE {s}.checkpoints(size BIGINT PRIMARY KEY, note TEXT NOT NULL);
CREATE TABLE {s}.claims(run_id TEXT PRIMARY KEY, holder TEXT NOT NULL, until_unix_ms BIGINT NOT NULL);
CREATE FUNCTION {s}.ice_append_only() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN RAISE EXCEPTION 'the event log is append-only'; END $$;
INSERT INTO {s}.head(id, size) VALUES (0, 0);
"
    );
    for t in ["events", "tree", "blobs", "checkpoints"] {
        out.push_str(&format!(
            "CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {s}.{t} \
             FOR EACH ROW EXECUTE FUNCTION {s}.ice_append_only();\n\
             CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {s}.{t} \
             FOR EACH STATEMENT EXECUTE FUNCTION {s}.ice_append_only();\n"
        ));
    }
    out
}

/// The statements ICE runs, prepared once per connection.
struct Statements {
    lock: Statement,
    tips: Statement,
    tree_nodes: Statement,
    blobs_have: Statement,
    write: Statement,
    fast_write: Statement,
    landed: Statement,
    size: Statement,
    read_run: Statement,
    scan: Statement,
    get: Statement,
    runs: Statement,
    existing: Statement,
    blob: Statement,
    scan_nodes: Statement,
    cp_insert: Statement,
    cp_get: Statement,
    checkpoints: Statement,
    claim: Statement,
    claim_get: Statement,
    release: Statement,
    extent: Statement,
    altered_blob: Statement,
    runs_newest: Statement,
    run_count: Statement,
}

impl Statements {
    async fn prepare(client: &Client, s: &str) -> Result<Statements, tokio_postgres::Error> {
        const COLS: &str = "log_seq, run_id, run_seq, type, hash, body";
        let sql = [
            format!("SELECT size FROM {s}.head WHERE id = 0 FOR UPDATE"),
            // Each run's last event: one backward step on the (run_id, run_seq) index.
            format!(
                "SELECT r.run_id, t.run_seq, t.hash FROM unnest($1::text[]) AS r(run_id) \
                 LEFT JOIN LATERAL (SELECT e.run_seq, e.hash FROM {s}.events e \
                 WHERE e.run_id = r.run_id ORDER BY e.run_seq DESC LIMIT 1) t ON true"
            ),
            format!(
                "SELECT u.leaf_end, u.level, t.hash FROM unnest($1::int8[], $2::int2[]) AS u(leaf_end, level) \
                 JOIN {s}.tree t ON t.leaf_end = u.leaf_end AND t.level = u.level"
            ),
            // Whether each is stored, and intact: bytes planted under a blob's name before an
            // event needs it must not stand in for the real ones.
            format!(
                "SELECT digest, sha256(bytes) = digest FROM {s}.blobs WHERE digest = ANY($1::bytea[])"
            ),
            // Everything an append group writes, in one statement; the head row is locked by
            // this transaction, so the size it sets is the one the log_seqs were counted from.
            format!(
                "WITH b AS (INSERT INTO {s}.blobs(digest, bytes) \
                   SELECT * FROM unnest($1::bytea[], $2::bytea[]) ON CONFLICT (digest) DO NOTHING), \
                 e AS (INSERT INTO {s}.events(log_seq, run_id, run_seq, type, hash, body) \
                   SELECT * FROM unnest($3::int8[], $4::text[], $5::int8[], $6::text[], $7::bytea[], $8::bytea[])), \
                 t AS (INSERT INTO {s}.tree(leaf_end, level, hash) \
                   SELECT * FROM unnest($9::int8[], $10::int2[], $11::bytea[])) \
                 UPDATE {s}.head SET size = $12::int8 WHERE id = 0"
            ),
            // The same in one statement of its own (autocommit), for a writer that expects no
            // other: it writes only if the log still has the size the writer's tree edge is
            // for and each run's tip is where its first batch starts ($13..$16); otherwise it
            // writes nothing. The size is re-checked once the head row is locked, so a writer
            // that committed since the statement's snapshot makes it write nothing.
            format!(
                "WITH ok AS (SELECT COALESCE(bool_and(CASE WHEN t.run_seq IS NULL THEN c.first_seq = 0 \
                   ELSE t.run_seq = c.first_seq - 1 AND t.hash = c.prev END), false) AS ok \
                   FROM unnest($13::text[], $14::int8[], $15::bytea[]) AS c(run_id, first_seq, prev) \
                   LEFT JOIN LATERAL (SELECT e.run_seq, e.hash FROM {s}.events e \
                   WHERE e.run_id = c.run_id ORDER BY e.run_seq DESC LIMIT 1) t ON true), \
                 h AS (UPDATE {s}.head SET size = $12::int8 \
                   WHERE id = 0 AND size = $16::int8 AND (SELECT ok FROM ok) RETURNING size), \
                 b AS (INSERT INTO {s}.blobs(digest, bytes) \
                   SELECT * FROM unnest($1::bytea[], $2::bytea[]) WHERE EXISTS (SELECT 1 FROM h) \
                   ON CONFLICT (digest) DO NOTHING), \
                 e AS (INSERT INTO {s}.events(log_seq, run_id, run_seq, type, hash, body) \
                   SELECT * FROM unnest($3::int8[], $4::text[], $5::int8[], $6::text[], $7::bytea[], $8::bytea[]) \
                   WHERE EXISTS (SELECT 1 FROM h)), \
                 t AS (INSERT INTO {s}.tree(leaf_end, level, hash) \
                   SELECT * FROM unnest($9::int8[], $10::int2[], $11::bytea[]) WHERE EXISTS (SELECT 1 FROM h)) \
                 SELECT count(*) FROM h"
            ),
            format!("SELECT log_seq, hash FROM {s}.events WHERE run_id = $1 AND run_seq = $2"),
            format!("SELECT size FROM {s}.head WHERE id = 0"),
            format!(
                "SELECT {COLS} FROM {s}.events WHERE run_id = $1 AND run_seq >= $2 ORDER BY run_seq LIMIT $3"
            ),
            format!("SELECT {COLS} FROM {s}.events WHERE log_seq >= $1 ORDER BY log_seq LIMIT $2"),
            format!("SELECT {COLS} FROM {s}.events WHERE run_id = $1 AND run_seq = $2"),
            format!(
                "SELECT run_id FROM {s}.events WHERE run_seq = 0 ORDER BY log_seq LIMIT $1 OFFSET $2"
            ),
            format!(
                "SELECT e.run_id, e.run_seq FROM unnest($1::text[], $2::int8[]) AS u(run_id, run_seq) \
                 JOIN {s}.events e ON e.run_id = u.run_id AND e.run_seq = u.run_seq"
            ),
            format!("SELECT bytes FROM {s}.blobs WHERE digest = $1"),
            format!(
                "SELECT leaf_end, level, hash FROM {s}.tree WHERE leaf_end >= $1 AND leaf_end < $2 \
                 ORDER BY leaf_end, level"
            ),
            format!(
                "INSERT INTO {s}.checkpoints(size, note) VALUES ($1, $2) ON CONFLICT (size) DO NOTHING RETURNING size"
            ),
            format!("SELECT note FROM {s}.checkpoints WHERE size = $1"),
            format!("SELECT size, note FROM {s}.checkpoints ORDER BY size"),
            format!(
                "INSERT INTO {s}.claims AS c(run_id, holder, until_unix_ms) VALUES ($1, $2, $4) \
                 ON CONFLICT (run_id) DO UPDATE SET holder = EXCLUDED.holder, until_unix_ms = EXCLUDED.until_unix_ms \
                 WHERE c.holder = EXCLUDED.holder OR c.until_unix_ms <= $3::int8 RETURNING c.holder"
            ),
            format!("SELECT holder, until_unix_ms FROM {s}.claims WHERE run_id = $1"),
            format!("DELETE FROM {s}.claims WHERE run_id = $1 AND holder = $2"),
            // One statement, one snapshot; each edge is an index lookup.
            format!(
                "SELECT (SELECT size FROM {s}.head WHERE id = 0), \
                 (SELECT MIN(log_seq) FROM {s}.events), (SELECT MAX(log_seq) FROM {s}.events), \
                 (SELECT MIN(leaf_end) FROM {s}.tree), (SELECT MAX(leaf_end) FROM {s}.tree)"
            ),
            // The blobs after $1, in name order: up to $2 of them and, past the first, up to $3
            // bytes (sizes are read from the row headers; only the chosen rows are hashed).
            format!(
                "SELECT digest, sha256(bytes) = digest FROM (SELECT digest, bytes, \
                 sum(octet_length(bytes)) OVER (ORDER BY digest ROWS UNBOUNDED PRECEDING) - octet_length(bytes) AS before \
                 FROM {s}.blobs WHERE digest > $1 ORDER BY digest LIMIT $2) b WHERE before < $3 ORDER BY digest"
            ),
            format!(
                "SELECT run_id FROM {s}.events WHERE run_seq = 0 ORDER BY log_seq DESC LIMIT $1 OFFSET $2"
            ),
            format!("SELECT count(*) FROM {s}.events WHERE run_seq = 0"),
        ];
        // Sent together: one round trip, not twenty.
        let mut st = try_join_all(sql.iter().map(|q| client.prepare(q)))
            .await?
            .into_iter();
        let mut next = || st.next().expect("one statement per query");
        Ok(Statements {
            lock: next(),
            tips: next(),
            tree_nodes: next(),
            blobs_have: next(),
            write: next(),
            fast_write: next(),
            landed: next(),
            size: next(),
            read_run: next(),
            scan: next(),
            get: next(),
            runs: next(),
            existing: next(),
            blob: next(),
            scan_nodes: next(),
            cp_insert: next(),
            cp_get: next(),
            checkpoints: next(),
            claim: next(),
            claim_get: next(),
            release: next(),
            extent: next(),
            altered_blob: next(),
            runs_newest: next(),
            run_count: next(),
        })
    }
}

/// The task that drives one session's connection.
struct Driver {
    task: tokio::task::AbortHandle,
    /// Set when the session is cut: it is not used again, whatever the client says.
    killed: AtomicBool,
    /// Dropped with the session: the task then lets the connection close politely, but for at
    /// most [`CLOSE_GRACE`] (a server that stopped answering never lets it).
    _dropped: oneshot::Sender<()>,
}

impl Driver {
    fn spawn<F: std::future::Future + Send + 'static>(connection: F) -> Driver {
        let (dropped, gone) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Ends when the client is dropped or the server closes the session; the client
            // then reports itself closed and the next call reconnects.
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = &mut connection => return,
                _ = gone => {}
            }
            let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
        });
        Driver {
            task: task.abort_handle(),
            killed: AtomicBool::new(false),
            _dropped: dropped,
        }
    }

    /// Cut the session now: its socket is closed, every request still waiting on it fails.
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

/// One session with the server, its prepared statements, and which server process it is.
struct Conn {
    client: Client,
    st: Statements,
    /// `pg_backend_pid()` and the process's start time: enough to find it again, and to be
    /// sure it is that process and not a later one with the same pid.
    backend: (i32, String),
    driver: Driver,
}

impl Conn {
    /// Whether the session may take a request: not closed, and not cut after a timeout.
    fn usable(&self) -> bool {
        !self.driver.killed.load(Ordering::SeqCst) && !self.client.is_closed()
    }

    fn kill(&self) {
        self.driver.kill();
    }
}

/// A duration as messages give it.
fn dur(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// What a request that got no answer in time says.
fn no_answer(bound: Duration) -> String {
    format!(
        "timed out: the server did not answer within {}; ICE closed the session",
        dur(bound)
    )
}

/// Whether an error means the session is gone (rather than that a statement failed).
fn lost(e: &tokio_postgres::Error, client: &Client) -> bool {
    if e.is_closed() || client.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let c = db.code();
        return *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
            || *c == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
            || c.code().starts_with("08");
    }
    // I/O, or a stream that no longer parses: the session cannot be trusted either way.
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// The server's words for an error, without the driver's generic prefix.
fn message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!(
            "PostgreSQL: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        );
        if let Some(d) = db.detail() {
            m.push_str(": ");
            m.push_str(d);
        }
        return m;
    }
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

fn storage(context: impl Into<String>, e: &tokio_postgres::Error) -> LogError {
    LogError::Storage {
        context: context.into(),
        message: message(e),
    }
}

fn col<'a, T: FromSql<'a>>(row: &'a Row, i: usize, what: &str) -> Result<T, LogError> {
    row.try_get(i).map_err(|e| LogError::Corrupt {
        what: format!("{what}: column {i}: {}", message(&e)),
    })
}

fn u64_col(row: &Row, i: usize, what: &str) -> Result<u64, LogError> {
    let v: i64 = col(row, i, what)?;
    u64::try_from(v).map_err(|_| LogError::Corrupt {
        what: format!("{what}: column {i} is negative ({v})"),
    })
}

fn digest_of(bytes: &[u8], what: impl FnOnce() -> String) -> Result<Digest, LogError> {
    bytes.try_into().map(Digest).map_err(|_| LogError::Corrupt {
        what: format!("{} is {} bytes, not 32", what(), bytes.len()),
    })
}

fn row_event(r: &Row) -> Result<StoredEvent, LogError> {
    Ok(StoredEvent {
        log_seq: u64_col(r, 0, "event row")?,
        run_id: col(r, 1, "event row")?,
        run_seq: u64_col(r, 2, "event row")?,
        event_type: col(r, 3, "event row")?,
        hash: col(r, 4, "event row")?,
        body: col(r, 5, "event row")?,
    })
}

/// A position as the database stores it: past `i64::MAX` nothing can be stored, so a request
/// beyond it is clamped there (and finds nothing) rather than wrapped.
fn pos(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn clamp(limit: usize) -> i64 {
    limit.min(MAX_READ_ROWS) as i64
}

/// `(leaf_end, level)` of a node, or `None` for an id no tree of `i64::MAX` leaves holds.
fn node_key(id: &NodeId) -> Option<(i64, i16)> {
    if id.level >= 63 {
        return None;
    }
    let end = id.index.checked_add(1)?.checked_mul(1u64 << id.level)? - 1;
    Some((i64::try_from(end).ok()?, i16::from(id.level)))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn check_schema_name(s: &str) -> Result<(), LogError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(LogError::Invalid(format!(
            "schema name {s:?}: use 1 to 63 ASCII letters, digits and underscores, not starting with a digit"
        )))
    }
}

/// Where the log is, for messages (never the password).
fn describe(cfg: &Config, schema: &str) -> String {
    use tokio_postgres::config::Host;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let db = cfg.get_dbname().unwrap_or("");
    format!("postgres://{user}{host}:{port}/{db} (schema {schema})")
}

struct Inner {
    config: Config,
    /// The schema, quoted for SQL.
    quoted: String,
    schema: String,
    location: String,
    opts: Options,
    /// How long opening a session may take: the connect timeout for each host of the URL.
    startup: Duration,
    shared: Mutex<Option<Arc<Conn>>>,
    lose_next_commit_reply: AtomicBool,
}

impl Inner {
    fn connecting(&self, purpose: &str) -> String {
        if purpose.is_empty() {
            format!("connecting to {}", self.location)
        } else {
            format!("connecting to {} {purpose}", self.location)
        }
    }

    fn connect_timed_out(&self, purpose: &str, started: Instant) -> LogError {
        LogError::Storage {
            context: self.connecting(purpose),
            message: format!(
                "timed out after {}: the server did not complete the connection (TCP connect, \
                 startup, authentication, session setup)",
                dur(started.elapsed())
            ),
        }
    }

    /// A new session, past startup and authentication, by `limit`.
    async fn session(
        &self,
        purpose: &str,
        started: Instant,
        limit: Instant,
    ) -> Result<(Client, Driver), LogError> {
        match timeout_at(limit, self.config.connect(NoTls)).await {
            Ok(Ok((client, connection))) => Ok((client, Driver::spawn(connection))),
            Ok(Err(e)) => Err(storage(self.connecting(purpose), &e)),
            Err(_) => Err(self.connect_timed_out(purpose, started)),
        }
    }

    /// A new session with ICE's statements prepared, within the connect timeout and by
    /// `deadline`.
    async fn open(&self, purpose: &str, writer: bool, deadline: Instant) -> Result<Conn, LogError> {
        let started = Instant::now();
        let limit = deadline.min(started + self.startup);
        let (client, driver) = self.session(purpose, started, limit).await?;
        match timeout_at(limit, self.prepare(&client, purpose, writer)).await {
            Ok(Ok((st, backend))) => Ok(Conn {
                client,
                st,
                backend,
                driver,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                driver.kill();
                Err(self.connect_timed_out(purpose, started))
            }
        }
    }

    async fn prepare(
        &self,
        client: &Client,
        purpose: &str,
        writer: bool,
    ) -> Result<(Statements, (i32, String)), LogError> {
        let ctx = || format!("preparing statements on {} {purpose}", self.location);
        if writer {
            client
                // A commit returns once durable, even if the server's default says otherwise
                // (a stronger default, such as remote_apply, is kept). The appends' statements
                // are planned once per session: planning them anew each time (PostgreSQL's
                // custom plans) cost more than the rest of an append on a fast disk.
                .batch_execute(&format!(
                    "SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}; \
                     SELECT set_config('synchronous_commit', 'on', false) \
                       WHERE current_setting('synchronous_commit') IN ('off', 'local'); \
                     SELECT set_config('plan_cache_mode', 'force_generic_plan', false) \
                       WHERE current_setting('server_version_num')::int >= 120000"
                ))
                .await
                .map_err(|e| storage(ctx(), &e))?;
        } else {
            // A read past the request timeout is cut on this side by closing the session, which
            // a server process waiting on a lock does not notice: the server stops it too.
            // (A writer's cut session has its server process ended, and a cancelled COMMIT
            // would be an outcome of its own; so writers keep the server's setting.)
            client
                .batch_execute(&format!(
                    "SET statement_timeout = {}",
                    self.opts
                        .request_timeout
                        .as_millis()
                        .clamp(1, i32::MAX as u128)
                ))
                .await
                .map_err(|e| storage(ctx(), &e))?;
        }
        let (st, who) = tokio::join!(
            biased;
            Statements::prepare(client, &self.quoted),
            client.query_one(
                "SELECT pg_backend_pid(), backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
        );
        let st = st.map_err(|e| storage(ctx(), &e))?;
        let who = who.map_err(|e| storage(ctx(), &e))?;
        let backend = (
            col(&who, 0, "pg_stat_activity")?,
            col(&who, 1, "pg_stat_activity")?,
        );
        Ok((st, backend))
    }

    /// The shared session for reads and single-statement writes, reconnected if closed or
    /// cut, by `deadline`.
    async fn shared(&self, deadline: Instant) -> Result<Arc<Conn>, LogError> {
        let Ok(mut g) = timeout_at(deadline, self.shared.lock()).await else {
            return Err(LogError::Storage {
                context: format!("waiting for the session to {}", self.location),
                message: format!(
                    "timed out: another call was connecting, and no session was ready within {}",
                    dur(self.opts.request_timeout)
                ),
            });
        };
        if let Some(c) = g.as_ref()
            && c.usable()
        {
            return Ok(c.clone());
        }
        *g = None;
        let c = Arc::new(self.open("to read the log", false, deadline).await?);
        *g = Some(c.clone());
        Ok(c)
    }

    /// Run `f` on the shared session; if the session turns out to be gone, once more on a new
    /// one. Only for operations that are safe to repeat (reads, idempotent writes). All of it
    /// within the request timeout: past it the session is cut (it may be half-way through an
    /// exchange) and the call fails.
    async fn with_shared<'f, T>(
        &self,
        context: &str,
        f: impl Fn(Arc<Conn>) -> BoxFuture<'f, Result<T, tokio_postgres::Error>>,
    ) -> Result<T, LogError> {
        let deadline = Instant::now() + self.opts.request_timeout;
        let mut retried = false;
        loop {
            let c = self.shared(deadline).await.map_err(|e| match e {
                LogError::Storage {
                    context: c,
                    message,
                } => LogError::Storage {
                    context: format!("{context}: {c}"),
                    message,
                },
                e => e,
            })?;
            match timeout_at(deadline, f(c.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let gone = lost(&e, &c.client);
                    if gone {
                        c.kill();
                        if !retried && Instant::now() < deadline {
                            retried = true;
                            continue;
                        }
                    }
                    return Err(storage(format!("{context} in {}", self.location), &e));
                }
                Err(_) => {
                    c.kill();
                    return Err(LogError::Storage {
                        context: format!("{context} in {}", self.location),
                        message: no_answer(self.opts.request_timeout),
                    });
                }
            }
        }
    }
}

/// What an append's events need checked, computed by the caller's task (hashing happens there,
/// in parallel) and judged by the writer under the lock, in the SQLite backend's order.
struct Prepared {
    batch: SealedBatch,
    /// The first blob whose bytes do not hash to its name.
    blob_error: Option<LogError>,
    /// Per event, in order, until the first that fails: blobs it references that the batch
    /// does not carry (they must already be stored), or why it is refused.
    events: Vec<Result<Vec<Digest>, LogError>>,
    bytes: usize,
}

impl Prepared {
    fn new(batch: SealedBatch) -> Result<Prepared, LogError> {
        if batch.is_empty() {
            return Err(LogError::Invalid("an empty batch".into()));
        }
        // Assert in pairs: the digest names the bytes, here as when verified.
        let blob_error = batch
            .blobs()
            .iter()
            .find(|b| Digest::of(&b.bytes) != b.digest)
            .map(|b| LogError::Invalid(format!("blob {} does not hash to its name", b.digest)));
        let own: HashSet<Digest> = batch.blobs().iter().map(|b| b.digest).collect();
        let mut events = Vec::with_capacity(batch.events().len());
        let mut bytes = batch.blobs().iter().map(|b| b.bytes.len()).sum::<usize>();
        for se in batch.events() {
            let e = se.event();
            bytes += se.body().len();
            let check = if Digest::of(se.body()) != e.hash {
                Err(LogError::Invalid(format!(
                    "event {} does not hash to its hash",
                    e.id()
                )))
            } else {
                blob_refs(&e.payload)
                    .map_err(LogError::Invalid)
                    .map(|refs| {
                        refs.into_iter()
                            .map(|r| r.digest)
                            .filter(|d| !own.contains(d))
                            .collect()
                    })
            };
            let failed = check.is_err();
            events.push(check);
            if failed {
                break;
            }
        }
        Ok(Prepared {
            batch,
            blob_error,
            events,
            bytes,
        })
    }

    fn context(&self, location: &str, phase: &str) -> String {
        format!(
            "appending {} event(s) to run {} in {location}: {phase}",
            self.batch.events().len(),
            self.batch.run_id()
        )
    }
}

struct Request {
    prep: Prepared,
    reply: oneshot::Sender<Result<AppendReceipt, LogError>>,
}

/// Rows one group writes.
#[derive(Default)]
struct Rows<'a> {
    blob_digests: Vec<&'a [u8]>,
    blob_bytes: Vec<&'a [u8]>,
    log_seqs: Vec<i64>,
    run_ids: Vec<&'a str>,
    run_seqs: Vec<i64>,
    types: Vec<&'a str>,
    hashes: Vec<&'a [u8]>,
    bodies: Vec<&'a [u8]>,
    leaf_ends: Vec<i64>,
    levels: Vec<i16>,
    node_hashes: Vec<Vec<u8>>,
}

impl Rows<'_> {
    /// Parameters `$1..$12` of the write statements.
    fn params<'p>(&'p self, new_size: &'p i64) -> Vec<&'p (dyn ToSql + Sync)> {
        vec![
            &self.blob_digests,
            &self.blob_bytes,
            &self.log_seqs,
            &self.run_ids,
            &self.run_seqs,
            &self.types,
            &self.hashes,
            &self.bodies,
            &self.leaf_ends,
            &self.levels,
            &self.node_hashes,
            new_size,
        ]
    }
}

/// Judge each batch against the tips as the earlier ones leave them, and lay out the rows of
/// those accepted, growing `frontier`.
fn plan<'a>(
    group: &'a [Prepared],
    tips: &mut HashMap<String, Result<(u64, Digest), LogError>>,
    stored_blobs: &HashSet<Digest>,
    frontier: &mut Frontier,
) -> (Rows<'a>, Vec<Result<AppendReceipt, LogError>>) {
    let mut rows = Rows::default();
    let mut results = Vec::with_capacity(group.len());
    let mut group_blobs: HashSet<Digest> = HashSet::new();
    for p in group {
        let r = judge(p, tips, stored_blobs, &group_blobs).map(|()| {
            let b = &p.batch;
            for blob in b.blobs() {
                if group_blobs.insert(blob.digest) {
                    rows.blob_digests.push(&blob.digest.0[..]);
                    rows.blob_bytes.push(&blob.bytes);
                }
            }
            let first_log_seq = frontier.size();
            for se in b.events() {
                let e = se.event();
                rows.log_seqs.push(frontier.size() as i64);
                rows.run_ids.push(b.run_id().as_str());
                rows.run_seqs.push(e.run_seq as i64);
                rows.types.push(&e.event_type);
                rows.hashes.push(&e.hash.0[..]);
                rows.bodies.push(se.body());
                for (id, h) in frontier.push(leaf_hash(&e.hash.0)) {
                    rows.leaf_ends.push(id.last_leaf() as i64);
                    rows.levels.push(i16::from(id.level));
                    rows.node_hashes.push(h.0.to_vec());
                }
            }
            AppendReceipt {
                first_log_seq,
                count: frontier.size() - first_log_seq,
                tree_size: frontier.size(),
            }
        });
        results.push(r);
    }
    (rows, results)
}

/// How one attempt at committing a group ended.
enum Attempt {
    /// Committed (or nothing to commit): one result per request.
    Done(Vec<Result<AppendReceipt, LogError>>, Option<Frontier>),
    /// Nothing was written. `lost`: because the session is gone (the group may be retried).
    Failed {
        phase: String,
        error: LogError,
        lost: bool,
    },
    /// The write and `COMMIT` (or the one-statement write) were sent and no answer came: the
    /// session was lost, or the server did not answer in time.
    Unknown {
        planned: Vec<Result<AppendReceipt, LogError>>,
        frontier: Frontier,
        old_backend: (i32, String),
        /// Whether no answer came in time (else the session was lost).
        timed_out: bool,
        message: String,
    },
}

/// The answer to one request of an attempt, before anything that could commit was sent.
fn answered<T>(
    r: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    phase: &str,
    conn: &Conn,
    bound: Duration,
) -> Result<T, Attempt> {
    match r {
        Ok(r) => r.map_err(|e| failed(phase, &e, &conn.client)),
        Err(_) => Err(timed_out(conn, phase, bound)),
    }
}

/// A request that got no answer by the deadline, before anything that could commit was sent:
/// the session is cut (the server rolls back what it had begun), nothing was written.
fn timed_out(conn: &Conn, phase: &str, bound: Duration) -> Attempt {
    conn.kill();
    Attempt::Failed {
        phase: phase.into(),
        error: LogError::Storage {
            context: String::new(),
            message: no_answer(bound),
        },
        lost: true,
    }
}

fn failed(phase: &str, e: &tokio_postgres::Error, client: &Client) -> Attempt {
    Attempt::Failed {
        phase: phase.into(),
        error: LogError::Storage {
            context: String::new(),
            message: message(e),
        },
        lost: lost(e, client),
    }
}

/// The task that commits a node's appends: one session, the tree's right edge.
struct Writer {
    inner: Arc<Inner>,
    conn: Option<Conn>,
    frontier: Option<Frontier>,
    /// Whether the last commit found the log as this writer had left it (no other writer
    /// lately): then the next group tries the one-statement path first.
    solo: bool,
}

impl Writer {
    /// The writer task: commits what appenders queued while another commit was under way.
    async fn run(core: Arc<Mutex<Writer>>, mut rx: mpsc::Receiver<Request>) {
        let mut last_group = 0usize;
        while let Some(first) = rx.recv().await {
            if last_group > 1 {
                // Appenders answered by the last group are about to send their next request:
                // let them, so they join this group instead of waiting for the next.
                tokio::task::yield_now().await;
            }
            let mut bytes = first.prep.bytes;
            let mut group = vec![first];
            while group.len() < MAX_GROUP_REQUESTS && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.prep.bytes;
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            last_group = group.len();
            let (preps, replies): (Vec<_>, Vec<_>) =
                group.into_iter().map(|r| (r.prep, r.reply)).unzip();
            let results = core.lock().await.commit_group(&preps).await;
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
    }

    async fn commit_group(&mut self, group: &[Prepared]) -> Vec<Result<AppendReceipt, LogError>> {
        // Everything up to the commit's answer, the retry included, by this deadline.
        let deadline = Instant::now() + self.inner.opts.request_timeout;
        let mut retried = false;
        loop {
            match self.attempt(group, deadline).await {
                Attempt::Done(results, frontier) => {
                    if frontier.is_some() {
                        self.frontier = frontier;
                    }
                    return results;
                }
                Attempt::Failed { phase, error, lost } => {
                    if lost {
                        self.conn = None;
                        // Nothing was sent that could commit: safe to try once more, in the
                        // time left.
                        if !retried && Instant::now() < deadline {
                            retried = true;
                            continue;
                        }
                    }
                    let loc = &self.inner.location;
                    return group
                        .iter()
                        .map(|p| {
                            Err(match &error {
                                LogError::Storage { message, .. } => LogError::Storage {
                                    context: p
                                        .context(loc, &format!("{phase}; nothing was written")),
                                    message: message.clone(),
                                },
                                other => other.clone(),
                            })
                        })
                        .collect();
                }
                Attempt::Unknown {
                    planned,
                    frontier,
                    old_backend,
                    timed_out,
                    message,
                } => {
                    self.conn = None;
                    let why = if timed_out {
                        format!(
                            "the server did not answer the commit within {}",
                            dur(self.inner.opts.request_timeout)
                        )
                    } else {
                        "the connection was lost while committing".into()
                    };
                    return self
                        .resolve(group, planned, frontier, old_backend, why, message)
                        .await;
                }
            }
        }
    }

    async fn attempt(&mut self, group: &[Prepared], deadline: Instant) -> Attempt {
        let bound = self.inner.opts.request_timeout;
        if self.conn.as_ref().is_none_or(|c| !c.usable()) {
            self.conn = None;
            match self.inner.open("to append", true, deadline).await {
                Ok(c) => self.conn = Some(c),
                Err(error) => {
                    return Attempt::Failed {
                        phase: "connecting".into(),
                        error,
                        lost: false,
                    };
                }
            }
        }
        let Some(conn) = self.conn.as_ref() else {
            unreachable!("connected above")
        };
        let (client, st) = (&conn.client, &conn.st);

        // Blobs the batches reference but do not carry: they must be stored already, and
        // stored blobs never go away, so this needs no lock. Those they carry too: one already
        // stored under that name must be intact, or the append would keep the other bytes.
        let mut needed: Vec<&[u8]> = group
            .iter()
            .flat_map(|p| p.events.iter())
            .filter_map(|c| c.as_ref().ok())
            .flatten()
            .map(|d| &d.0[..])
            .chain(
                group
                    .iter()
                    .flat_map(|p| p.batch.blobs().iter())
                    .map(|b| &b.digest.0[..]),
            )
            .collect();
        needed.sort_unstable();
        needed.dedup();
        let mut stored_blobs: HashSet<Digest> = HashSet::new();
        if !needed.is_empty() {
            match timeout_at(deadline, client.query(&st.blobs_have, &[&needed])).await {
                Err(_) => return timed_out(conn, "looking up stored blobs", bound),
                Ok(Ok(rows)) => {
                    for r in rows {
                        let d: Vec<u8> = match col(&r, 0, "blob row") {
                            Ok(d) => d,
                            Err(error) => return corrupt(error),
                        };
                        let intact: bool = match col(&r, 1, "blob row") {
                            Ok(i) => i,
                            Err(error) => return corrupt(error),
                        };
                        if let Ok(d) = <[u8; 32]>::try_from(d.as_slice()) {
                            if !intact {
                                return corrupt(LogError::Corrupt {
                                    what: format!(
                                        "blob {} is stored with bytes that do not hash to its name: the store was altered; nothing was appended (run `ice verify`)",
                                        Digest(d)
                                    ),
                                });
                            }
                            stored_blobs.insert(Digest(d));
                        }
                    }
                }
                Ok(Err(e)) => return failed("looking up stored blobs", &e, client),
            }
        }

        // No other writer was seen lately: one statement, one round trip, and it writes only
        // if the log is as this writer left it.
        if self.solo
            && let Some(f) = &self.frontier
        {
            let mut frontier = f.clone();
            let expected = frontier.size() as i64;
            let mut tips: HashMap<String, Result<(u64, Digest), LogError>> = HashMap::new();
            let (mut first_runs, mut first_seqs, mut first_prevs) = (vec![], vec![], vec![]);
            for p in group {
                let run = p.batch.run_id().as_str();
                if !tips.contains_key(run) {
                    tips.insert(run.to_string(), Ok((p.batch.first_seq(), p.batch.prev())));
                    first_runs.push(run);
                    first_seqs.push(p.batch.first_seq() as i64);
                    first_prevs.push(p.batch.prev().0.to_vec());
                }
            }
            let (rows, results) = plan(group, &mut tips, &stored_blobs, &mut frontier);
            // Only when every batch would land: what fails is judged under the lock, where
            // a conflict is told apart from a bad batch as the SQLite backend tells it.
            if results.iter().all(Result::is_ok) {
                let new_size = frontier.size() as i64;
                let mut params = rows.params(&new_size);
                params.extend([
                    &first_runs as &(dyn ToSql + Sync),
                    &first_seqs,
                    &first_prevs,
                    &expected,
                ]);
                // Sent whole, the statement may commit whatever follows; a session known to be
                // gone (the server ended it since the check above) is replaced first instead,
                // and past the deadline nothing is sent.
                if !conn.usable() {
                    return Attempt::Failed {
                        phase: "sending the events".into(),
                        error: LogError::Storage {
                            context: String::new(),
                            message: "the connection is closed".into(),
                        },
                        lost: true,
                    };
                }
                if Instant::now() >= deadline {
                    return timed_out(conn, "sending the events", bound);
                }
                match timeout_at(deadline, client.query_one(&st.fast_write, &params)).await {
                    Ok(Ok(row)) if row.try_get::<_, i64>(0).is_ok_and(|n| n == 1) => {
                        if self
                            .inner
                            .lose_next_commit_reply
                            .swap(false, Ordering::SeqCst)
                        {
                            return Attempt::Unknown {
                                planned: results,
                                frontier,
                                old_backend: conn.backend.clone(),
                                timed_out: false,
                                message: "(test) the reply to the commit was lost".into(),
                            };
                        }
                        return Attempt::Done(results, Some(frontier));
                    }
                    // Another writer was here: the careful way, from now on.
                    Ok(Ok(_)) => self.solo = false,
                    Ok(Err(e)) if lost(&e, client) => {
                        conn.kill();
                        return Attempt::Unknown {
                            planned: results,
                            frontier,
                            old_backend: conn.backend.clone(),
                            timed_out: false,
                            message: message(&e),
                        };
                    }
                    Ok(Err(e)) => return failed("writing the events", &e, client),
                    Err(_) => {
                        conn.kill();
                        return Attempt::Unknown {
                            planned: results,
                            frontier,
                            old_backend: conn.backend.clone(),
                            timed_out: true,
                            message: no_answer(bound),
                        };
                    }
                }
            }
        }

        // Take the log's write lock, then read the tips: sent together, executed in order, so
        // the tips are read after the lock is held.
        let mut runs: Vec<&str> = group.iter().map(|p| p.batch.run_id().as_str()).collect();
        runs.sort_unstable();
        runs.dedup();
        let tips_params: [&(dyn ToSql + Sync); 1] = [&runs];
        let (begin, head, tips) = tokio::join!(
            biased;
            timeout_at(deadline, client.batch_execute("BEGIN")),
            timeout_at(deadline, client.query_opt(&st.lock, &[])),
            timeout_at(deadline, client.query(&st.tips, &tips_params)),
        );
        let outcome = (|| -> Result<_, Attempt> {
            answered(begin, "beginning a transaction", conn, bound)?;
            let head = answered(head, "waiting for the log's write lock", conn, bound)?;
            let tips = answered(tips, "reading the runs' tips", conn, bound)?;
            let head = head.ok_or_else(|| {
                corrupt(LogError::Corrupt {
                    what: "the head row (the log's size) is missing".into(),
                })
            })?;
            let size = u64_col(&head, 0, "head row").map_err(corrupt)?;
            let mut tip_of: HashMap<String, Result<(u64, Digest), LogError>> = HashMap::new();
            for r in &tips {
                let run: String = col(r, 0, "tip row").map_err(corrupt)?;
                let seq: Option<i64> = col(r, 1, "tip row").map_err(corrupt)?;
                let tip = match seq {
                    None => Ok((0, Digest::GENESIS)),
                    Some(seq) => col::<Vec<u8>>(r, 2, "tip row").and_then(|h| {
                        digest_of(&h, || format!("hash of {run}:{seq}"))
                            .map(|d| (seq as u64 + 1, d))
                    }),
                };
                tip_of.insert(run, tip);
            }
            Ok((size, tip_of))
        })();
        let (size, mut tip_of) = match outcome {
            Ok(v) => v,
            Err(a) => return self.abandon(a, deadline).await,
        };

        // The tree's right edge: another node may have appended since this one last did.
        self.solo = self.frontier.as_ref().is_some_and(|f| f.size() == size);
        let mut frontier = match &self.frontier {
            Some(f) if f.size() == size => f.clone(),
            _ => match load_frontier(conn, size, deadline, bound).await {
                Ok(f) => f,
                Err(a) => return self.abandon(a, deadline).await,
            },
        };

        let (rows, results) = plan(group, &mut tip_of, &stored_blobs, &mut frontier);
        if rows.log_seqs.is_empty() {
            return match timeout_at(deadline, client.batch_execute("ROLLBACK")).await {
                Ok(Ok(())) => Attempt::Done(results, None),
                _ => {
                    // Not committed: cut, the session rolls back.
                    conn.kill();
                    self.conn = None;
                    Attempt::Done(results, None)
                }
            };
        }
        if Instant::now() >= deadline {
            let a = timed_out(conn, "writing the events", bound);
            return self.abandon(a, deadline).await;
        }

        // Write and commit, sent together. If the write fails the transaction is aborted and
        // PostgreSQL answers the COMMIT with a rollback.
        let new_size = frontier.size() as i64;
        let params = rows.params(&new_size);
        let (write, commit) = tokio::join!(
            biased;
            timeout_at(deadline, client.execute(&st.write, &params)),
            timeout_at(deadline, client.batch_execute("COMMIT")),
        );
        let unknown = |timed_out: bool, message: String| Attempt::Unknown {
            planned: results.clone(),
            frontier: frontier.clone(),
            old_backend: conn.backend.clone(),
            timed_out,
            message,
        };
        let lost_reply = [
            write.as_ref().ok().and_then(|r| r.as_ref().err()),
            commit.as_ref().ok().and_then(|r| r.as_ref().err()),
        ]
        .into_iter()
        .flatten()
        .find(|e| lost(e, client))
        .map(message);
        if let Some(m) = lost_reply {
            conn.kill();
            return unknown(false, m);
        }
        match (write, commit) {
            // The write failed: the transaction is aborted, its COMMIT can only roll back.
            (Ok(Err(e)), commit) => {
                if commit.is_err() {
                    conn.kill();
                }
                failed("writing the events", &e, client)
            }
            // Sent, and no answer in time: it may have committed.
            (Err(_), _) | (_, Err(_)) => {
                conn.kill();
                unknown(true, no_answer(bound))
            }
            (Ok(Ok(_)), Ok(Err(e))) => failed("committing", &e, client),
            (Ok(Ok(_)), Ok(Ok(()))) => {
                if self
                    .inner
                    .lose_next_commit_reply
                    .swap(false, Ordering::SeqCst)
                {
                    return unknown(false, "(test) the reply to COMMIT was lost".into());
                }
                Attempt::Done(results, Some(frontier))
            }
        }
    }

    /// End the transaction of a failed attempt (nothing was written) and pass the failure on.
    /// A session that cannot roll back by `deadline` is cut (the server rolls back).
    async fn abandon(&mut self, a: Attempt, deadline: Instant) -> Attempt {
        let gone = matches!(a, Attempt::Failed { lost: true, .. });
        if let Some(c) = &self.conn {
            if !gone
                && c.usable()
                && matches!(
                    timeout_at(deadline, c.client.batch_execute("ROLLBACK")).await,
                    Ok(Ok(()))
                )
            {
                return a;
            }
            c.kill();
        }
        self.conn = None;
        a
    }

    /// The commit's reply was lost: find out from the log whether the group landed.
    async fn resolve(
        &mut self,
        group: &[Prepared],
        planned: Vec<Result<AppendReceipt, LogError>>,
        frontier: Frontier,
        old_backend: (i32, String),
        why: String,
        lost_message: String,
    ) -> Vec<Result<AppendReceipt, LogError>> {
        let loc = self.inner.location.clone();
        // A bound of its own: the attempt may have used all of its time.
        let deadline = Instant::now() + self.inner.opts.request_timeout;
        let found = self.find_out(group, &planned, &old_backend, deadline).await;
        match found {
            Ok(true) => {
                self.frontier = Some(frontier);
                planned
            }
            Ok(false) => group
                .iter()
                .zip(planned)
                .map(|(p, r)| {
                    r.and_then(|_| {
                        Err(LogError::Storage {
                            context: p.context(
                                &loc,
                                &format!(
                                    "{why}; ICE reconnected, made sure the old session had ended \
                                     and re-read the run: the batch is not stored, nothing was \
                                     written"
                                ),
                            ),
                            message: lost_message.clone(),
                        })
                    })
                })
                .collect(),
            Err(unknown) => group
                .iter()
                .zip(planned)
                .map(|(p, r)| {
                    r.and_then(|_| {
                        Err(LogError::Storage {
                            context: p.context(
                                &loc,
                                &format!(
                                    "{why}, and ICE could not find out whether the batch is \
                                     stored ({unknown}); read the run before appending to it again"
                                ),
                            ),
                            message: lost_message.clone(),
                        })
                    })
                })
                .collect(),
        }
    }

    async fn find_out(
        &mut self,
        group: &[Prepared],
        planned: &[Result<AppendReceipt, LogError>],
        old_backend: &(i32, String),
        deadline: Instant,
    ) -> Result<bool, String> {
        let bound = self.inner.opts.request_timeout;
        let conn = self
            .inner
            .open("to find out whether a commit landed", true, deadline)
            .await
            .map_err(|e| e.to_string())?;
        let client = &conn.client;
        // Each request by the deadline; past it the new session is cut too.
        let gave_up = || {
            conn.kill();
            no_answer(bound)
        };
        // Fence: while the old server process lives it could still commit. End it and wait
        // until it is gone; from then on what is stored is final.
        let (pid, start) = old_backend;
        let fence_started = Instant::now();
        let fence_deadline = deadline.min(fence_started + FENCE_TIMEOUT);
        loop {
            let rows = timeout_at(
                deadline,
                client.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start::text = $2",
                    &[pid, start],
                ),
            )
            .await
            .map_err(|_| gave_up())?
            .map_err(|e| message(&e))?;
            if rows.is_empty() {
                break;
            }
            if Instant::now() > fence_deadline {
                return Err(format!(
                    "the old session (server process {pid}) did not end within {}",
                    dur(fence_started.elapsed())
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One transaction: every batch of the group is stored, or none is.
        let mut landed = None;
        for (p, r) in group.iter().zip(planned) {
            let Ok(receipt) = r else { continue };
            let first = &p.batch.events()[0];
            let row = timeout_at(
                deadline,
                client.query_opt(
                    &conn.st.landed,
                    &[&p.batch.run_id().as_str(), &(p.batch.first_seq() as i64)],
                ),
            )
            .await
            .map_err(|_| gave_up())?
            .map_err(|e| message(&e))?;
            let here = match row {
                None => false,
                Some(row) => {
                    let log_seq = u64_col(&row, 0, "event row").map_err(|e| e.to_string())?;
                    let hash: Vec<u8> = col(&row, 1, "event row").map_err(|e| e.to_string())?;
                    log_seq == receipt.first_log_seq && hash == first.event().hash.0
                }
            };
            match landed {
                None => landed = Some(here),
                Some(l) if l != here => {
                    return Err(
                        "some batches of one transaction are stored and others are not".into(),
                    );
                }
                Some(_) => {}
            }
        }
        self.conn = Some(conn);
        Ok(landed.unwrap_or(false))
    }
}

fn corrupt(error: LogError) -> Attempt {
    Attempt::Failed {
        phase: String::new(),
        error,
        lost: false,
    }
}

/// Rebuild the tree's right edge for a log of `size` events from its stored nodes.
async fn load_frontier(
    conn: &Conn,
    size: u64,
    deadline: Instant,
    bound: Duration,
) -> Result<Frontier, Attempt> {
    // One perfect subtree per set bit of the size, largest first (as Frontier::from_nodes
    // asks for them).
    let mut ids = Vec::new();
    let mut start = 0u64;
    for level in (0..64u8).rev() {
        if size & (1u64 << level) != 0 {
            ids.push(NodeId {
                level,
                index: start >> level,
            });
            start += 1u64 << level;
        }
    }
    let keys: Vec<(i64, i16)> = ids.iter().filter_map(node_key).collect();
    let ends: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let levels: Vec<i16> = keys.iter().map(|k| k.1).collect();
    let rows = answered(
        timeout_at(
            deadline,
            conn.client.query(&conn.st.tree_nodes, &[&ends, &levels]),
        )
        .await,
        "reading the tree's right edge",
        conn,
        bound,
    )?;
    let mut map = HashMap::new();
    for r in &rows {
        let end: i64 = col(r, 0, "tree row").map_err(corrupt)?;
        let level: i16 = col(r, 1, "tree row").map_err(corrupt)?;
        let h: Vec<u8> = col(r, 2, "tree row").map_err(corrupt)?;
        let d =
            digest_of(&h, || format!("tree node at leaf {end}, level {level}")).map_err(corrupt)?;
        map.insert((end, level), d);
    }
    let mut missing = None;
    Frontier::from_nodes(size, |id| {
        let got = node_key(&id).and_then(|k| map.get(&k).copied());
        if got.is_none() {
            missing = Some(id);
        }
        got
    })
    .ok_or_else(|| {
        corrupt(LogError::Corrupt {
            what: format!(
                "tree node {missing:?} of a log of {size} events is missing; run `ice verify`"
            ),
        })
    })
}

/// Whether a batch may be appended now, checked in the order the SQLite backend checks.
fn judge(
    p: &Prepared,
    tips: &mut HashMap<String, Result<(u64, Digest), LogError>>,
    stored_blobs: &HashSet<Digest>,
    group_blobs: &HashSet<Digest>,
) -> Result<(), LogError> {
    let b = &p.batch;
    let run = b.run_id().as_str();
    let (next, prev) = match tips.get(run) {
        Some(Ok(t)) => *t,
        Some(Err(e)) => return Err(e.clone()),
        None => (0, Digest::GENESIS),
    };
    if b.first_seq() != next || b.prev() != prev {
        return Err(LogError::Conflict {
            run_id: run.to_string(),
            expected: b.first_seq(),
            expected_prev: b.prev(),
            actual: next,
        });
    }
    if let Some(e) = &p.blob_error {
        return Err(e.clone());
    }
    for (check, se) in p.events.iter().zip(b.events()) {
        for d in check.as_ref().map_err(Clone::clone)? {
            if !stored_blobs.contains(d) && !group_blobs.contains(d) {
                return Err(LogError::Invalid(format!(
                    "event {} references blob {} that is not stored",
                    se.event().id(),
                    d
                )));
            }
        }
    }
    let last = &b.events()[b.events().len() - 1];
    tips.insert(
        run.to_string(),
        Ok((last.event().run_seq + 1, last.event().hash)),
    );
    Ok(())
}

/// The time bounds of a [`PgLog`] (the module's **Time bounds** says what each covers).
#[derive(Clone, Debug)]
pub struct Options {
    /// How long opening a session may take, per host the URL names: TCP connect, startup,
    /// authentication and session setup. A `connect_timeout` in the URL (whole seconds) takes
    /// its place.
    pub connect_timeout: Duration,
    /// How long a call may wait for the server: a read, a claim or a checkpoint in all; an
    /// append up to its commit's answer, and as long again to find out whether a commit that
    /// got no answer landed.
    pub request_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// A log in a PostgreSQL schema, shared by every ICE node that connects to it.
pub struct PgLog {
    inner: Arc<Inner>,
    /// The writer; whoever holds it commits.
    core: Arc<Mutex<Writer>>,
    /// Appends that found a commit under way wait here for the writer task.
    queue: mpsc::Sender<Request>,
}

/// The writer, held by an appender that commits on its own task. Should that task drop the
/// append half-way (a caller's timeout), the session goes with it: the server then rolls back
/// whatever was not committed, and the next commit starts on a new session from the log as it
/// finds it.
struct Committing<'a> {
    writer: tokio::sync::MutexGuard<'a, Writer>,
    finished: bool,
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.writer.conn = None;
        }
    }
}

impl PgLog {
    /// Connect to the log in `schema` (default [`DEFAULT_SCHEMA`]) of the database at `url`
    /// (`postgres://user[:password]@host[:port]/database[?param=value…]`, no TLS), creating
    /// the schema and its tables if it holds none of them, with the default [`Options`].
    ///
    /// Refused with [`LogError::NotALog`] if the schema holds ICE's table names without ICE's
    /// format record, or a format this code does not read; [`LogError::Invalid`] for a
    /// malformed URL or schema name (1–63 ASCII letters, digits, `_`); [`LogError::Storage`]
    /// if the server cannot be reached or does not answer in time. Must be called within a
    /// Tokio runtime: the writer task and the connections' tasks are spawned on it.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<PgLog, LogError> {
        Self::open(url, schema, Options::default(), true).await
    }

    /// [`PgLog::connect`] with other time bounds.
    pub async fn connect_with(
        url: &str,
        schema: Option<&str>,
        opts: Options,
    ) -> Result<PgLog, LogError> {
        Self::open(url, schema, opts, true).await
    }

    /// Open the log that is already in `schema` (default [`DEFAULT_SCHEMA`]) of the database
    /// at `url`, creating and changing nothing (no schema, table, row or migration): the way
    /// to open a log only to read it. A schema that does not exist or holds none of the log's
    /// tables is [`LogError::NotALog`], whose `path` names the server, database and schema
    /// (never the password); otherwise as [`PgLog::connect`].
    pub async fn connect_existing(url: &str, schema: Option<&str>) -> Result<PgLog, LogError> {
        Self::open(url, schema, Options::default(), false).await
    }

    /// [`PgLog::connect_existing`] with other time bounds.
    pub async fn connect_existing_with(
        url: &str,
        schema: Option<&str>,
        opts: Options,
    ) -> Result<PgLog, LogError> {
        Self::open(url, schema, opts, false).await
    }

    async fn open(
        url: &str,
        schema: Option<&str>,
        opts: Options,
        create: bool,
    ) -> Result<PgLog, LogError> {
        let schema = schema.unwrap_or(DEFAULT_SCHEMA);
        check_schema_name(schema)?;
        if opts.connect_timeout.is_zero() || opts.request_timeout.is_zero() {
            return Err(LogError::Invalid(
                "PostgreSQL timeouts must be longer than zero".into(),
            ));
        }
        let mut config: Config = url.parse().map_err(|e: tokio_postgres::Error| {
            LogError::Invalid(format!("PostgreSQL URL: {}", message(&e)))
        })?;
        // tokio-postgres bounds only the TCP connect with it; ICE bounds the whole opening of
        // a session by it too, per host the URL names (they are tried in turn).
        let per_host = *config
            .get_connect_timeout()
            .unwrap_or(&opts.connect_timeout);
        config.connect_timeout(per_host);
        let hosts = config
            .get_hosts()
            .len()
            .max(config.get_hostaddrs().len())
            .max(1);
        if config.get_application_name().is_none() {
            config.application_name("ice-log");
        }
        let inner = Arc::new(Inner {
            location: describe(&config, schema),
            quoted: quote_ident(schema),
            schema: schema.to_string(),
            startup: per_host.saturating_mul(u32::try_from(hosts).unwrap_or(u32::MAX)),
            opts,
            config,
            shared: Mutex::new(None),
            lose_next_commit_reply: AtomicBool::new(false),
        });
        let started = Instant::now();
        let (client, driver) = inner.session("", started, started + inner.startup).await?;
        let deadline = Instant::now() + inner.opts.request_timeout;
        let opened = timeout_at(deadline, async {
            if create {
                setup(&client, &inner).await?;
            } else {
                check_existing(&client, &inner).await?;
            }
            let (st, backend) = inner.prepare(&client, "to read the log", false).await?;
            check_size(&client, &inner).await?;
            Ok::<_, LogError>((st, backend))
        })
        .await;
        let (st, backend) = match opened {
            Ok(r) => r?,
            Err(_) => {
                driver.kill();
                let what = if create {
                    "creating or opening"
                } else {
                    "opening"
                };
                return Err(LogError::Storage {
                    context: format!("{what} the log in {}", inner.location),
                    message: no_answer(inner.opts.request_timeout),
                });
            }
        };
        *inner.shared.lock().await = Some(Arc::new(Conn {
            client,
            st,
            backend,
            driver,
        }));
        let (queue, rx) = mpsc::channel(WRITE_QUEUE);
        let core = Arc::new(Mutex::new(Writer {
            inner: inner.clone(),
            conn: None,
            frontier: None,
            solo: false,
        }));
        tokio::spawn(Writer::run(core.clone(), rx));
        Ok(PgLog { inner, core, queue })
    }

    /// The schema the log lives in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// Where the log is (URL without password, and schema), as error messages name it.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// Fault injection for tests: after the next successful commit, act as if its reply had
    /// been lost with the connection (the writer reconnects and re-reads the log to find out).
    #[doc(hidden)]
    pub fn lose_next_commit_reply(&self) {
        self.inner
            .lose_next_commit_reply
            .store(true, Ordering::SeqCst);
    }
}

/// Create the tables if the schema holds none of them; check the format if it holds them.
async fn setup(client: &Client, inner: &Inner) -> Result<(), LogError> {
    let ctx = || format!("creating or opening the log in {}", inner.location);
    let s = &inner.quoted;
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| storage(ctx(), &e))?;
    let result = async {
        // Nodes starting together create the schema once.
        client
            .execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&SETUP_LOCK_CLASS, &inner.schema],
            )
            .await
            .map_err(|e| storage(ctx(), &e))?;
        if !schema_exists(client, inner, &ctx).await? {
            client
                .batch_execute(&format!("CREATE SCHEMA {s}"))
                .await
                .map_err(|e| storage(ctx(), &e))?;
        }
        let present = present_tables(client, inner, &ctx).await?;
        if present.is_empty() {
            client
                .batch_execute(&ddl(s))
                .await
                .map_err(|e| storage(ctx(), &e))?;
            client
                .execute(
                    &format!(
                        "INSERT INTO {s}.meta(key, value) VALUES ('format', $1), ('taxonomy', $2)"
                    ),
                    &[&FORMAT, &ice_kernel::TAXONOMY_VERSION.to_string()],
                )
                .await
                .map_err(|e| storage(ctx(), &e))?;
            return Ok(());
        }
        check_format(client, inner, &present).await
    }
    .await;
    match result {
        Ok(()) => client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| storage(ctx(), &e)),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Check that the schema holds a log, without creating or changing anything: one read-only
/// transaction, rolled back.
async fn check_existing(client: &Client, inner: &Inner) -> Result<(), LogError> {
    let ctx = || format!("opening the log in {}", inner.location);
    let no_log = |why: &str| LogError::NotALog {
        path: inner.location.clone(),
        reason: format!("no ICE log in schema {}: {why}", inner.schema),
    };
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| storage(ctx(), &e))?;
    let result = async {
        if !schema_exists(client, inner, &ctx).await? {
            return Err(no_log("the database has no such schema"));
        }
        let present = present_tables(client, inner, &ctx).await?;
        if present.is_empty() {
            return Err(no_log("it holds none of the log's tables"));
        }
        check_format(client, inner, &present).await
    }
    .await;
    let end = client.batch_execute("ROLLBACK").await;
    match (result, end) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(storage(ctx(), &e)),
        (Ok(()), Ok(())) => Ok(()),
    }
}

async fn schema_exists(
    client: &Client,
    inner: &Inner,
    ctx: &impl Fn() -> String,
) -> Result<bool, LogError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&inner.schema],
        )
        .await
        .map_err(|e| storage(ctx(), &e))?
        .is_some())
}

/// Which of ICE's relation names the schema holds.
async fn present_tables(
    client: &Client,
    inner: &Inner,
    ctx: &impl Fn() -> String,
) -> Result<Vec<String>, LogError> {
    let names: Vec<&str> = TABLES.to_vec();
    Ok(client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = ANY($2::text[]) ORDER BY 1",
            &[&inner.schema, &names],
        )
        .await
        .map_err(|e| storage(ctx(), &e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A schema that holds some of ICE's table names: they must be an ICE log of this format,
/// whole.
async fn check_format(client: &Client, inner: &Inner, present: &[String]) -> Result<(), LogError> {
    let not_a_log = |reason: String| LogError::NotALog {
        path: inner.location.clone(),
        reason,
    };
    let s = &inner.quoted;
    if !present.iter().any(|t| t == "meta") {
        return Err(not_a_log(format!(
            "the schema holds tables named like an ICE log's ({}) but no meta table with its format",
            present.join(", ")
        )));
    }
    let format = client
        .query_opt(
            &format!("SELECT value FROM {s}.meta WHERE key = 'format'"),
            &[],
        )
        .await
        .map_err(|e| {
            not_a_log(format!(
                "its meta table is not an ICE log's: {}",
                message(&e)
            ))
        })?;
    let format: Option<String> = match format {
        None => None,
        Some(r) => Some(r.try_get(0).map_err(|e| {
            not_a_log(format!(
                "its meta table is not an ICE log's: {}",
                message(&e)
            ))
        })?),
    };
    match format {
        Some(f) if f == FORMAT => {}
        Some(f) => {
            return Err(not_a_log(format!(
                "format {f:?}; this ice reads {FORMAT:?}"
            )));
        }
        None => return Err(not_a_log("no format record".into())),
    }
    let missing: Vec<&str> = TABLES
        .iter()
        .copied()
        .filter(|t| !present.iter().any(|p| p == t))
        .collect();
    if !missing.is_empty() {
        return Err(LogError::Corrupt {
            what: format!(
                "{}: tables {} are missing",
                inner.location,
                missing.join(", ")
            ),
        });
    }
    Ok(())
}

/// The head row and the events must agree on the log's size. Both are read by one statement,
/// so they come from one snapshot: other nodes may be appending while this one connects.
async fn check_size(client: &Client, inner: &Inner) -> Result<(), LogError> {
    let ctx = || format!("reading the size of the log in {}", inner.location);
    let q = &inner.quoted;
    let both = format!(
        "SELECT (SELECT size FROM {q}.head WHERE id = 0), \
                (SELECT COALESCE(MAX(log_seq) + 1, 0) FROM {q}.events)"
    );
    let row = client
        .query_one(&both, &[])
        .await
        .map_err(|e| storage(ctx(), &e))?;
    let head: Option<i64> = row.try_get(0).map_err(|e| storage(ctx(), &e))?;
    let Some(head) = head else {
        return Err(LogError::Corrupt {
            what: format!(
                "{}: the head row (the log's size) is missing",
                inner.location
            ),
        });
    };
    let events: i64 = row.try_get(1).map_err(|e| storage(ctx(), &e))?;
    if head != events {
        return Err(LogError::Corrupt {
            what: format!(
                "{}: the head row says the log holds {head} events, but the last event is at log_seq {}",
                inner.location,
                events as i128 - 1
            ),
        });
    }
    Ok(())
}

impl PgLog {
    /// Runs by their first event, in log order or newest first.
    async fn list_runs(
        &self,
        newest: bool,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<RunId>, LogError> {
        let (lim, off) = (clamp(limit), pos(offset));
        let rows = self
            .inner
            .with_shared("listing runs", |c| {
                Box::pin(async move {
                    let st = if newest {
                        &c.st.runs_newest
                    } else {
                        &c.st.runs
                    };
                    c.client.query(st, &[&lim, &off]).await
                })
            })
            .await?;
        rows.iter()
            .map(|r| {
                let s: String = col(r, 0, "run id column")?;
                RunId::new(s).map_err(|e| LogError::Corrupt {
                    what: format!("run id column: {e}"),
                })
            })
            .collect()
    }
}

#[async_trait]
impl EventLog for PgLog {
    async fn append(&self, batch: SealedBatch) -> Result<AppendReceipt, LogError> {
        let prep = Prepared::new(batch)?;
        // No commit under way: commit right here. Handing the append to the writer task and
        // back would cost two task switches; under load the writer task gathers concurrent
        // appends into one group commit instead.
        if let Ok(writer) = self.core.try_lock() {
            let mut c = Committing {
                writer,
                finished: false,
            };
            let r = c.writer.commit_group(std::slice::from_ref(&prep)).await;
            c.finished = true;
            return r.into_iter().next().unwrap_or(Err(LogError::Closed));
        }
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(Request { prep, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LogError> {
        let (run, from, lim) = (run_id.as_str(), pos(from_seq), clamp(limit));
        let rows = self
            .inner
            .with_shared("reading a run", |c| {
                Box::pin(async move { c.client.query(&c.st.read_run, &[&run, &from, &lim]).await })
            })
            .await?;
        rows.iter().map(row_event).collect()
    }

    async fn scan(&self, from_log_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        let (from, lim) = (pos(from_log_seq), clamp(limit));
        let rows = self
            .inner
            .with_shared("scanning the log", |c| {
                Box::pin(async move { c.client.query(&c.st.scan, &[&from, &lim]).await })
            })
            .await?;
        rows.iter().map(row_event).collect()
    }

    async fn get(&self, id: &EventId) -> Result<Option<StoredEvent>, LogError> {
        let (run, seq) = (id.run_id.as_str(), pos(id.run_seq));
        let row = self
            .inner
            .with_shared("reading an event", |c| {
                Box::pin(async move { c.client.query_opt(&c.st.get, &[&run, &seq]).await })
            })
            .await?;
        row.as_ref().map(row_event).transpose()
    }

    async fn size(&self) -> Result<u64, LogError> {
        let row = self
            .inner
            .with_shared("reading the log size", |c| {
                Box::pin(async move { c.client.query_opt(&c.st.size, &[]).await })
            })
            .await?;
        match row {
            Some(r) => u64_col(&r, 0, "head row"),
            None => Err(LogError::Corrupt {
                what: "the head row (the log's size) is missing".into(),
            }),
        }
    }

    async fn runs(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.list_runs(false, offset, limit).await
    }

    async fn runs_newest_first(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.list_runs(true, offset, limit).await
    }

    async fn run_count(&self) -> Result<u64, LogError> {
        let row = self
            .inner
            .with_shared("counting runs", |c| {
                Box::pin(async move { c.client.query_one(&c.st.run_count, &[]).await })
            })
            .await?;
        let n: i64 = col(&row, 0, "run count")?;
        Ok(n.max(0) as u64)
    }

    async fn existing(&self, ids: &[EventId]) -> Result<HashSet<EventId>, LogError> {
        // Positions past i64::MAX cannot be stored; leave them out rather than clamp them
        // onto a position that could be.
        let asked: Vec<&EventId> = ids
            .iter()
            .filter(|id| i64::try_from(id.run_seq).is_ok())
            .collect();
        if asked.is_empty() {
            return Ok(HashSet::new());
        }
        let runs: Vec<&str> = asked.iter().map(|id| id.run_id.as_str()).collect();
        let seqs: Vec<i64> = asked.iter().map(|id| id.run_seq as i64).collect();
        let (runs, seqs) = (&runs, &seqs);
        let rows = self
            .inner
            .with_shared("looking up causes", |c| {
                Box::pin(async move { c.client.query(&c.st.existing, &[runs, seqs]).await })
            })
            .await?;
        let mut found: HashSet<(String, u64)> = HashSet::new();
        for r in &rows {
            found.insert((col(r, 0, "event row")?, u64_col(r, 1, "event row")?));
        }
        Ok(asked
            .into_iter()
            .filter(|id| found.contains(&(id.run_id.as_str().to_string(), id.run_seq)))
            .cloned()
            .collect())
    }

    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError> {
        let d = &digest.0[..];
        let row = self
            .inner
            .with_shared("reading a blob", |c| {
                Box::pin(async move { c.client.query_opt(&c.st.blob, &[&d]).await })
            })
            .await?;
        row.map(|r| col(&r, 0, "blob row")).transpose()
    }

    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Digest>, LogError> {
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            keys.push(node_key(id).ok_or_else(|| {
                LogError::Invalid(format!("tree node {id:?} is beyond any log's size"))
            })?);
        }
        let ends: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let levels: Vec<i16> = keys.iter().map(|k| k.1).collect();
        let (ends, levels) = (&ends, &levels);
        let rows = self
            .inner
            .with_shared("reading tree nodes", |c| {
                Box::pin(async move { c.client.query(&c.st.tree_nodes, &[ends, levels]).await })
            })
            .await?;
        let mut map = HashMap::with_capacity(rows.len());
        for r in &rows {
            let end: i64 = col(r, 0, "tree row")?;
            let level: i16 = col(r, 1, "tree row")?;
            let h: Vec<u8> = col(r, 2, "tree row")?;
            map.insert((end, level), h);
        }
        ids.iter()
            .zip(&keys)
            .map(|(id, k)| {
                let h = map.get(k).ok_or_else(|| LogError::Corrupt {
                    what: format!("tree node {id:?} is missing"),
                })?;
                digest_of(h, || format!("tree node {id:?}"))
            })
            .collect()
    }

    fn tree_floor(&self) -> u8 {
        0
    }

    async fn scan_nodes(
        &self,
        from_leaf: u64,
        leaves: u64,
    ) -> Result<Vec<(NodeId, Option<Digest>)>, LogError> {
        let from = pos(from_leaf);
        let end = pos(from_leaf.saturating_add(leaves.min(MAX_READ_ROWS as u64)));
        let rows = self
            .inner
            .with_shared("scanning the tree", |c| {
                Box::pin(async move { c.client.query(&c.st.scan_nodes, &[&from, &end]).await })
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let leaf_end = u64_col(r, 0, "tree row")?;
            let level: i16 = col(r, 1, "tree row")?;
            if !(0..64).contains(&level) {
                return Err(LogError::Corrupt {
                    what: format!("tree row at leaf {leaf_end} has level {level}"),
                });
            }
            let level = level as u8;
            // The inverse of NodeId::last_leaf; a row whose key is not a node's last leaf maps
            // to a node verification will not expect, and is reported there.
            out.push((
                NodeId {
                    level,
                    index: ((leaf_end + 1) >> level).wrapping_sub(1),
                },
                crate::merkle::stored_hash(&col::<Vec<u8>>(r, 2, "tree row")?),
            ));
        }
        Ok(out)
    }

    async fn add_checkpoint(&self, checkpoint: StoredCheckpoint) -> Result<(), LogError> {
        let size = self.size().await?;
        if checkpoint.size > size {
            return Err(LogError::Invalid(format!(
                "checkpoint covers {} events but the log has {}",
                checkpoint.size, size
            )));
        }
        let (cp_size, note) = (checkpoint.size as i64, checkpoint.note.as_str());
        // Insert-if-absent, then compare: repeating it after a lost reply is harmless.
        let (inserted, existing) = self
            .inner
            .with_shared("storing a checkpoint", |c| {
                Box::pin(async move {
                    let ins = c
                        .client
                        .query_opt(&c.st.cp_insert, &[&cp_size, &note])
                        .await?;
                    if ins.is_some() {
                        return Ok((true, None));
                    }
                    let row = c.client.query_opt(&c.st.cp_get, &[&cp_size]).await?;
                    Ok((false, row))
                })
            })
            .await?;
        if inserted {
            return Ok(());
        }
        let existing: Option<String> =
            existing.map(|r| col(&r, 0, "checkpoint row")).transpose()?;
        match existing {
            Some(n) if n == checkpoint.note => Ok(()),
            Some(_) => Err(LogError::Invalid(format!(
                "a different checkpoint of size {} is already stored",
                checkpoint.size
            ))),
            None => Err(LogError::Storage {
                context: format!("storing a checkpoint in {}", self.inner.location),
                message: format!(
                    "the checkpoint of size {} was neither inserted nor found",
                    checkpoint.size
                ),
            }),
        }
    }

    async fn index_problem(&self) -> Result<Option<String>, LogError> {
        // The server keeps its indexes; nothing ICE can check from a client (readers still check every row they are led to).
        Ok(None)
    }

    async fn altered_blob(&self) -> Result<Option<String>, LogError> {
        // The server hashes the rows: only names cross the connection. In steps of at most
        // BLOB_CHECK_BYTES, each one request within the request timeout, however large the
        // store (blobs are never removed, so the steps together see every blob stored before
        // the first).
        let mut after: Vec<u8> = Vec::new();
        loop {
            let from = &after;
            let rows = self
                .inner
                .with_shared("checking blobs", |c| {
                    Box::pin(async move {
                        c.client
                            .query(
                                &c.st.altered_blob,
                                &[from, &BLOB_CHECK_ROWS, &BLOB_CHECK_BYTES],
                            )
                            .await
                    })
                })
                .await?;
            let mut last = None;
            for r in &rows {
                let name: Vec<u8> = col(r, 0, "blob row")?;
                let intact: bool = col(r, 1, "blob row")?;
                if !intact {
                    return Ok(Some(hex::encode(name)));
                }
                last = Some(name);
            }
            match last {
                Some(name) => after = name,
                None => return Ok(None),
            }
        }
    }

    async fn extent(&self) -> Result<Option<Extent>, LogError> {
        let row = self
            .inner
            .with_shared("reading the log's edges", |c| {
                Box::pin(async move { c.client.query_one(&c.st.extent, &[]).await })
            })
            .await?;
        let int = |i: usize| -> Result<Option<i64>, LogError> {
            row.try_get(i).map_err(|e| LogError::Corrupt {
                what: format!("the log's edges do not read: {e}"),
            })
        };
        let size = match int(0)? {
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                return Err(LogError::Corrupt {
                    what: format!("the head row says size {n}"),
                });
            }
            None => {
                return Err(LogError::Corrupt {
                    what: "the head row (the log's size) is missing".into(),
                });
            }
        };
        Ok(Some(Extent {
            size,
            events: int(1)?.zip(int(2)?),
            nodes: int(3)?.zip(int(4)?),
            // The head keeps no last hash here: each append reads the last event itself.
            last: None,
            // A primary key: no row lacks its position (and counting would read the table).
            rows: None,
        }))
    }

    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, LogError> {
        let rows = self
            .inner
            .with_shared("reading checkpoints", |c| {
                Box::pin(async move { c.client.query(&c.st.checkpoints, &[]).await })
            })
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredCheckpoint {
                    size: u64_col(r, 0, "checkpoint row")?,
                    note: col(r, 1, "checkpoint row")?,
                })
            })
            .collect()
    }

    async fn claim_run(
        &self,
        run: &RunId,
        holder: &str,
        now_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<(), LogError> {
        if holder.is_empty() {
            return Err(LogError::Invalid(format!(
                "a claim on run {run} needs a holder"
            )));
        }
        if until_unix_ms < now_unix_ms {
            return Err(LogError::Invalid(format!(
                "a claim on run {run} until {until_unix_ms} ms ends before now ({now_unix_ms} ms)"
            )));
        }
        let r = run.as_str();
        // The claim is granted by one atomic upsert; if refused, read who holds it. The holder
        // can change in between (released, or taken over): then try again.
        for _ in 0..8 {
            let granted = self
                .inner
                .with_shared("claiming a run", |c| {
                    Box::pin(async move {
                        c.client
                            .query_opt(&c.st.claim, &[&r, &holder, &now_unix_ms, &until_unix_ms])
                            .await
                    })
                })
                .await?;
            if granted.is_some() {
                return Ok(());
            }
            let current = self
                .inner
                .with_shared("reading a run's claim", |c| {
                    Box::pin(async move { c.client.query_opt(&c.st.claim_get, &[&r]).await })
                })
                .await?;
            if let Some(row) = current {
                let other: String = col(&row, 0, "claim row")?;
                let until: i64 = col(&row, 1, "claim row")?;
                if other != holder && until > now_unix_ms {
                    return Err(LogError::Claimed {
                        run_id: r.to_string(),
                        holder: other,
                        until_unix_ms: until,
                    });
                }
            }
        }
        Err(LogError::Storage {
            context: format!("claiming run {run} in {}", self.inner.location),
            message: "the claim kept changing hands; try again".into(),
        })
    }

    async fn release_run(&self, run: &RunId, holder: &str) -> Result<(), LogError> {
        let r = run.as_str();
        self.inner
            .with_shared("releasing a run", |c| {
                Box::pin(async move { c.client.execute(&c.st.release, &[&r, &holder]).await })
            })
            .await
            .map(|_| ())
    }

    fn claims_lapse(&self) -> bool {
        true
    }
}
