// ICE's operator page: the token, the header (verification, latest checkpoint, approvals
// waiting), errors, and the views by location hash: #/runs, #/runs/RUN[/SEQ], #/approvals.

import { token, get, post, onAuthFailure, ApiError } from './api.js';
import { h, fill, short, clock, compact, oneAtATime } from './dom.js';
import { runsView } from './runs.js';
import { runView } from './run.js';
import { approvalsView, tickExpiries } from './approvals.js';

const $ = (id) => document.getElementById(id);
let current = null; // {name, view}
let started = false;

// ---------------------------------------------------------------- errors

const shownErrors = new Map(); // text → element

function showError(e) {
  if (e instanceof ApiError && e.auth) return; // the token prompt says it
  if (e?.name === 'AbortError') return;
  const text = e instanceof ApiError ? e.describe() : String(e?.message ?? e);
  const old = shownErrors.get(text);
  if (old) { old.classList.remove('fresh'); void old.offsetWidth; old.classList.add('fresh'); return; }
  const close = h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss' }, '×');
  const el = h('div', { class: 'error fresh' }, h('strong', null, 'Error '), h('span', { class: 'error-text' }, text), close);
  const drop = () => { el.remove(); shownErrors.delete(text); };
  close.addEventListener('click', drop);
  shownErrors.set(text, el);
  $('errors').append(el);
  setTimeout(drop, 30000);
}

function clearErrors() {
  for (const el of shownErrors.values()) el.remove();
  shownErrors.clear();
}

window.addEventListener('unhandledrejection', (ev) => showError(ev.reason));

// ---------------------------------------------------------------- header

// One verification at a time (it reads the whole log).
const verify = oneAtATime(async () => {
  const pill = $('verify-status');
  pill.className = 'pill pill-muted';
  fill(pill, 'verifying the log…');
  try {
    const r = await post('/verify');
    if (r.ok) {
      pill.className = 'pill pill-good';
      fill(pill, `✓ log verified · ${r.events} event${r.events === 1 ? '' : 's'} · ${r.runs} run${r.runs === 1 ? '' : 's'}`);
      pill.title = `Every hash, chain, the Merkle tree (root ${r.root}), ${r.checkpoints_verified} checkpoint signature(s) and ${r.blobs_checked} blob(s) checked at ${clock(new Date().toISOString())}${r.warnings?.length ? `\nwarnings: ${r.warnings.join('; ')}` : ''}. Click to verify again.`;
    } else {
      const f = r.failure ?? {};
      pill.className = 'pill pill-bad';
      fill(pill, `✗ log INVALID${f.event_id ? ` at ${f.event_id}` : f.log_seq !== undefined && f.log_seq !== null ? ` at log position ${f.log_seq}` : ''}`);
      pill.title = `${f.problem ?? compact(f)}. Click to verify again.`;
      showError(new Error(`ice verify: the log is invalid${f.event_id ? ` at ${f.event_id}` : ''}: ${f.problem ?? compact(f)}`));
    }
  } catch (e) {
    pill.className = 'pill pill-muted';
    fill(pill, 'log: could not verify');
    pill.title = e instanceof ApiError ? e.describe() : String(e);
    showError(e);
  }
});

async function checkpoint() {
  const pill = $('checkpoint-status');
  try {
    const c = await get('/checkpoints/latest');
    const signer = String(c.note ?? '').split('\n')[0];
    pill.className = 'pill pill-info';
    fill(pill, `checkpoint ${c.size} · root ${short(c.root, 10)}`);
    pill.title = `Latest signed checkpoint (C2SP tlog-checkpoint, Ed25519) by ${signer}: the first ${c.size} events, Merkle root ${c.root}.\n\n${c.note}`;
  } catch (e) {
    pill.className = 'pill pill-muted';
    if (e instanceof ApiError && e.status === 404) {
      fill(pill, 'no checkpoint yet');
      pill.title = e.message;
    } else {
      fill(pill, 'checkpoint: ?');
      pill.title = e instanceof ApiError ? e.describe() : String(e);
    }
  }
}

