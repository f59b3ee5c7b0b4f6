// Drives the Train tab in headless Chromium: train on a checkpoint chosen in the base-model
// field, watch the ETA fall and the sample gallery grow, reload the page mid-run and see it
// attach to the running job again, then Stop: the run says where it stopped and its file is there.
// Usage: node train_ui_browser.js URL SCREENSHOT_DIR CHECKPOINT_NAME
// (run by tests/test_train_ui.py; needs playwright-core and Debian's chromium).
const { chromium } = require('playwright-core');
const url = process.argv[2], shots = process.argv[3], checkpoint = process.argv[4];
const progress = () => document.querySelector('.loha-progress')?.dataset || {};
(async () => {
  const browser = await chromium.launch({ executablePath: process.env.LOHA_CHROMIUM || '/usr/bin/chromium',
    headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1600 } });
  globalThis.page = page;
  await page.goto(url, { waitUntil: 'networkidle' });
  const box = (label) => page.locator(`#loha-train-${label} input, #loha-train-${label} textarea`).first();
  const setValue = async (label, value) => { await box(label).fill(String(value)); await box(label).press('Tab'); };
  const model = box('model');
  await model.fill(checkpoint); await model.press('Enter'); await model.press('Tab');
  await setValue('steps', 400);
  await setValue('resolution', 64);
  await setValue('batch_size', 1);
  await setValue('sample_every', 3);
  await setValue('output', 'from-checkpoint');
  await page.click('#loha-train-start');
  const state = async () => page.evaluate(() => ({ ...(document.querySelector('.loha-progress')?.dataset || {}),
    gallery: document.querySelectorAll('#loha-train-gallery img').length,
    text: document.querySelector('.loha-progress')?.innerText || '',
    model: document.querySelector('#loha-train-model input')?.value,
    steps: document.querySelector('#loha-train-steps input')?.value }));
  const waitStep = async (n) => page.waitForFunction((n) => Number(document.querySelector('.loha-progress')
      ?.dataset.step) >= n, n, { timeout: 480000 });
  await waitStep(4);
  await page.waitForFunction(() => document.querySelectorAll('#loha-train-gallery img').length >= 1, null,
                             { timeout: 240000 });
  const first = await state();
  await page.screenshot({ path: shots + '/1-training-from-checkpoint.png', fullPage: true });
  await waitStep(Number(first.step) + 7);
  await page.waitForFunction((n) => document.querySelectorAll('#loha-train-gallery img').length > n,
                             first.gallery, { timeout: 240000 });
  const later = await state();
  await page.screenshot({ path: shots + '/2-eta-and-gallery-moved.png', fullPage: true });
  await page.reload({ waitUntil: 'domcontentloaded' });
  await page.waitForFunction((n) => Number(document.querySelector('.loha-progress')?.dataset.step) > n
      && document.querySelector('.loha-progress')?.dataset.state === 'training', Number(later.step),
      { timeout: 240000 });
  const reattached = await state();
  await page.screenshot({ path: shots + '/3-reloaded-and-reattached.png', fullPage: true });
  await page.click('#loha-train-stop');
  await page.waitForFunction(() => document.querySelector('.loha-progress')?.dataset.state === 'stopped', null,
                             { timeout: 480000 });
  await page.waitForTimeout(1000);
  const stopped = await state();
  stopped.status = await page.locator('#loha-train-status').innerText();
  await page.screenshot({ path: shots + '/4-stopped.png', fullPage: true });
  console.log(JSON.stringify({ first, later, reattached, stopped }));
  await browser.close();
})().catch(async e => { console.error(e); try { await globalThis.page.screenshot({ path: shots + '/error.png', fullPage: true }); } catch (x) {} process.exit(1); });
