// One run: its state and cost, pending approvals, staged diff, and its timeline, live, with
// the causal graph of the selected event.

import { get, seg, follow, blobKnown, ApiError } from './api.js';
import { h, fill, stamp, clock, short, runHref, parseId, oneAtATime } from './dom.js';
import { budgetCost, costMeters, statePill, provisioned } from './runs.js';
import { approvalCard, tickExpiries } from './approvals.js';
import { causalGraph, timelineRow, links, idOf, kind, summary, blobRef, blobWords, blobFields, whenBlob, pretty, describe } from './events.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Staged writes whose content the diff fetches by itself; the rest wait for a click. */
const AUTO_BLOB_WRITES = 10;
/** Most characters of a blob's value the inspector shows. */
const BLOB_SHOWN = 200000;

/** A file's new text as added lines (the first 200). */
function patch(text) {
  const lines = text.split('\n');
  if (lines.length && lines[lines.length - 1] === '') lines.pop();
  return h('pre', { class: 'patch' },
    lines.slice(0, 200).map((l) => h('span', { class: 'add' }, `+ ${l}\n`)),
    lines.length > 200 ? h('span', { class: 'muted' }, `… ${lines.length - 200} more lines\n`) : '');
}

/**
 * The content an `fs.write` staged, from the agent's request (walking back from `eventId`):
 * {request, content} (content as recorded: text, or absent), {request, blob} when the
 * request's arguments are kept as a blob, or null when the request is not in `byId`.
 */
function stagedText(eventId, byId) {
  const seen = new Set();
  const queue = [eventId];
  while (queue.length) {
    const id = queue.shift();
    if (seen.has(id)) continue;
    seen.add(id);
    const e = byId.get(id);
    if (!e) continue;
    if (e.type === 'CapabilityRequested') {
      const args = e.payload?.arguments;
      const blob = blobRef(args);
      return blob ? { request: id, blob } : { request: id, content: args?.content };
    }
    for (const l of links(e)) queue.push(l.id);
  }
  return null;
}

