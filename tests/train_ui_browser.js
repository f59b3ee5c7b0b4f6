// Drives the Train tab in headless Chromium: a short run shows progress, a moving loss
// plot and samples, and writes its file; a long run stopped after a few steps still
// writes its file. Usage: node train_ui_browser.js URL SCREENSHOT_DIR EXPECTED_FILE
// (run by tests/test_train_ui.py; needs playwright-core and Debian's chromium).
const { chromium } = require('playwright-core');
const fs = require('fs');
const url = process.argv[2], shots = process.argv[3], outFile = process.argv[4];
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--no-first-run', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1300 } });
  globalThis.page = page;
  await page.goto(url, { waitUntil: 'networkidle' });
  const setNumber = async (label, value) => {
    const box = page.locator(`#loha-train-${label} input, #loha-train-${label} textarea`).first();
    await box.fill(String(value)); await box.press('Tab');
  };
  await setNumber('steps', 16);
  await setNumber('resolution', 64);
  await setNumber('sample_every', 6);
  await page.click('#loha-train-start');
  const step = async () => Number(await page.locator('.loha-progress').getAttribute('data-step'));
  await page.waitForSelector('.loha-progress', { timeout: 120000 });
  await page.waitForFunction(() => Number(document.querySelector('.loha-progress')?.dataset.step) >= 3, null, { timeout: 480000 });
  const s1 = await step();
  await page.screenshot({ path: shots + '/1-training.png', fullPage: true });
  await page.waitForFunction(() => Number(document.querySelector('.loha-progress')?.dataset.step) >= 9, null, { timeout: 480000 });
  const s2 = await step();
  await page.screenshot({ path: shots + '/2-later.png', fullPage: true });
  await page.waitForFunction(() => document.querySelector('.loha-progress')?.dataset.state === 'done', null, { timeout: 480000 });
  await page.waitForTimeout(1500);
  await page.screenshot({ path: shots + '/3-done.png', fullPage: true });
  const status = await page.locator('#loha-train-status').innerText();
  const plotMarks = await page.locator('#loha-train-loss canvas, #loha-train-loss svg').count();
  const sampleSrc = await page.locator('#loha-train-sample img').first().getAttribute('src').catch(() => null);
  console.log(JSON.stringify({ s1, s2, status, plotMarks, sampleSrc, fileExists: fs.existsSync(outFile) }));
  // Stop: a long run, stopped after a few steps, still writes its file.
  await setNumber('steps', 100000);
  await setNumber('output', 'stopped.safetensors');
  await page.click('#loha-train-start');
  await page.waitForFunction(() => Number(document.querySelector('.loha-progress')?.dataset.step) >= 3
      && document.querySelector('.loha-progress')?.dataset.total === '100000', null, { timeout: 480000 });
  await page.click('#loha-train-stop');
  await page.waitForFunction(() => document.querySelector('.loha-progress')?.dataset.state === 'done', null, { timeout: 480000 });
  await page.waitForTimeout(1000);
  await page.screenshot({ path: shots + '/4-stopped.png', fullPage: true });
  console.log(JSON.stringify({ stoppedAt: await step(), status: await page.locator('#loha-train-status').innerText() }));
  await browser.close();
})().catch(async e => { console.error(e); try { await globalThis.page.screenshot({ path: shots + '/error.png', fullPage: true }); } catch (x) {} process.exit(1); });
