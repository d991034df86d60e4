// A tiny OpenAI-compatible chat-completions server backed by a real local model, for the
// optional smoke test (tests/llm_smoke.rs). Node's `http` module and node-llama-cpp, nothing else.
//
// usage: node llama_server.mjs SMOKE_DIR
//
// SMOKE_DIR is what scripts/smoke-deps installs (.deps/smoke): the model is SMOKE_DIR/model.gguf
// and node-llama-cpp is taken from SMOKE_DIR/node/node_modules (its prebuilt llama.cpp binary,
// CPU only; nothing is downloaded or built). The server loads the model, binds 127.0.0.1:0,
// prints `PORT <n>` on stdout once it is ready, and serves:
//
//   POST /v1/chat/completions  a `chat.completion` for the request's `messages`, each request on
//                              its own (fresh chat history, cleared context); `max_tokens` (or
//                              `max_completion_tokens`) is honoured, `temperature` defaults to 0
//                              (greedy); `tools` are ignored: the reply is the model's text only.
//                              `usage` counts tokens with the model's tokenizer: the rendered
//                              prompt, and the tokens generated.
//   GET  /v1/models            the one model.
//
// Requests are answered one at a time (one context sequence). One line per request on stderr.
// Environment: LLAMA_CONTEXT_SIZE (default 4096), LLAMA_THREADS (default 1). One thread, because
// llama.cpp's worker threads spin-wait on each other: on a busy 2-core machine (a cargo build
// beside the test) 2 threads took 7 to 16 s per short reply where 1 took about 1 s, and
// node-llama-cpp's own CPU default (at least 4 threads) took minutes.

import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const smoke = process.argv[2];
if (!smoke) {
  console.error("usage: node llama_server.mjs SMOKE_DIR");
  process.exit(2);
}
const modelPath = path.resolve(smoke, "model.gguf");
const require = createRequire(path.resolve(smoke, "node", "package.json"));
const { getLlama, LlamaChat, LlamaLogLevel } = await import(
  pathToFileURL(require.resolve("node-llama-cpp")).href
);

const log = (...args) => console.error("llama_server:", ...args);
const contextSize = Number(process.env.LLAMA_CONTEXT_SIZE || 4096);
const threads = Math.max(1, Number(process.env.LLAMA_THREADS || 1));

const t0 = Date.now();
const llama = await getLlama({
  gpu: false,
  build: "never",
  logLevel: LlamaLogLevel.error,
  progressLogs: false,
  maxThreads: threads,
});
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ contextSize });
const sequence = context.getSequence();
const modelId = path.basename(fs.realpathSync(modelPath), ".gguf");
{
  const probe = new LlamaChat({ contextSequence: sequence, autoDisposeSequence: false });
  log(
    `loaded ${modelId} in ${Date.now() - t0} ms (llama.cpp ${llama.buildType}, ` +
      `${context.currentThreads} threads, context ${context.contextSize}, chat format ${probe.chatWrapper.wrapperName})`,
  );
  probe.dispose({ disposeSequence: false });
}

/** The text of an OpenAI message's `content`: a string, or an array of parts. */
function textOf(content) {
  if (content == null) return "";
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content
      .map((p) => (typeof p === "string" ? p : p && typeof p.text === "string" ? p.text : ""))
      .join("");
  }
  return JSON.stringify(content);
}

/** OpenAI messages as node-llama-cpp chat history, ending with the model's turn to speak. */
function historyOf(messages) {
  const history = [];
  for (const m of messages) {
    if (!m || typeof m !== "object") throw new Error("each message must be an object");
    const text = textOf(m.content);
    switch (m.role) {
      case "system":
      case "developer":
        history.push({ type: "system", text });
        break;
      case "user":
        history.push({ type: "user", text });
        break;
      case "assistant": {
        // Tool calls are not given to the model as calls (tools are ignored): they are told.
        const calls = Array.isArray(m.tool_calls) ? m.tool_calls : [];
        const told = calls
          .map((c) => `[called ${c?.function?.name}(${c?.function?.arguments ?? ""})]`)
          .join("\n");
        history.push({ type: "model", response: [[text, told].filter(Boolean).join("\n")] });
        break;
      }
      case "tool":
        history.push({ type: "user", text: `Tool result${m.tool_call_id ? ` (${m.tool_call_id})` : ""}: ${text}` });
        break;
      default:
        throw new Error(`unknown message role ${JSON.stringify(m.role)}`);
    }
  }
  history.push({ type: "model", response: [] });
  return history;
}

