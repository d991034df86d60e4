// The operator web UI in a real headless Chromium (Debian's `chromium`, driven by npm
// `playwright-core`, both installed by scripts/deps), as a person would use it: a wrong token
// is refused and asked again; with the right one, open the run, see its timeline, approve the
// pending request and watch the run continue to its commit without reloading; open the causal
// graph of the effect and find the grant and the approval in it; save a screenshot. With more
// runs than the runs page lists, it lists the newest and says how many it leaves out. A run
// whose spec, request arguments and validation results are kept as blobs still shows every
// event, why it failed, and its inspector; the page fetches those blobs and shows the real
// budget, the staged file's content and the results, and says so plainly when it cannot. An
// approval whose arguments are a blob shows the whole call before Approve works. The page's
// summaries cope with a blob in any field.
//
//   ICE_TOKEN=OPERATOR_TOKEN node ui_check.mjs --url http://127.0.0.1:PORT --run RUN \
//     --blob-run RUN2 --blob-approval-run RUN3 --oldest-run RUN0 --runs TOTAL \
//     --screenshot OUT.png --chromium /usr/bin/chromium --node-modules .deps/node/node_modules
//
// Exits 0 when every check passed; otherwise prints what failed (and saves OUT.failed.png).

import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';
import path from 'node:path';

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string' },
    run: { type: 'string' },
    'blob-run': { type: 'string' },
    'blob-approval-run': { type: 'string' },
    'oldest-run': { type: 'string' },
    runs: { type: 'string' },
    screenshot: { type: 'string' },
    chromium: { type: 'string' },
    'node-modules': { type: 'string' },
  },
});
opt.token = process.env.ICE_TOKEN; // not an argument: tokens may start with '-', and stay out of `ps`
if (!opt.token) {
  console.error('ui_check: the operator token goes in $ICE_TOKEN');
  process.exit(2);
}
for (const k of ['url', 'run', 'blob-run', 'blob-approval-run', 'oldest-run', 'runs', 'screenshot', 'chromium', 'node-modules']) {
  if (!opt[k]) {
    console.error(`ui_check: --${k} is required`);
    process.exit(2);
  }
}

const require = createRequire(path.join(path.resolve(opt['node-modules']), 'noop.js'));
const { chromium } = require('playwright-core');

const started = Date.now();
const steps = [];
const step = (what) => {
  steps.push(`${((Date.now() - started) / 1000).toFixed(1)}s ${what}`);
  console.log(`ui_check: ${what}`);
};
const fail = (msg) => { throw new Error(msg); };

