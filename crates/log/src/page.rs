//! A page of stored events in one buffer: what `verify` and replay stream through.
//!
//! Reading a log at millions of events a second leaves no room for four allocations per
//! event (and as many frees, on another thread than the one that read them): a page keeps every
//! column of every row in one byte buffer and hands out borrowed [`StoredRef`]s.

use ice_kernel::{Digest, Event};

use crate::{LogError, NodeId, StoredEvent};

/// One stored event, borrowed from an [`EventPage`]. The same columns as [`StoredEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredRef<'a> {
    /// Global position.
    pub log_seq: u64,
    /// Run id column.
    pub run_id: &'a str,
    /// Run position column.
    pub run_seq: u64,
    /// Type column.
    pub event_type: &'a str,
    /// Hash column.
    pub hash: &'a [u8],
    /// Canonical encoding of the event without its hash.
    pub body: &'a [u8],
    /// The stored hash of the event before this one in the log (the genesis value at
    /// `log_seq` 0), for backends that link events in log order (see
    /// [`crate::EventLog::tree_floor`]); `None` where the backend keeps no such link.
    pub log_prev: Option<&'a [u8]>,
}

impl StoredRef<'_> {
    /// Parse the stored record into an event (no validation).
    pub fn event(&self) -> Result<Event, LogError> {
        let hash: [u8; 32] = self.hash.try_into().map_err(|_| LogError::Corrupt {
            what: format!(
                "event at log_seq {}: hash column is {} bytes, not 32",
                self.log_seq,
                self.hash.len()
            ),
        })?;
        Event::from_body(self.body, Digest(hash)).map_err(|e| LogError::Corrupt {
            what: format!(
                "event at log_seq {}: body does not parse: {e}",
                self.log_seq
            ),
        })
    }

    /// An owned copy.
    pub fn to_stored(&self) -> StoredEvent {
        StoredEvent {
            log_seq: self.log_seq,
            run_id: self.run_id.to_string(),
            run_seq: self.run_seq,
            event_type: self.event_type.to_string(),
            hash: self.hash.to_vec(),
            body: self.body.to_vec(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Row {
    log_seq: u64,
    run_seq: u64,
    /// Where the row's run id and type end in the text buffer, and its hash, log link and
    /// body in the byte buffer (each starts where the one before it ends; the first where the
    /// previous row's last ends).
    ends: [usize; 5],
    linked: bool,
}

/// Stored events in log order, in one buffer, and (when asked for) the stored tree nodes their
/// leaves completed.
#[derive(Clone, Debug, Default)]
pub struct EventPage {
    /// The text columns (kept as a `String`: checked to be UTF-8 once, when pushed).
    text: String,
    buf: Vec<u8>,
    rows: Vec<Row>,
    nodes: Vec<(NodeId, Option<Digest>)>,
}

impl EventPage {
    /// Add a row (copying its columns into the page).
    pub fn push(&mut self, r: StoredRef<'_>) {
        let mut ends = [0; 5];
        self.text.push_str(r.run_id);
        ends[0] = self.text.len();
        self.text.push_str(r.event_type);
        ends[1] = self.text.len();
        for (end, col) in ends[2..]
            .iter_mut()
            .zip([r.hash, r.log_prev.unwrap_or_default(), r.body])
        {
            self.buf.extend_from_slice(col);
            *end = self.buf.len();
        }
        self.rows.push(Row {
            log_seq: r.log_seq,
            run_seq: r.run_seq,
            ends,
            linked: r.log_prev.is_some(),
        });
    }

    /// Empty it, keeping its memory.
    pub fn clear(&mut self) {
        self.text.clear();
        self.buf.clear();
        self.rows.clear();
        self.nodes.clear();
    }

    /// Add a stored tree node (as [`crate::EventLog::scan_nodes`] returns them).
    pub fn push_node(&mut self, node: (NodeId, Option<Digest>)) {
        self.nodes.push(node);
    }

    /// The stored tree nodes completed by the page's leaves, in the order they were completed.
    pub fn nodes(&self) -> &[(NodeId, Option<Digest>)] {
        &self.nodes
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it holds no event.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The `i`-th event.
    pub fn get(&self, i: usize) -> Option<StoredRef<'_>> {
        let row = self.rows.get(i)?;
        let (t0, b0) = match i {
            0 => (0, 0),
            _ => {
                let prev = &self.rows[i - 1].ends;
                (prev[1], prev[4])
            }
        };
        let [a, b, c, d, e] = row.ends;
        // Both text columns were whole `str`s when pushed: their ends are char boundaries.
        let text = |from: usize, to: usize| self.text.get(from..to).unwrap_or("");
        Some(StoredRef {
            log_seq: row.log_seq,
            run_id: text(t0, a),
            run_seq: row.run_seq,
            event_type: text(a, b),
            hash: &self.buf[b0..c],
            log_prev: row.linked.then(|| &self.buf[c..d]),
            body: &self.buf[d..e],
        })
    }

    /// The events, in order.
    pub fn iter(&self) -> impl Iterator<Item = StoredRef<'_>> {
        (0..self.rows.len()).filter_map(|i| self.get(i))
    }
}

impl StoredEvent {
    /// Borrowed view of the same columns.
    pub fn borrowed(&self) -> StoredRef<'_> {
        StoredRef {
            log_seq: self.log_seq,
            run_id: &self.run_id,
            run_seq: self.run_seq,
            event_type: &self.event_type,
            hash: &self.hash,
            body: &self.body,
            log_prev: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_gives_back_exactly_the_rows_put_in() {
        let rows: Vec<StoredEvent> = (0..5u64)
            .map(|i| StoredEvent {
                log_seq: 10 + i,
                run_id: format!("run-{i}"),
                run_seq: i * 3,
                event_type: if i % 2 == 0 {
                    "A".into()
                } else {
                    String::new()
                },
                hash: vec![i as u8; (i * 8) as usize],
                body: format!("{{\"n\":{i}}}").into_bytes(),
            })
            .collect();
        let mut page = EventPage::default();
        for r in &rows {
            page.push(r.borrowed());
        }
        assert_eq!(page.len(), 5);
        let back: Vec<StoredEvent> = page.iter().map(|r| r.to_stored()).collect();
        assert_eq!(back, rows);
        assert!(page.iter().all(|r| r.log_prev.is_none()));
        // A linked row keeps its link, an unlinked one next to it stays unlinked.
        let link = [9u8; 32];
        page.push(StoredRef {
            log_prev: Some(&link),
            ..rows[0].borrowed()
        });
        page.push(rows[1].borrowed());
        assert_eq!(page.get(5).unwrap().log_prev, Some(&link[..]));
        assert_eq!(page.get(5).unwrap().to_stored(), rows[0]);
        assert_eq!(page.get(6).unwrap().log_prev, None);
        page.clear();
        for r in &rows {
            page.push(r.borrowed());
        }
        assert!(page.get(5).is_none());
        assert!(EventPage::default().is_empty());
        page.clear();
        assert!(page.is_empty() && page.get(0).is_none());
    }
}
