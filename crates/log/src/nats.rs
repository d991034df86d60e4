//! The shared backend on NATS JetStream: several ICE nodes append to one log and any node reads,
//! verifies and replays it. Built for nats-server 2.9 and later (no atomic batch publish needed).
//!
//! # Names
//!
//! Everything of one log lives under a prefix given to [`NatsLog::connect`] (1 to 64 characters
//! of `[A-Za-z0-9_-]`):
//!
//! | what | NATS object |
//! |---|---|
//! | events (one message per appended batch) | stream `<prefix>_EVENTS`, subjects `<prefix>.ev.<run>` |
//! | large batch records | object store `<prefix>_RECORDS` |
//! | checkpoints (key: tree size) | key-value bucket `<prefix>_CHECKPOINTS` |
//! | run writer claims (key: run) | key-value bucket `<prefix>_CLAIMS` |
//!
//! `<run>` is the run id with `_` written `_u` and `.` written `_d` (a subject token cannot
//! hold a dot, and the mapping must stay one-to-one so two runs never share a subject).
//! [`destroy`] removes all four. [`NatsLog::connect`] creates what is missing;
//! [`NatsLog::connect_existing`] (for readers) creates nothing and refuses a prefix that names
//! no complete ICE log with [`LogError::NotALog`].
//!
//! # Server URL
//!
//! `nats://HOST:PORT`, with optional user info: `USER:PASSWORD@` or `TOKEN@` (async-nats
//! itself ignores user info; this backend hands it to the client as credentials). Only the
//! URL with its secrets replaced by `***` ([`redact_url`]) is kept: it is what
//! [`NatsLog::url`] returns and what errors name.
//!
//! # Order and atomicity
//!
//! An appended batch is **one** JetStream message (all its events' stored records and the blobs
//! they carry), so it is stored whole or not at all. The log's single order is the stream's
//! order: an event's `log_seq` is the number of events in all earlier messages. It is not
//! written into the message (a publisher cannot know it before the server orders the message);
//! every node derives it by reading the stream in order, which is the same for every reader
//! because the stream is append-only (`deny_delete`, `deny_purge`, no limits).
//!
//! # Conflicts (one writer per run position)
//!
//! Each run has its own subject, and a batch is published with
//! `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the run's last message as this
//! node knows it (0 for a new run). The server stores the message only if no other message of
//! the run came in between, atomically with storing it. Before publishing, the batch's
//! `first_seq` and `prev` are checked against that same known tip. So the batch continues the
//! run exactly where it ends, or nothing is written: a lost race returns the server's
//! "wrong last sequence", this node reads what it missed, and answers [`LogError::Conflict`] if
//! the run moved (if it did not, it publishes again against the new tip; appends to *other*
//! runs never conflict, there is no global lock).
//!
//! # Lost acknowledgements, reconnects
//!
//! Every batch carries `Nats-Msg-Id` = its last event's hash and its length; the stream keeps a
//! two-minute duplicate window. A publish whose acknowledgement is lost (timeout, connection
//! dropped, server restarting) is sent again with the same id until
//! [`Options::append_deadline`]: the server stores it at most once and answers a repeat with the
//! first copy's position. After the deadline the append fails with [`LogError::Storage`].
//! async-nats reconnects by itself; a publish it had buffered while disconnected may still reach
//! the server after that error, so a `Storage` error on append means "outcome unknown": reload
//! the run (as [`crate::ledger::Ledger`] does after any error). A batch is never half-written.
//! Every append error after such a lost answer says the batch may still be stored, whatever
//! failed next; and an append whose batch the server did acknowledge but whose position this
//! node then failed to read (the messages of other nodes before it) fails saying that the
//! batch IS stored, as which stream message.
//!
//! # Reads and the in-memory index
//!
//! Each [`NatsLog`] keeps an index of the stream, built when it connects and extended as it
//! reads: per message its stream sequence, first `log_seq`, run and first `run_seq`; per run its
//! messages and tip; the blobs by digest; and every Merkle tree node (recomputed from the event
//! hashes, so they need not be stored separately; 64 bytes per event). Event bodies are not kept:
//! reads fetch the messages they need (`direct get` for a few, an ordered consumer for ranges;
//! `read_run` filters by the run's subject) through a bounded cache. A read that may depend on
//! events this node has not seen yet first asks the server for the stream's last sequence and
//! reads up to it, so every node sees every append acknowledged before its read began.
//!
//! # Blobs and large batches
//!
//! Blobs travel inside their batch's message, so a batch that loses a race leaves no blob
//! behind, as in the embedded backend. A batch whose message would exceed the server's
//! `max_payload` is first written to the object store, named by the SHA-256 of its record, and
//! its message carries that digest instead; the message remains the commit point. An object
//! whose message never made it (a lost race) is never referenced, so it is invisible (it stays in
//! the bucket until [`destroy`]).
//!
//! # Checkpoints and claims
//!
//! A checkpoint is the key `<size>` of the checkpoint bucket, written only if absent (revision
//! compare-and-set). A claim is the key `<run>` of the claims bucket holding the holder and its
//! expiry; claiming, renewing, taking over a lapsed claim (expiry ≤ now) and releasing are
//! compare-and-set updates on the key's revision, so two nodes never both win.
//!
//! # Throughput
//!
//! Appends from one node are not serialized: each publishes as soon as its checks pass, and the
//! server orders them. To learn its `log_seq`, an append indexes the stream up to its message;
//! the messages before it that this node published are taken from memory (an append waits for
//! the tasks of publishes sent before its own to record them: the server answers one
//! connection in order, so they are already answered), and only other nodes' messages are read
//! back from the server.
//!
//! # Limits
//!
//! - Correctness under races relies on the server checking the expected subject sequence and
//!   the message id atomically with storing the message, which a single 2.9 server does (one
//!   stream processes its messages in order, under its lock); on a clustered stream the Raft
//!   leader does these checks, which this code has not been tested against.
//! - The index takes memory proportional to the log: 64 bytes per event (its tree nodes) and
//!   about 40 per batch; connecting reads the whole stream once.
//! - The subjects `<prefix>.ev.*` must be writable only by ICE (NATS permissions): a message
//!   that is not a valid batch continuing its run makes the log unreadable (reported as
//!   [`LogError::Corrupt`]), as a damaged file would.
//! - nats-server 2.9 answers the account query of async-nats' `create_key_value` in a form the
//!   client cannot parse, so the buckets' streams are created directly, configured as that call
//!   would (history 1, rollups allowed, direct get).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, kv, object_store, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use ice_kernel::blob::blob_refs;
use ice_kernel::{Digest, EventId, RunId, SealedBatch};
use tokio::io::AsyncReadExt;

use crate::merkle::{Frontier, NodeId, leaf_hash};
use crate::sqlite::MAX_READ_ROWS;
use crate::{AppendReceipt, EventLog, Extent, LogError, StoredCheckpoint, StoredEvent};

/// The format this code writes and reads (the events stream's description names it).
pub const FORMAT: &str = "ice-log-nats/1";
/// How long the stream remembers message ids (a lost acknowledgement is retried within it).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Most characters of a prefix.
pub const MAX_PREFIX_LEN: usize = 64;
/// Bytes of decoded messages kept in memory for reads.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Up to this many missing messages are fetched one by one (concurrently); more use a consumer.
const DIRECT_GETS: usize = 16;
/// Messages read into the index per step while catching up (bounds memory).
const CATCH_UP_STEP: u64 = 4096;
/// Lost races against another append to the same run's *subject* that turned out not to move
/// the run (impossible unless the stream holds foreign messages); then the append fails.
const MAX_REPUBLISH: u32 = 16;
/// Room left for headers below the server's `max_payload`.
const HEADER_ROOM: usize = 1024;
/// Record encoding.
const MAGIC: &[u8; 4] = b"ICE1";
const KIND_RECORD: u8 = 0;
const KIND_POINTER: u8 = 1;

/// Timeouts of a [`NatsLog`].
#[derive(Clone, Debug)]
pub struct Options {
    /// How long connecting to the server may take.
    pub connect_timeout: Duration,
    /// How long one request (a read, a publish's acknowledgement) may take.
    pub request_timeout: Duration,
    /// How long an append keeps re-sending a publish whose acknowledgement was lost before it
    /// fails with [`LogError::Storage`]. Must stay well below [`DUPLICATE_WINDOW`].
    pub append_deadline: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            append_deadline: Duration::from_secs(15),
        }
    }
}

fn storage(context: impl Into<String>) -> impl FnOnce(String) -> LogError {
    let context = context.into();
    move |message| LogError::Storage { context, message }
}

fn corrupt(what: impl Into<String>) -> LogError {
    LogError::Corrupt { what: what.into() }
}

/// The names of one log's NATS objects.
#[derive(Clone, Debug)]
struct Names {
    prefix: String,
    stream: String,
    records: String,
    checkpoints: String,
    claims: String,
}

impl Names {
    fn new(prefix: &str) -> Result<Names, LogError> {
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_LEN
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(LogError::Invalid(format!(
                "NATS log prefix {prefix:?}: use 1 to {MAX_PREFIX_LEN} characters of A-Z a-z 0-9 _ -"
            )));
        }
        Ok(Names {
            prefix: prefix.to_string(),
            stream: format!("{prefix}_EVENTS"),
            records: format!("{prefix}_RECORDS"),
            checkpoints: format!("{prefix}_CHECKPOINTS"),
            claims: format!("{prefix}_CLAIMS"),
        })
    }

    fn subject(&self, run: &str) -> String {
        format!("{}.ev.{}", self.prefix, run_token(run))
    }
}

