// Drives the dashboard in headless Chromium like a person with a wallet would:
// sign in (a real EIP-191 signature by the wallet's key), send a prompt with Enter,
// watch tokens stream in, read the summary, wait for the deposit to go down, and take
// screenshots. Prints one JSON line with what it saw; cli/tests/web_e2e.rs asserts on it.
//
// Environment: WEB_URL, WALLET_KEY (0x private key), PROMPT, MAX_TOKENS, SEED,
// SCREENSHOT_DIR, CHROMIUM (default /usr/bin/chromium).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { Wallet, getBytes } from "ethers";

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const url = env("WEB_URL");
const wallet = new Wallet(env("WALLET_KEY"));
const prompt = env("PROMPT");
const shots = env("SCREENSHOT_DIR");
const deadline = (ms) => ({ timeout: ms });

const profile = mkdtempSync(join(tmpdir(), "unfed-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = { address: wallet.address };
try {
  // An EIP-1193 wallet whose personal_sign is this Node process signing with the key.
  await browser.exposeBinding("__unfedSign", async (_src, hexMessage) => wallet.signMessage(getBytes(hexMessage)));
  await browser.addInitScript((address) => {
    window.ethereum = {
      isTestWallet: true,
      request: async ({ method, params }) => {
        if (method === "eth_requestAccounts" || method === "eth_accounts") return [address];
        if (method === "personal_sign") return window.__unfedSign(params[0]);
        throw new Error("unsupported wallet method " + method);
      },
    };
  }, wallet.address);
  const page = browser.pages()[0] ?? (await browser.newPage());
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => document.querySelector("#model-line").textContent.includes("READY"), null, deadline(30000));

  await page.click("#sign-in");
  await page.waitForFunction((a) => document.querySelector("#wallet-address").textContent.toLowerCase() === a.toLowerCase(),
    wallet.address, deadline(15000));
  result.signed_in_as = await page.textContent("#wallet-address");
  await page.waitForFunction(() => document.querySelector("#wallet-balance").dataset.depositWei, null, deadline(15000));
  result.deposit_before = await page.$eval("#wallet-balance", (e) => e.dataset.depositWei);

  await page.click("#settings summary");
  await page.fill("#max-tokens", env("MAX_TOKENS"));
  await page.fill("#seed", env("SEED"));
  // Count how often the answer grows: streamed tokens arrive one by one.
  await page.evaluate(() => {
    window.__updates = 0;
    new MutationObserver(() => { window.__updates += 1; })
      .observe(document.querySelector("#transcript"), { subtree: true, characterData: true, childList: true });
  });
  await page.fill("#prompt", prompt);
  await page.press("#prompt", "Enter");
  await page.waitForFunction(() => document.querySelector("#summary").dataset.costWei, null, deadline(60000));
  result.updates = await page.evaluate(() => window.__updates);
  result.streamed_text = await page.$eval("#transcript .turn.assistant:last-child", (e) => e.textContent);
  result.summary_text = await page.$eval("#summary", (e) => e.dataset.text);
  result.summary = await page.textContent("#summary");
  result.cost_wei = await page.$eval("#summary", (e) => e.dataset.costWei);
  await page.screenshot({ path: join(shots, "chat-1280x800.png") });

  // The deposit goes down once the daemon settles the chat's blocks on-chain.
  await page.waitForFunction((before) => {
    const now = document.querySelector("#wallet-balance").dataset.depositWei;
    return now && BigInt(now) < BigInt(before);
  }, result.deposit_before, deadline(90000));
  result.deposit_after = await page.$eval("#wallet-balance", (e) => e.dataset.depositWei);

  // Stop: a long generation ends early on the button, and says so.
  await page.fill("#max-tokens", "1000");
  await page.fill("#prompt", prompt);
  await page.press("#prompt", "Enter");
  await page.waitForFunction(() => {
    const turns = document.querySelectorAll("#transcript .turn.assistant");
    return turns.length === 2 && turns[1].textContent.length > 0;
  }, null, deadline(30000));
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelector("#summary").dataset.costWei, null, deadline(60000));
  result.stopped = await page.$eval("#summary", (e) => e.dataset.stopped === "true");
  result.stopped_tokens = Number(await page.$eval("#summary", (e) => e.dataset.tokens));

  // The other views render real data, and the page works in a narrow window.
  await page.click("nav button[data-view=network]");
  await page.waitForSelector("#nodes-table tbody tr", deadline(15000));
  result.network_rows = await page.$$eval("#nodes-table tbody tr", (r) => r.length);
  result.route = await page.$$eval("#route li", (l) => l.map((x) => x.textContent));
  await page.click("nav button[data-view=chain]");
  await page.waitForSelector("#blocks-table tbody tr", deadline(15000));
  result.block_rows = await page.$$eval("#blocks-table tbody tr", (r) => r.length);
  await page.screenshot({ path: join(shots, "chain-1280x800.png") });
  await page.setViewportSize({ width: 400, height: 800 });
  await page.click("nav button[data-view=chat]");
  await page.screenshot({ path: join(shots, "chat-400x800.png"), fullPage: true });
  result.console_errors = consoleErrors;
} catch (e) {
  result.error = String(e && e.stack || e);
  const page = browser.pages()[0];
  if (page) {
    result.messages = await page.textContent("#messages").catch(() => null);
    await page.screenshot({ path: join(shots, "failure.png") }).catch(() => {});
  }
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(result.error ? 1 : 0);