export function runView(root, ctx, params) {
  const run = params.run;
  const events = [];
  const byId = new Map();
  let selected = params.seq ?? null;
  let ended = false;
  let alive = true;
  let info = null;
  const abort = new AbortController();

  // ------------------------------------------------------------------ layout
  const title = h('h1', { class: 'mono' }, run);
  const pill = h('span', null);
  const live = h('span', { class: 'live', id: 'live' }, 'connecting…');
  const facts = h('dl', { class: 'facts inline' });
  const counters = h('div', { class: 'counters' });
  const meters = h('div', { class: 'card cost-card' }, h('h2', null, 'Cost / budget'), h('p', { class: 'muted' }, '…'));
  const approvals = h('div', { class: 'approvals' });
  const approvalsSection = h('section', { id: 'run-approvals', hidden: true },
    h('h2', null, 'Waiting for an operator'), approvals);
  const diff = h('div', { class: 'diff' }, h('p', { class: 'muted' }, '…'));
  const rows = h('tbody');
  const inspector = h('aside', { id: 'inspector', class: 'card inspector' });
  const eventCount = h('span', { class: 'muted' }, '');
  fill(root, h('section', { class: 'page run-page', dataset: { run } },
    h('p', { class: 'crumbs' }, h('a', { href: '#/runs' }, '← Runs')),
    h('div', { class: 'page-head' }, title, pill, live),
    facts,
    h('div', { class: 'overview' }, counters, meters),
    approvalsSection,
    h('section', { id: 'diff', class: 'card' }, h('h2', null, 'Changes'), diff),
    h('div', { class: 'split' },
      h('section', { id: 'timeline', class: 'card' },
        h('div', { class: 'section-head' }, h('h2', null, 'Timeline'), eventCount),
        h('div', { class: 'table-wrap' },
          h('table', { class: 'timeline' },
            h('thead', null, h('tr', null,
              h('th', { class: 'num' }, '#'), h('th', null, 'Time'), h('th', null, 'Type'),
              h('th', null, 'Origin'), h('th', null, 'Intent · what happened'))),
            rows))),
      inspector)));
  renderInspector();

  // ------------------------------------------------------------------ live events
  let pendingRows = null;
  // Never throws: a throw here would end the stream with the event already in `byId`, so the
  // reconnect would skip it and its row would never appear. An event the page cannot draw
  // still gets a row, saying so.
  const onEvent = (e) => {
    if (!e || typeof e !== 'object' || e.run_id !== run) return;
    if (!Number.isSafeInteger(e.run_seq) || e.run_seq < 0) {
      ctx.error(new Error(`an event of run ${run} in the stream has no valid run_seq (${String(e.run_seq)}); it is not shown`));
      return;
    }
    if (byId.has(idOf(e))) return;
    let row;
    try {
      row = timelineRow(e, select);
    } catch (err) {
      row = h('tr', { class: 'ev k-bad', dataset: { seq: e.run_seq, type: String(e.type) }, onclick: () => select(e.run_seq) },
        h('td', { class: 'seq' }, String(e.run_seq)), h('td', null, ''), h('td', { class: 'etype' }, String(e.type)),
        h('td', null, ''), h('td', { class: 'what problem' }, `(this event cannot be shown: ${err?.message ?? err})`));
    }
    events[e.run_seq] = e;
    byId.set(idOf(e), e);
    if (!pendingRows) {
      pendingRows = document.createDocumentFragment();
      queueMicrotask(() => {
        rows.append(pendingRows);
        pendingRows = null;
        markSelected();
        // The diff shows staged text from the requests' events: draw it again with the new ones.
        if (info) guarded('the changes', () => renderDiff(info.changes ?? []));
      });
    }
    pendingRows.append(row);
    fill(eventCount, `${byId.size} event${byId.size === 1 ? '' : 's'}`);
    // An event's causes all precede it, so only the selected event's own arrival changes the graph.
    if (e.run_seq === selected) renderInspector();
    soon();
  };
  /** Run a drawing step; a failure is reported, never thrown into the event stream. */
  function guarded(what, f) {
    try { f(); } catch (err) { ctx.error(new Error(`drawing ${what} failed: ${err?.message ?? err}`)); }
  }

  const stream = async () => {
    let failures = 0;
    while (alive && !ended) {
      const from = nextSeq();
      setLive('live', 'live');
      try {
        const how = await follow(run, from, onEvent, abort.signal);
        if (how === 'end') {
          ended = true;
          setLive('ended', 'run ended');
          refresh();
          ctx.onRunEnded?.();
          return;
        }
        setLive('retry', 'reconnecting…');
        await sleep(1000);
      } catch (e) {
        if (!alive || e?.name === 'AbortError') return;
        if (e instanceof ApiError && e.auth) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
          setLive('error', `not followed: ${e.describe()}`);
          return;
        }
        failures++;
        setLive('retry', `stream lost: ${e instanceof ApiError ? e.describe() : e} — retrying`);
        await sleep(Math.min(10000, 1000 * failures));
      }
    }
  };
  const nextSeq = () => {
    let n = 0;
    while (byId.has(`${run}:${n}`)) n++;
    return n;
  };
  function setLive(cls, text) {
    live.className = `live live-${cls}`;
    fill(live, text);
  }

  // ------------------------------------------------------------------ summary, approvals, diff
  let timer = null;
  let headRetry = null;
  function soon() {
    if (timer) return;
    timer = setTimeout(() => { timer = null; refresh(); }, 250);
  }
  // One refresh at a time; one asked for meanwhile runs once it ends.
  const refresh = oneAtATime(async () => {
    if (!alive) return;
    try {
      const [shown, pending, prov] = await Promise.all([
        get(`/runs/${seg(run)}`),
        get(`/approvals?run=${seg(run)}`),
        provisioned(run).catch(() => null),
      ]);
      if (!alive) return;
      info = shown;
      const budget = renderHead(shown, pending.approvals, prov);
      // A budget whose blob could not be fetched: ask again later (a run that has ended
      // draws its head no more by itself). api.js keeps a failure for 10 s.
      if (budget?.failed && !headRetry) {
        headRetry = setTimeout(() => { headRetry = null; if (alive) soon(); }, 12000);
      }
      renderApprovals(pending.approvals);
      renderDiff(shown.changes ?? []);
    } catch (e) {
      if (!alive) return;
      ctx.error(e);
      if (e instanceof ApiError && e.status >= 400 && e.status < 500 && !info) {
        fill(root, h('section', { class: 'page' },
          h('p', { class: 'crumbs' }, h('a', { href: '#/runs' }, '← Runs')),
          h('div', { class: 'card' }, h('h1', { class: 'mono' }, run), h('p', { class: 'problem' }, e.describe()))));
      }
    }
  });

  /**
   * A blob's value if the page has it ({value}); else {notShown} saying why, and (once per
   * blob) a fetch that draws the head again when it settles.
   */
  const headBlobs = new Set();
  function blobNow(ref, what) {
    const known = blobKnown(ref.digest);
    if (known?.ok) return { value: known.value };
    if (known) return { notShown: `${what} is ${blobWords(ref)} and could not be loaded (${describe(known.error)})`, failed: true };
    if (!headBlobs.has(ref.digest)) {
      headBlobs.add(ref.digest);
      const done = () => { headBlobs.delete(ref.digest); if (alive) soon(); };
      whenBlob(ref, done, done);
    }
    return { notShown: `${what} is ${blobWords(ref)}; loading it…` };
  }

  /** The budget in force (see costMeters): the spec's, as the last reconfiguration left it. */
  function budgetNow(prov) {
    let budget = prov ? prov.budget : { notShown: 'the run\'s first event could not be loaded' };
    for (const e of events) {
      if (e?.type !== 'ReconfigurationRecorded') continue;
      let nw = e.payload?.new;
      const what = `reconfiguration #${e.run_seq}`;
      if (blobRef(nw)) {
        const got = blobNow(blobRef(nw), what);
        if (got.notShown) { budget = got; continue; }
        nw = got.value;
      }
      let b = nw?.budget;
      if (blobRef(b)) {
        const got = blobNow(blobRef(b), `the budget of ${what}`);
        if (got.notShown) { budget = got; continue; }
        b = got.value;
      }
      if (b && typeof b === 'object' && !Array.isArray(b)) budget = b;
    }
    return budget;
  }

  /** The run's state, facts, counters and cost; returns the budget it showed. */
  function renderHead(shown, pending, prov) {
    const s = shown.summary;
    fill(pill, statePill(s, pending.length > 0));
    const kill = shown.kill ? [h('dt', null, 'kill requested'), h('dd', null, `${shown.kill.by}: ${shown.kill.reason || '(no reason)'}`)] : '';
    const susp = shown.suspension ? [h('dt', null, 'suspended'), h('dd', null, shown.suspension.reason ?? JSON.stringify(shown.suspension))] : '';
    fill(facts,
      h('dt', null, 'agent'), h('dd', null, shown.agent ?? prov?.agent ?? '—'),
      h('dt', null, 'driver'), h('dd', null, shown.driver ?? prov?.driver ?? '—'),
      h('dt', null, 'started'), h('dd', { title: s.started_at }, stamp(s.started_at)),
      h('dt', null, 'last event'), h('dd', { title: s.last_at }, clock(s.last_at)),
      h('dt', null, 'head'), h('dd', { class: 'mono', title: s.head }, short(s.head, 16)),
      kill, susp);
    const counter = (label, value, cls) => h('div', { class: ['counter', cls] }, h('span', { class: 'counter-value' }, String(value ?? 0)), h('span', { class: 'counter-label' }, label));
    fill(counters,
      counter('events', s.events),
      counter('proposals', s.proposals),
      counter('effects', s.effects),
      counter('writes applied', shown.books?.applied ?? s.by_type?.EffectApplied ?? 0),
      counter('denials', s.denials, s.denials ? 'bad' : ''),
      counter('grants', shown.books?.grants?.length ?? 0),
      counter('approvals', shown.books?.approvals?.length ?? 0));
    const budget = budgetNow(prov);
    const spent = { ...budgetCost(s.cost, shown.window_elapsed_us), denials: shown.books?.refusals ?? 0 };
    fill(meters, h('h2', null, 'Cost / budget'), costMeters(spent, budget));
    return budget;
  }

  const cards = new Map();
  function renderApprovals(list) {
    const ids = new Set(list.map((a) => a.id));
    for (const [id, card] of cards) {
      if (!ids.has(id) && !card.classList.contains('answered-yes') && !card.classList.contains('answered-no')) {
        card.remove();
        cards.delete(id);
      }
    }
    for (const a of list) {
      if (cards.has(a.id)) continue;
      const card = approvalCard(a, {
        byId,
        onAnswered: () => { ctx.refreshHeader(); soon(); setTimeout(() => { card.remove(); cards.delete(a.id); approvalsSection.hidden = cards.size === 0; }, 2500); },
        onError: ctx.error,
      });
      cards.set(a.id, card);
      approvals.append(card);
    }
    approvalsSection.hidden = cards.size === 0;
    tickExpiries();
  }

  /**
   * The content of a write whose request's arguments are a blob: fetched (the first
   * AUTO_BLOB_WRITES of the diff by themselves, the others on a click) and shown as the patch;
   * while it loads, or if it cannot be had, the box says so.
   */
  const wantedBlobs = new Set(); // digests of writes whose content the diff shows
  function stagedBlob(staged, auto) {
    const ref = staged.blob;
    const words = blobWords(ref);
    const box = h('div', { class: 'blob-content' });
    const hint = () => [h('span', { class: 'mono' }, `ice show ${staged.request} --blobs`), ' prints them'];
    const load = (retry) => {
      wantedBlobs.add(ref.digest);
      box.dataset.blob = 'loading';
      fill(box, h('p', { class: 'muted blob-note' }, `Loading the content: the request's arguments are ${words}…`));
      whenBlob(ref, (v) => {
        box.dataset.blob = 'shown';
        const text = v && typeof v === 'object' ? v.content : undefined;
        fill(box, typeof text === 'string' ? patch(text)
          : h('p', { class: 'muted' }, `content: not recorded as text in the request's arguments (${words})`));
      }, (e) => {
        box.dataset.blob = 'failed';
        const again = h('button', { type: 'button', class: 'link retry' }, 'Try again');
        again.addEventListener('click', () => load(true));
        fill(box, h('p', { class: 'blob-note' },
          h('span', { class: 'problem' }, `The content could not be loaded: ${describe(e)}.`),
          ` The request's arguments are ${words}; `, hint(), '. ', again));
      }, { retry });
    };
    if (auto || wantedBlobs.has(ref.digest) || blobKnown(ref.digest)) {
      load(false);
    } else {
      box.dataset.blob = 'not-loaded';
      const show = h('button', { type: 'button', class: 'link load' }, 'Show the content');
      show.addEventListener('click', () => load(false));
      fill(box, h('p', { class: 'muted blob-note' }, `The request's arguments are ${words}. `, show, ' (or ', hint(), ')'));
    }
    return box;
  }

  function renderDiff(changes) {
    if (!changes.length) {
      fill(diff, h('p', { class: 'muted' }, 'No staged writes: this run changed nothing in its workspace (so far).'));
      return;
    }
    const explain = [...new Set(changes.map((c) => c.status))].map((status) => ({
      staged: 'Staged: the workspace does not change until the run validates and commits.',
      applied: 'Applied to the workspace when the run committed.',
      unchanged: 'Unchanged (=): the workspace already held what the run staged when it committed, so nothing was written.',
      discarded: 'Discarded: the run ended without committing, so none of this reached the workspace.',
      abandoned: 'Abandoned: an operator gave up this run\'s commit, which may have reached the workspace in part.',
    }[status] ?? '')).filter(Boolean).join(' ');
    let blobWrites = 0;
    fill(diff,
      h('p', { class: 'muted' }, explain),
      changes.map((c) => {
        const sign = c.change === 'added' ? 'A' : c.change === 'deleted' ? 'D' : c.change === 'unchanged' ? '=' : 'M';
        const staged = c.change === 'deleted' ? null : stagedText(c.event, byId);
        const text = staged?.content;
        let body;
        if (typeof text === 'string') {
          body = patch(text);
        } else if (c.change === 'deleted') {
          body = h('pre', { class: 'patch' }, h('span', { class: 'del' }, '- (the file is deleted)\n'));
        } else if (staged?.blob) {
          body = stagedBlob(staged, blobWrites++ < AUTO_BLOB_WRITES);
        } else if (staged) {
          body = h('p', { class: 'muted' }, 'content: not recorded as text in the request');
        } else {
          body = h('p', { class: 'muted' }, 'content: not in the loaded events');
        }
        const at = parseId(c.event);
        return h('div', { class: 'change', dataset: { path: c.path } },
          h('div', { class: 'change-head' },
            h('span', { class: ['change-sign', `sign-${sign === '=' ? 'same' : sign}`] }, sign),
            h('span', { class: 'mono path' }, c.path),
            h('span', { class: `pill pill-${c.status === 'applied' || c.status === 'unchanged' ? 'good' : c.status === 'discarded' ? 'bad' : 'warn'}` }, c.status),
            at ? h('a', { class: 'mono', href: runHref(at.run, at.seq), onclick: (ev) => { ev.preventDefault(); select(at.seq); } }, `#${at.seq}`) : '',
            h('span', { class: 'mono muted digests' }, `${c.before ? short(c.before, 10) : '∅'} → ${c.after ? short(c.after, 10) : '∅'}`)),
          body);
      }));
  }

  // ------------------------------------------------------------------ selection and the inspector
  function select(seq) {
    selected = seq;
    markSelected();
    renderInspector();
    const want = runHref(run, seq);
    if (location.hash !== want) history.replaceState(null, '', want);
    if (window.matchMedia('(max-width: 1100px)').matches) inspector.scrollIntoView({ behavior: 'smooth', block: 'start' });
  }
  function markSelected() {
    for (const tr of rows.querySelectorAll('tr.selected')) tr.classList.remove('selected');
    if (selected !== null) rows.querySelector(`tr[data-seq="${Number(selected)}"]`)?.classList.add('selected');
  }

  /** Draw the inspector; if the event cannot be drawn, say so there (never throw). */
  function renderInspector() {
    try {
      drawInspector();
    } catch (err) {
      fill(inspector, h('h2', null, `#${selected}`),
        h('p', { class: 'problem' }, `This event cannot be shown: ${err?.message ?? err}`));
    }
  }

  function drawInspector() {
    const e = selected === null ? null : byId.get(`${run}:${selected}`);
    if (!e) {
      fill(inspector,
        h('h2', null, 'Causal graph'),
        h('p', { class: 'muted' }, selected === null
          ? 'Select an event in the timeline to see what proposed it, what decided it and what authorised it.'
          : `Event #${selected} is not in the timeline yet.`));
      return;
    }
    const link = (id) => {
      const p = parseId(id);
      return p && p.run === run
        ? h('a', { class: 'mono', href: runHref(run, p.seq), onclick: (ev) => { ev.preventDefault(); select(p.seq); } }, `#${p.seq}`)
        : h('span', { class: 'mono' }, id);
    };
    let payload;
    try { payload = JSON.stringify(e.payload ?? {}, null, 2); } catch { payload = String(e.payload); }
    if (payload.length > 50000) payload = `${payload.slice(0, 50000)}\n… (cut: ${payload.length} characters)`;
    // Fields over the kernel's threshold are references in the payload: fetch this event's
    // (cached by digest), show each value, and summarise the event again with them.
    const summaryEl = h('dd', { class: 'event-summary' }, summary(e));
    const blobs = blobFields(e.payload);
    const resolved = {};
    const blobItem = (b) => {
      const value = h('div', { class: 'blob-value-box' });
      const li = h('li', { dataset: { field: b.field } },
        h('span', { class: 'mono' }, b.field), `: ${blobWords(b)} `, h('span', { class: 'mono muted', title: b.digest }, short(b.digest, 16)),
        value);
      const load = (retry) => {
        li.dataset.blob = 'loading';
        fill(value, h('p', { class: 'muted blob-status' }, 'loading…'));
        whenBlob(b, (v) => {
          li.dataset.blob = 'shown';
          let text = pretty(v);
          if (text.length > BLOB_SHOWN) text = `${text.slice(0, BLOB_SHOWN)}\n… (cut: ${text.length} characters; ice show ${idOf(e)} --blobs prints it all)`;
          fill(value, h('pre', { class: 'blob-value' }, text));
          resolved[b.field] = v;
          fill(summaryEl, summary({ ...e, payload: { ...e.payload, ...resolved } }));
        }, (err) => {
          li.dataset.blob = 'failed';
          const again = h('button', { type: 'button', class: 'link retry' }, 'Try again');
          again.addEventListener('click', () => load(true));
          fill(value, h('p', { class: 'blob-status' }, h('span', { class: 'problem' }, `could not be loaded: ${describe(err)}`), ' ', again));
        }, { retry });
      };
      load(false);
      return li;
    };
    const blobNote = blobs.length
      ? h('div', { class: 'blob-fields' },
        h('p', { class: 'muted' }, 'Fields stored as blobs, outside the event (fetched from the log; ',
          h('span', { class: 'mono' }, `ice show ${idOf(e)} --blobs`), ' prints them too):'),
        h('ul', null, blobs.map(blobItem)))
      : '';
    let graph;
    try {
      graph = causalGraph(e, byId, select);
    } catch (err) {
      graph = h('p', { class: 'problem' }, `The causal graph cannot be drawn: ${err?.message ?? err}`);
    }
    fill(inspector,
      h('div', { class: 'section-head' },
        h('h2', null, `#${e.run_seq} `, h('span', { class: `etype k-${kind(e.type)}` }, e.type)),
        h('a', { href: runHref(run), onclick: (ev) => { ev.preventDefault(); selected = null; markSelected(); renderInspector(); history.replaceState(null, '', runHref(run)); } }, 'close')),
      h('dl', { class: 'facts' },
        h('dt', null, 'id'), h('dd', { class: 'mono' }, idOf(e)),
        h('dt', null, 'at'), h('dd', { title: e.at }, `${stamp(e.at)}  (${clock(e.at)})`),
        h('dt', null, 'origin'), h('dd', { class: 'mono' }, e.origin),
        e.intent ? [h('dt', null, 'intent'), h('dd', null, h('q', null, e.intent))] : '',
        e.authority ? [h('dt', null, 'authority'), h('dd', null, link(e.authority))] : '',
        (e.causes ?? []).length ? [h('dt', null, 'causes'), h('dd', null, e.causes.map((c, i) => [i ? ', ' : '', link(c)]))] : '',
        h('dt', null, 'hash'), h('dd', { class: 'mono', title: e.hash }, short(e.hash, 24)),
        e.log_seq !== undefined ? [h('dt', null, 'log position'), h('dd', { class: 'mono' }, String(e.log_seq))] : '',
        h('dt', null, 'summary'), summaryEl),
      h('h3', null, 'Causal graph'),
      graph,
      blobNote,
      h('details', { class: 'payload' }, h('summary', null, 'Payload'), h('pre', null, payload)));
  }

  refresh();
  stream();
  return {
    unmount() {
      alive = false;
      abort.abort();
      clearTimeout(timer);
      clearTimeout(headRetry);
    },
    /** Same run, another event: select it without reloading. */
    update(p) {
      if (p.run !== run) return false;
      if ((p.seq ?? null) !== selected) {
        if (p.seq === undefined) { selected = null; markSelected(); renderInspector(); } else select(p.seq);
      }
      return true;
    },
    get info() { return info; },
  };
}
