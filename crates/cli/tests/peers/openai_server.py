"""A scripted OpenAI-compatible chat-completions server for the tests (standard library only).

usage: openai_server.py SCRIPT.json

Binds 127.0.0.1:0, prints `PORT <n>` and serves `POST /v1/chat/completions` (and
`GET /v1/models`). SCRIPT.json is a list; each request consumes the next entry:

  {"message": {...}, "finish_reason": "stop", "usage": {"prompt_tokens": 1, ...}}
        -> 200, a chat.completion whose choices[0] is that message
  {"status": 500, "body": "..."}   -> that status and raw body
  {"raw": "not json"}              -> 200 with that raw body
  {"delay_ms": n, ...}             -> wait n ms, then answer as the rest of the entry says

When the script runs out: 500 {"error": "script exhausted"}. If OPENAI_LOG names a file, every
received request body is appended to it as one JSON line.
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CREATED = 1700000000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # headers and body leave in one write (no delayed-ACK stalls)
    disable_nagle_algorithm = True
    script = []
    lock = threading.Lock()
    served = 0

    def log_message(self, *args):
        pass

    def send(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            models = {"object": "list", "data": [{"id": "scripted", "object": "model", "created": CREATED, "owned_by": "ice-tests"}]}
            self.send(200, json.dumps(models))
        else:
            self.send(404, json.dumps({"error": "not found"}))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send(404, json.dumps({"error": "not found"}))
            return
        try:
            request = json.loads(raw)
        except ValueError:
            request = {"unparsed": raw.decode("utf-8", "replace")}
        with Handler.lock:
            log = os.environ.get("OPENAI_LOG")
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(request, sort_keys=True) + "\n")
            n = Handler.served
            Handler.served += 1
            entry = Handler.script[n] if n < len(Handler.script) else None
        if entry is None:
            self.send(500, json.dumps({"error": "script exhausted"}))
            return
        if entry.get("delay_ms"):
            time.sleep(entry["delay_ms"] / 1000.0)
        if "status" in entry:
            body = entry.get("body", "")
            self.send(entry["status"], body if isinstance(body, str) else json.dumps(body))
        elif "raw" in entry:
            self.send(200, entry["raw"])
        elif "message" in entry:
            usage = dict(entry.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0})
            usage.setdefault("total_tokens", usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
            reply = {
                "id": "chatcmpl-%d" % (n + 1),
                "object": "chat.completion",
                "created": CREATED,
                "model": request.get("model", "scripted") if isinstance(request, dict) else "scripted",
                "choices": [{"index": 0, "message": entry["message"], "finish_reason": entry.get("finish_reason", "stop")}],
                "usage": usage,
            }
            self.send(200, json.dumps(reply))
        else:
            self.send(500, json.dumps({"error": "script entry %d has no message, status or raw" % (n + 1)}))


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        Handler.script = json.load(f)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("PORT %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