// ---------------------------------------------------------------------------------------------
// Server URLs: what is dialled, what authenticates, and what may be shown.

/// What the user info of a server URL authenticates with (nats-server's reading of it).
enum Credentials {
    None,
    UserPassword(String, String),
    /// User info without a `:` is a token.
    Token(String),
}

/// A server URL taken apart. Deliberately not `Debug`: it holds the secrets.
struct ServerUrl {
    /// The URL without its user info (async-nats ignores it; `credentials` carries it).
    dial: String,
    credentials: Credentials,
    /// The URL with every secret replaced by `***`: the only form kept and shown.
    shown: String,
    /// The secrets as they appear in the URL and decoded, longest first (scrubbed from the
    /// client's messages).
    secrets: Vec<String>,
}

/// Query parameters whose values are never shown (matched without case, in part: `password`,
/// `pass`, `token`, `auth_token`, `secret`, `jwt`, `nkey`, `seed`, `creds`, …).
fn secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "pass", "pwd", "token", "secret", "jwt", "key", "seed", "cred", "auth",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// `%XX` escapes decoded (as a URL's user info is written); the text itself if that is not
/// UTF-8.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

impl ServerUrl {
    fn parse(url: &str) -> ServerUrl {
        let start = url.find("://").map_or(0, |i| i + 3);
        let end = url[start..]
            .find(['?', '#'])
            .map_or(url.len(), |i| start + i);
        let mut secrets = Vec::new();
        let mut secret = |raw: &str| {
            if !raw.is_empty() {
                secrets.push(raw.to_string());
                secrets.push(percent_decode(raw));
            }
        };
        // The last `@` before the query ends the user info (a password may hold an `@`).
        let (dial, mut shown, credentials) = match url[start..end].rfind('@') {
            None => (
                url[..end].to_string(),
                url[..end].to_string(),
                Credentials::None,
            ),
            Some(at) => {
                let (info, host) = (&url[start..start + at], &url[start + at + 1..end]);
                let dial = format!("{}{host}", &url[..start]);
                match info.split_once(':') {
                    Some((user, password)) => {
                        secret(password);
                        (
                            dial,
                            format!("{}{user}:***@{host}", &url[..start]),
                            Credentials::UserPassword(
                                percent_decode(user),
                                percent_decode(password),
                            ),
                        )
                    }
                    None if info.is_empty() => (dial.clone(), dial, Credentials::None),
                    None => {
                        secret(info);
                        (
                            dial,
                            format!("{}***@{host}", &url[..start]),
                            Credentials::Token(percent_decode(info)),
                        )
                    }
                }
            }
        };
        let tail = &url[end..];
        let (query, fragment) = match tail.strip_prefix('?') {
            Some(q) => q.split_at(q.find('#').unwrap_or(q.len())),
            None => ("", tail),
        };
        if tail.starts_with('?') {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) if secret_param(k) && !v.is_empty() => {
                        secret(v);
                        format!("{k}=***")
                    }
                    _ => kv.to_string(),
                })
                .collect();
            shown.push('?');
            shown.push_str(&params.join("&"));
        }
        shown.push_str(fragment);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        ServerUrl {
            dial: format!("{dial}{tail}"),
            credentials,
            shown,
            secrets,
        }
    }

    /// `text` with every secret of the URL replaced by `***`.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for s in &self.secrets {
            text = text.replace(s.as_str(), "***");
        }
        text
    }
}

/// A NATS server URL as it may be shown: the password of its user info (`USER:***@`), a token
/// given as user info (`***@`) and the values of query parameters that name a password, token,
/// key or secret replaced by `***`.
pub fn redact_url(url: &str) -> String {
    ServerUrl::parse(url).shown
}

/// A run id as one subject token (and key-value key): `_` → `_u`, `.` → `_d`; one-to-one.
fn run_token(run: &str) -> String {
    let mut out = String::with_capacity(run.len() + 4);
    for c in run.chars() {
        match c {
            '_' => out.push_str("_u"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Batch records: the bytes of one message.

/// One stored event of a record.
#[derive(Debug)]
struct RecEvent {
    event_type: String,
    hash: Digest,
    body: Vec<u8>,
}

/// A decoded batch record.
#[derive(Debug)]
struct Record {
    run_id: String,
    first_seq: u64,
    prev: Digest,
    events: Vec<RecEvent>,
    blobs: Vec<(Digest, Vec<u8>)>,
    /// Encoded size (cache accounting).
    bytes: usize,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// `MAGIC, KIND_RECORD, run id (u16 len), first_seq (u64), prev (32), events (u32 n; each: type
/// (u16 len), hash (32), body (u32 len)), blobs (u32 n; each: digest (32), bytes (u32 len))`,
/// integers big-endian. An event's `run_seq` is `first_seq` plus its index.
fn encode_batch(batch: &SealedBatch) -> Vec<u8> {
    let size: usize = 64
        + batch
            .events()
            .iter()
            .map(|e| 64 + e.body().len())
            .sum::<usize>()
        + batch
            .blobs()
            .iter()
            .map(|b| 40 + b.bytes.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    out.push(KIND_RECORD);
    let run = batch.run_id().as_str().as_bytes();
    out.extend_from_slice(&(run.len() as u16).to_be_bytes());
    out.extend_from_slice(run);
    out.extend_from_slice(&batch.first_seq().to_be_bytes());
    out.extend_from_slice(&batch.prev().0);
    out.extend_from_slice(&(batch.events().len() as u32).to_be_bytes());
    for se in batch.events() {
        let e = se.event();
        let t = e.event_type.as_bytes();
        out.extend_from_slice(&(t.len() as u16).to_be_bytes());
        out.extend_from_slice(t);
        out.extend_from_slice(&e.hash.0);
        put_bytes(&mut out, se.body());
    }
    out.extend_from_slice(&(batch.blobs().len() as u32).to_be_bytes());
    for b in batch.blobs() {
        out.extend_from_slice(&b.digest.0);
        put_bytes(&mut out, &b.bytes);
    }
    out
}

/// A message that points at a record stored in the object store.
fn encode_pointer(digest: &Digest, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(45);
    out.extend_from_slice(MAGIC);
    out.push(KIND_POINTER);
    out.extend_from_slice(&digest.0);
    out.extend_from_slice(&len.to_be_bytes());
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| "u16")?) as usize)
    }
    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| "u32")?) as usize)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| "u64")?,
        ))
    }
    fn digest(&mut self) -> Result<Digest, String> {
        Ok(Digest(self.take(32)?.try_into().map_err(|_| "digest")?))
    }
    fn string(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
}

/// What a message holds: a record, or a pointer to one in the object store.
enum Decoded {
    Record(Record),
    Pointer { digest: Digest, len: u64 },
}

fn decode(buf: &[u8]) -> Result<Decoded, String> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err("not an ICE batch record (bad magic)".into());
    }
    match r.u8()? {
        KIND_RECORD => {}
        KIND_POINTER => {
            let digest = r.digest()?;
            let len = r.u64()?;
            if r.pos != buf.len() {
                return Err("trailing bytes after a record pointer".into());
            }
            return Ok(Decoded::Pointer { digest, len });
        }
        k => return Err(format!("unknown record kind {k}")),
    }
    let n = r.u16()?;
    let run_id = r.string(n)?;
    let first_seq = r.u64()?;
    let prev = r.digest()?;
    let n_events = r.u32()?;
    // Each event takes at least 38 bytes: a count beyond that is damage, not an allocation.
    if n_events > buf.len() / 38 {
        return Err(format!(
            "{n_events} events cannot fit in {} bytes",
            buf.len()
        ));
    }
    let mut events = Vec::with_capacity(n_events);
    for _ in 0..n_events {
        let n = r.u16()?;
        let event_type = r.string(n)?;
        let hash = r.digest()?;
        let n = r.u32()?;
        let body = r.take(n)?.to_vec();
        events.push(RecEvent {
            event_type,
            hash,
            body,
        });
    }
    let n_blobs = r.u32()?;
    if n_blobs > buf.len() / 36 {
        return Err(format!("{n_blobs} blobs cannot fit in {} bytes", buf.len()));
    }
    let mut blobs = Vec::with_capacity(n_blobs);
    for _ in 0..n_blobs {
        let d = r.digest()?;
        let n = r.u32()?;
        blobs.push((d, r.take(n)?.to_vec()));
    }
    if r.pos != buf.len() {
        return Err("trailing bytes after a batch record".into());
    }
    Ok(Decoded::Record(Record {
        run_id,
        first_seq,
        prev,
        events,
        blobs,
        bytes: buf.len(),
    }))
}

// ---------------------------------------------------------------------------------------------
// The index: what this node knows of the stream, in stream order.

#[derive(Clone, Copy, Debug)]
struct MsgMeta {
    stream_seq: u64,
    first_log_seq: u64,
    first_run_seq: u64,
    count: u64,
    run: u32,
}

#[derive(Debug)]
struct RunMeta {
    id: RunId,
    /// Indexes into `Index::msgs`, in run order.
    msgs: Vec<u32>,
    next_seq: u64,
    last_hash: Digest,
    last_stream_seq: u64,
}

/// The tip of a run as this node knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tip {
    next_seq: u64,
    last_hash: Digest,
    last_stream_seq: u64,
}

