#!/usr/bin/env node
// Drives JupyterLab, running in gateway mode against a Sandgate gateway, in headless Chromium:
// creates a notebook on the "Python 3 (Sandgate sandbox)" kernel, runs `print(6*7)` and waits
// for 42, then builds a pandas DataFrame and a matplotlib bar chart and waits for the HTML table
// and the inline PNG. A screenshot is saved after every step (and on failure) to
// tests/artifacts/browser-*.png.
//
// With --at-once N it instead does, N times in a row: create a notebook from the Launcher, type
// `print(6*7)` while the kernel starts, press Shift+Enter as soon as JupyterLab has a kernel for
// the notebook (before it is connected or idle), wait for 42, then close the notebook and shut
// its kernel down.
//
// With --widgets it instead runs, in a new notebook, `%pip install ipywidgets`, then ipywidgets (which must be importable in the
// kernel): an IntSlider with an Output widget its observe callback prints into, moves the slider
// one step with the keyboard and waits for the Output to show the new value (and the kernel to
// have it); then a tqdm.notebook bar over 40 steps, and waits for it to reach 100% (green).
//
// Every WebSocket frame the page sends and receives, and the page's console messages, are written
// to DIR/browser-websocket.log (epoch ms, socket, direction, channel, type, ids).
//
// Usage: node lab.mjs [--artifacts DIR] [--kernel-display-name NAME] [--via launcher|menu] [--at-once N | --widgets] URL
//   URL: JupyterLab's address with its token, e.g. http://127.0.0.1:8889/lab?token=abc
//        (or the environment variable LAB_URL).
//   --via: create the notebook from the Launcher card of the kernel (default; falls back to the
//        menu when there is no such card) or from File > New > Notebook and the kernel dialog.
// Environment: CHROMIUM (default /usr/bin/chromium), ARTIFACTS_DIR, SANDGATE_KERNEL_DISPLAY_NAME,
//   LAB_TIMEOUT_SCALE (multiplies every timeout, and the overall limit of 300 s; default 1).
// Exit status: 0 when every step passed, 1 on a failed step (with a message on stderr), 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const opts = {
    url: process.env.LAB_URL,
    artifacts: process.env.ARTIFACTS_DIR || path.resolve(here, '..', 'artifacts'),
    kernel: process.env.SANDGATE_KERNEL_DISPLAY_NAME || 'Python 3 (Sandgate sandbox)',
    via: 'launcher',
    atOnce: 0,
    widgets: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--artifacts') opts.artifacts = argv[++i];
    else if (a === '--kernel-display-name') opts.kernel = argv[++i];
    else if (a === '--via') opts.via = argv[++i];
    else if (a === '--at-once') opts.atOnce = Number(argv[++i]);
    else if (a === '--widgets') opts.widgets = true;
    else if (a === '-h' || a === '--help') opts.help = true;
    else if (a.startsWith('-')) throw new Error(`unknown option ${a}`);
    else opts.url = a;
  }
  return opts;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  console.error(`lab.mjs: ${e.message}`);
  process.exit(2);
}
if (!['launcher', 'menu'].includes(opts.via)) {
  console.error(`lab.mjs: --via must be launcher or menu, not ${opts.via}`);
  process.exit(2);
}
if (opts.widgets && opts.atOnce > 0) {
  console.error('lab.mjs: --widgets and --at-once are separate runs');
  process.exit(2);
}
if (!(Number.isInteger(opts.atOnce) && opts.atOnce >= 0 && opts.atOnce <= 100)) {
  console.error('lab.mjs: --at-once takes a number of rounds from 0 to 100');
  process.exit(2);
}
if (opts.help || !opts.url) {
  console.error('usage: node lab.mjs [--artifacts DIR] [--kernel-display-name NAME] [--via launcher|menu] [--at-once N | --widgets] URL-WITH-TOKEN (or LAB_URL)');
  process.exit(opts.help ? 0 : 2);
}

