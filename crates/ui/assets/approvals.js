// Pending approvals: the exact request each one is about, and Approve / Deny.

import { get, post, seg } from './api.js';
import { h, fill, stamp, runHref, parseId, compact, oneAtATime } from './dom.js';
import { blobRef, blobWords, whenBlob, pretty, describe } from './events.js';

const requests = new Map(); // approval id → Promise of its CapabilityRequested event (or null)

/** The agent's request an approval is about (from `byId` when the page has the run's events). */
export function requestOf(approvalId, byId) {
  const here = byId?.get(approvalId);
  const reqId = here?.payload?.request;
  if (reqId && byId.get(reqId)) return Promise.resolve(byId.get(reqId));
  if (!requests.has(approvalId)) {
    requests.set(approvalId, (async () => {
      const ask = here ?? await get(`/events/${seg(approvalId)}`);
      const rid = ask?.payload?.request;
      return rid ? await get(`/events/${seg(rid)}`) : null;
    })().catch((e) => { requests.delete(approvalId); throw e; }));
  }
  return requests.get(approvalId);
}

/** Keeps every "expires in …" on the page current. */
export function tickExpiries(now = Date.now()) {
  for (const el of document.querySelectorAll('[data-expires]')) {
    const t = new Date(el.dataset.expires).getTime();
    const s = Math.round((t - now) / 1000);
    el.textContent = s > 0 ? `expires in ${s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`}` : 'expired';
    el.classList.toggle('expiring', s > 0 && s < 30);
  }
}

/**
 * One pending approval, as a card: the exact call (capability, target, arguments, the digest
 * an approval binds to, expiry, the policies that asked) and the buttons that answer it.
 *
 * An argument list or target over the kernel's threshold is a blob reference in the record:
 * the card fetches it (GET /blobs/{digest}) and shows it in full. An operator never approves
 * what they cannot see: until every such field is shown, Approve waits (Deny does not), and
 * the card says it is loading, or why it could not load it, how to read it on the server
 * (`ice show REQUEST --blobs`), and offers to try again.
 */
export function approvalCard(a, { byId, showRun = false, onAnswered, onError }) {
  const approve = h('button', { type: 'button', class: 'approve primary' }, 'Approve');
  const deny = h('button', { type: 'button', class: 'deny danger' }, 'Deny');
  const unseen = new Set(); // the call's blob fields not shown yet
  let answering = false;
  const syncApprove = () => {
    approve.disabled = answering || unseen.size > 0;
    if (unseen.size) {
      approve.title = `Approve waits until the ${[...unseen].join(' and ')} ${unseen.size > 1 ? 'are' : 'is'} shown: an approval authorises exactly the call shown`;
    } else {
      approve.removeAttribute('title');
    }
  };
  let request = null; // RUN:SEQ of the agent's request, once loaded
  const requestKnown = []; // redraws that name the request

  /**
   * A field of the call kept as a blob, fetched and drawn into `box` (`draw(value)` gives the
   * element showing it); Approve waits for it.
   */
  const blobField = (what, ref, box, draw) => {
    unseen.add(what);
    syncApprove();
    const words = blobWords(ref);
    const load = (retry) => {
      box.dataset.blob = 'loading';
      fill(box, h('p', { class: 'blob-status muted' }, `Loading the ${what} (${words})…`));
      whenBlob(ref, (v) => {
        box.dataset.blob = 'shown';
        fill(box,
          h('p', { class: 'blob-status muted' }, `${words[0].toUpperCase()}${words.slice(1)}; fetched from the log and shown in full:`),
          draw(v));
        unseen.delete(what);
        syncApprove();
      }, (e) => {
        box.dataset.blob = 'failed';
        const again = h('button', { type: 'button', class: 'link retry' }, 'Try again');
        again.addEventListener('click', () => load(true));
        const say = () => fill(box, h('p', { class: 'blob-status' },
          h('span', { class: 'problem' }, `The ${what} could not be loaded, so this call cannot be approved here: ${describe(e)}.`),
          ` The ${what} ${what.endsWith('s') ? 'are' : 'is'} ${words}; `,
          h('span', { class: 'mono' }, `ice show ${request ?? 'REQUEST'} --blobs`),
          ` prints ${what.endsWith('s') ? 'them' : 'it'}${request ? '' : ' (REQUEST: the event this approval is about)'}. `,
          again));
        say();
        if (!request) requestKnown.push(() => { if (box.dataset.blob === 'failed') say(); });
      }, { retry });
    };
    load(false);
  };

  const target = h('div', { class: 'mono target' }, '…');
  const origin = h('span', null, a.agent ? `agent:${a.agent}` : '');
  const requestLink = h('span', { class: 'mono' }, '');
  const args = h('div', { class: 'args-box' });
  const argsBlob = blobRef(a.arguments);
  if (argsBlob) blobField('arguments', argsBlob, args, (v) => h('pre', { class: 'args blob-value' }, pretty(v)));
  else fill(args, h('pre', { class: 'args' }, pretty(a.arguments)));
  requestOf(a.id, byId).then((req) => {
    const t = req?.payload?.target;
    const tBlob = blobRef(t);
    if (tBlob) blobField('target', tBlob, target, (v) => h('pre', { class: 'args blob-value' }, pretty(v, true)));
    else fill(target, t === undefined || t === null ? '(not recorded)' : typeof t === 'string' ? t : compact(t));
    if (req) {
      request = `${req.run_id}:${req.run_seq}`;
      fill(origin, req.origin);
      fill(requestLink, h('a', { href: runHref(req.run_id, req.run_seq) }, request));
      for (const f of requestKnown.splice(0)) f();
    }
  }).catch((e) => fill(target, `(could not load the request: ${describe(e)})`));
  const reason = h('input', {
    type: 'text', class: 'reason', placeholder: 'reason (recorded with a denial)', 'aria-label': 'Reason',
    maxlength: 4096, // the API takes 4 096 bytes (fewer characters beyond ASCII; it says so if over)
  });
  const outcome = h('p', { class: 'outcome', role: 'status' });
  const card = h('article', { class: 'approval card', dataset: { approval: a.id, run: a.run } },
    h('header', null,
      h('strong', null, 'Approval requested'),
      showRun ? [' in ', h('a', { href: runHref(a.run) }, a.run)] : '',
      h('span', { class: 'mono muted' }, ` ${a.id}`),
      h('span', { class: 'expires', dataset: { expires: a.expires_at } }, '')),
    a.intent ? h('p', { class: 'intent' }, h('q', null, a.intent)) : '',
    a.waiting === false
      ? h('p', { class: 'orphaned' }, `Nobody waits for this answer: the process that asked stopped, so an answer is refused. ${typeof a.advice === 'string' ? a.advice : ''}`)
      : '',
    h('dl', { class: 'facts' },
      h('dt', null, 'who'), h('dd', null, origin),
      h('dt', null, 'capability'), h('dd', { class: 'mono' }, a.capability),
      h('dt', null, 'target'), h('dd', null, target),
      h('dt', null, 'resource'), h('dd', { class: 'mono' }, a.resource),
      h('dt', null, 'arguments'), h('dd', null, args),
      h('dt', null, 'digest'), h('dd', { class: 'mono digest', title: 'SHA-256 of the exact call: an approval authorises this call only, once' }, a.digest),
      h('dt', null, 'asked by'), h('dd', null, (a.policies ?? []).join(', ') || '—'),
      h('dt', null, 'expires'), h('dd', null, stamp(a.expires_at)),
      h('dt', null, 'request'), h('dd', null, requestLink)),
    h('footer', null, approve, reason, deny),
    outcome);
  const answer = async (yes) => {
    if (yes && unseen.size) return; // Approve waits until the whole call is shown
    answering = true;
    syncApprove();
    deny.disabled = reason.disabled = true;
    fill(outcome, yes ? 'Approving…' : 'Denying…');
    try {
      const r = yes
        ? await post(`/approvals/${seg(a.id)}/approve`)
        : await post(`/approvals/${seg(a.id)}/deny`, { reason: reason.value });
      card.classList.add(yes ? 'answered-yes' : 'answered-no');
      const exp = card.querySelector('[data-expires]');
      if (exp) { delete exp.dataset.expires; exp.textContent = 'answered'; }
      fill(outcome, `${r.answer} by ${r.operator}`, yes ? ' — the run continues.' : '.');
      onAnswered?.(a, r);
    } catch (e) {
      answering = false;
      syncApprove();
      deny.disabled = reason.disabled = false;
      fill(outcome, h('span', { class: 'problem' }, describe(e)));
      onError?.(e);
    }
  };
  approve.addEventListener('click', () => answer(true));
  deny.addEventListener('click', () => answer(false));
  return card;
}

/** The approvals page: every pending approval, all runs. */
export function approvalsView(root, ctx) {
  const list = h('div', { class: 'approvals' });
  const note = h('p', { class: 'muted' }, 'Loading…');
  // Runs the listing had to leave out (their record does not fold): named, never hidden.
  const leftOut = h('ul', { id: 'approvals-left-out', class: 'problems', hidden: true });
  fill(root, h('section', { class: 'page' },
    h('h1', null, 'Pending approvals'),
    h('p', { class: 'lead' }, 'Requests the policy would permit only with an operator\'s approval. An approval authorises exactly the call shown (its digest), once, before it expires.'),
    note, leftOut, list));
  const shown = new Map();
  // One refresh at a time: a slow answer must not pile more requests onto the server.
  const refresh = oneAtATime(async () => {
    let r;
    try { r = await get('/approvals'); } catch (e) { ctx.error(e); return; }
    const ids = new Set(r.approvals.map((a) => a.id));
    for (const [id, card] of shown) {
      if (!ids.has(id) && !card.classList.contains('answered-yes') && !card.classList.contains('answered-no')) {
        card.remove();
        shown.delete(id);
      }
    }
    for (const a of r.approvals) {
      if (shown.has(a.id)) continue;
      const card = approvalCard(a, {
        showRun: true,
        onAnswered: () => { ctx.refreshHeader(); setTimeout(() => { card.remove(); shown.delete(a.id); }, 2500); },
        onError: ctx.error,
      });
      shown.set(a.id, card);
      list.append(card);
    }
    fill(note, r.approvals.length ? `${r.approvals.length} waiting.` : 'Nothing is waiting for an operator.');
    const problems = r.problems ?? [];
    leftOut.hidden = problems.length === 0;
    fill(leftOut, problems.map((p) => {
      const at = parseId(p.event);
      return h('li', { class: 'problem', dataset: { run: p.run } },
        'Run ', h('a', { href: runHref(p.run) }, p.run),
        ' is left out: its record does not fold at event ',
        at ? h('a', { href: runHref(at.run, at.seq) }, p.event) : p.event, `: ${p.problem}. `,
        h('span', { class: 'mono' }, `ice explain ${p.event}`), ' shows it.');
    }));
    tickExpiries();
  });
  refresh();
  const timer = setInterval(() => { if (!document.hidden) refresh.ifIdle(); }, 3000);
  return { unmount: () => clearInterval(timer) };
}
