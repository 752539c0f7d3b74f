#!/usr/bin/env node
// Drives JupyterLab, running in gateway mode against a Sandgate gateway, in headless Chromium:
// creates a notebook on the "Python 3 (Sandgate sandbox)" kernel, runs `print(6*7)` and waits
// for 42, then builds a pandas DataFrame and a matplotlib bar chart and waits for the HTML table
// and the inline PNG. A screenshot is saved after every step (and on failure) to
// tests/artifacts/browser-*.png.
//
// Usage: node lab.mjs [--artifacts DIR] [--kernel-display-name NAME] URL
//   URL: JupyterLab's address with its token, e.g. http://127.0.0.1:8889/lab?token=abc
//        (or the environment variable LAB_URL).
// Environment: CHROMIUM (default /usr/bin/chromium), ARTIFACTS_DIR, SANDGATE_KERNEL_DISPLAY_NAME,
//   LAB_TIMEOUT_SCALE (multiplies every timeout; default 1).
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
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--artifacts') opts.artifacts = argv[++i];
    else if (a === '--kernel-display-name') opts.kernel = argv[++i];
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
if (opts.help || !opts.url) {
  console.error('usage: node lab.mjs [--artifacts DIR] [--kernel-display-name NAME] URL-WITH-TOKEN (or LAB_URL)');
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
page.on('websocket', (ws) => {
  const url = ws.url().replace(/token=[^&]+/, 'token=…');
  note(`websocket opened: ${url}`);
  ws.on('close', () => note(`websocket closed: ${url}`));
  ws.on('socketerror', (e) => note(`websocket error: ${url}: ${e}`));
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

// Fails at once when the page shows an error dialog, a kernel error, or an error output,
// instead of waiting for the full timeout.
async function waitFor(locator, { timeout, what, cell }) {
  const failures = [page.locator('.jp-Dialog').filter({ hasText: /error|failed|could not|unable/i })];
  if (cell) {
    failures.push(cell.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'));
    failures.push(cell.locator('.jp-OutputArea-output').filter({ hasText: /Traceback|Error:/ }));
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
async function answerKernelDialog() {
  const dialog = page.locator('.jp-Dialog').filter({ has: page.locator('select') });
  if (!(await dialog.first().isVisible())) return false;
  log('a kernel selection dialog is open: choosing the Sandgate kernel');
  const select = dialog.first().locator('select').first();
  await select.selectOption({ label: opts.kernel });
  await dialog.first().locator('.jp-Dialog-button.jp-mod-accept').click();
  await dialog.first().waitFor({ state: 'hidden' });
  return true;
}

const notebook = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden)').first();
const cells = notebook.locator('.jp-Notebook .jp-Cell');

async function runCell(index, code, what) {
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
  await page.keyboard.press('Shift+Enter');
  return cell;
}

let failed = null;
try {
  await run('open JupyterLab', async () => {
    await page.goto(opts.url, { waitUntil: 'domcontentloaded', timeout: T.load });
    await waitFor(page.locator('#jp-main-dock-panel'), { timeout: T.load, what: "JupyterLab's main area" });
    await screenshot('lab');
  });

  await run(`create a notebook on "${opts.kernel}"`, async () => {
    const card = page.locator('.jp-Launcher .jp-LauncherCard[data-category="Notebook"]')
      .filter({ has: page.locator('.jp-LauncherCard-label', { hasText: opts.kernel }) });
    let viaLauncher = true;
    try {
      await card.first().waitFor({ state: 'visible', timeout: T.load });
    } catch {
      viaLauncher = false;
      const shown = await page.locator('.jp-LauncherCard[data-category="Notebook"]').allInnerTexts();
      log(`no Launcher card for "${opts.kernel}" (notebook cards: ${JSON.stringify(shown)}); using File > New > Notebook`);
    }
    if (viaLauncher) {
      await card.first().click();
    } else {
      await page.locator('.lm-MenuBar-itemLabel', { hasText: /^File$/ }).click();
      await page.locator('.lm-Menu-item', { hasText: /^New/ }).first().hover();
      await page.locator('.lm-Menu-item[data-command="notebook:create-new"]').click();
    }
    // Either the notebook comes up or JupyterLab asks for a kernel first.
    const kernelDialog = page.locator('.jp-Dialog').filter({ has: page.locator('select') });
    await waitFor(notebook.or(kernelDialog), { timeout: T.kernel, what: 'the new notebook' });
    await answerKernelDialog();
    await notebook.waitFor({ state: 'visible', timeout: T.kernel });
  });

  await run('wait for the kernel to be idle', async () => {
    // A dialog can also appear after the panel (e.g. once the kernelspecs arrive).
    const kernelName = notebook.locator('.jp-KernelName');
    const idle = notebook.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]');
    const deadline = Date.now() + T.kernel;
    for (;;) {
      const kernelDialog = page.locator('.jp-Dialog').filter({ has: page.locator('select') });
      await waitFor(idle.or(kernelDialog), { timeout: Math.max(1, deadline - Date.now()), what: 'the kernel to become idle' });
      if (!(await answerKernelDialog())) break;
    }
    const name = (await kernelName.first().innerText()).trim();
    if (name !== opts.kernel) throw new StepError(`the notebook's kernel is "${name}", not "${opts.kernel}"`);
    log(`kernel "${name}" is idle`);
    await screenshot('notebook');
  });

  await run('print(6*7)', async () => {
    const cell = await runCell(0, 'print(6*7)', 'first');
    const out = cell.locator('.jp-OutputArea-output').filter({ hasText: /^\s*42\s*$/ });
    await waitFor(out, { timeout: T.print, what: 'the output 42', cell });
    await waitFor(cell.locator('.jp-InputPrompt').filter({ hasText: /\[\d+\]/ }), {
      timeout: T.print, what: 'an execution count on the first cell', cell,
    });
    await screenshot('print');
  });

  await run('pandas DataFrame and matplotlib plot', async () => {
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
    await waitFor(notebook.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]'), {
      timeout: T.print, what: 'the kernel to be idle again',
    });
  });
} catch (e) {
  failed = e;
}

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
