// The operator API (/api/v1), with the operator's bearer token on every call.

export const BASE = '/api/v1';
const KEY = 'ice.operator.token';

/** The token, kept for this tab only. */
export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

/** What the API (or the network) said went wrong. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  /** One line for people: "409 conflict: approval x was already answered". */
  describe() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
  /** The token is missing, unknown, or not an operator's. */
  get auth() {
    return this.status === 401 || (this.status === 403 && this.code === 'forbidden');
  }
}

let authFailed = () => {};

/** Called (with the ApiError) whenever the API refuses the token. */
export function onAuthFailure(f) {
  authFailed = f;
}

function headers(accept) {
  const t = token.get();
  if (!t) throw new ApiError(401, 'unauthenticated', 'no operator token given yet');
  return { Authorization: `Bearer ${t}`, Accept: accept };
}

async function failure(res) {
  const text = await res.text().catch(() => '');
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  const err = new ApiError(
    res.status,
    body?.error?.code ?? `http_${res.status}`,
    body?.error?.message ?? (text.trim().slice(0, 300) || res.statusText || 'request failed'),
  );
  if (err.auth) authFailed(err);
  return err;
}

async function send(path, init) {
  try {
    return await fetch(BASE + path, { cache: 'no-store', credentials: 'omit', ...init });
  } catch (e) {
    if (e?.name === 'AbortError' || e?.name === 'TimeoutError') throw e;
    throw new ApiError(0, 'network', `cannot reach the ICE server (${e?.message ?? e})`);
  }
}

/** Call the API: the parsed JSON body, or an ApiError. `signal` may abort it. */
export async function api(method, path, body, signal) {
  const h = headers('application/json');
  const init = { method, headers: h, signal };
  if (body !== undefined) {
    h['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await send(path, init);
  if (!res.ok) throw await failure(res);
  let text;
  try {
    text = await res.text();
  } catch (e) {
    if (e?.name === 'AbortError' || e?.name === 'TimeoutError') throw e;
    throw new ApiError(0, 'network', `the ICE server's answer to ${method} ${path} was cut off (${e?.message ?? e})`);
  }
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    throw new ApiError(res.status, 'bad_response', `the server's answer to ${method} ${path} is not JSON`);
  }
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body);

/** encodeURIComponent for a path segment. */
export const seg = encodeURIComponent;

// ---------------------------------------------------------------- blobs

/**
 * Blobs by digest. A payload field over the kernel's threshold (16 KiB) is kept outside its
 * event, which shows `{"$blob": DIGEST, "size": N}`; GET /blobs/{digest} returns the JSON value
 * it holds, checked against its digest by the server. Content-addressed, so a value never
 * changes: each is fetched once and kept (the least recently used go past BLOB_CACHE bytes).
 * A failed fetch is remembered for BLOB_RETRY ms, so pages that redraw often do not hammer the
 * server; asking with `retry` tries again at once.
 */
const blobs = new Map(); // digest → {promise, state: 'loading'|'ok'|'failed', value, error, size, at}
const BLOB_CACHE = 64e6;
const BLOB_RETRY = 10000;
const BLOB_TIMEOUT = 60000;
let blobBytes = 0;

/** A SHA-256 digest as the log writes it: 64 lowercase hex characters. */
export const isDigest = (d) => typeof d === 'string' && /^[0-9a-f]{64}$/.test(d);

/** The value a blob holds: a Promise (of the value, or an ApiError). */
export function blobValue(digest, { retry = false } = {}) {
  let b = blobs.get(digest);
  if (b && (b.state !== 'failed' || (!retry && Date.now() - b.at < BLOB_RETRY))) {
    // Most recently used last.
    blobs.delete(digest);
    blobs.set(digest, b);
    return b.promise;
  }
  if (b) blobs.delete(digest);
  b = { state: 'loading', value: undefined, error: null, size: 0, at: Date.now() };
  b.promise = loadBlob(digest).then((r) => {
    b.state = 'ok';
    b.value = r.value;
    b.size = typeof r.size === 'number' ? r.size : 0;
    blobBytes += b.size;
    evict();
    return r.value;
  }, (e) => {
    b.state = 'failed';
    b.error = e;
    b.at = Date.now();
    throw e;
  });
  // Whoever asks handles the failure; the cache itself never leaves one unhandled.
  b.promise.catch(() => {});
  blobs.set(digest, b);
  return b.promise;
}

/**
 * What is known of a blob now, without waiting: {ok: true, value}, {ok: false, error} (a
 * recent failure), or null (never asked, or still loading) — so a redraw shows a value it
 * already has at once.
 */
export function blobKnown(digest) {
  const b = blobs.get(digest);
  if (!b || b.state === 'loading') return null;
  if (b.state === 'ok') return { ok: true, value: b.value };
  return Date.now() - b.at < BLOB_RETRY ? { ok: false, error: b.error } : null;
}

async function loadBlob(digest) {
  if (!isDigest(digest)) throw new ApiError(0, 'bad_reference', `"${String(digest).slice(0, 80)}" is not a blob digest`);
  let r;
  try {
    r = await api('GET', `/blobs/${seg(digest)}`, undefined, AbortSignal.timeout(BLOB_TIMEOUT));
  } catch (e) {
    if (e?.name === 'TimeoutError' || e?.name === 'AbortError') {
      throw new ApiError(0, 'timeout', `the blob did not arrive within ${BLOB_TIMEOUT / 1000} s`);
    }
    throw e;
  }
  if (!r || typeof r !== 'object' || r.digest !== digest || !('value' in r)) {
    throw new ApiError(200, 'bad_response', `the server's answer for blob ${digest.slice(0, 12)}… is not that blob`);
  }
  return r;
}

function evict() {
  for (const [d, b] of blobs) {
    if (blobBytes <= BLOB_CACHE) break;
    if (b.state !== 'ok') continue;
    blobs.delete(d);
    blobBytes -= b.size;
  }
}

/**
 * Follow a run's events from `from` as the server appends them (server-sent events read with
 * fetch(), since EventSource cannot send the Authorization header). Calls onEvent(event) for
 * each. Resolves 'end' after the run's last event (RunTerminated), 'closed' if the server
 * closed the stream without saying so; rejects with an ApiError, or an AbortError when
 * `signal` aborts.
 */
export async function follow(run, from, onEvent, signal) {
  const res = await send(`/runs/${seg(run)}/events/stream?from=${from}`, {
    headers: headers('text/event-stream'),
    signal,
  });
  if (!res.ok) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return 'closed';
      buf = (buf + value).replace(/\r\n/g, '\n');
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const msg = parseBlock(block);
        if (!msg) continue;
        if (msg.event === 'end') return 'end';
        if (msg.event === 'error') {
          let e = null;
          try { e = JSON.parse(msg.data)?.error; } catch { /* keep null */ }
          throw new ApiError(500, e?.code ?? 'stream_error', e?.message ?? 'the event stream failed');
        }
        let ev;
        try { ev = JSON.parse(msg.data); } catch {
          throw new ApiError(500, 'bad_response', 'an event in the stream is not JSON');
        }
        onEvent(ev);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** One server-sent event (lines of `field: value`; comments start with ':'). */
function parseBlock(block) {
  const msg = { event: 'message', data: [], id: null };
  let any = false;
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') { msg.data.push(value); any = true; }
    else if (field === 'event') msg.event = value;
    else if (field === 'id') msg.id = value;
  }
  if (!any) return null;
  msg.data = msg.data.join('\n');
  return msg;
}
