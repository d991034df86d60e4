// What the page knows about events: their kind, a one-line summary, their links (causes and
// authority), and the causal graph of one event.

import { h, svg, compact, bytes, micros, short, clock, runHref, parseId } from './dom.js';
import { blobValue, blobKnown, ApiError } from './api.js';

const KINDS = {
  request: ['CapabilityRequested'],
  grant: ['CapabilityGranted'],
  denial: ['CapabilityDenied', 'CapabilityRevoked', 'CapabilityExpired'],
  use: ['CapabilityUsed'],
  approval: ['ApprovalRequested'],
  operator: ['ApprovalGranted', 'ApprovalDenied', 'ReconfigurationRecorded', 'RunKillRequested'],
  effect: ['FileRead', 'FileWritten', 'EffectStaged', 'EffectApplied', 'ToolInvoked',
    'APIRequestExecuted', 'TaskStarted', 'TaskCompleted', 'UserNotificationSent', 'WorkflowAdvanced'],
  budget: ['BudgetReserved', 'BudgetSettled'],
  thought: ['InferenceStep', 'DecisionProposed', 'HypothesisGenerated', 'UncertaintyDeclared',
    'PlanStepProposed', 'AssumptionDeclared'],
  memory: ['MemoryMounted', 'MemoryPromoted', 'MemoryExpired', 'MemoryDeprecated', 'MemorySuperseded',
    'MemoryInvalidated'],
  good: ['ValidationPassed', 'RunCommitted'],
  bad: ['ValidationFailed', 'RunAborted', 'AbortReasonDeclared', 'RunSuspended'],
};
const KIND_OF = new Map(Object.entries(KINDS).flatMap(([k, types]) => types.map((t) => [t, k])));

/** request, grant, denial, use, approval, operator, effect, budget, thought, memory, good, bad, lifecycle. */
export function kind(type) {
  return KIND_OF.get(type) ?? 'lifecycle';
}

/** The event's id, RUN:SEQ. */
export const idOf = (e) => `${e.run_id}:${e.run_seq}`;

/**
 * A blob reference — a payload field over the kernel's threshold (16 KiB) that the log keeps
 * outside the event, `{"$blob": "<sha256 hex>", "size": N}` — as {digest, size}; else null.
 * The API returns events with their references; GET /blobs/{digest} serves the value (see
 * whenBlob), and `ice show ID --blobs` prints it on the server's machine.
 */
export function blobRef(v) {
  if (!v || typeof v !== 'object' || Array.isArray(v) || typeof v.$blob !== 'string') return null;
  return { digest: v.$blob, size: typeof v.size === 'number' ? v.size : null };
}

/** "stored as a blob, 17012 bytes": what the page says of a blob (in summaries, while loading). */
export function blobWords(ref) {
  return `stored as a blob${ref.size === null ? '' : `, ${ref.size} bytes`}`;
}

/** An error as one line for people. */
export function describe(e) {
  return e instanceof ApiError ? e.describe() : String(e?.message ?? e);
}

/**
 * Show a blob's value, fetched on demand and cached by digest (api.js): `shown(value)` at once
 * when the page has it already, else when it arrives; `failed(error)` when it cannot be had.
 * The caller draws "loading" first (this may replace it before returning). Never throws, and
 * neither callback's failure escapes (a redraw must never break a render or the live stream).
 */
export function whenBlob(ref, shown, failed, { retry = false } = {}) {
  const safe = (f, x) => {
    try { f(x); } catch (err) { console.error('drawing a blob failed', err); }
  };
  try {
    const now = retry ? null : blobKnown(ref.digest);
    if (now) { if (now.ok) safe(shown, now.value); else safe(failed, now.error); return; }
    blobValue(ref.digest, { retry }).then((v) => safe(shown, v), (e) => safe(failed, e));
  } catch (e) {
    safe(failed, e);
  }
}

/** A JSON value for people, whole: indented JSON (a string as itself when `raw`). */
export function pretty(v, raw = false) {
  if (v === undefined || v === null) return '—';
  if (raw && typeof v === 'string') return v;
  try { return JSON.stringify(v, null, 2) ?? String(v); } catch { return compact(v, Infinity); }
}

/** The payload's top-level fields kept as blobs: [{field, digest, size}]. */
export function blobFields(payload) {
  if (!payload || typeof payload !== 'object') return [];
  return Object.entries(payload).flatMap(([field, v]) => {
    const b = blobRef(v);
    return b ? [{ field, ...b }] : [];
  });
}

const notShown = (v) => `(${blobWords(blobRef(v))})`;
/** An object with its blob references put as words, for compact(). */
const plain = (o) => (o && typeof o === 'object' && !Array.isArray(o)
  ? Object.fromEntries(Object.entries(o).map(([k, v]) => [k, blobRef(v) ? notShown(v) : v])) : o);
