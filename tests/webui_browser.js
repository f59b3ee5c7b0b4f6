// The LoHa cards page and tab of a running WebUI, in headless Chromium (playwright-core).
//   NODE_PATH=<node_modules with playwright-core> node webui_browser.js URL SCREENSHOT_DIR
// Prints one JSON line: the prompt after clicking the "test" card, the card's metadata
// popup text, the LoHa tab's sub-tabs and the Inspect report of test.safetensors.
const { chromium } = require("playwright-core");
const path = require("path");
const os = require("os");
const fs = require("fs");

async function main() {
  const [url, shots] = process.argv.slice(2);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "loha-chromium-"));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--no-first-run", "--disable-sync"],
  });
  const page = browser.pages()[0] || (await browser.newPage());
  page.setDefaultTimeout(Number(process.env.LOHA_BROWSER_TIMEOUT_MS || 180000));
  await page.goto(url);
  const prompt = page.locator("#txt2img_prompt textarea");
  await prompt.waitFor();

  // Cards: the "LoHa" extra-networks page under txt2img.
  await page.locator("#txt2img_extra_tabs button", { hasText: /^\s*LoHa\s*$/ }).click();
  const card = page.locator('#txt2img_loha_cards .card[data-name="test"]');
  await card.waitFor();
  await page.screenshot({ path: path.join(shots, "loha-cards.png") });
  await card.locator(".name").click();
  const promptText = await prompt.inputValue();

  await card.hover();
  await card.locator(".metadata-button").click();
  const popup = page.locator(".global-popup-inner");
  await popup.waitFor();
  const metadata = await popup.innerText();
  await page.screenshot({ path: path.join(shots, "loha-card-metadata.png") });
  await page.keyboard.press("Escape");
  await page.locator(".global-popup-close").click().catch(() => {});

  // The "LoHa" tab: its sub-tabs, and an Inspect run.
  await page.locator("#tabs > .tab-nav button", { hasText: /^\s*LoHa\s*$/ }).click();
  const root = page.locator("#tab_loha");
  const tabs = (await root.locator(".tab-nav button").allInnerTexts()).map((t) => t.trim());
  await root.locator(".tab-nav button", { hasText: "Inspect" }).click();
  const network = root.locator("input.border-none:visible, input[role='listbox']:visible").first();
  await network.click();
  await network.fill("test.safetensors");
  await network.press("Enter");
  await root.locator("button", { hasText: /^\s*Inspect\s*$/ }).last().click();
  // The report is a gr.Code (monospace): a CodeMirror editor, its text in .cm-content.
  const report = root.locator("#loha-inspect-report .cm-content");
  await page.waitForFunction((el) => el.innerText.includes("SD 1.x") || el.innerText.startsWith("Error"),
                             await report.elementHandle());
  const inspect = await report.innerText();
  await page.screenshot({ path: path.join(shots, "loha-tab-inspect.png") });
  await root.locator(".tab-nav button", { hasText: "Merge" }).click();
  await page.screenshot({ path: path.join(shots, "loha-tab-merge.png") });

  await browser.close();
  console.log(JSON.stringify({ prompt: promptText, metadata, tabs, inspect }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