async function approvalsBadge() {
  try {
    const r = await get('/approvals');
    const b = $('approvals-badge');
    b.hidden = r.approvals.length === 0;
    fill(b, String(r.approvals.length));
  } catch (e) {
    showError(e);
  }
}

// One header refresh at a time.
const refreshHeader = oneAtATime(() => Promise.all([approvalsBadge(), checkpoint()]));

// ---------------------------------------------------------------- views

function route() {
  const raw = location.hash.replace(/^#\/?/, '');
  let parts;
  try { parts = raw.split('/').filter(Boolean).map(decodeURIComponent); } catch { parts = []; }
  if (parts[0] === 'runs' && parts[1]) {
    return { name: 'run', run: parts[1], seq: /^\d+$/.test(parts[2] ?? '') ? Number(parts[2]) : undefined };
  }
  if (parts[0] === 'approvals') return { name: 'approvals' };
  return { name: 'runs' };
}

function show() {
  if (!started) return;
  const r = route();
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === (r.name === 'approvals' ? 'approvals' : 'runs'));
  }
  if (current && current.name === r.name && current.view.update?.(r)) return;
  current?.view.unmount();
  current = null;
  const root = $('view');
  const ctx = {
    error: showError,
    refreshHeader,
    onRunEnded: () => { refreshHeader(); verify(); },
  };
  const view = r.name === 'run' ? runView(root, ctx, r)
    : r.name === 'approvals' ? approvalsView(root, ctx)
      : runsView(root, ctx);
  current = { name: r.name, view };
  document.title = r.name === 'run' ? `${r.run} — ICE` : r.name === 'approvals' ? 'Approvals — ICE' : 'Runs — ICE';
  window.scrollTo(0, 0);
}

function start() {
  started = true;
  $('login').hidden = true;
  $('token-forget').hidden = false;
  document.body.classList.remove('locked');
  refreshHeader();
  verify();
  show();
}

function stop() {
  started = false;
  current?.view.unmount();
  current = null;
  fill($('view'));
  $('token-forget').hidden = true;
}

// ---------------------------------------------------------------- the token

function askForToken(problem) {
  stop();
  clearErrors();
  document.body.classList.add('locked');
  $('login').hidden = false;
  const p = $('token-problem');
  p.hidden = !problem;
  fill(p, problem ?? '');
  const input = $('token-input');
  input.value = '';
  input.focus();
}

onAuthFailure((err) => {
  token.clear();
  if (!started && !$('login').hidden) return;
  askForToken(`The server refused the token: ${err.describe()}`);
});

$('token-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const t = $('token-input').value.trim();
  if (!t) { askForToken('Enter an operator token.'); return; }
  const button = $('token-submit');
  button.disabled = true;
  token.set(t);
  try {
    await get('/runs?limit=1');
    start();
  } catch (e) {
    token.clear();
    askForToken(e instanceof ApiError && e.auth
      ? `The server refused this token: ${e.describe()}`
      : `Could not check the token: ${e instanceof ApiError ? e.describe() : e}`);
  } finally {
    button.disabled = false;
  }
});

$('token-forget').addEventListener('click', () => {
  token.clear();
  askForToken('Token forgotten. Enter an operator token.');
});

$('verify-status').addEventListener('click', () => { if (started) verify(); });
window.addEventListener('hashchange', show);

setInterval(tickExpiries, 1000);
setInterval(() => { if (started && !document.hidden) refreshHeader.ifIdle(); }, 5000);
// Verifying reads the whole log: again every five minutes (and after each run that ends here).
setInterval(() => { if (started && !document.hidden) verify.ifIdle(); }, 300000);

// Boot: a token this tab already has is checked first.
(async () => {
  if (!token.get()) { askForToken(null); return; }
  try {
    await get('/runs?limit=1');
    start();
  } catch (e) {
    if (!(e instanceof ApiError && e.auth)) askForToken(`Could not reach the API: ${e instanceof ApiError ? e.describe() : e}`);
  }
})();