const str = (v) => (v === undefined || v === null ? '' : typeof v === 'string' ? v
  : blobRef(v) ? notShown(v) : compact(plain(v), 80));
const resource = (r) => (blobRef(r) ? notShown(r) : r && typeof r === 'object' ? `${r.kind ?? ''} ${r.id ?? ''}`.trim() : str(r));
const amount = (a) => (blobRef(a) ? notShown(a) : a && typeof a === 'object' ? Object.entries(a)
  .map(([k, v]) => (k === 'bytes' ? bytes(v) : k === 'wall_time_us' ? micros(v) : `${str(v)} ${k.replace(/_/g, ' ')}`))
  .join(', ') : str(a));
/** A list field: its items, or null when it is a blob (or not a list). */
const list = (v) => (Array.isArray(v) ? v : v === undefined || v === null ? [] : null);
/** "3 file(s)", or what the list is instead ("files stored as a blob, N bytes"). */
const count = (v, one, many = `${one}s`) => {
  const l = list(v);
  if (l) return `${l.length} ${l.length === 1 ? one : many}`;
  return blobRef(v) ? `${many} ${blobWords(blobRef(v))}` : `${many}: ${str(v)}`;
};
/** The list's items through f, joined; what the list is instead when it is not one. */
const names = (v, f = str, sep = ', ') => {
  const l = list(v);
  if (l) return l.map((x) => (x && typeof x === 'object' ? str(f(x)) : str(x))).join(sep);
  return str(v);
};
const has = (v) => v !== undefined && v !== null && !(Array.isArray(v) && !v.length);

/**
 * One line saying what the event records. Never throws: a field kept as a blob is named as
 * such (never read as if it were the value), and an event that still cannot be summarised says
 * so — its row and inspector stay.
 */
export function summary(e) {
  try {
    return summarise(e);
  } catch (err) {
    return `(no summary: ${err?.message ?? err})`;
  }
}

function summarise(e) {
  const p = e?.payload && typeof e.payload === 'object' ? e.payload : {};
  switch (e?.type) {
    case 'RunProvisioned': return `agent ${str(p.agent)}, driver ${str(p.driver)}${blobRef(p.spec) ? `, spec ${blobWords(blobRef(p.spec))}` : typeof p.spec?.file === 'string' ? `, spec ${p.spec.file}` : ''}`;
    case 'ContextResolved': return `policy ${short(str(p.policy_version), 12) || 'resolved'}${has(p.assumptions) ? `, ${count(p.assumptions, 'assumption(s)', 'assumption(s)')}` : ''}`;
    case 'PolicyReloaded': return `policy now ${short(str(p.policy_version), 12)}${p.previous_version ? ` (was ${short(str(p.previous_version), 12)})` : ''}: ${count(p.policy_sources, 'file(s)', 'file(s)')}`;
    case 'CapabilitiesBound': return `${names(p.capabilities, (c) => c.name)}${has(p.tools) ? ` + ${count(p.tools, 'tool(s)', 'tool(s)')}` : ''}`;
    case 'MemoryMounted': return `${count(p.memories, 'memory', 'memories')} mounted`;
    case 'ExecutionWindowOpened': return `agent ${str(p.agent)} may propose`;
    case 'CapabilityRequested': return `${str(p.capability)} ${str(p.target)}${blobRef(p.arguments) ? ` arguments ${blobWords(blobRef(p.arguments))}` : p.arguments && typeof p.arguments === 'object' && Object.keys(p.arguments).length ? ` ${compact(plain(p.arguments), 70)}` : ''}`;
    case 'CapabilityGranted': return `grant ${str(p.scope)}${p.approval ? `, approved (${str(p.approval)})` : ''}${has(p.policies) ? ` by ${names(p.policies)}` : ''}, ${str(p.max_uses ?? '?')} use(s)`;
    case 'CapabilityDenied': return `denied ${str(p.capability)} ${str(p.target)}: ${str(p.reason)}${p.detail ? ` (${str(p.detail)})` : ''}`;
    case 'CapabilityUsed': return `${str(p.capability)} on ${resource(p.resource)} under grant ${str(p.grant)}`;
    case 'ApprovalRequested': return `${str(p.capability)} on ${resource(p.resource)} needs an operator (${names(p.policies)})`;
    case 'ApprovalGranted': return `approved ${str(p.approval)}`;
    case 'ApprovalDenied': return `denied ${str(p.approval)}${p.reason ? `: ${str(p.reason)}` : ''}`;
    case 'BudgetReserved': return `reserve ${amount(p.amount)}`;
    case 'BudgetSettled': return `settle ${amount(p.actual)}`;
    case 'FileRead': return `${str(p.path)}${typeof p.bytes === 'number' ? ` (${bytes(p.bytes)})` : ''}`;
    case 'EffectStaged': return `staged ${blobRef(p.staged) ? `(${blobWords(blobRef(p.staged))})` : str(p.staged?.op ?? 'write')} ${str(p.path)}${typeof p.bytes === 'number' ? ` (${bytes(p.bytes)})` : ''}`;
    case 'EffectApplied': return `${str(p.change)} ${str(p.path)}`;
    case 'FileWritten': return `${str(p.path)}`;
    case 'APIRequestExecuted': {
      const url = p.url ?? (blobRef(p.evidence) ? p.evidence : p.evidence?.http?.url);
      const status = p.status ?? (blobRef(p.output) ? p.output : p.output?.status);
      return `${str(p.method)} ${str(url)} → ${str(status)}`;
    }
    case 'ToolInvoked': return `${str(p.server)}/${str(p.tool)}${p.is_error === true ? ' (error)' : ''}`;
    case 'InferenceStep': return `${str(p.model)}${p.usage ? ` ${blobRef(p.usage) ? notShown(p.usage) : compact(plain(p.usage), 60)}` : ''}`;
    case 'PlanStepProposed': case 'DecisionProposed': case 'HypothesisGenerated':
    case 'UncertaintyDeclared': case 'AssumptionDeclared': return str(p.text ?? p.thought ?? compact(plain(p), 100));
    case 'ValidationStarted': return `checks: ${names(p.checks) || 'authority, budget, assumptions'}`;
    case 'ValidationPassed': return `${count(p.results, 'check(s)', 'check(s)')} passed`;
    case 'ValidationFailed': {
      const results = list(p.results);
      if (!results) return `failed: the check results are not shown (${blobRef(p.results) ? blobWords(blobRef(p.results)) : `not a list: ${str(p.results)}`})${p.reason ? `: ${str(p.reason)}` : ''}`;
      return `failed: ${results.filter((r) => !r?.passed).map((r) => str(r?.check)).join(', ') || str(p.reason)}`;
    }
    case 'RunCommitted': return `${str(p.applied ?? 0)} change(s) applied`;
    case 'RunAborted': case 'AbortReasonDeclared': case 'RunSuspended': case 'RunKillRequested':
      return `${str(p.reason)}${p.detail ? `: ${str(p.detail)}` : ''}`;
    case 'RunResumed': return str(p.reconfiguration ?? p.reason ?? '');
    case 'ReconfigurationRecorded': return `${str(p.reason)}`;
    case 'RunTerminated': return `outcome: ${str(p.outcome)}`;
    case 'ResourcesAllocated': case 'ResourcesReleased': return `stage ${str(p.stage)}`;
    default: {
      const keys = ['reason', 'detail', 'path', 'capability', 'target', 'status', 'memory', 'kind', 'scope'];
      return keys.filter((k) => p[k] !== undefined).map((k) => `${k} ${str(p[k])}`).join(', ');
    }
  }
}