let served = 0;
let queue = Promise.resolve();

/** One completion, run alone on the context's one sequence. */
function complete(request) {
  const run = queue.then(() => completeNow(request));
  queue = run.catch(() => {});
  return run;
}

async function completeNow(request) {
  const n = ++served;
  const started = Date.now();
  const history = historyOf(request.messages);
  const maxTokens = Number(request.max_tokens ?? request.max_completion_tokens ?? 256);
  const temperature = Number(request.temperature ?? 0);
  await sequence.clearHistory();
  const chat = new LlamaChat({ contextSequence: sequence, autoDisposeSequence: false });
  try {
    const promptTokens = chat.chatWrapper
      .generateContextState({ chatHistory: history })
      .contextText.tokenize(model.tokenizer).length;
    if (promptTokens + maxTokens > context.contextSize) {
      const e = new Error(
        `the prompt (${promptTokens} tokens) plus max_tokens (${maxTokens}) exceed the context (${context.contextSize})`,
      );
      e.status = 400;
      throw e;
    }
    let generated = 0;
    const penalties = request.frequency_penalty || request.presence_penalty;
    const result = await chat.generateResponse(history, {
      maxTokens,
      temperature,
      ...(request.seed != null ? { seed: Number(request.seed) } : {}),
      ...(typeof request.top_p === "number" ? { topP: request.top_p } : {}),
      repeatPenalty: penalties
        ? { frequencyPenalty: request.frequency_penalty || 0, presencePenalty: request.presence_penalty || 0 }
        : false,
      onToken: (tokens) => {
        generated += tokens.length;
      },
    });
    const content = result.response;
    const completionTokens = Math.max(generated, content ? model.tokenize(content).length : 0);
    const finish = result.metadata.stopReason === "maxTokens" ? "length" : "stop";
    log(
      `request ${n}: ${request.messages.length} messages, ${promptTokens} prompt tokens, ` +
        `${completionTokens} completion tokens, ${finish} (${result.metadata.stopReason}), ${Date.now() - started} ms: ` +
        JSON.stringify(content),
    );
    return {
      id: `chatcmpl-${n}`,
      object: "chat.completion",
      created: Math.floor(Date.now() / 1000),
      model: typeof request.model === "string" ? request.model : modelId,
      choices: [{ index: 0, message: { role: "assistant", content }, finish_reason: finish }],
      usage: {
        prompt_tokens: promptTokens,
        completion_tokens: completionTokens,
        total_tokens: promptTokens + completionTokens,
      },
    };
  } finally {
    chat.dispose({ disposeSequence: false });
  }
}

function send(res, status, body) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { "content-type": "application/json", "content-length": data.length });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const url = (req.url || "").split("?")[0].replace(/\/+$/, "");
  if (req.method === "GET" && url === "/v1/models") {
    send(res, 200, { object: "list", data: [{ id: modelId, object: "model", created: 0, owned_by: "local" }] });
    return;
  }
  if (req.method !== "POST" || url !== "/v1/chat/completions") {
    send(res, 404, { error: { message: "not found", type: "invalid_request_error" } });
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", async () => {
    let request;
    try {
      request = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      if (!request || !Array.isArray(request.messages) || request.messages.length === 0) {
        throw new Error("`messages` must be a non-empty array");
      }
    } catch (e) {
      send(res, 400, { error: { message: String(e.message || e), type: "invalid_request_error" } });
      return;
    }
    try {
      send(res, 200, await complete(request));
    } catch (e) {
      log(`error: ${e.stack || e}`);
      const status = e.status || 500;
      send(res, status, {
        error: { message: String(e.message || e), type: status === 400 ? "invalid_request_error" : "server_error" },
      });
    }
  });
});
server.keepAliveTimeout = 5000;
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`PORT ${server.address().port}\n`);
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
