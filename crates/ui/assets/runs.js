// The runs list: state, events, cost spent against budget, effects, denials; and the
// approvals waiting for an operator.

import { get, seg, blobValue } from './api.js';
import { h, fill, bytes, micros, stamp, ago, runHref, oneAtATime } from './dom.js';
import { approvalCard, tickExpiries } from './approvals.js';
import { blobRef, blobWords, describe } from './events.js';

const DIMS = [
  ['tool_calls', 'tool calls', (v) => String(v)],
  ['bytes', 'bytes', bytes],
  ['wall_time_us', 'wall time', micros],
  ['tokens_in', 'tokens in', (v) => String(v)],
  ['tokens_out', 'tokens out', (v) => String(v)],
  ['credits_micro', 'credits', (v) => (v / 1e6).toFixed(2)],
  ['risk', 'risk', (v) => String(v)],
  // Not a cost: the requests refused so far (`books.refusals`), against `[budget] denials`.
  ['denials', 'refusals', (v) => String(v)],
];

/**
 * Cost as a budget spends it: a wall_time budget is spent by the execution window's elapsed
 * time (the API's `window_elapsed_us`), not by the time recorded on single calls.
 */
export function budgetCost(cost, windowElapsedUs) {
  return typeof windowElapsedUs === 'number' ? { ...cost, wall_time_us: windowElapsedUs } : cost;
}

/**
 * Cost spent against the budget, one meter per dimension that has a limit or a cost. `budget`
 * is the limits ({tool_calls: 20, …}; a dimension without one has no limit), null while it is
 * loading, or {notShown: 'why'} when the page cannot know it: then no meter claims "no limit".
 */
export function costMeters(cost, budget, small = false) {
  const unknown = typeof budget?.notShown === 'string' ? budget.notShown : null;
  const rows = [];
  for (const [key, label, fmt] of DIMS) {
    const spent = cost?.[key];
    const limit = unknown ? undefined : budget?.[key];
    const hasLimit = typeof limit === 'number';
    if (!hasLimit && !spent) continue;
    const ratio = hasLimit && limit > 0 ? (spent ?? 0) / limit : 0;
    const bar = h('span', { class: 'bar' });
    bar.style.width = `${Math.min(100, Math.round(ratio * 100))}%`;
    const of = hasLimit ? ` of ${fmt(limit)}` : unknown ? ` (limit not shown: ${unknown})` : budget ? ' (no limit)' : '';
    rows.push(h('div', { class: ['meter', ratio >= 1 ? 'over' : ratio >= 0.8 ? 'warn' : ''], title: `${label}: ${fmt(spent ?? 0)}${of}` },
      h('span', { class: 'meter-label' }, label),
      h('span', { class: 'meter-value' }, fmt(spent ?? 0),
        hasLimit ? h('span', { class: 'muted' }, ` / ${fmt(limit)}`)
          : h('span', { class: 'muted' }, small ? '' : unknown ? ' (limit not shown)' : budget ? ' (no limit)' : '')),
      hasLimit ? h('span', { class: 'track' }, bar) : ''));
  }
  return h('div', { class: ['meters', small && 'meters-small'] },
    rows.length ? rows : h('span', { class: 'muted' }, 'nothing spent'),
    unknown ? h('div', { class: 'muted small budget-not-shown', title: unknown }, `budget not shown: ${unknown}`) : '');
}

/** The run's state, with how a terminated run ended and whether it waits for an operator. */
export function statePill(summary, waiting = false) {
  const s = summary?.state ?? '?';
  const by = summary?.by_type ?? {};
  const ended = by.RunCommitted ? 'committed' : by.RunAborted ? 'aborted' : null;
  const cls = ended === 'aborted' || s === 'ABORTED' || s === 'TERMINATED_BY_RUNTIME' ? 'bad'
    : ended === 'committed' || s === 'COMMITTED' ? 'good'
      : s === 'SUSPENDED' || waiting ? 'warn' : 'live';
  return h('span', { class: ['pill', `pill-${cls}`], dataset: { state: s } },
    s, ended && s === 'TERMINATED' ? ` · ${ended}` : '', waiting ? ' · waiting for approval' : '');
}

const firsts = new Map(); // run → Promise of its RunProvisioned event (event 0; never changes)

/** The budget a run's recorded spec sets (see costMeters), or {notShown} when it cannot be read. */
export function specBudget(spec) {
  const ref = blobRef(spec);
  if (ref) return { notShown: `the run's spec is ${blobWords(ref)}` };
  if (!spec || typeof spec !== 'object') return { notShown: 'the run records no spec' };
  const b = spec.budget;
  if (blobRef(b)) return { notShown: `its budget is ${blobWords(blobRef(b))}` };
  if (!b || typeof b !== 'object' || Array.isArray(b)) return { notShown: 'the run\'s spec records no budget' };
  return b;
}

/**
 * The agent, driver and budget a run was provisioned with (its event 0, fetched once). A spec
 * kept as a blob is fetched (once: blobs are cached by digest) to read its budget; if it
 * cannot be, the budget is {notShown} saying why, and a later call tries again.
 */
export async function provisioned(run) {
  if (!firsts.has(run)) {
    firsts.set(run, get(`/events/${seg(`${run}:0`)}`).catch((e) => { firsts.delete(run); throw e; }));
  }
  const e = await firsts.get(run);
  const p = e?.payload && typeof e.payload === 'object' ? e.payload : {};
  let spec = p.spec;
  let budget;
  const ref = blobRef(spec);
  if (ref) {
    try {
      spec = await blobValue(ref.digest);
      budget = specBudget(spec);
    } catch (err) {
      spec = null;
      // `failed`: a page that keeps showing it asks again later (the blob may be had then).
      budget = { notShown: `the run's spec is ${blobWords(ref)} and could not be loaded (${describe(err)})`, failed: true };
    }
  } else {
    budget = specBudget(spec);
  }
  const text = (v) => (typeof v === 'string' ? v : undefined);
  return {
    agent: text(p.agent) ?? text(spec?.agent),
    driver: text(p.driver) ?? text(spec?.driver),
    budget,
  };
}