/** What the event is, in a causal chain. */
export function role(e) {
  switch (e.type) {
    case 'CapabilityRequested': return 'request';
    case 'CapabilityGranted': return e.payload?.approval ? 'decision: grant (approved)' : 'decision: grant (policy)';
    case 'CapabilityDenied': return 'decision: denial';
    case 'ApprovalRequested': return 'decision: approval required';
    case 'ApprovalGranted': return 'operator answer: approved';
    case 'ApprovalDenied': return 'operator answer: denied';
    case 'CapabilityUsed': return 'use of the grant';
    case 'BudgetReserved': return 'budget reserved';
    case 'BudgetSettled': return 'budget settled';
    default: return kind(e.type) === 'effect' ? 'effect' : kind(e.type);
  }
}

/** The ids an event names as its causes or authority: [{id, via: ['cause', 'authority', …]}]. */
export function links(e) {
  const out = new Map();
  const put = (id, via) => {
    if (typeof id !== 'string' || !parseId(id)) return;
    if (!out.has(id)) out.set(id, []);
    if (!out.get(id).includes(via)) out.get(id).push(via);
  };
  for (const c of e.causes ?? []) put(c, 'cause');
  put(e.authority, 'authority');
  for (const k of ['request', 'approval', 'grant']) put(e.payload?.[k], k);
  return [...out].map(([id, via]) => ({ id, via }));
}

/** Every event reached from `target` through links (itself included), in log order. */
export function chain(target, byId) {
  const seen = new Map([[idOf(target), target]]);
  const missing = new Set();
  const queue = [target];
  while (queue.length) {
    const e = queue.pop();
    for (const { id } of links(e)) {
      if (seen.has(id)) continue;
      const c = byId.get(id);
      if (c) { seen.set(id, c); queue.push(c); } else missing.add(id);
    }
  }
  const events = [...seen.values()].sort((a, b) => a.run_seq - b.run_seq);
  return { events, missing: [...missing] };
}