const browser = await chromium.launch({
  executablePath: opt.chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
});
const problems = []; // uncaught page errors and policy violations
// Requests that failed or were answered with an error, said when the check fails (a page that
// stays blank after a reload has been seen: this says whether its files were refused or lost).
const network = [];
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1480, height: 1000 }, deviceScaleFactor: 1 });
  page = await context.newPage();
  // Blob fetches are made to fail inside the page (a fetch shim that runs before the page's own
  // code, switched by sessionStorage so it holds across reloads), not by Playwright's request
  // interception: a route active across a navigation can stall the new document's other
  // requests in Chromium (playwright#19678, chromium#1279953), which left this check waiting
  // on an unstyled page.
  await page.addInitScript((body) => {
    // about:blank has no storage of its own: nothing to switch there.
    try { sessionStorage.getItem('x'); } catch { return; }
    const real = window.fetch.bind(window);
    const gated = sessionStorage.getItem('ice-check-blobs-gate') === '1';
    const gate = gated ? new Promise((r) => { window.iceCheckReleaseBlobs = r; }) : null;
    window.fetch = async (input, init) => {
      const url = typeof input === 'string' ? input : input.url;
      if (sessionStorage.getItem('ice-check-blobs-offline') === '1' && url.includes('/api/v1/blobs/')) {
        if (gate) await gate;
        return new Response(body, { status: 503, headers: { 'Content-Type': 'application/json' } });
      }
      return real(input, init);
    };
  }, JSON.stringify({ error: { code: 'unavailable', message: 'blobs are offline for this check' } }));
  const blobsOffline = (gated = false) => page.evaluate((g) => {
    sessionStorage.setItem('ice-check-blobs-offline', '1');
    if (g) sessionStorage.setItem('ice-check-blobs-gate', '1');
  }, gated);
  const blobsOnline = () => page.evaluate(() => {
    sessionStorage.removeItem('ice-check-blobs-offline');
    sessionStorage.removeItem('ice-check-blobs-gate');
  });
  page.setDefaultTimeout(20000);
  const at = () => `${((Date.now() - started) / 1000).toFixed(1)}s`;
  page.on('requestfailed', (r) => network.push(`${at()} ${r.method()} ${r.url()} failed: ${r.failure()?.errorText}`));
  page.on('response', (r) => { if (r.status() >= 400) network.push(`${at()} ${r.request().method()} ${r.url()} ${r.status()}`); });
  page.on('pageerror', (e) => problems.push(`uncaught error in the page: ${e.message}`));
  page.on('console', (m) => {
    const t = m.text();
    if (/Content Security Policy|Trusted Type|TrustedHTML|TrustedScript/i.test(t)) problems.push(`policy violation: ${t}`);
  });
  const checkProblems = () => { if (problems.length) fail(problems.join('\n')); };

  // ------------------------------------------------------------------ the token
  const resp = await page.goto(`${opt.url}/`);
  if (!page.url().endsWith('/ui/')) fail(`/ did not lead to /ui/ (at ${page.url()})`);
  const csp = resp.headers()['content-security-policy'] ?? '';
  if (!csp.includes("script-src 'self'")) fail(`the page has no strict Content-Security-Policy: ${csp}`);
  await page.locator('#token-input').waitFor({ state: 'visible' });
  step('the page asks for a token');

  await page.fill('#token-input', 'not-a-real-token');
  await page.click('#token-submit');
  const problem = page.locator('#token-problem');
  await problem.waitFor({ state: 'visible' });
  const said = await problem.textContent();
  if (!/refused/.test(said) || !/401/.test(said)) fail(`a wrong token should be refused plainly, the page says: ${said}`);
  if (!(await page.locator('#login').isVisible())) fail('after a wrong token the page should ask again');
  step(`a wrong token is refused and asked again: "${said.trim()}"`);

  await page.fill('#token-input', opt.token);
  await page.click('#token-submit');
  await page.locator('#login').waitFor({ state: 'hidden' });
  const stored = await page.evaluate(() => sessionStorage.getItem('ice.operator.token'));
  if (stored !== opt.token) fail('the token is not kept in sessionStorage');

  // ------------------------------------------------------------------ the runs list
  const row = page.locator(`table.runs tr[data-run="${opt.run}"]`);
  await row.waitFor();
  const rowText = await row.innerText();
  if (!/EXECUTING/.test(rowText) || !/waiting for approval/.test(rowText)) fail(`the run's row should say it is executing and waiting for approval: ${rowText}`);
  if (!/tool calls/.test(rowText)) fail(`the run's row should show its cost against the budget: ${rowText}`);
  await page.locator(`.pending article.approval[data-run="${opt.run}"]`).waitFor();
  // Two approvals wait: this run's, and the one whose arguments are a blob.
  await page.locator('#approvals-badge', { hasText: '2' }).waitFor();
  step('the runs list shows the run executing, its cost, and the approval waiting');

  // More runs than the page lists: the newest, newest first, and how many older ones are left out.
  const listed = page.locator('table.runs tbody tr[data-run]');
  const blobRow = page.locator(`table.runs tr[data-run="${opt['blob-run']}"]`);
  await blobRow.waitFor();
  const firstListed = await listed.first().getAttribute('data-run');
  if (firstListed !== opt['blob-run']) fail(`the newest run (${opt['blob-run']}) should come first, not ${firstListed}`);
  if (await page.locator(`table.runs tr[data-run="${opt['oldest-run']}"]`).count()) fail(`the oldest run ${opt['oldest-run']} is listed: the page should list the newest`);
  const shownRuns = await listed.count();
  const total = Number(opt.runs);
  const older = total - shownRuns;
  if (!(older > 0)) fail(`the page lists ${shownRuns} of ${total} runs: the test needs more runs than it lists`);
  const countText = await page.locator('#runs-count').innerText();
  if (!countText.includes(`${total} runs`) || !countText.includes(`${older} older runs are not shown`)) fail(`the runs page should say ${older} of ${total} runs are not shown: ${countText}`);
  step(`the runs list shows the ${shownRuns} newest runs and says ${older} older ones are not shown`);
  // That run's spec is kept as a blob: the page fetches it and shows the spec's real limits.
  await blobRow.locator('.meter', { hasText: '/ 7' }).waitFor();
  const blobMeters = await blobRow.locator('.meter').evaluateAll((ms) => ms.map((m) => m.title));
  if (!blobMeters.some((t) => /^tool calls: \d+ of 7$/.test(t)) || blobMeters.some((t) => /no limit|not shown/.test(t))
    || (await blobRow.locator('.budget-not-shown').count())) fail(`the cost of a run whose spec is a blob should show the spec's limits: ${JSON.stringify(blobMeters)}`);
  step(`a run whose spec is a blob: its cost shows the spec's limits, fetched (${blobMeters.join('; ')})`);

  // ------------------------------------------------------------------ the run and its timeline
  await row.locator('a.run-link').click();
  await page.waitForURL(`**/ui/#/runs/${encodeURIComponent(opt.run)}`);
  const timeline = page.locator('#timeline');
  await timeline.locator('tr[data-type="ExecutionWindowOpened"]').waitFor();
  await timeline.locator('tr[data-type="ApprovalRequested"]').waitFor();
  if (await timeline.locator('tr[data-type="RunCommitted"]').count()) fail('the run committed before it was approved');
  // Data is shown as text, never as markup: the plan's intent carries an <img onerror=…>.
  const intents = await timeline.locator('td.what .intent').allInnerTexts();
  if (!intents.some((t) => t.includes('<img src=x onerror='))) fail(`the intent with markup is not shown literally: ${JSON.stringify(intents)}`);
  if (await page.locator('#view img').count()) fail('markup from the log became an element');
  const before = await timeline.locator('tr.ev').count();
  step(`the timeline shows ${before} events, ExecutionWindowOpened and ApprovalRequested among them`);

  const card = page.locator('#run-approvals article.approval');
  await card.waitFor();
  const cardText = await card.innerText();
  for (const want of ['http.request', '127.0.0.1', 'POST', 'hello.txt changed', 'notify-needs-approval', 'expires']) {
    if (!cardText.includes(want)) fail(`the approval should show the exact request (${want}): ${cardText}`);
  }
  // The target as the agent gave it, and the URL as it will be sent among the arguments the
  // approval binds to.
  await card.locator('dd .target', { hasText: '/notify' }).waitFor();
  await card.locator('dd pre.args', { hasText: '/notify' }).waitFor();
  if (!/[0-9a-f]{64}/.test(cardText)) fail(`the approval should show the digest it binds to: ${cardText}`);
  const diff = page.locator('#diff');
  await diff.locator('.change[data-path="hello.txt"] pre.patch', { hasText: '+ hello, governed world' }).waitFor();
  const diffText = await diff.innerText();
  if (!/staged/.test(diffText) || !diffText.includes('+ hello, governed world')) fail(`the staged diff should show hello.txt's new text: ${diffText}`);
  await page.evaluate(() => { window.__iceNoReload = true; });
  await page.screenshot({ path: opt.screenshot.replace(/\.png$/, '') + '-pending.png', fullPage: true });
  step('the approval shows the exact request; the diff shows the staged write');

  // ------------------------------------------------------------------ approve; watch the run go on
  await card.locator('button.approve').click();
  await card.locator('.outcome', { hasText: 'approved by operator:' }).waitFor();
  step('approved');
  await timeline.locator('tr[data-type="ApprovalGranted"]').waitFor({ timeout: 30000 });
  await timeline.locator('tr[data-type="APIRequestExecuted"]').waitFor({ timeout: 30000 });
  await timeline.locator('tr[data-type="RunCommitted"]').waitFor({ timeout: 30000 });
  await page.locator('#live', { hasText: 'run ended' }).waitFor({ timeout: 30000 });
  if (!(await page.evaluate(() => window.__iceNoReload === true))) fail('the page reloaded: the timeline should update live');
  const after = await timeline.locator('tr.ev').count();
  const seqs = await timeline.locator('tr.ev').evaluateAll((rows) => rows.map((r) => Number(r.dataset.seq)));
  if (seqs.some((s, i) => s !== i)) fail(`the timeline should list every event once, in order: ${seqs.join(',')}`);
  step(`the run continued live to RunCommitted: ${after} events (${after - before} new), no reload`);
  // The policy was edited while the run waited: the timeline shows the run taking it on.
  const reload = timeline.locator('tr[data-type="PolicyReloaded"]');
  if ((await reload.count()) !== 1) fail(`the timeline should show the one policy reload: ${await timeline.innerText()}`);
  const reloadText = await reload.innerText();
  if (!/policy now [0-9a-f]{12}… \(was [0-9a-f]{12}…\): 1 file\(s\)/.test(reloadText)) fail(`the policy reload should name the new and the previous version and the files: ${reloadText}`);
  step(`the timeline shows the policy edit the run took on: ${reloadText.replace(/\s+/g, ' ').trim()}`);

  // ------------------------------------------------------------------ the causal graph of the effect
  await timeline.locator('tr[data-type="APIRequestExecuted"]').click();
  const graph = page.locator('#causal-graph');
  await graph.waitFor();
  for (const t of ['CapabilityRequested', 'ApprovalRequested', 'ApprovalGranted', 'CapabilityGranted', 'APIRequestExecuted']) {
    if (!(await graph.locator(`li[data-type="${t}"]`).count())) fail(`the causal graph of the effect should include ${t}: ${await graph.innerText()}`);
  }
  const graphText = await graph.innerText();
  for (const want of ['decision: grant (approved)', 'operator answer: approved', 'operator:alice', 'request', 'explained']) {
    if (!graphText.includes(want)) fail(`the causal graph should name "${want}": ${graphText}`);
  }
  if (!(await graph.locator('svg path.edge-authority').count())) fail('the causal graph should draw its authority links');
  if (!/\/runs\/[^/]+\/\d+$/.test(page.url())) fail(`selecting an event should be linkable (url ${page.url()})`);
  step('the causal graph of the effect names the request, the approval, the operator\'s answer and the grant');

  // ------------------------------------------------------------------ the rest of the page after the commit
  await diff.locator('.pill', { hasText: 'applied' }).waitFor();
  await page.locator('#verify-status', { hasText: 'log verified' }).waitFor({ timeout: 30000 });
  await page.locator('#checkpoint-status', { hasText: /checkpoint \d+/ }).waitFor({ timeout: 30000 });
  await page.locator('.run-page .page-head [data-state="TERMINATED"]').waitFor();
  // The answered approval leaves the page once its answer has been seen.
  await page.locator('#run-approvals').waitFor({ state: 'hidden' });
  checkProblems();
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: opt.screenshot, fullPage: true });
  step(`screenshot saved: ${opt.screenshot}`);

  // ------------------------------------------------------------------ a run whose fields are blobs
  // Its spec, the write's arguments and the validation results are kept as blobs: the live
  // stream still shows every event (the failed validation among them), the page fetches the
  // blobs it shows (the budget, the staged content, the inspected event's fields) and says
  // plainly when it cannot, and the failed validation's inspector opens.
  const blobRun = opt['blob-run'];
  const timelineRows = async () => {
    const blobSeqs = await timeline.locator('tr.ev').evaluateAll((rows) => rows.map((r) => Number(r.dataset.seq)));
    if (blobSeqs.some((s, i) => s !== i)) fail(`the timeline should list every event once, in order: ${blobSeqs.join(',')}`);
    const lastType = await timeline.locator('tr.ev').last().getAttribute('data-type');
    if (lastType !== 'RunTerminated') fail(`the timeline should end with RunTerminated, not ${lastType}`);
    return blobSeqs;
  };
  // First with every blob fetch failing: the page says what it could not load, and where to
  // read it; the live stream still shows every event. (A reload: no blob is in memory yet.)
  await blobsOffline();
  await page.goto(`${opt.url}/ui/#/runs/${encodeURIComponent(blobRun)}`);
  await page.reload();
  await page.locator(`.run-page[data-run="${blobRun}"]`).waitFor();
  await page.locator('#live', { hasText: 'run ended' }).waitFor({ timeout: 30000 });
  await timelineRows();
  const bigChange = page.locator('#diff .change[data-path="big.txt"]');
  const bigFailed = bigChange.locator('.blob-content[data-blob="failed"]');
  await bigFailed.waitFor();
  const bigFailedText = await bigFailed.innerText();
  if (!/The content could not be loaded: 503 unavailable: blobs are offline for this check\. The request's arguments are stored as a blob, \d+ bytes; ice show \S+:\d+ --blobs prints them/.test(bigFailedText)) fail(`a staged write whose content cannot be fetched should say so and how to read it: ${bigFailedText}`);
  await page.locator('.cost-card .budget-not-shown').waitFor();
  const offlineCost = await page.locator('.cost-card').innerText();
  if (/no limit/.test(offlineCost) || !/budget not shown: the run's spec is stored as a blob, \d+ bytes and could not be loaded \(503 unavailable/.test(offlineCost)) fail(`a budget whose spec cannot be fetched should be said unknown, and why: ${offlineCost}`);
  await timeline.locator('tr[data-type="ValidationFailed"]').click();
  const offlineResults = page.locator('#inspector li[data-field="results"][data-blob="failed"]');
  await offlineResults.waitFor();
  if (!/could not be loaded: 503 unavailable/.test(await offlineResults.innerText())) fail(`the inspector should say a blob field could not be loaded: ${await offlineResults.innerText()}`);
  checkProblems();
  step('with blob fetches failing, the diff, the budget and the inspector say what could not be loaded; every event is shown');
  // The server answers again: "Try again" shows the content.
  await blobsOnline();
  await bigFailed.locator('button.retry').click();
  await bigChange.locator('.blob-content[data-blob="shown"] pre.patch', { hasText: '+ line 00000' }).waitFor();
  step('once the server answers, "Try again" shows the staged content');

  // Then as it is: its spec, the write's arguments and the validation results are kept as
  // blobs; the live stream shows every event (the failed validation among them), and the page
  // fetches the blobs it shows — the budget, the staged content — instead of naming them.
  await page.reload();
  await page.locator(`.run-page[data-run="${blobRun}"]`).waitFor();
  await page.locator('#live', { hasText: 'run ended' }).waitFor({ timeout: 30000 });
  const failed = timeline.locator('tr[data-type="ValidationFailed"]');
  if ((await failed.count()) !== 1) fail(`the failed validation should have its row: ${await timeline.innerText()}`);
  const failedText = await failed.innerText();
  if (!/failed: the check results are not shown \(stored as a blob, \d+ bytes\)/.test(failedText)) fail(`the failed validation's row should say its results are a blob: ${failedText}`);
  const blobSeqs = await timelineRows();
  const aborted = await timeline.locator('tr[data-type="AbortReasonDeclared"]').innerText();
  if (!aborted.includes('check "loud check one" failed')) fail(`the abort should name the failed check: ${aborted}`);
  const requested = await timeline.locator('tr[data-type="CapabilityRequested"]').innerText();
  if (!/fs\.write .*big\.txt arguments stored as a blob, \d+ bytes/.test(requested)) fail(`the request should say its arguments are a blob: ${requested}`);
  // The budget: the spec's own limits, fetched.
  await page.locator('.cost-card .meter', { hasText: '/ 7' }).waitFor();
  const costCard = await page.locator('.cost-card').innerText();
  if (/no limit|not shown/.test(costCard) || !costCard.includes('/ 7') || !costCard.includes('/ 5 min') || !costCard.includes('/ 1 MB')) fail(`the budget of a run whose spec is a blob should show the spec's limits: ${costCard}`);
  // The diff: the staged file's content, fetched from the request's arguments.
  const bigPatch = bigChange.locator('.blob-content[data-blob="shown"] pre.patch');
  await bigPatch.waitFor();
  const bigText = await bigPatch.innerText();
  if (!bigText.includes('+ line 00000') || !bigText.includes('+ line 00199') || !bigText.includes('… 1300 more lines') || /stored as a blob/.test(bigText)) fail(`the staged write should show the file's content: ${bigText.slice(0, 300)}…`);
  checkProblems();
  step(`a run whose fields are blobs shows all ${blobSeqs.length} events live; its budget (${costCard.replace(/\s+/g, ' ').trim()}) and the staged big.txt are fetched and shown`);

  // Its inspector, opened from a link to it (the event arrives while the inspector waits for it).
  const failedSeq = await failed.getAttribute('data-seq');
  await page.goto(`${opt.url}/ui/#/runs/${encodeURIComponent(blobRun)}/${failedSeq}`);
  await page.reload();
  const inspector = page.locator('#inspector');
  await inspector.locator(`#causal-graph[data-event="${blobRun}:${failedSeq}"]`).waitFor();
  await page.locator('#live', { hasText: 'run ended' }).waitFor({ timeout: 30000 });
  const inspected = await inspector.innerText();
  if (!inspected.includes('ValidationFailed') || !inspected.includes(`ice show ${blobRun}:${failedSeq} --blobs`) || !/results: stored as a blob, \d+ bytes/.test(inspected)) fail(`the inspector should open on the failed validation and name its blob: ${inspected}`);
  if ((await timeline.locator('tr[data-type="ValidationFailed"]').count()) !== 1) fail('with the inspector open on it, the failed validation should still have its row');
  // It fetches the event's blob field and shows its value, and summarises the event with it.
  const results = inspector.locator('li[data-field="results"][data-blob="shown"] pre.blob-value');
  await results.waitFor();
  const resultsText = await results.innerText();
  let resultsValue;
  try { resultsValue = JSON.parse(resultsText); } catch { fail(`the inspector should show the results' value as JSON: ${resultsText.slice(0, 300)}…`); }
  const checks = Array.isArray(resultsValue) ? resultsValue.filter((r) => r?.passed === false).map((r) => r.check) : [];
  if (!checks.includes('loud check one') || !checks.includes('loud check two')) fail(`the inspector should show the checks' results: ${resultsText.slice(0, 300)}…`);
  const inspectedSummary = await inspector.locator('.event-summary').innerText();
  if (inspectedSummary !== 'failed: loud check one, loud check two') fail(`with its results fetched, the inspector should summarise the failed validation: ${inspectedSummary}`);
  step(`the failed validation's inspector opens, fetches its results (${checks.length} failed checks) and summarises them`);
  checkProblems();
  await page.screenshot({ path: opt.screenshot.replace(/\.png$/, '') + '-blobs.png', fullPage: true });

  // The page's own functions, with a blob reference in every field they read.
  const unit = await page.evaluate(async () => {
    const ev = await import('/ui/events.js');
    const runs = await import('/ui/runs.js');
    const ap = await import('/ui/approvals.js');
    const out = [];
    const ref = { $blob: 'ab'.repeat(32), size: 20000 };
    const fields = ['agent', 'driver', 'spec', 'policy_version', 'previous_version', 'assumptions', 'policy_sources',
      'capabilities', 'tools', 'memories', 'capability', 'target', 'arguments', 'scope', 'approval', 'policies',
      'max_uses', 'reason', 'detail', 'resource', 'grant', 'amount', 'actual', 'path', 'bytes', 'staged', 'change',
      'method', 'url', 'evidence', 'status', 'output', 'server', 'tool', 'model', 'usage', 'text', 'thought',
      'checks', 'results', 'applied', 'reconfiguration', 'outcome', 'stage', 'memory', 'kind', 'new', 'request'];
    const types = ['RunProvisioned', 'ContextResolved', 'PolicyReloaded', 'CapabilitiesBound', 'MemoryMounted',
      'ExecutionWindowOpened', 'CapabilityRequested', 'CapabilityGranted', 'CapabilityDenied', 'CapabilityUsed',
      'ApprovalRequested', 'ApprovalGranted', 'ApprovalDenied', 'BudgetReserved', 'BudgetSettled', 'FileRead',
      'EffectStaged', 'EffectApplied', 'FileWritten', 'APIRequestExecuted', 'ToolInvoked', 'InferenceStep',
      'PlanStepProposed', 'DecisionProposed', 'HypothesisGenerated', 'UncertaintyDeclared', 'AssumptionDeclared',
      'ValidationStarted', 'ValidationPassed', 'ValidationFailed', 'RunCommitted', 'RunAborted', 'AbortReasonDeclared',
      'RunSuspended', 'RunKillRequested', 'RunResumed', 'ReconfigurationRecorded', 'RunTerminated',
      'ResourcesAllocated', 'ResourcesReleased', 'MemoryPromoted', 'SomethingNew'];
    const event = (type, payload) => ({ run_id: 'u', run_seq: 1, type, origin: 'runtime', at: '2026-01-01T00:00:00Z', causes: [], payload });
    const bad = (s) => typeof s !== 'string' || /\$blob|undefined|NaN|\[object Object\]/.test(s);
    for (const type of types) {
      // Every field a blob; then each field alone a blob.
      const all = ev.summary(event(type, Object.fromEntries(fields.map((f) => [f, ref]))));
      if (bad(all)) out.push(`${type} with every field a blob: ${all}`);
      for (const f of fields) {
        const one = ev.summary(event(type, { [f]: ref }));
        if (bad(one)) out.push(`${type} with ${f} a blob: ${one}`);
      }
      const row = ev.timelineRow(event(type, Object.fromEntries(fields.map((f) => [f, ref]))), () => {});
      if (row.dataset.type !== type) out.push(`${type}: no timeline row`);
    }
    const must = [
      ['ValidationFailed', 'results', /stored as a blob, 20000 bytes/],
      ['ValidationPassed', 'results', /stored as a blob, 20000 bytes/],
      ['CapabilityRequested', 'arguments', /arguments stored as a blob, 20000 bytes/],
      ['CapabilitiesBound', 'capabilities', /stored as a blob, 20000 bytes/],
      ['ApprovalRequested', 'policies', /stored as a blob, 20000 bytes/],
      ['BudgetReserved', 'amount', /stored as a blob, 20000 bytes/],
      ['RunProvisioned', 'spec', /spec stored as a blob, 20000 bytes/],
    ];
    for (const [type, f, re] of must) {
      const s = ev.summary(event(type, { [f]: ref }));
      if (!re.test(s)) out.push(`${type} with ${f} a blob should say so: ${s}`);
    }
    // An event whose payload cannot even be read still summarises, and gets its row.
    const hostile = new Proxy({}, { get() { throw new Error('unreadable'); }, ownKeys() { throw new Error('unreadable'); } });
    let s;
    try { s = ev.summary(event('ValidationFailed', hostile)); } catch (e) { s = `threw ${e}`; }
    if (!/no summary: unreadable/.test(s)) out.push(`an unreadable payload: ${s}`);
    try { ev.timelineRow(event('ValidationFailed', hostile), () => {}); } catch (e) { out.push(`an unreadable payload has no row: ${e}`); }
    // A budget that cannot be read is never "no limit".
    for (const spec of [ref, { budget: ref }, undefined, 'not a spec']) {
      const m = runs.costMeters({ tool_calls: 3 }, runs.specBudget(spec)).textContent;
      if (/no limit/.test(m) || !/limit not shown/.test(m)) out.push(`budget of spec ${JSON.stringify(spec)}: ${m}`);
    }
    const fine = runs.costMeters({ tool_calls: 3 }, runs.specBudget({ budget: { tool_calls: 20, bytes: null } })).textContent;
    if (!/3 \/ 20/.test(fine)) out.push(`a readable budget: ${fine}`);
    // A denials budget is a meter of refusals against its limit.
    const refused = runs.costMeters({ tool_calls: 3, denials: 2 }, runs.specBudget({ budget: { denials: 5 } })).textContent;
    if (!/refusals\s*2 \/ 5/.test(refused)) out.push(`a denials budget: ${refused}`);
    // An approval whose request's arguments and target are blobs the log does not hold: the
    // card says they could not be loaded and how to read them, never the reference, and
    // Approve waits.
    const card = ap.approvalCard({ id: 'u:2', run: 'u', capability: 'fs.write', resource: 'File::"x"', arguments: ref, digest: 'd', expires_at: '2026-01-01T00:00:00Z', policies: [] },
      { byId: new Map([['u:2', { payload: { request: 'u:1' } }], ['u:1', { run_id: 'u', run_seq: 1, origin: 'agent:a', payload: { target: ref } }]]) });
    for (let i = 0; i < 100 && card.querySelectorAll('[data-blob="failed"]').length < 2; i++) await new Promise((r) => setTimeout(r, 50));
    const cardText = card.textContent;
    for (const what of ['arguments', 'target']) {
      if (!new RegExp(`The ${what} could not be loaded, so this call cannot be approved here: 404 not_found: [^.]*\\. The ${what} (are|is) stored as a blob, 20000 bytes; ice show u:1 --blobs prints`).test(cardText)) out.push(`an approval whose ${what} is a blob the log does not hold: ${cardText}`);
    }
    if (/\$blob|object Object/.test(cardText)) out.push(`an approval with blob arguments shows the reference: ${cardText}`);
    if (!card.querySelector('button.approve').disabled || !/waits until the arguments and target are shown/.test(card.querySelector('button.approve').title)) out.push('Approve should wait until the arguments and target are shown');
    return out;
  });
  if (unit.length) fail(`the page's functions do not cope with blobs:\n  ${unit.join('\n  ')}`);
  step('the page\'s summaries, budgets and approval cards cope with a blob in any field');

  // ------------------------------------------------------------------ an approval whose arguments are a blob
  // The card fetches them and shows the whole call; until then Approve waits and the card says
  // why: loading, then (the server failing) what failed and how to read them; "Try again"
  // shows them once the server answers. (A reload: no blob is in memory yet.)
  const approvalRun = opt['blob-approval-run'];
  await blobsOffline(true);
  await page.goto(`${opt.url}/ui/#/approvals`);
  await page.reload();
  const bigCard = page.locator(`article.approval[data-run="${approvalRun}"]`);
  const bigArgs = bigCard.locator('.args-box');
  const approveBig = bigCard.locator('button.approve');
  await bigCard.locator('.args-box[data-blob="loading"]').waitFor();
  const loadingText = await bigArgs.innerText();
  if (!/^Loading the arguments \(stored as a blob, \d+ bytes\)…$/.test(loadingText.trim())) fail(`while its arguments load, the card should say so: ${loadingText}`);
  if (!(await approveBig.isDisabled())) fail('Approve should wait while the arguments load');
  await bigCard.locator('dd a', { hasText: `${approvalRun}:` }).waitFor(); // the request, which the failure names
  await page.evaluate(() => window.iceCheckReleaseBlobs());
  await bigCard.locator('.args-box[data-blob="failed"]').waitFor();
  const failedArgs = await bigArgs.innerText();
  if (!/The arguments could not be loaded, so this call cannot be approved here: 503 unavailable: blobs are offline for this check\. The arguments are stored as a blob, \d+ bytes; ice show \S+:\d+ --blobs prints them\./.test(failedArgs)) fail(`a card whose arguments cannot be fetched should say so and how to read them: ${failedArgs}`);
  if (/\$blob/.test(await bigCard.innerText())) fail('the card shows the blob reference');
  if (!(await approveBig.isDisabled()) || (await bigCard.locator('button.deny').isDisabled())) fail('with its arguments not shown, Approve should wait and Deny should not');
  step('an approval whose arguments are a blob: Approve waits while they load, and when they cannot be, the card says why and how to read them');
  await blobsOnline();
  await bigArgs.locator('button.retry').click();
  const bigArgsShown = bigCard.locator('.args-box[data-blob="shown"] pre.args');
  await bigArgsShown.waitFor();
  const shownArgs = await bigArgsShown.innerText();
  let argsValue;
  try { argsValue = JSON.parse(shownArgs); } catch { fail(`the card should show the arguments as JSON: ${shownArgs.slice(0, 300)}…`); }
  const body = argsValue?.body ?? '';
  if (argsValue?.method !== 'POST' || !body.startsWith('BEGIN big notice\n') || !body.endsWith('notice line 01199\nEND big notice\n') || body.split('\n').length !== 1203) fail(`the card should show the whole call: ${shownArgs.slice(0, 300)}…`);
  if (!(await approveBig.isEnabled())) fail('with the whole call shown, Approve should work');
  checkProblems();
  step(`once the server answers, the card shows the whole call (${shownArgs.length} characters) and Approve works`);
  await bigCard.screenshot({ path: opt.screenshot.replace(/\.png$/, '') + '-blob-approval.png' });
  await bigCard.locator('input.reason').fill('too long to send');
  await bigCard.locator('button.deny').click();
  await bigCard.locator('.outcome', { hasText: 'denied by operator:alice' }).waitFor();
  step('the operator denies it');

  // ------------------------------------------------------------------ a run the listing leaves out
  await page.goto(`${opt.url}/ui/#/approvals`);
  const leftOut = page.locator('#approvals-left-out li', { hasText: 'is left out' });
  await leftOut.waitFor();
  const leftOutText = await leftOut.innerText();
  if (!leftOutText.includes('Run damaged is left out') || !leftOutText.includes('ice explain damaged:0')) {
    fail(`the run left out of the approvals is not named: ${leftOutText}`);
  }
  step('a run whose record does not fold is named on the approvals page, not hidden');
  checkProblems();

  // ------------------------------------------------------------------ a token that stops working
  await page.evaluate(() => sessionStorage.setItem('ice.operator.token', 'revoked'));
  await page.goto(`${opt.url}/ui/#/approvals`);
  await page.locator('#token-problem', { hasText: 'refused' }).waitFor();
  step('a token the server refuses sends the page back to the token prompt');
  checkProblems();
  console.log(JSON.stringify({ ok: true, seconds: (Date.now() - started) / 1000, steps }));
} catch (e) {
  console.error(`ui_check FAILED: ${e.message}`);
  console.error(`steps done:\n  ${steps.join('\n  ')}`);
  if (problems.length) console.error(`page problems:\n  ${problems.join('\n  ')}`);
  if (network.length) console.error(`requests refused or failed (the last 40):\n  ${network.slice(-40).join('\n  ')}`);
  if (page) await page.screenshot({ path: opt.screenshot.replace(/\.png$/, '') + '.failed.png', fullPage: true }).catch(() => {});
  await browser.close();
  process.exit(1);
}
await browser.close();
