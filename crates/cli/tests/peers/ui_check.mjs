// The operator web UI in a real headless Chromium (Debian's `chromium`, driven by npm
// `playwright-core`, both installed by scripts/deps), as a person would use it: a wrong token
// is refused and asked again; with the right one, open the run, see its timeline, approve the
// pending request and watch the run continue to its commit without reloading; open the causal
// graph of the effect and find the grant and the approval in it; save a screenshot.
//
//   ICE_TOKEN=OPERATOR_TOKEN node ui_check.mjs --url http://127.0.0.1:PORT --run RUN \
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
for (const k of ['url', 'run', 'screenshot', 'chromium', 'node-modules']) {
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
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1480, height: 1000 }, deviceScaleFactor: 1 });
  page = await context.newPage();
  page.setDefaultTimeout(20000);
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
  await page.locator('#approvals-badge', { hasText: '1' }).waitFor();
  step('the runs list shows the run executing, its cost, and the approval waiting');

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
  await card.locator('dd', { hasText: '/notify' }).waitFor();
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
  if (page) await page.screenshot({ path: opt.screenshot.replace(/\.png$/, '') + '.failed.png', fullPage: true }).catch(() => {});
  await browser.close();
  process.exit(1);
}
await browser.close();