const ROW = 58; // px: the height of one node row; the SVG's arcs join rows' centres

/**
 * The causal graph of `target`: the events it was caused and authorised by, in log order, each
 * with its role and the links it names, and beside them an SVG of those links (causes grey,
 * authority green) — request → decision (grant, denial, approval) → operator answer → effect.
 */
export function causalGraph(target, byId, onSelect) {
  const { events, missing } = chain(target, byId);
  const row = new Map(events.map((e, i) => [idOf(e), i]));
  const edges = [];
  for (const e of events) {
    for (const l of links(e)) {
      if (row.has(l.id)) edges.push({ from: row.get(idOf(e)), to: row.get(l.id), via: l.via });
    }
  }
  const width = 30 + Math.min(6, Math.max(1, edges.length)) * 12;
  const height = events.length * ROW;
  const pic = svg('svg', {
    class: 'graph-svg', width, height, viewBox: `0 0 ${width} ${height}`, 'aria-hidden': 'true',
  });
  const x = width - 10;
  edges.forEach((ed, i) => {
    const y1 = ed.from * ROW + ROW / 2;
    const y2 = ed.to * ROW + ROW / 2;
    const bend = x - 14 - Math.min(width - 24, Math.abs(ed.from - ed.to) * 8 + (i % 3) * 4);
    const authority = ed.via.some((v) => v !== 'cause');
    pic.append(svg('path', {
      d: `M ${x} ${y1} C ${bend} ${y1}, ${bend} ${y2}, ${x} ${y2}`,
      class: authority ? 'edge edge-authority' : 'edge edge-cause',
    }));
  });
  events.forEach((e, i) => {
    pic.append(svg('circle', { cx: x, cy: i * ROW + ROW / 2, r: 5, class: `node node-${kind(e.type)}` }));
  });
  const rows = events.map((e) => {
    const mine = links(e);
    const isTarget = idOf(e) === idOf(target);
    const what = summary(e);
    return h('li', {
      class: ['graph-row', `k-${kind(e.type)}`, isTarget && 'graph-target'],
      dataset: { seq: e.run_seq, type: e.type },
    },
    h('div', { class: 'graph-line' },
      h('a', { href: runHref(e.run_id, e.run_seq), class: 'seq', onclick: onSelect && ((ev) => { ev.preventDefault(); onSelect(e.run_seq); }) }, `#${e.run_seq}`),
      h('span', { class: 'etype' }, e.type),
      h('span', { class: 'role' }, isTarget ? `${role(e)} — explained` : role(e))),
    h('div', { class: 'graph-sub', title: what },
      h('span', { class: 'origin' }, e.origin), ' · ',
      mine.length
        ? mine.map((l, j) => [j ? '; ' : '', `${l.via.join(' + ')} `, h('span', { class: 'mono' }, `#${parseId(l.id)?.seq ?? l.id}`)])
        : (e.intent ? '' : 'no links: a fact of the run itself'),
      e.intent ? [mine.length ? ' — ' : '', h('q', null, e.intent)] : '',
      ' ', h('span', { class: 'muted' }, what)));
  });
  const authorityNotEvents = events
    .map((e) => e.authority)
    .filter((a) => typeof a === 'string' && !parseId(a));
  return h('div', { class: 'graph', id: 'causal-graph', dataset: { event: idOf(target) } },
    h('div', { class: 'graph-body' }, pic, h('ol', { class: 'graph-rows' }, rows)),
    h('p', { class: 'graph-legend muted' },
      h('span', { class: 'swatch swatch-cause' }), ' cause  ',
      h('span', { class: 'swatch swatch-authority' }), ' authority (grant, approval, request)',
      authorityNotEvents.length ? ` · decided under ${[...new Set(authorityNotEvents)].map((a) => (a.startsWith('policy:') ? `policy ${short(a.slice(7), 12)}` : a)).join(', ')}` : '',
      missing.length ? ` · not in this run's events: ${missing.join(', ')}` : ''));
}

/** The timeline's row for one event. */
export function timelineRow(e, onSelect) {
  const what = summary(e);
  return h('tr', {
    class: ['ev', `k-${kind(e.type)}`],
    dataset: { seq: e.run_seq, type: e.type },
    tabindex: 0,
    onclick: () => onSelect(e.run_seq),
    onkeydown: (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); onSelect(e.run_seq); } },
  },
  h('td', { class: 'seq' }, String(e.run_seq)),
  h('td', { class: 'time', title: e.at }, clock(e.at)),
  h('td', { class: 'etype' }, h('span', { class: 'dot' }), e.type),
  h('td', { class: 'origin' }, e.origin),
  h('td', { class: 'what' },
    e.intent ? h('div', { class: 'intent' }, h('q', null, e.intent)) : '',
    h('div', { class: 'summary', title: what }, what)));
}
