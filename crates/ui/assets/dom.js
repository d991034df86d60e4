// Building the page from data without ever parsing HTML: every string the API returns becomes
// a text node or an attribute value, never markup. (The server's Content-Security-Policy also
// requires Trusted Types, so assigning a string to an HTML sink would throw.)

/** An element: h('tr', {class: 'x', dataset: {seq: 3}, onclick: f}, 'text', child, [more]). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

const SVG = 'http://www.w3.org/2000/svg';

/** An SVG element, like h(). */
export function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG, tag), attrs, children);
}

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.setAttribute('class', Array.isArray(v) ? v.filter(Boolean).join(' ') : v);
    else if (k === 'dataset') for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = String(dv);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'href') el.setAttribute('href', safeHref(String(v)));
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  add(el, children);
  return el;
}

/** Only links within this page (`#/…`) or same-origin paths; anything else becomes inert. */
function safeHref(v) {
  return v.startsWith('#') || (v.startsWith('/') && !v.startsWith('//')) ? v : '#';
}

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(visible(String(c))));
  }
}

// Characters that show nothing, or reorder what follows (bidirectional controls): in a call an
// operator approves, `report\u202efdp.exe` would read as `reportexe.pdf`. Tabs and newlines
// stay; letters of right-to-left scripts are not controls and stay too.
const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]/g;

/** Text as shown: every invisible or reordering character written out as `\u{…}` (as `ice`
 * prints it), so what an operator reads is what the record holds. Every string the page
 * shows passes through here. */
export function visible(s) {
  return s.replace(HIDDEN, (c) => `\\u{${c.codePointAt(0).toString(16)}}`);
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

// ---------------------------------------------------------------- formatting

const pad = (n, w = 2) => String(n).padStart(w, '0');

/** Local time of day with milliseconds: 15:53:05.894. */
export function clock(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso ?? '');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** Local date and time: 2026-11-26 15:53:05. */
export function stamp(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso ?? '');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** "3 s ago", "5 min ago", … */
export function ago(iso, now = Date.now()) {
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return '';
  const s = Math.round((now - t) / 1000);
  if (s < 0) return `in ${span(-s)}`;
  if (s < 2) return 'just now';
  return `${span(s)} ago`;
}

/** A duration in seconds, short: 45 s, 4 min 5 s, 2 h 3 min, 3 d 4 h. */
export function span(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  if (s < 86400) return `${Math.floor(s / 3600)} h${Math.floor((s % 3600) / 60) ? ` ${Math.floor((s % 3600) / 60)} min` : ''}`;
  return `${Math.floor(s / 86400)} d${Math.floor((s % 86400) / 3600) ? ` ${Math.floor((s % 86400) / 3600)} h` : ''}`;
}

/** Bytes: 396 B, 1.2 kB, 3.4 MB. */
export function bytes(n) {
  if (typeof n !== 'number') return String(n ?? '');
  if (n < 1000) return `${n} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let v = n;
  let i = -1;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return `${v >= 100 ? Math.round(v) : v.toFixed(1).replace(/\.0$/, '')} ${units[i]}`;
}

/** Microseconds as a duration: 19.7 ms, 4.2 s, 5 min. */
export function micros(us) {
  if (typeof us !== 'number') return String(us ?? '');
  if (us < 1000) return `${us} µs`;
  if (us < 1e6) return `${(us / 1000).toFixed(1).replace(/\.0$/, '')} ms`;
  if (us < 60e6) return `${(us / 1e6).toFixed(1).replace(/\.0$/, '')} s`;
  return span(us / 1e6);
}

/** The first characters of a hex digest. */
export function short(hex, n = 12) {
  return typeof hex === 'string' && hex.length > n ? `${hex.slice(0, n)}…` : String(hex ?? '');
}

/** Compact JSON for one line. */
export function compact(v, max = 160) {
  let s;
  try { s = typeof v === 'string' ? v : JSON.stringify(v); } catch { s = String(v); }
  s = s ?? '';
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

/** A run's id in a link to its page. */
export function runHref(run, seq) {
  return `#/runs/${encodeURIComponent(run)}${seq === undefined ? '' : `/${seq}`}`;
}

/** "run-x:12" → {run: "run-x", seq: 12}, or null. */
export function parseId(id) {
  const m = /^(.+):(\d+)$/.exec(String(id ?? ''));
  return m ? { run: m[1], seq: Number(m[2]) } : null;
}

/** `fn` (async), run one call at a time: a call made while one is under way runs once more when
 * it ends (however many calls came meanwhile), so a refresh asked for after something changed
 * is never lost. `.ifIdle()` runs it only if none is under way: what a timer calls, so that on
 * a server slower than the timer the refreshes still leave it a pause. */
export function oneAtATime(fn) {
  let running = null;
  let again = false;
  const run = () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      // Not before `running` is set: a `fn` that throws at once must still clear it.
      await null;
      try {
        do {
          again = false;
          await fn();
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
  run.ifIdle = () => running ?? run();
  return run;
}