/** Most runs the page lists: the newest. */
const MAX_RUNS = 500;

/** The newest runs (at most MAX_RUNS), newest first, and how many runs the log holds in all. */
async function newestRuns() {
  const page = await get(`/runs?order=newest&limit=${MAX_RUNS}`);
  // A run started after the count was taken may be in the page.
  return { runs: page.runs, total: Math.max(page.total ?? 0, page.runs.length) };
}

/** The runs page. */
export function runsView(root, ctx) {
  const pending = h('div', { class: 'approvals' });
  const pendingSection = h('section', { class: 'pending', hidden: true },
    h('h2', null, 'Waiting for an operator'), pending);
  const body = h('tbody');
  const count = h('span', { class: 'muted', id: 'runs-count' }, 'Loading…');
  fill(root, h('section', { class: 'page' },
    h('div', { class: 'page-head' }, h('h1', null, 'Runs'), count),
    pendingSection,
    h('div', { class: 'table-wrap card' },
      h('table', { class: 'runs' },
        h('thead', null, h('tr', null,
          h('th', null, 'Run'), h('th', null, 'Agent'), h('th', null, 'State'),
          h('th', { class: 'num' }, 'Events'), h('th', null, 'Cost / budget'),
          h('th', { class: 'num' }, 'Effects'), h('th', { class: 'num' }, 'Denials'),
          h('th', null, 'Started'), h('th', null, 'Last event'))),
        body))));
  const cards = new Map();
  let alive = true;
  // One refresh at a time: on a slow server, a listing that takes longer than the interval must
  // not pile more listings (each folds up to MAX_RUNS runs) onto it.
  const refresh = oneAtATime(async () => {
    let runs;
    let total;
    let approvals;
    try {
      ({ runs, total } = await newestRuns());
      approvals = (await get('/approvals')).approvals;
    } catch (e) {
      ctx.error(e);
      return;
    }
    if (!alive) return;
    const waiting = new Set(approvals.map((a) => a.run));
    const older = total - runs.length;
    fill(count, `${total} run${total === 1 ? '' : 's'}`, older > 0
      ? h('span', { class: 'runs-older' }, ` — the ${runs.length} newest shown; ${older} older run${older === 1 ? ' is' : 's are'} not shown (\`ice runs\` lists every run)`)
      : '');
    const rows = runs.map((s) => {
      const agent = h('td', { class: 'agent' }, '');
      const spent = budgetCost(s.cost, s.window_elapsed_us);
      const cost = h('td', { class: 'cost' }, costMeters(spent, null, true));
      provisioned(s.run_id).then((p) => {
        fill(agent, p.agent ?? '');
        // The list's summaries do not count refusals: no refusals meter here, the run's page
        // has it.
        const { denials: _refusalsLimit, ...budget } = p.budget ?? {};
        fill(cost, costMeters(spent, p.budget ? budget : p.budget, true));
      }).catch(() => {});
      return h('tr', { dataset: { run: s.run_id }, class: 'clickable', onclick: (ev) => { if (ev.target.tagName !== 'A') location.hash = runHref(s.run_id); } },
        h('td', null, h('a', { class: 'run-link mono', href: runHref(s.run_id) }, s.run_id)),
        agent,
        h('td', null, statePill(s, waiting.has(s.run_id))),
        h('td', { class: 'num' }, String(s.events)),
        cost,
        h('td', { class: 'num', title: 'effect events; writes applied to the workspace at commit' }, String(s.effects),
          s.by_type?.EffectApplied ? h('div', { class: 'muted small' }, `${s.by_type.EffectApplied} applied`) : ''),
        h('td', { class: ['num', s.denials ? 'has-denials' : ''] }, String(s.denials)),
        h('td', { title: s.started_at }, stamp(s.started_at)),
        h('td', { title: s.last_at }, ago(s.last_at)));
    });
    fill(body, rows.length ? rows : h('tr', null, h('td', { colspan: 9, class: 'empty' }, 'No runs yet. Start one with `ice run SPEC`, through MCP, or POST /api/v1/runs.')));
    // Approvals: keep cards already shown (and their inputs), add new ones, drop answered ones.
    const ids = new Set(approvals.map((a) => a.id));
    for (const [id, card] of cards) {
      const answered = card.classList.contains('answered-yes') || card.classList.contains('answered-no');
      if (!ids.has(id) && !answered) { card.remove(); cards.delete(id); }
    }
    for (const a of approvals) {
      if (!cards.has(a.id)) {
        const card = approvalCard(a, {
          showRun: true,
          onAnswered: () => {
            ctx.refreshHeader();
            setTimeout(refresh, 300);
            setTimeout(() => { card.remove(); cards.delete(a.id); pendingSection.hidden = cards.size === 0; }, 2500);
          },
          onError: ctx.error,
        });
        cards.set(a.id, card);
        pending.append(card);
      }
    }
    pendingSection.hidden = cards.size === 0;
    tickExpiries();
  });
  const tick = () => {
    if (!document.hidden && alive) refresh.ifIdle();
  };
  tick();
  const timer = setInterval(tick, 4000);
  return { unmount: () => { alive = false; clearInterval(timer); } };
}
