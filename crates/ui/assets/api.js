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
    if (e?.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', `cannot reach the ICE server (${e?.message ?? e})`);
  }
}

/** Call the API: the parsed JSON body, or an ApiError. */
export async function api(method, path, body) {
  const h = headers('application/json');
  const init = { method, headers: h };
  if (body !== undefined) {
    h['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await send(path, init);
  if (!res.ok) throw await failure(res);
  const text = await res.text();
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