#[derive(Default)]
struct Index {
    last_stream_seq: u64,
    msgs: Vec<MsgMeta>,
    frontier: Frontier,
    /// Every perfect-subtree hash, in the order leaves completed them (by last leaf, then level):
    /// leaf `i`'s nodes start at `node_offset(i)`.
    nodes: Vec<Digest>,
    run_ids: HashMap<String, u32>,
    runs: Vec<RunMeta>,
    /// Blob digest → the message (index into `msgs`) that first carried it.
    blobs: HashMap<Digest, u32>,
}

/// Nodes completed by leaves `0..leaf`: each leaf completes itself plus one node per trailing
/// one bit of its index, and those sum to `leaf - popcount(leaf)`.
fn node_offset(leaf: u64) -> u64 {
    2 * leaf - leaf.count_ones() as u64
}

impl Index {
    fn size(&self) -> u64 {
        self.frontier.size()
    }

    fn tip(&self, run: &str) -> Tip {
        match self.run_ids.get(run) {
            Some(&r) => {
                let m = &self.runs[r as usize];
                Tip {
                    next_seq: m.next_seq,
                    last_hash: m.last_hash,
                    last_stream_seq: m.last_stream_seq,
                }
            }
            None => Tip {
                next_seq: 0,
                last_hash: Digest::GENESIS,
                last_stream_seq: 0,
            },
        }
    }

    /// Add the next message of the stream. Checks first, changes nothing unless all pass.
    fn apply(
        &mut self,
        names: &Names,
        stream_seq: u64,
        subject: &str,
        rec: &Record,
    ) -> Result<(), LogError> {
        if stream_seq != self.last_stream_seq + 1 {
            return Err(corrupt(format!(
                "stream {}: message {stream_seq} follows message {}; messages are missing",
                names.stream, self.last_stream_seq
            )));
        }
        let at = |why: String| {
            corrupt(format!(
                "stream {} message {stream_seq}: {why}",
                names.stream
            ))
        };
        if rec.events.is_empty() {
            return Err(at("a batch of no events".into()));
        }
        if subject != names.subject(&rec.run_id) {
            return Err(at(format!(
                "run {} stored under subject {subject}",
                rec.run_id
            )));
        }
        let tip = self.tip(&rec.run_id);
        if rec.first_seq != tip.next_seq || rec.prev != tip.last_hash {
            return Err(at(format!(
                "the batch of run {} starts at run_seq {} but the run is at {}: the chain forks",
                rec.run_id, rec.first_seq, tip.next_seq
            )));
        }
        let run = match self.run_ids.get(&rec.run_id) {
            Some(&r) => r,
            None => {
                let id = RunId::new(rec.run_id.clone()).map_err(|e| at(format!("run id: {e}")))?;
                let r = self.runs.len() as u32;
                self.runs.push(RunMeta {
                    id,
                    msgs: Vec::new(),
                    next_seq: 0,
                    last_hash: Digest::GENESIS,
                    last_stream_seq: 0,
                });
                self.run_ids.insert(rec.run_id.clone(), r);
                r
            }
        };
        let msg = self.msgs.len() as u32;
        let count = rec.events.len() as u64;
        self.msgs.push(MsgMeta {
            stream_seq,
            first_log_seq: self.frontier.size(),
            first_run_seq: rec.first_seq,
            count,
            run,
        });
        for e in &rec.events {
            self.nodes.extend(
                self.frontier
                    .push(leaf_hash(&e.hash.0))
                    .into_iter()
                    .map(|(_, h)| h),
            );
        }
        for (d, _) in &rec.blobs {
            self.blobs.entry(*d).or_insert(msg);
        }
        let m = &mut self.runs[run as usize];
        m.msgs.push(msg);
        m.next_seq += count;
        m.last_hash = rec.events[rec.events.len() - 1].hash;
        m.last_stream_seq = stream_seq;
        self.last_stream_seq = stream_seq;
        Ok(())
    }

    /// The message holding `log_seq`.
    fn msg_at_log_seq(&self, log_seq: u64) -> Option<usize> {
        let i = self
            .msgs
            .partition_point(|m| m.first_log_seq + m.count <= log_seq);
        (i < self.msgs.len()).then_some(i)
    }

    /// The message holding event `run:run_seq`.
    fn msg_of_event(&self, run: &str, run_seq: u64) -> Option<usize> {
        let m = &self.runs[*self.run_ids.get(run)? as usize];
        let i = m.msgs.partition_point(|&k| {
            let k = &self.msgs[k as usize];
            k.first_run_seq + k.count <= run_seq
        });
        m.msgs.get(i).map(|&k| k as usize)
    }

    fn node(&self, id: NodeId) -> Option<Digest> {
        if id.level >= 64 {
            return None;
        }
        let last = id
            .index
            .checked_add(1)?
            .checked_mul(1u64 << id.level)?
            .checked_sub(1)?;
        if last >= self.size() {
            return None;
        }
        let pos = node_offset(last) + id.level as u64;
        self.nodes.get(pos as usize).copied()
    }
}

/// Decoded messages, kept for reads (first in, first out, bounded by bytes).
#[derive(Default)]
struct Cache {
    map: HashMap<u64, Arc<Record>>,
    order: VecDeque<u64>,
    bytes: usize,
}