const scale = Number(process.env.LAB_TIMEOUT_SCALE || 1);
const T = {
  load: 60_000 * scale, // JupyterLab's page and its extensions
  kernel: 90_000 * scale, // the gateway starts the kernel; JupyterLab connects its WebSocket
  print: 30_000 * scale, // print(6*7)
  plot: 120_000 * scale, // first `import pandas, matplotlib` in the sandbox takes a few seconds
  action: 15_000 * scale, // clicks, typing
};

// A bound on the whole run, so that a hang still ends with a message and a screenshot.
const deadline = 300_000 * scale;

const started = Date.now();
const elapsed = () => ((Date.now() - started) / 1000).toFixed(1) + 's';
const log = (msg) => console.log(`[lab.mjs ${elapsed()}] ${msg}`);

fs.mkdirSync(opts.artifacts, { recursive: true });
for (const f of fs.readdirSync(opts.artifacts)) {
  if (/^browser-.*\.png$/.test(f)) fs.rmSync(path.join(opts.artifacts, f));
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
if (!fs.existsSync(executablePath)) {
  console.error(`lab.mjs: no Chromium at ${executablePath} (install Debian's chromium or set CHROMIUM)`);
  process.exit(1);
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sandgate-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  viewport: { width: 1400, height: 1000 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
context.setDefaultTimeout(T.action);
const page = context.pages()[0] || (await context.newPage());

// What the page said, shown when a step fails.
const diagnostics = [];
const note = (line) => {
  diagnostics.push(`${elapsed()} ${line}`);
  if (diagnostics.length > 200) diagnostics.shift();
};
page.on('console', (m) => {
  if (m.type() === 'error' || m.type() === 'warning') note(`console.${m.type()}: ${m.text()}`);
});
page.on('pageerror', (e) => note(`page error: ${e.message}`));
page.on('requestfailed', (r) => note(`request failed: ${r.method()} ${r.url().replace(/token=[^&]+/, 'token=…')} ${r.failure()?.errorText}`));
page.on('response', (r) => {
  if (r.status() >= 400) note(`HTTP ${r.status()}: ${r.request().method()} ${r.url().replace(/token=[^&]+/, 'token=…')}`);
});
// Every WebSocket frame and console message, one line each, so a lost message can be found.
const wsLog = fs.createWriteStream(path.join(opts.artifacts, 'browser-websocket.log'));
function frameSummary(payload) {
  try {
    const m = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8'));
    const h = m.header || {};
    let extra = '';
    if (h.msg_type === 'status') extra = m.content?.execution_state;
    else if (h.msg_type === 'execute_request') extra = JSON.stringify(m.content?.code);
    else if (h.msg_type === 'stream') extra = JSON.stringify(m.content?.text);
    return `${m.channel} ${h.msg_type} id=${(h.msg_id || '').slice(0, 8)} parent=${(m.parent_header?.msg_id || '').slice(0, 8)} ${extra}`;
  } catch {
    return `${typeof payload === 'string' ? 'text' : 'binary'} (${payload.length} bytes, not JSON)`;
  }
}
page.on('console', (m) => wsLog.write(`${Date.now()} console.${m.type()}: ${m.text()}\n`));
// Requests the page sent on a kernel's shell or control channel and got no reply for yet:
// msg_id -> {what, at, comm}. A request that never gets its reply is a lost message. Comm
// messages (the widget manager's comm_open and comm_msg when a kernel connects) have no reply:
// the idle status the kernel publishes with them as parent is their answer, as in ipykernel.
const unanswered = new Map();
function trackFrame(n, direction, payload) {
  let m;
  try {
    m = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8'));
  } catch {
    return;
  }
  const type = m?.header?.msg_type || '';
  if (direction === 'sent' && (m.channel === 'shell' || m.channel === 'control') && m.header?.msg_id) {
    unanswered.set(m.header.msg_id, { what: `${type} sent on ws${n}`, at: Date.now(), comm: type.startsWith('comm_') });
  } else if (direction === 'received' && m.parent_header?.msg_id && (type.endsWith('_reply')
      || (type === 'status' && m.content?.execution_state === 'idle' && unanswered.get(m.parent_header.msg_id)?.comm))) {
    unanswered.delete(m.parent_header.msg_id);
    if (unanswered.size === 0) for (const done of answeredWaiters.splice(0)) done(true);
  }
}
const answeredWaiters = [];
// Resolves true once every request sent so far has its reply, false after `ms`.
function allAnswered(ms) {
  if (unanswered.size === 0) return Promise.resolve(true);
  return new Promise((resolve) => {
    answeredWaiters.push(resolve);
    setTimeout(() => resolve(false), ms);
  });
}
let sockets = 0;
page.on('websocket', (ws) => {
  const url = ws.url().replace(/token=[^&]+/, 'token=…');
  const n = ++sockets;
  const line = (what) => wsLog.write(`${Date.now()} ws${n} ${what}\n`);
  line(`opened ${url}`);
  note(`websocket opened: ${url}`);
  ws.on('framesent', (f) => {
    line(`sent ${frameSummary(f.payload)}`);
    trackFrame(n, 'sent', f.payload);
  });
  ws.on('framereceived', (f) => {
    line(`received ${frameSummary(f.payload)}`);
    trackFrame(n, 'received', f.payload);
  });
  ws.on('close', () => {
    line('closed');
    note(`websocket closed: ${url}`);
  });
  ws.on('socketerror', (e) => {
    line(`error ${e}`);
    note(`websocket error: ${url}: ${e}`);
  });
});

let shot = 0;
async function screenshot(name) {
  const file = path.join(opts.artifacts, `browser-${++shot}-${name}.png`);
  try {
    await page.screenshot({ path: file, timeout: 10_000 });
    log(`screenshot ${path.relative(process.cwd(), file)}`);
  } catch (e) {
    log(`screenshot ${file} failed: ${e.message}`);
  }
}

let step = 'start';
async function run(name, fn) {
  step = name;
  log(`step: ${name}`);
  await fn();
}

class StepError extends Error {}

const escapeRegExp = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
const exactText = (s) => new RegExp(`^\\s*${escapeRegExp(s)}\\s*$`);

// Fails at once when the page shows an error dialog, a kernel error, or an error output,
// instead of waiting for the full timeout.
async function waitFor(locator, { timeout, what, cell }) {
  const failures = [page.locator('.jp-Dialog').filter({ hasText: /error|failed|could not|unable/i })];
  if (cell) {
    // An error (or a traceback on stderr) in the cell's output; other stderr text, like a warning, is fine.
    failures.push(cell.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"], '
      + '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').filter({ hasText: /Traceback|Error\b/ }));
  }
  let any = locator;
  for (const f of failures) any = any.or(f);
  try {
    await any.first().waitFor({ state: 'visible', timeout });
  } catch (e) {
    throw new StepError(`timed out after ${timeout / 1000}s waiting for ${what}`);
  }
  for (const f of failures) {
    if (await f.first().isVisible()) {
      const text = (await f.first().innerText()).trim();
      throw new StepError(`while waiting for ${what}, the page showed an error:\n${text}`);
    }
  }
}

// JupyterLab asks which kernel to use in a "Select Kernel" dialog in some situations (no default
// kernel, a notebook opened without one): choose the Sandgate kernel there.
const kernelDialog = page.locator('.jp-Dialog').filter({ has: page.locator('select') });
async function answerKernelDialog() {
  const dialog = kernelDialog;
  if (!(await dialog.first().isVisible())) return false;
  log(`a kernel selection dialog is open: choosing "${opts.kernel}"`);
  const select = dialog.first().locator('select').first();
  const options = (await select.locator('option').allInnerTexts()).map((o) => o.trim());
  if (!options.includes(opts.kernel)) {
    throw new StepError(`the kernel selection dialog does not offer "${opts.kernel}" (it offers ${JSON.stringify(options)})`);
  }
  await select.selectOption({ label: opts.kernel });
  await dialog.first().locator('.jp-Dialog-button.jp-mod-accept').click();
  await dialog.first().waitFor({ state: 'hidden' });
  return true;
}

const notebook = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden)').first();
const cells = notebook.locator('.jp-Notebook .jp-Cell');
const statusIdle = page.locator('.jp-StatusBar-TextItem', { hasText: new RegExp(`^\\s*${escapeRegExp(opts.kernel)} \\| Idle\\s*$`) });

// Types `code` into a cell (its editor keeps the focus) and returns the cell.
async function typeCell(index, code, what) {
  const cell = cells.nth(index);
  await cell.waitFor({ state: 'visible', timeout: T.action });
  const editor = cell.locator('.cm-content');
  await editor.click();
  // fill() replaces the editor's text through one input event: no auto-indent or bracket completion.
  await editor.fill(code);
  const typed = await editor.innerText();
  if (typed.replace(/\s+/g, '') !== code.replace(/\s+/g, '')) {
    throw new StepError(`the ${what} cell holds ${JSON.stringify(typed)} instead of ${JSON.stringify(code)}`);
  }
  return cell;
}

async function runCell(index, code, what) {
  const cell = await typeCell(index, code, what);
  await page.keyboard.press('Shift+Enter');
  return cell;
}

const kernelStatus = page.locator('.jp-StatusBar-TextItem', { hasText: new RegExp(`^\\s*${escapeRegExp(opts.kernel)} \\|`) });
const menu = (label) => page.locator('.lm-MenuBar-itemLabel', { hasText: new RegExp(`^${label}$`) });
const launcherCard = page.locator('.jp-Launcher .jp-LauncherCard[data-category="Notebook"]:visible')
  .filter({ has: page.locator('.jp-LauncherCard-label', { hasText: exactText(opts.kernel) }) });

// One round of "type and run at once": a notebook made from the Launcher, `print(6*7)` typed
// while its kernel starts, and Shift+Enter pressed the moment JupyterLab has a kernel for the
// notebook (the status bar leaves "Initializing"): before the kernel's WebSocket is connected
// and idle, while JupyterLab's server opens its two gateway sockets for it. 42 must come back.
// (Pressed earlier, while the status bar says "Initializing", JupyterLab itself drops the run:
// CodeCell.execute returns without a word when the session has no kernel yet; see the README's
// known issues.) Then the notebook is closed and its kernel shut down, so each round starts a
// fresh kernel and fresh WebSockets.
const rounds = [];
async function runAtOnce(round) {
  // JupyterLab opens a Launcher when its main area becomes empty; open one if it does not.
  try {
    await launcherCard.first().waitFor({ state: 'visible', timeout: 5_000 * scale });
  } catch {
    await menu('File').click();
    await page.locator('.lm-Menu-item[data-command="launcher:create"]').first().click();
  }
  await waitFor(launcherCard, { timeout: T.load, what: `the Launcher card "${opts.kernel}"` });
  await launcherCard.first().click();
  await waitFor(notebook.locator('.jp-Cell .cm-content'), { timeout: T.kernel, what: "the new notebook's first cell" });
  const cell = await typeCell(0, 'print(6*7)', 'first');
  await waitFor(kernelStatus.filter({ hasNotText: /\|\s*Initializing/ }), {
    timeout: T.kernel, what: 'JupyterLab to have a kernel for the notebook',
  });
  const status = (await kernelStatus.allInnerTexts()).join(' ').replace(/^.*\|\s*/, '').trim();
  await page.keyboard.press('Shift+Enter');
  wsLog.write(`${Date.now()} round ${round}: Shift+Enter pressed (${status})\n`);
  log(`round ${round}: Shift+Enter pressed; just before, the kernel status said ${status}`);
  const out = cell.locator('.jp-OutputArea-output').filter({ hasText: /^\s*42\s*$/ });
  await waitFor(out, { timeout: T.print, what: `the output 42 (round ${round}, pressed while ${status})`, cell });
  await waitFor(cell.locator('.jp-InputPrompt').filter({ hasText: /\[\d+\]/ }), {
    timeout: T.print, what: `an execution count on the cell (round ${round})`, cell,
  });
  // Every request the page sent (its kernel_info_request first) was answered: none was lost on
  // the way, even if the cell still ran (JupyterLab sends a cell held behind an unanswered
  // kernel_info_request after 3 s).
  if (!(await allAnswered(5_000 * scale))) {
    const lost = [...unanswered.values()].map((u) => `${u.what} ${((Date.now() - u.at) / 1000).toFixed(1)} s ago`);
    throw new StepError(`round ${round}: requests the page sent got no reply: ${lost.join('; ')}`);
  }
  rounds.push(status);
  log(`round ${round}: 42`);
  await menu('File').click();
  await page.locator('.lm-Menu-item[data-command="filemenu:close-and-cleanup"]').click();
  const confirm = page.locator('.jp-Dialog').filter({ hasText: /Shut down the notebook/ });
  await confirm.locator('.jp-Dialog-button.jp-mod-accept').click();
  await confirm.waitFor({ state: 'hidden' });
  await notebook.waitFor({ state: 'hidden', timeout: T.action });
}

// ipywidgets in the notebook (--widgets): a slider moved with the keyboard updates the Output
// widget its callback prints into, and a tqdm.notebook bar reaches 100%.
async function runWidgets() {
  await run('%pip install ipywidgets (fetched by the gateway)', async () => {
    const cell = await runCell(0, '%pip install ipywidgets', '%pip install');
    const done = cell.locator('.jp-OutputArea-output').filter({ hasText: /Successfully installed .*ipywidgets-/ });
    await waitFor(done, { timeout: T.plot * 4, what: 'pip to say "Successfully installed ... ipywidgets-..."', cell });
    log(`pip: ${JSON.stringify((await done.first().innerText()).trim().split('\n').pop())}`);
  });

  await run('an IntSlider and the Output its callback prints into', async () => {
    const code = [
      'import ipywidgets as widgets',
      "slider = widgets.IntSlider(value=3, min=0, max=10, description='n')",
      'shown = widgets.Output()',
      'def moved(change):',
      '    with shown:',
      "        print(f\"{change['new']} squared is {change['new'] ** 2}\")",
      "slider.observe(moved, names='value')",
      'display(slider, shown)',
    ].join('\n');
    const cell = await runCell(1, code, 'slider');
    const handle = cell.locator('.widget-slider .noUi-handle');
    await waitFor(handle, { timeout: T.plot, what: 'the slider (ipywidgets rendered by jupyterlab_widgets)', cell });
    const readout = cell.locator('.widget-slider .widget-readout');
    await waitFor(readout.filter({ hasText: /^\s*3\s*$/ }), { timeout: T.print, what: 'the slider to read 3', cell });
    await screenshot('slider');
    // One step right, as a user does with the keyboard on the focused handle.
    await handle.first().focus();
    await page.keyboard.press('ArrowRight');
    await waitFor(readout.filter({ hasText: /^\s*4\s*$/ }), { timeout: T.print, what: 'the slider to read 4', cell });
    const printed = cell.locator('.widget-output').filter({ hasText: '4 squared is 16' });
    await waitFor(printed, { timeout: T.print, what: 'the Output widget to show "4 squared is 16"', cell });
    log(`the Output widget shows ${JSON.stringify((await cell.locator('.widget-output').first().innerText()).trim())}`);
    await screenshot('slider-moved');
  });

  await run('the kernel has the value the slider was moved to', async () => {
    const cell = await runCell(2, 'print(f"slider.value = {slider.value}")', 'slider value');
    const out = cell.locator('.jp-OutputArea-output').filter({ hasText: /^\s*slider\.value = 4\s*$/ });
    await waitFor(out, { timeout: T.print, what: 'the output "slider.value = 4"', cell });
  });

  await run('a tqdm.notebook bar reaches 100%', async () => {
    const code = [
      'from tqdm.notebook import tqdm',
      "for i in tqdm(range(40), desc='steps'):",
      '    pass',
    ].join('\n');
    const cell = await runCell(3, code, 'tqdm');
    const done = cell.locator('.widget-hprogress .progress-bar-success');
    await waitFor(done, { timeout: T.plot, what: 'the tqdm bar to turn green (bar_style success)', cell });
    const label = cell.locator('.widget-html').filter({ hasText: /steps:\s*100%/ });
    await waitFor(label, { timeout: T.print, what: 'the label "steps: 100%"', cell });
    const counts = cell.locator('.widget-html').filter({ hasText: /40\/40/ });
    await waitFor(counts, { timeout: T.print, what: 'the count "40/40"', cell });
    const width = await done.first().evaluate((el) => el.style.width || getComputedStyle(el).width);
    log(`tqdm: "${(await label.first().innerText()).trim()}", the bar's width ${width}`);
    await screenshot('tqdm');
  });
}

let failed = null;
const overall = setTimeout(async () => {
  console.error(`lab.mjs: FAILED: still at step "${step}" after the overall limit of ${deadline / 1000}s`);
  if (diagnostics.length) console.error(`what the page reported:\n  ${diagnostics.join('\n  ')}`);
  await screenshot('failure');
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(1);
}, deadline);
try {
  await run('open JupyterLab', async () => {
    // `reset` starts from JupyterLab's default workspace (just a Launcher), whatever was open before.
    const url = new URL(opts.url);
    url.searchParams.set('reset', '');
    await page.goto(url.href, { waitUntil: 'domcontentloaded', timeout: T.load });
    await waitFor(page.locator('#jp-main-dock-panel'), { timeout: T.load, what: "JupyterLab's main area" });
    await waitFor(page.locator('.jp-Launcher .jp-LauncherCard').or(notebook), {
      timeout: T.load, what: 'the Launcher',
    });
    await screenshot('lab');
  });

  if (opts.atOnce > 0) {
    for (let round = 1; round <= opts.atOnce; round++) {
      await run(`round ${round} of ${opts.atOnce}: new notebook, print(6*7) at once`, () => runAtOnce(round));
    }
    const early = rounds.filter((s) => !/^Idle$/i.test(s)).length;
    log(`at once: 42 in all ${rounds.length} rounds; Shift+Enter before the kernel was idle in ${early} (${rounds.join(', ')})`);
  } else {
    // (--widgets runs its own cells in the notebook made below, instead of print and the plot.)
    await run(`create a notebook on "${opts.kernel}"`, async () => {
      const card = page.locator('.jp-Launcher .jp-LauncherCard[data-category="Notebook"]')
        .filter({ has: page.locator('.jp-LauncherCard-label', { hasText: exactText(opts.kernel) }) });
      let viaLauncher = opts.via === 'launcher';
      if (viaLauncher) {
        try {
          await card.first().waitFor({ state: 'visible', timeout: T.load });
        } catch {
          viaLauncher = false;
          const shown = await page.locator('.jp-LauncherCard[data-category="Notebook"]').allInnerTexts();
          log(`no Launcher card for "${opts.kernel}" (notebook cards: ${JSON.stringify(shown)}); using File > New > Notebook`);
        }
      }
      if (viaLauncher) {
        await card.first().click();
      } else {
        await page.locator('.lm-MenuBar-itemLabel', { hasText: /^File$/ }).click();
        await page.locator('.lm-Menu-item[data-type="submenu"]', { hasText: /^\s*New\s*$/ }).first().hover();
        await page.locator('.lm-Menu-item[data-command="notebook:create-new"]').click();
      }
      await waitFor(notebook, { timeout: T.kernel, what: 'the new notebook' });
      // JupyterLab may ask for the kernel ("Select Kernel"), e.g. for File > New > Notebook.
      const named = notebook.locator('.jp-KernelName', { hasText: exactText(opts.kernel) });
      const deadline = Date.now() + T.kernel;
      for (;;) {
        await waitFor(named.or(kernelDialog), {
          timeout: Math.max(1, deadline - Date.now()), what: `the notebook's kernel to be "${opts.kernel}"`,
        });
        if (!(await answerKernelDialog())) break;
      }
    });

    await run('wait for the kernel to be idle', async () => {
      // The status bar (which follows the active notebook, the only one here since the workspace
      // was reset) says "<kernel> | Idle" once JupyterLab has connected to the started kernel.
      // The toolbar's execution indicator alone is not enough: it says idle before there is a kernel.
      await waitFor(statusIdle, { timeout: T.kernel, what: `the status bar to say "${opts.kernel} | Idle"` });
      await waitFor(notebook.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]'), {
        timeout: T.kernel, what: "the notebook toolbar's kernel indicator to say idle",
      });
      const name = (await notebook.locator('.jp-KernelName').first().innerText()).trim();
      if (name !== opts.kernel) throw new StepError(`the notebook's kernel is "${name}", not "${opts.kernel}"`);
      log(`kernel "${name}" is idle`);
      await screenshot('notebook');
    });

    if (opts.widgets) await runWidgets();
    else await run('print(6*7)', async () => {
      const cell = await runCell(0, 'print(6*7)', 'first');
      const out = cell.locator('.jp-OutputArea-output').filter({ hasText: /^\s*42\s*$/ });
      await waitFor(out, { timeout: T.print, what: 'the output 42', cell });
      await waitFor(cell.locator('.jp-InputPrompt').filter({ hasText: /\[\d+\]/ }), {
        timeout: T.print, what: 'an execution count on the first cell', cell,
      });
      await screenshot('print');
    });

    if (!opts.widgets) await run('pandas DataFrame and matplotlib plot', async () => {
      const code = [
        'import pandas as pd, matplotlib.pyplot as plt',
        "df = pd.DataFrame({'month': ['Jan', 'Feb', 'Mar'], 'revenue': [120, 135, 160]})",
        "df.plot(x='month', y='revenue', kind='bar')",
        'df',
      ].join('\n');
      const cell = await runCell(1, code, 'second');
      const table = cell.locator('.jp-RenderedHTMLCommon table');
      await waitFor(table, { timeout: T.plot, what: 'the DataFrame as an HTML table', cell });
      const text = await table.first().innerText();
      for (const want of ['month', 'revenue', 'Jan', 'Mar', '160']) {
        if (!text.includes(want)) throw new StepError(`the table lacks "${want}": ${JSON.stringify(text)}`);
      }
      const img = cell.locator('img[src^="data:image/png"]');
      await waitFor(img, { timeout: T.plot, what: 'the inline matplotlib PNG', cell });
      const size = await img.first().evaluate((el) => (el.complete ? [el.naturalWidth, el.naturalHeight] : [0, 0]));
      if (!(size[0] > 50 && size[1] > 50)) throw new StepError(`the PNG did not decode to a picture (size ${size})`);
      log(`table ${JSON.stringify(text.replace(/\s+/g, ' '))}, PNG ${size[0]}x${size[1]}`);
      await img.first().scrollIntoViewIfNeeded();
      await screenshot('dataframe-plot');
    });

    await run('kernel idle after the run', async () => {
      await waitFor(statusIdle, { timeout: T.print, what: 'the kernel to be idle again' });
    });
  }
} catch (e) {
  failed = e;
}

clearTimeout(overall);
if (failed) {
  const message = failed instanceof StepError ? failed.message : (failed.stack || String(failed));
  console.error(`lab.mjs: FAILED at step "${step}" after ${elapsed()}: ${message}`);
  if (diagnostics.length) console.error(`what the page reported:\n  ${diagnostics.join('\n  ')}`);
  await screenshot('failure');
} else {
  log('all steps passed');
}
await context.close().catch(() => {});
fs.rmSync(userDataDir, { recursive: true, force: true });
process.exit(failed ? 1 : 0);