impl Cache {
    fn insert(&mut self, seq: u64, rec: Arc<Record>) {
        if self.map.contains_key(&seq) {
            return;
        }
        self.bytes += rec.bytes;
        self.map.insert(seq, rec);
        self.order.push_back(seq);
        while self.bytes > CACHE_BYTES && self.order.len() > 1 {
            if let Some(old) = self.order.pop_front()
                && let Some(r) = self.map.remove(&old)
            {
                self.bytes -= r.bytes;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The backend.

/// The NATS JetStream log. Cheap to share (`Arc` it); every method is safe to call concurrently.
pub struct NatsLog {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    names: Names,
    opts: Options,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    records: object_store::ObjectStore,
    checkpoints: kv::Store,
    claims: kv::Store,
    index: RwLock<Index>,
    /// One catch-up at a time reads the stream into the index.
    catching_up: tokio::sync::Mutex<()>,
    /// Records this node published and the server acknowledged, not yet in the index (saves
    /// reading them back).
    own: Mutex<HashMap<u64, Arc<Record>>>,
    cache: Mutex<Cache>,
    /// Publishes go out one at a time, numbered in the order they are sent.
    sending: tokio::sync::Mutex<()>,
    inflight: Mutex<Inflight>,
    /// Signalled whenever a publish's outcome is recorded.
    resolved: tokio::sync::Notify,
    /// Test fault: see [`NatsLog::fail_next_server_read`].
    fail_next_server_read: AtomicBool,
}

/// This node's publishes whose outcome no task has recorded yet, by send order. The server
/// answers one connection's publishes in order, so once a publish is acknowledged, the earlier
/// ones are answered too: their tasks only have to run to put their records in `own`, which is
/// cheaper to wait for than reading those messages back from the server.
#[derive(Default)]
struct Inflight {
    next: u64,
    open: BTreeSet<u64>,
}

/// One publish attempt; records its outcome when dropped, whatever happened.
struct Attempt<'a> {
    inner: &'a Inner,
    order: u64,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .remove(&self.order);
        self.inner.resolved.notify_waiters();
    }
}

fn nats_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl NatsLog {
    /// Connect to the NATS server at `url` (for example `nats://127.0.0.1:4222`) and open the
    /// log named by `prefix` (1 to 64 characters of `[A-Za-z0-9_-]`), creating its stream and
    /// buckets if they do not exist yet. Reads the whole stream once to build the index.
    ///
    /// User info in the URL authenticates: `nats://USER:PASSWORD@HOST:PORT` or
    /// `nats://TOKEN@HOST:PORT` (percent-encoded where needed). No error and no
    /// [`NatsLog::url`] shows a password or token (see [`redact_url`]).
    ///
    /// Fails with [`LogError::Storage`] if the server cannot be reached or has no JetStream,
    /// and with [`LogError::NotALog`] if a stream of that name exists but is not an ICE log.
    pub async fn connect(url: &str, prefix: &str) -> Result<NatsLog, LogError> {
        NatsLog::connect_with(url, prefix, Options::default()).await
    }

    /// [`NatsLog::connect`] with explicit timeouts.
    pub async fn connect_with(url: &str, prefix: &str, opts: Options) -> Result<NatsLog, LogError> {
        NatsLog::open(url, prefix, opts, true).await
    }

    /// Open the log named by `prefix` only if it exists: creates nothing on the server. For
    /// readers (verifying, exporting, copying from), where a mistyped prefix must not make an
    /// empty log that then reads as a valid one.
    ///
    /// Fails with [`LogError::NotALog`] if the server holds no ICE log of that prefix (its
    /// events stream does not exist), if that stream is not an ICE log, or if the log is
    /// incomplete (one of its buckets is missing); with [`LogError::Storage`] as
    /// [`NatsLog::connect`] does. The log opened is not read-only: it appends as one opened
    /// by [`NatsLog::connect`] does.
    pub async fn connect_existing(url: &str, prefix: &str) -> Result<NatsLog, LogError> {
        NatsLog::connect_existing_with(url, prefix, Options::default()).await
    }

    /// [`NatsLog::connect_existing`] with explicit timeouts.
    pub async fn connect_existing_with(
        url: &str,
        prefix: &str,
        opts: Options,
    ) -> Result<NatsLog, LogError> {
        NatsLog::open(url, prefix, opts, false).await
    }

    async fn open(
        url: &str,
        prefix: &str,
        opts: Options,
        create: bool,
    ) -> Result<NatsLog, LogError> {
        let names = Names::new(prefix)?;
        if opts.append_deadline >= DUPLICATE_WINDOW / 2 {
            return Err(LogError::Invalid(format!(
                "an append deadline of {:?} is too long: retried publishes must stay well within the {:?} duplicate window",
                opts.append_deadline, DUPLICATE_WINDOW
            )));
        }
        let server = ServerUrl::parse(url);
        let (client, js) = connect_client(&server, prefix, &opts).await?;
        let location = format!("NATS at {} (prefix {prefix})", server.shown);
        let (stream, records, checkpoints, claims) = if create {
            let stream = ensure_stream(&js, &names, &location).await?;
            let records = match js.get_object_store(&names.records).await {
                Ok(s) => s,
                Err(_) => js
                    .create_object_store(object_store::Config {
                        bucket: names.records.clone(),
                        description: Some(format!("ICE log {prefix}: large batch records")),
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(nats_err)
                    .map_err(storage(format!("creating object store {}", names.records)))?,
            };
            let checkpoints = ensure_kv(&js, &names.checkpoints, "checkpoints").await?;
            let claims = ensure_kv(&js, &names.claims, "run writer claims").await?;
            (stream, records, checkpoints, claims)
        } else {
            open_existing(&js, &names, &location).await?
        };
        let log = NatsLog {
            inner: Arc::new(Inner {
                url: server.shown,
                names,
                opts,
                client,
                js,
                stream,
                records,
                checkpoints,
                claims,
                index: RwLock::new(Index::default()),
                catching_up: tokio::sync::Mutex::new(()),
                own: Mutex::new(HashMap::new()),
                cache: Mutex::new(Cache::default()),
                sending: tokio::sync::Mutex::new(()),
                inflight: Mutex::new(Inflight::default()),
                resolved: tokio::sync::Notify::new(),
                fail_next_server_read: AtomicBool::new(false),
            }),
        };
        log.inner.refresh().await?;
        Ok(log)
    }

    /// The prefix naming this log.
    pub fn prefix(&self) -> &str {
        &self.inner.names.prefix
    }

    /// The server URL this log was opened with, without its secrets (see [`redact_url`]).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Fault injection for tests: the next read of messages from the server (not from this
    /// node's memory) fails as if the server had stopped answering.
    #[doc(hidden)]
    pub fn fail_next_server_read(&self) {
        self.inner
            .fail_next_server_read
            .store(true, Ordering::SeqCst);
    }

    /// Delete this log's stream and buckets: everything it stored, for every node.
    pub async fn destroy(self) -> Result<(), LogError> {
        delete_all(&self.inner.js, &self.inner.names).await
    }
}

/// Delete the log named by `prefix` on the server at `url` (its stream and buckets), whether or
/// not anyone has it open. Deleting what does not exist is not an error.
pub async fn destroy(url: &str, prefix: &str) -> Result<(), LogError> {
    let names = Names::new(prefix)?;
    let (_client, js) = connect_client(&ServerUrl::parse(url), prefix, &Options::default()).await?;
    delete_all(&js, &names).await
}

async fn connect_client(
    server: &ServerUrl,
    prefix: &str,
    opts: &Options,
) -> Result<(async_nats::Client, jetstream::Context), LogError> {
    let options = async_nats::ConnectOptions::new()
        .name(format!("ice-log {prefix}"))
        .connection_timeout(opts.connect_timeout)
        .request_timeout(Some(opts.request_timeout));
    // async-nats ignores user info in a URL: pass it on as what it means to nats-server.
    let options = match &server.credentials {
        Credentials::None => options,
        Credentials::UserPassword(user, password) => {
            options.user_and_password(user.clone(), password.clone())
        }
        Credentials::Token(token) => options.token(token.clone()),
    };
    let client = options
        .connect(server.dial.as_str())
        .await
        .map_err(|e| LogError::Storage {
            context: format!("connecting to NATS at {}", server.shown),
            message: server.scrub(&e.to_string()),
        })?;
    let js = jetstream::ContextBuilder::new()
        .timeout(opts.request_timeout)
        .build(client.clone());
    Ok((client, js))
}

async fn delete_all(js: &jetstream::Context, names: &Names) -> Result<(), LogError> {
    let streams = [
        names.stream.clone(),
        format!("OBJ_{}", names.records),
        format!("KV_{}", names.checkpoints),
        format!("KV_{}", names.claims),
    ];
    for s in streams {
        match js.delete_stream(&s).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => {
                return Err(LogError::Storage {
                    context: format!("deleting stream {s}"),
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

fn stream_description() -> String {
    format!("ICE event log ({FORMAT})")
}

/// The stream, if it is an ICE log's events stream.
fn check_stream(
    s: stream::Stream,
    names: &Names,
    location: &str,
) -> Result<stream::Stream, LogError> {
    let info = s.cached_info();
    let want = stream_description();
    if info.config.description.as_deref() != Some(want.as_str()) {
        return Err(LogError::NotALog {
            path: location.to_string(),
            reason: format!(
                "stream {} is not an ICE log: its description is {:?}, not {want:?}",
                names.stream, info.config.description
            ),
        });
    }
    Ok(s)
}

/// The stream named `name`, or `None` if the server has no such stream.
async fn find_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Stream>, LogError> {
    match js.get_stream(name).await {
        Ok(s) => Ok(Some(s)),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(LogError::Storage {
                context: format!("looking up stream {name}"),
                message: e.to_string(),
            }),
        },
    }
}

/// An existing log's stream and buckets; creates nothing.
async fn open_existing(
    js: &jetstream::Context,
    names: &Names,
    location: &str,
) -> Result<
    (
        stream::Stream,
        object_store::ObjectStore,
        kv::Store,
        kv::Store,
    ),
    LogError,
> {
    let not_a_log = |reason: String| LogError::NotALog {
        path: location.to_string(),
        reason,
    };
    let stream = match find_stream(js, &names.stream).await? {
        Some(s) => check_stream(s, names, location)?,
        None => {
            return Err(not_a_log(format!(
                "no ICE log with prefix {} (stream {} does not exist)",
                names.prefix, names.stream
            )));
        }
    };
    // Written by every node that opens the log for writing, right after the events stream: a
    // log without them is incomplete (or was being deleted).
    for (what, bucket, backing) in [
        (
            "object store",
            &names.records,
            format!("OBJ_{}", names.records),
        ),
        (
            "key-value bucket",
            &names.checkpoints,
            format!("KV_{}", names.checkpoints),
        ),
        (
            "key-value bucket",
            &names.claims,
            format!("KV_{}", names.claims),
        ),
    ] {
        if find_stream(js, &backing).await?.is_none() {
            return Err(not_a_log(format!(
                "the log is incomplete: its {what} {bucket} (stream {backing}) does not exist"
            )));
        }
    }
    let records = js
        .get_object_store(&names.records)
        .await
        .map_err(nats_err)
        .map_err(storage(format!("opening object store {}", names.records)))?;
    let kv = |bucket: &String| {
        let bucket = bucket.clone();
        async move {
            js.get_key_value(bucket.as_str())
                .await
                .map_err(nats_err)
                .map_err(storage(format!("opening key-value bucket {bucket}")))
        }
    };
    let checkpoints = kv(&names.checkpoints).await?;
    let claims = kv(&names.claims).await?;
    Ok((stream, records, checkpoints, claims))
}

async fn ensure_stream(
    js: &jetstream::Context,
    names: &Names,
    location: &str,
) -> Result<stream::Stream, LogError> {
    let check = |s: stream::Stream| check_stream(s, names, location);
    if let Ok(s) = js.get_stream(&names.stream).await {
        return check(s);
    }
    let config = stream::Config {
        name: names.stream.clone(),
        description: Some(stream_description()),
        subjects: vec![format!("{}.ev.*", names.prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        max_message_size: -1,
        discard: stream::DiscardPolicy::New,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: 1,
        // Append-only: no message can be removed through the API.
        deny_delete: true,
        deny_purge: true,
        allow_rollup: false,
        allow_direct: true,
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(s) => check(s),
        // Another node may have created it meanwhile.
        Err(e) => match js.get_stream(&names.stream).await {
            Ok(s) => check(s),
            Err(_) => Err(LogError::Storage {
                context: format!("creating stream {}", names.stream),
                message: e.to_string(),
            }),
        },
    }
}

async fn ensure_kv(
    js: &jetstream::Context,
    bucket: &str,
    what: &str,
) -> Result<kv::Store, LogError> {
    if let Ok(s) = js.get_key_value(bucket).await {
        return Ok(s);
    }
    // The bucket's stream, configured as async-nats' `create_key_value` would, made directly:
    // that call first queries the account, whose reply from a 2.9 server it cannot parse.
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(format!("ICE log: {what}")),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    let created = js.create_stream(config).await.map(|_| ());
    js.get_key_value(bucket)
        .await
        .map_err(|e| LogError::Storage {
            context: format!("creating key-value bucket {bucket}"),
            message: match created {
                Err(c) => c.to_string(),
                Ok(()) => e.to_string(),
            },
        })
}

/// The `Nats-Msg-Id` of a batch: its last event's hash and its length.
fn message_id(batch: &SealedBatch) -> String {
    let n = batch.events().len();
    match batch.events().last() {
        Some(e) => format!("{}-{n}", e.event().hash.to_hex()),
        None => format!("empty-{n}"),
    }
}

/// The warning of every append error after a publish whose answer was lost.
fn may_be_stored(msg_id: &str) -> String {
    format!(
        "the batch may still be stored (message id {msg_id}): reload the run before appending again"
    )
}

/// The message of an append whose publish failed for a reason not worth retrying; after an
/// earlier attempt whose answer was lost (`maybe_sent`), that attempt may still be stored.
fn publish_failed(error: &str, maybe_sent: bool, msg_id: &str) -> String {
    if maybe_sent {
        format!(
            "{error}; an earlier attempt's answer was lost, so {}",
            may_be_stored(msg_id)
        )
    } else {
        error.to_string()
    }
}

/// Whether a publish failure may mean the message never got an answer (so it is sent again
/// under the same message id).
fn retry_publish(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::MaxAckPending
    )
}

impl Inner {
    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's last sequence, from the server.
    async fn server_last_seq(&self) -> Result<u64, LogError> {
        self.stream
            .get_info()
            .await
            .map(|i| i.state.last_sequence)
            .map_err(|e| LogError::Storage {
                context: format!("reading the state of stream {}", self.names.stream),
                message: e.to_string(),
            })
    }

    /// Read everything stored before this call into the index.
    async fn refresh(&self) -> Result<(), LogError> {
        let last = self.server_last_seq().await?;
        self.catch_up(last).await
    }

    /// Read the stream into the index up to stream sequence `target`.
    async fn catch_up(&self, target: u64) -> Result<(), LogError> {
        if self.read_index().last_stream_seq >= target {
            return Ok(());
        }
        let _one = self.catching_up.lock().await;
        loop {
            let from = self.read_index().last_stream_seq + 1;
            if from > target {
                break;
            }
            let to = target.min(from + CATCH_UP_STEP - 1);
            let mut have: HashMap<u64, (String, Arc<Record>)> = HashMap::new();
            let mut missing = Vec::new();
            {
                let own = self.own.lock().unwrap_or_else(|p| p.into_inner());
                for seq in from..=to {
                    match own.get(&seq) {
                        Some(r) => {
                            have.insert(seq, (self.names.subject(&r.run_id), r.clone()));
                        }
                        None => missing.push(seq),
                    }
                }
            }
            have.extend(self.fetch(&missing, None).await?);
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            for seq in from..=to {
                let (subject, rec) = have.get(&seq).ok_or_else(|| {
                    corrupt(format!(
                        "stream {}: message {seq} is missing",
                        self.names.stream
                    ))
                })?;
                index.apply(&self.names, seq, subject, rec)?;
            }
            let last = index.last_stream_seq;
            drop(index);
            self.own
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|s, _| *s > last);
        }
        Ok(())
    }

    /// The records of the given messages (with their subjects), from the cache or the server.
    /// `filter` (a subject) lets a consumer skip other runs' messages.
    async fn fetch(
        &self,
        seqs: &[u64],
        filter: Option<&str>,
    ) -> Result<HashMap<u64, (String, Arc<Record>)>, LogError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for &s in seqs {
                match cache.map.get(&s) {
                    Some(r) => {
                        out.insert(s, (self.names.subject(&r.run_id), r.clone()));
                    }
                    None => missing.push(s),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        missing.sort_unstable();
        missing.dedup();
        if self.fail_next_server_read.swap(false, Ordering::SeqCst) {
            return Err(LogError::Storage {
                context: format!(
                    "reading {} message(s) from {} of stream {}",
                    missing.len(),
                    missing[0],
                    self.names.stream
                ),
                message: "(test) the server did not answer".into(),
            });
        }
        let raw: Vec<(u64, String, Vec<u8>)> = if missing.len() <= DIRECT_GETS {
            let gets = missing.iter().map(|&seq| async move {
                let m = self.stream.direct_get(seq).await.map_err(|e| {
                    if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) {
                        corrupt(format!(
                            "stream {}: message {seq} is missing",
                            self.names.stream
                        ))
                    } else {
                        LogError::Storage {
                            context: format!(
                                "reading message {seq} of stream {}",
                                self.names.stream
                            ),
                            message: e.to_string(),
                        }
                    }
                })?;
                Ok::<_, LogError>((seq, m.subject.to_string(), m.payload.to_vec()))
            });
            futures_util::future::try_join_all(gets).await?
        } else {
            self.read_range(&missing, filter).await?
        };
        let mut decoded = Vec::with_capacity(raw.len());
        for (seq, subject, payload) in raw {
            let rec = Arc::new(self.resolve(seq, &payload).await?);
            decoded.push((seq, subject, rec));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for (seq, subject, rec) in decoded {
            cache.insert(seq, rec.clone());
            out.insert(seq, (subject, rec));
        }
        Ok(out)
    }

    /// Read the messages `wanted` (sorted) with one ordered consumer.
    async fn read_range(
        &self,
        wanted: &[u64],
        filter: Option<&str>,
    ) -> Result<Vec<(u64, String, Vec<u8>)>, LogError> {
        let ctx = || format!("reading stream {}", self.names.stream);
        let (first, last) = (wanted[0], wanted[wanted.len() - 1]);
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.unwrap_or_default().to_string(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: first,
                },
                ..Default::default()
            })
            .await
            .map_err(nats_err)
            .map_err(storage(ctx()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats_err)
            .map_err(storage(ctx()))?;
        let want: HashSet<u64> = wanted.iter().copied().collect();
        let mut out = Vec::with_capacity(wanted.len());
        while out.len() < wanted.len() {
            let next = tokio::time::timeout(self.opts.request_timeout, messages.next())
                .await
                .map_err(|_| LogError::Storage {
                    context: ctx(),
                    message: format!(
                        "no message within {:?} (read {} of {})",
                        self.opts.request_timeout,
                        out.len(),
                        wanted.len()
                    ),
                })?;
            let m = match next {
                Some(m) => m.map_err(nats_err).map_err(storage(ctx()))?,
                None => {
                    return Err(LogError::Storage {
                        context: ctx(),
                        message: "the consumer ended early".into(),
                    });
                }
            };
            let seq = m
                .info()
                .map_err(nats_err)
                .map_err(storage(ctx()))?
                .stream_sequence;
            if seq > last {
                break;
            }
            if want.contains(&seq) {
                out.push((
                    seq,
                    m.message.subject.to_string(),
                    m.message.payload.to_vec(),
                ));
            }
        }
        if out.len() < wanted.len() {
            return Err(corrupt(format!(
                "stream {}: messages between {first} and {last} are missing",
                self.names.stream
            )));
        }
        Ok(out)
    }

    /// Decode a message, fetching its record from the object store if it is a pointer.
    async fn resolve(&self, seq: u64, payload: &[u8]) -> Result<Record, LogError> {
        let bad = |e: String| corrupt(format!("stream {} message {seq}: {e}", self.names.stream));
        match decode(payload).map_err(bad)? {
            Decoded::Record(r) => Ok(r),
            Decoded::Pointer { digest, len } => {
                let name = record_object_name(&digest);
                let ctx = || format!("reading object {name} of {}", self.names.records);
                let mut obj = self
                    .records
                    .get(&name)
                    .await
                    .map_err(nats_err)
                    .map_err(storage(ctx()))?;
                let mut bytes = Vec::with_capacity(len.min(1 << 30) as usize);
                obj.read_to_end(&mut bytes)
                    .await
                    .map_err(nats_err)
                    .map_err(storage(ctx()))?;
                if bytes.len() as u64 != len || Digest::of(&bytes) != digest {
                    return Err(bad(format!(
                        "object {name} does not hash to the digest its message names"
                    )));
                }
                match decode(&bytes).map_err(bad)? {
                    Decoded::Record(r) => Ok(r),
                    Decoded::Pointer { .. } => Err(bad("a pointer to a pointer".into())),
                }
            }
        }
    }

    /// The records of the given message indexes, in that order.
    async fn records_of(
        &self,
        metas: &[MsgMeta],
        filter: Option<&str>,
    ) -> Result<Vec<Arc<Record>>, LogError> {
        let seqs: Vec<u64> = metas.iter().map(|m| m.stream_seq).collect();
        let got = self.fetch(&seqs, filter).await?;
        seqs.iter()
            .map(|s| {
                got.get(s).map(|(_, r)| r.clone()).ok_or_else(|| {
                    corrupt(format!(
                        "stream {}: message {s} is missing",
                        self.names.stream
                    ))
                })
            })
            .collect()
    }

    fn conflict(&self, batch: &SealedBatch, actual: u64) -> LogError {
        LogError::Conflict {
            run_id: batch.run_id().as_str().to_string(),
            expected: batch.first_seq(),
            expected_prev: batch.prev(),
            actual,
        }
    }

    /// The run's tip if the batch continues it; a conflict otherwise (after reading what this
    /// node may have missed).
    async fn position(&self, batch: &SealedBatch) -> Result<Tip, LogError> {
        let run = batch.run_id().as_str();
        let fits = |t: &Tip| t.next_seq == batch.first_seq() && t.last_hash == batch.prev();
        let tip = self.read_index().tip(run);
        if fits(&tip) {
            return Ok(tip);
        }
        self.refresh().await?;
        let tip = self.read_index().tip(run);
        if fits(&tip) {
            Ok(tip)
        } else {
            Err(self.conflict(batch, tip.next_seq))
        }
    }

    /// The stream sequence of the message holding this very batch, if the run holds it.
    async fn holds(&self, batch: &SealedBatch) -> Result<Option<u64>, LogError> {
        let Some(last) = batch.events().last().map(|e| e.event()) else {
            return Ok(None);
        };
        let meta = {
            let index = self.read_index();
            match index.msg_of_event(batch.run_id().as_str(), last.run_seq) {
                Some(k) => index.msgs[k],
                None => return Ok(None),
            }
        };
        if meta.first_run_seq != batch.first_seq() || meta.count != batch.events().len() as u64 {
            return Ok(None);
        }
        let rec = self.records_of(&[meta], None).await?.remove(0);
        Ok((rec.events.last().map(|e| e.hash) == Some(last.hash)).then_some(meta.stream_seq))
    }

    async fn append(&self, batch: SealedBatch) -> Result<AppendReceipt, LogError> {
        if batch.is_empty() {
            return Err(LogError::Invalid("an empty batch".into()));
        }
        let run = batch.run_id().as_str();
        let mut tip = self.position(&batch).await?;
        // Assert in pairs: the names and hashes are checked here as when verified.
        let mut have: HashSet<Digest> = HashSet::new();
        for b in batch.blobs() {
            if Digest::of(&b.bytes) != b.digest {
                return Err(LogError::Invalid(format!(
                    "blob {} does not hash to its name",
                    b.digest
                )));
            }
            have.insert(b.digest);
        }
        let mut refs = Vec::new();
        for (i, se) in batch.events().iter().enumerate() {
            let e = se.event();
            if Digest::of(se.body()) != e.hash {
                return Err(LogError::Invalid(format!(
                    "event {} does not hash to its hash",
                    e.id()
                )));
            }
            if e.run_id.as_str() != run || e.run_seq != batch.first_seq() + i as u64 {
                return Err(LogError::Invalid(format!(
                    "event {} is not at its place in a batch of run {run} from run_seq {}",
                    e.id(),
                    batch.first_seq()
                )));
            }
            for r in blob_refs(&e.payload).map_err(LogError::Invalid)? {
                if !have.contains(&r.digest) {
                    refs.push((e.id(), r.digest));
                }
            }
        }
        if !refs.is_empty() {
            let all_known = |idx: &Index| refs.iter().all(|(_, d)| idx.blobs.contains_key(d));
            if !all_known(&self.read_index()) {
                self.refresh().await?;
                let index = self.read_index();
                if let Some((id, d)) = refs.iter().find(|(_, d)| !index.blobs.contains_key(d)) {
                    return Err(LogError::Invalid(format!(
                        "event {id} references blob {d} that is not stored"
                    )));
                }
            }
        }

        let encoded = encode_batch(&batch);
        let record = match decode(&encoded) {
            Ok(Decoded::Record(r)) => Arc::new(r),
            _ => return Err(corrupt("a batch record does not decode as written")),
        };
        let payload = if encoded.len() + HEADER_ROOM <= self.client.max_payload() {
            encoded
        } else {
            self.store_record(&encoded).await?
        };
        let msg_id = message_id(&batch);
        let subject = self.names.subject(run);
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(&msg_id)
            .expected_stream(&self.names.stream);
        let deadline = Instant::now() + self.opts.append_deadline;
        // Whether an earlier attempt of this call may have been stored (its answer was lost).
        let mut maybe_sent = false;
        let mut republished = 0u32;
        loop {
            let attempt = publish
                .clone()
                .expected_last_subject_sequence(tip.last_stream_seq);
            let (sent, result) = {
                let _one = self.sending.lock().await;
                let sent = {
                    let mut f = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
                    let order = f.next;
                    f.next += 1;
                    f.open.insert(order);
                    Attempt { inner: self, order }
                };
                (sent, self.js.send_publish(subject.clone(), attempt).await)
            };
            let result = match result {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match result {
                Ok(ack) => {
                    if ack.duplicate && !maybe_sent {
                        // This very batch was stored before this call (by another node, or
                        // by an earlier call whose outcome was unknown): its place is taken,
                        // and this call wrote nothing. A conflict, as when the index already
                        // shows the run past the batch's start (as it does once the
                        // duplicate window has passed), and as in the embedded log.
                        drop(sent);
                        self.refresh().await?;
                        let actual = self.read_index().tip(run).next_seq;
                        return Err(self.conflict(&batch, actual));
                    }
                    self.remember(ack.sequence, record);
                    let order = sent.order;
                    drop(sent);
                    self.await_earlier(order).await;
                    return self.receipt(&batch, ack.sequence).await;
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another message of this run came first.
                    let refreshed = self.refresh().await;
                    drop(sent);
                    if let Err(e) = refreshed {
                        return Err(self.unknown_if(maybe_sent, &batch, e));
                    }
                    if maybe_sent {
                        match self.holds(&batch).await {
                            Ok(Some(seq)) => return self.receipt(&batch, seq).await,
                            Ok(None) => {}
                            Err(e) => return Err(self.unknown_if(true, &batch, e)),
                        }
                    }
                    let now = self.read_index().tip(run);
                    if now.next_seq != batch.first_seq() || now.last_hash != batch.prev() {
                        return Err(self.conflict(&batch, now.next_seq));
                    }
                    republished += 1;
                    if republished > MAX_REPUBLISH {
                        return Err(self.unknown_if(
                            maybe_sent,
                            &batch,
                            LogError::Storage {
                                context: self.append_context(&batch),
                                message: format!(
                                    "the server refused {republished} times that the run's subject {subject} ends where this node reads it ends"
                                ),
                            },
                        ));
                    }
                    tip = now;
                }
                Err(e) if retry_publish(e.kind()) => {
                    drop(sent);
                    maybe_sent = true;
                    if Instant::now() >= deadline {
                        return Err(LogError::Storage {
                            context: self.append_context(&batch),
                            message: format!(
                                "{e}; gave up after {:?}; {}",
                                self.opts.append_deadline,
                                may_be_stored(&msg_id)
                            ),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    drop(sent);
                    return Err(LogError::Storage {
                        context: self.append_context(&batch),
                        message: publish_failed(&e.to_string(), maybe_sent, &msg_id),
                    });
                }
            }
        }
    }

    /// What an append of `batch` was: names the server (without secrets) and the stream.
    fn append_context(&self, batch: &SealedBatch) -> String {
        format!(
            "appending {} events to run {} on NATS at {} (stream {})",
            batch.events().len(),
            batch.run_id(),
            self.url,
            self.names.stream
        )
    }

    /// An append failed after a publish whose answer was lost (`maybe_sent`): the batch may
    /// be stored, whatever failed next, and the error says so.
    fn unknown_if(&self, maybe_sent: bool, batch: &SealedBatch, e: LogError) -> LogError {
        if !maybe_sent {
            return e;
        }
        let note = may_be_stored(&message_id(batch));
        match e {
            LogError::Storage { context, message } if context == self.append_context(batch) => {
                LogError::Storage {
                    context,
                    message: format!("{message}; {note}"),
                }
            }
            LogError::Storage { context, message } => LogError::Storage {
                context: self.append_context(batch),
                message: format!("{context}: {message}; {note}"),
            },
            LogError::Corrupt { what } => LogError::Corrupt {
                what: format!("{what} (while appending: {note})"),
            },
            e => e,
        }
    }

    /// Write a record too large for one message to the object store; returns the pointer.
    async fn store_record(&self, encoded: &[u8]) -> Result<Vec<u8>, LogError> {
        let digest = Digest::of(encoded);
        let name = record_object_name(&digest);
        let mut reader = encoded;
        self.records
            .put(name.as_str(), &mut reader)
            .await
            .map_err(nats_err)
            .map_err(storage(format!(
                "storing a batch record of {} bytes as object {name} in {}",
                encoded.len(),
                self.names.records
            )))?;
        Ok(encode_pointer(&digest, encoded.len() as u64))
    }

    /// Keep a record the server stored as message `seq` (saves reading it back).
    fn remember(&self, seq: u64, record: Arc<Record>) {
        if self.read_index().last_stream_seq < seq {
            self.own
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(seq, record.clone());
        }
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq, record);
    }

    /// Wait (briefly) until every publish sent before `order` has its outcome recorded, so
    /// that catching up finds this node's own records in memory.
    async fn await_earlier(&self, order: u64) {
        let deadline = Instant::now() + Duration::from_millis(100);
        loop {
            let notified = self.resolved.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let open = self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .open
                .range(..order)
                .next()
                .is_some();
            if !open
                || tokio::time::timeout_at(deadline.into(), notified)
                    .await
                    .is_err()
            {
                return;
            }
        }
    }

    /// After the server stored the batch as message `seq`: index up to it and report where
    /// the events landed.
    async fn receipt(&self, batch: &SealedBatch, seq: u64) -> Result<AppendReceipt, LogError> {
        // The batch is stored: a failure to read what precedes it must not read as if the
        // append had failed before writing.
        self.catch_up(seq).await.map_err(|e| {
            let stored = format!(
                "the batch IS stored, as message {seq} of stream {} (message id {})",
                self.names.stream,
                message_id(batch)
            );
            match e {
                LogError::Storage { context, message } => LogError::Storage {
                    context: self.append_context(batch),
                    message: format!(
                        "{stored}, but then {context} failed: {message}; its position in the log is not known here: reload the run (do not append the batch again)"
                    ),
                },
                LogError::Corrupt { what } => LogError::Corrupt {
                    what: format!("{what} (found after {stored})"),
                },
                e => e,
            }
        })?;
        let index = self.read_index();
        let m = seq
            .checked_sub(1)
            .and_then(|k| index.msgs.get(k as usize))
            .copied()
            .ok_or_else(|| {
                corrupt(format!(
                    "stream {}: message {seq} is not indexed",
                    self.names.stream
                ))
            })?;
        // Assert in pairs: the message the server acknowledged is this batch.
        if index.runs[m.run as usize].id.as_str() != batch.run_id().as_str()
            || m.first_run_seq != batch.first_seq()
            || m.count != batch.events().len() as u64
        {
            return Err(corrupt(format!(
                "stream {}: message {seq} acknowledged for run {} is another batch",
                self.names.stream,
                batch.run_id()
            )));
        }
        Ok(AppendReceipt {
            first_log_seq: m.first_log_seq,
            count: m.count,
            tree_size: m.first_log_seq + m.count,
        })
    }

    fn stored(rec: &Record, meta: &MsgMeta, i: usize) -> StoredEvent {
        let e = &rec.events[i];
        StoredEvent {
            log_seq: meta.first_log_seq + i as u64,
            run_id: rec.run_id.clone(),
            run_seq: meta.first_run_seq + i as u64,
            event_type: e.event_type.clone(),
            hash: e.hash.0.to_vec(),
            body: e.body.clone(),
        }
    }

    async fn scan(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        let limit = limit.min(MAX_READ_ROWS) as u64;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let end_wanted = from.saturating_add(limit);
        if self.read_index().size() < end_wanted {
            self.refresh().await?;
        }
        let (metas, end) = {
            let index = self.read_index();
            let end = end_wanted.min(index.size());
            if from >= end {
                return Ok(Vec::new());
            }
            let first = index.msg_at_log_seq(from).unwrap_or(index.msgs.len());
            let last = index
                .msg_at_log_seq(end - 1)
                .unwrap_or(index.msgs.len() - 1);
            (index.msgs[first..=last].to_vec(), end)
        };
        let recs = self.records_of(&metas, None).await?;
        let mut out = Vec::with_capacity((end - from) as usize);
        for (m, r) in metas.iter().zip(&recs) {
            check_record(&self.names, m, r)?;
            for i in 0..r.events.len() {
                let ls = m.first_log_seq + i as u64;
                if ls >= from && ls < end {
                    out.push(Inner::stored(r, m, i));
                }
            }
        }
        Ok(out)
    }

    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LogError> {
        let limit = limit.min(MAX_READ_ROWS) as u64;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let run = run_id.as_str();
        let end_wanted = from_seq.saturating_add(limit);
        if self.read_index().tip(run).next_seq < end_wanted {
            self.refresh().await?;
        }
        let metas: Vec<MsgMeta> = {
            let index = self.read_index();
            let Some(&r) = index.run_ids.get(run) else {
                return Ok(Vec::new());
            };
            index.runs[r as usize]
                .msgs
                .iter()
                .map(|&k| index.msgs[k as usize])
                .filter(|m| m.first_run_seq + m.count > from_seq && m.first_run_seq < end_wanted)
                .collect()
        };
        let subject = self.names.subject(run);
        let recs = self.records_of(&metas, Some(&subject)).await?;
        let mut out = Vec::new();
        for (m, r) in metas.iter().zip(&recs) {
            check_record(&self.names, m, r)?;
            for i in 0..r.events.len() {
                let rs = m.first_run_seq + i as u64;
                if rs >= from_seq && rs < end_wanted {
                    out.push(Inner::stored(r, m, i));
                }
            }
        }
        Ok(out)
    }

    async fn get(&self, id: &EventId) -> Result<Option<StoredEvent>, LogError> {
        let run = id.run_id.as_str();
        let find = |inner: &Inner| {
            let index = inner.read_index();
            index.msg_of_event(run, id.run_seq).map(|k| index.msgs[k])
        };
        let meta = match find(self) {
            Some(m) => m,
            None => {
                self.refresh().await?;
                match find(self) {
                    Some(m) => m,
                    None => return Ok(None),
                }
            }
        };
        let rec = self.records_of(&[meta], None).await?.remove(0);
        check_record(&self.names, &meta, &rec)?;
        Ok(Some(Inner::stored(
            &rec,
            &meta,
            (id.run_seq - meta.first_run_seq) as usize,
        )))
    }

    async fn existing(&self, ids: &[EventId]) -> Result<HashSet<EventId>, LogError> {
        let look = |inner: &Inner| {
            let index = inner.read_index();
            ids.iter()
                .filter(|id| id.run_seq < index.tip(id.run_id.as_str()).next_seq)
                .cloned()
                .collect::<HashSet<_>>()
        };
        let found = look(self);
        if found.len() == ids.iter().collect::<HashSet<_>>().len() {
            return Ok(found);
        }
        self.refresh().await?;
        Ok(look(self))
    }

    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError> {
        let find = |inner: &Inner| {
            let index = inner.read_index();
            index.blobs.get(digest).map(|&k| index.msgs[k as usize])
        };
        let meta = match find(self) {
            Some(m) => m,
            None => {
                self.refresh().await?;
                match find(self) {
                    Some(m) => m,
                    None => return Ok(None),
                }
            }
        };
        let rec = self.records_of(&[meta], None).await?.remove(0);
        rec.blobs
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, b)| Some(b.clone()))
            .ok_or_else(|| {
                corrupt(format!(
                    "stream {} message {}: blob {digest} is not in it",
                    self.names.stream, meta.stream_seq
                ))
            })
    }

    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Digest>, LogError> {
        let all = |inner: &Inner| {
            let index = inner.read_index();
            ids.iter()
                .map(|id| index.node(*id))
                .collect::<Option<Vec<_>>>()
        };
        if let Some(v) = all(self) {
            return Ok(v);
        }
        self.refresh().await?;
        let index = self.read_index();
        ids.iter()
            .map(|id| {
                index
                    .node(*id)
                    .ok_or_else(|| corrupt(format!("tree node {id:?} is missing")))
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
        let end_wanted = from_leaf.saturating_add(leaves.min(MAX_READ_ROWS as u64));
        if self.read_index().size() < end_wanted {
            self.refresh().await?;
        }
        let index = self.read_index();
        let end = end_wanted.min(index.size());
        let mut out = Vec::new();
        for leaf in from_leaf..end {
            let base = node_offset(leaf) as usize;
            for level in 0..=(leaf.trailing_ones() as u8) {
                let id = NodeId {
                    level,
                    index: ((leaf + 1) >> level) - 1,
                };
                let h = index
                    .nodes
                    .get(base + level as usize)
                    .ok_or_else(|| corrupt(format!("tree node {id:?} is missing")))?;
                out.push((id, Some(*h)));
            }
        }
        Ok(out)
    }

    async fn add_checkpoint(&self, cp: StoredCheckpoint) -> Result<(), LogError> {
        if self.read_index().size() < cp.size {
            self.refresh().await?;
            let size = self.read_index().size();
            if cp.size > size {
                return Err(LogError::Invalid(format!(
                    "checkpoint covers {} events but the log has {size}",
                    cp.size
                )));
            }
        }
        let key = cp.size.to_string();
        let ctx = || {
            format!(
                "storing checkpoint {} in {}",
                cp.size, self.names.checkpoints
            )
        };
        match self
            .checkpoints
            .update(&key, cp.note.clone().into_bytes().into(), 0)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                let existing = self
                    .checkpoints
                    .get(&key)
                    .await
                    .map_err(nats_err)
                    .map_err(storage(ctx()))?;
                match existing {
                    Some(n) if n.as_ref() == cp.note.as_bytes() => Ok(()),
                    _ => Err(LogError::Invalid(format!(
                        "a different checkpoint of size {} is already stored",
                        cp.size
                    ))),
                }
            }
            Err(e) => Err(LogError::Storage {
                context: ctx(),
                message: e.to_string(),
            }),
        }
    }

    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, LogError> {
        let ctx = || format!("reading checkpoints from {}", self.names.checkpoints);
        let mut keys = self
            .checkpoints
            .keys()
            .await
            .map_err(nats_err)
            .map_err(storage(ctx()))?;
        let mut sizes = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(nats_err).map_err(storage(ctx()))?;
            let size: u64 = k.parse().map_err(|_| {
                corrupt(format!(
                    "{}: key {k:?} is not a tree size",
                    self.names.checkpoints
                ))
            })?;
            sizes.push(size);
        }
        sizes.sort_unstable();
        let mut out = Vec::with_capacity(sizes.len());
        for size in sizes {
            let v = self
                .checkpoints
                .get(size.to_string())
                .await
                .map_err(nats_err)
                .map_err(storage(ctx()))?;
            if let Some(v) = v {
                let note = String::from_utf8(v.to_vec()).map_err(|_| {
                    corrupt(format!(
                        "{}: checkpoint {size} is not UTF-8",
                        self.names.checkpoints
                    ))
                })?;
                out.push(StoredCheckpoint { size, note });
            }
        }
        Ok(out)
    }

    async fn claim_run(
        &self,
        run: &RunId,
        holder: &str,
        now_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<(), LogError> {
        let key = run_token(run.as_str());
        let ctx = || format!("claiming run {run} for {holder} in {}", self.names.claims);
        let value = serde_json::to_vec(&serde_json::json!({
            "holder": holder,
            "until_unix_ms": until_unix_ms,
        }))
        .map_err(|e| storage(ctx())(e.to_string()))?;
        // Each lost compare-and-set means another node changed the claim meanwhile; re-read.
        for _ in 0..64 {
            let entry = self
                .claims
                .entry(key.as_str())
                .await
                .map_err(nats_err)
                .map_err(storage(ctx()))?;
            let revision = match entry {
                None => 0,
                Some(e) if e.operation != kv::Operation::Put => e.revision,
                Some(e) => {
                    let (h, until) = parse_claim(&e.value).ok_or_else(|| {
                        corrupt(format!(
                            "{}: the claim of run {run} does not parse",
                            self.names.claims
                        ))
                    })?;
                    if h != holder && until > now_unix_ms {
                        return Err(LogError::Claimed {
                            run_id: run.as_str().to_string(),
                            holder: h,
                            until_unix_ms: until,
                        });
                    }
                    e.revision
                }
            };
            match self
                .claims
                .update(key.as_str(), value.clone().into(), revision)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(storage(ctx())(e.to_string())),
            }
        }
        Err(storage(ctx())(
            "the claim kept changing under 64 attempts".into(),
        ))
    }

    async fn release_run(&self, run: &RunId, holder: &str) -> Result<(), LogError> {
        let key = run_token(run.as_str());
        let ctx = || format!("releasing run {run} for {holder} in {}", self.names.claims);
        for _ in 0..64 {
            let entry = self
                .claims
                .entry(key.as_str())
                .await
                .map_err(nats_err)
                .map_err(storage(ctx()))?;
            let Some(e) = entry else { return Ok(()) };
            if e.operation != kv::Operation::Put {
                return Ok(());
            }
            match parse_claim(&e.value) {
                Some((h, _)) if h == holder => {}
                _ => return Ok(()),
            }
            match self
                .claims
                .delete_expect_revision(key.as_str(), Some(e.revision))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(storage(ctx())(e.to_string())),
            }
        }
        Err(storage(ctx())(
            "the claim kept changing under 64 attempts".into(),
        ))
    }
}

fn parse_claim(value: &[u8]) -> Option<(String, i64)> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    Some((
        v.get("holder")?.as_str()?.to_string(),
        v.get("until_unix_ms")?.as_i64()?,
    ))
}

fn record_object_name(digest: &Digest) -> String {
    format!("rec-{}", digest.to_hex())
}

/// A record read back must be the one the index says is there.
fn check_record(names: &Names, m: &MsgMeta, r: &Record) -> Result<(), LogError> {
    if r.first_seq != m.first_run_seq || r.events.len() as u64 != m.count {
        return Err(corrupt(format!(
            "stream {} message {}: it changed since it was indexed",
            names.stream, m.stream_seq
        )));
    }
    Ok(())
}

#[async_trait]
impl EventLog for NatsLog {
    async fn append(&self, batch: SealedBatch) -> Result<AppendReceipt, LogError> {
        self.inner.append(batch).await
    }

    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LogError> {
        self.inner.read_run(run_id, from_seq, limit).await
    }

    async fn scan(&self, from_log_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        self.inner.scan(from_log_seq, limit).await
    }

    async fn get(&self, id: &EventId) -> Result<Option<StoredEvent>, LogError> {
        self.inner.get(id).await
    }

    async fn size(&self) -> Result<u64, LogError> {
        self.inner.refresh().await?;
        Ok(self.inner.read_index().size())
    }

    async fn runs(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.inner.refresh().await?;
        let index = self.inner.read_index();
        Ok(index
            .runs
            .iter()
            .skip(offset.min(usize::MAX as u64) as usize)
            .take(limit.min(MAX_READ_ROWS))
            .map(|r| r.id.clone())
            .collect())
    }

    async fn runs_newest_first(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.inner.refresh().await?;
        let index = self.inner.read_index();
        Ok(index
            .runs
            .iter()
            .rev()
            .skip(offset.min(usize::MAX as u64) as usize)
            .take(limit.min(MAX_READ_ROWS))
            .map(|r| r.id.clone())
            .collect())
    }

    async fn run_count(&self) -> Result<u64, LogError> {
        self.inner.refresh().await?;
        Ok(self.inner.read_index().runs.len() as u64)
    }

    async fn existing(&self, ids: &[EventId]) -> Result<HashSet<EventId>, LogError> {
        self.inner.existing(ids).await
    }

    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError> {
        self.inner.blob(digest).await
    }

    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Digest>, LogError> {
        self.inner.nodes(ids).await
    }

    fn tree_floor(&self) -> u8 {
        self.inner.tree_floor()
    }

    async fn extent(&self) -> Result<Option<Extent>, LogError> {
        // Positions, the tree and the head are all derived from the stream's own order.
        Ok(None)
    }

    async fn altered_blob(&self) -> Result<Option<String>, LogError> {
        // No blob rows of its own: a blob is part of its batch's message.
        Ok(None)
    }

    async fn index_problem(&self) -> Result<Option<String>, LogError> {
        // A stream of messages: lookups by run read the messages' own subjects.
        Ok(None)
    }

    async fn scan_nodes(
        &self,
        from_leaf: u64,
        leaves: u64,
    ) -> Result<Vec<(NodeId, Option<Digest>)>, LogError> {
        self.inner.scan_nodes(from_leaf, leaves).await
    }

    async fn add_checkpoint(&self, checkpoint: StoredCheckpoint) -> Result<(), LogError> {
        self.inner.add_checkpoint(checkpoint).await
    }

    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, LogError> {
        self.inner.checkpoints().await
    }

    async fn claim_run(
        &self,
        run: &RunId,
        holder: &str,
        now_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<(), LogError> {
        self.inner
            .claim_run(run, holder, now_unix_ms, until_unix_ms)
            .await
    }

    async fn release_run(&self, run: &RunId, holder: &str) -> Result<(), LogError> {
        self.inner.release_run(run, holder).await
    }

    fn claims_lapse(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_tokens_are_one_to_one_and_subject_safe() {
        let ids = ["a", "a.b", "a_db", "a_b", "a__b", "._", "_.", "x-y.z_w"];
        let tokens: HashSet<String> = ids.iter().map(|s| run_token(s)).collect();
        assert_eq!(tokens.len(), ids.len());
        for t in &tokens {
            assert!(
                t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{t}"
            );
        }
    }

    #[test]
    fn node_offsets_count_the_nodes_of_earlier_leaves() {
        let mut f = Frontier::new();
        let mut total = 0u64;
        for leaf in 0..300u64 {
            assert_eq!(node_offset(leaf), total, "leaf {leaf}");
            total += f.push(leaf_hash(&leaf.to_be_bytes())).len() as u64;
        }
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(Names::new("ok_Prefix-1").is_ok());
        for bad in [
            "",
            "a.b",
            "a b",
            "a*",
            "a>",
            &"x".repeat(MAX_PREFIX_LEN + 1),
        ] {
            assert!(
                matches!(Names::new(bad), Err(LogError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn urls_are_shown_without_their_secrets() {
        for (url, shown) in [
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("127.0.0.1:4222", "127.0.0.1:4222"),
            ("nats://u:pw@h:4222", "nats://u:***@h:4222"),
            ("nats://u:p@ss@h", "nats://u:***@h"),
            ("nats://u:p%40ss@h", "nats://u:***@h"),
            ("nats://tok@h:4222", "nats://***@h:4222"),
            ("u:pw@h:4222", "u:***@h:4222"),
            (
                "nats://h?password=x1&token=x2&Auth_Token=x3&nkey=x4&name=n&prefix=p",
                "nats://h?password=***&token=***&Auth_Token=***&nkey=***&name=n&prefix=p",
            ),
            ("nats://u:pw@h?token=t#f", "nats://u:***@h?token=***#f"),
            ("nats://h?token=", "nats://h?token="),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn user_info_becomes_credentials_and_leaves_the_dialled_url() {
        let s = ServerUrl::parse("nats://ice:p%40ss%3Aw@127.0.0.1:4222?token=qq");
        assert_eq!(s.dial, "nats://127.0.0.1:4222?token=qq");
        assert!(
            matches!(&s.credentials, Credentials::UserPassword(u, p) if u == "ice" && p == "p@ss:w")
        );
        assert_eq!(
            s.scrub("bad login p%40ss%3Aw / p@ss:w / qq at nats://ice:p@ss:w@127.0.0.1"),
            "bad login *** / *** / *** at nats://ice:***@127.0.0.1"
        );
        let t = ServerUrl::parse("nats://s3cr%2Ft@h");
        assert_eq!(t.dial, "nats://h");
        assert!(matches!(&t.credentials, Credentials::Token(k) if k == "s3cr/t"));
        let e = ServerUrl::parse("nats://@h:1");
        assert_eq!(
            (e.dial.as_str(), e.shown.as_str()),
            ("nats://h:1", "nats://h:1")
        );
        assert!(matches!(e.credentials, Credentials::None));
        let n = ServerUrl::parse("nats://h:1");
        assert!(matches!(n.credentials, Credentials::None));
        assert!(n.secrets.is_empty());
        assert_eq!(n.scrub("text"), "text");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "%ff");
    }

    #[test]
    fn a_failed_publish_after_a_lost_answer_says_the_batch_may_be_stored() {
        let m = publish_failed("publish failed: x", true, "ab-2");
        assert!(m.starts_with("publish failed: x; "), "{m}");
        assert!(m.contains("may still be stored (message id ab-2)"), "{m}");
        assert_eq!(
            publish_failed("publish failed: x", false, "ab-2"),
            "publish failed: x"
        );
    }

    #[test]
    fn damaged_records_do_not_decode() {
        assert!(decode(b"").is_err());
        assert!(decode(b"ICE1\x07").is_err());
        let mut p = encode_pointer(&Digest::of(b"x"), 3);
        assert!(matches!(decode(&p), Ok(Decoded::Pointer { len: 3, .. })));
        p.push(0);
        assert!(decode(&p).is_err());
        // A huge event count in a tiny buffer is refused before allocating.
        let mut r = b"ICE1\x00\x00\x01a".to_vec();
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&[0u8; 32]);
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&r).is_err());
    }
}
