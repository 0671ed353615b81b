// End-to-end tests of the reference page (/demo) in Debian's Chromium,
// driven by playwright-core. Started by scripts/browser-test.sh, which runs
// the server and passes its address and settings in the environment.
import { chromium } from "playwright-core";
import { execFile } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);
const BASE = process.env.HOLDFAST_BASE_URL;
const BIN = process.env.HOLDFAST_BIN;
const ACCOUNT = process.env.HOLDFAST_DEMO_ACCOUNT || "demo-studio";
const SHOTS = process.env.HOLDFAST_SCREENSHOTS;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// The server's admin token: the test reads the ledger with it, and the
// breakdown test adds grants of several sources.
const ADMIN_TOKEN = process.env.HOLDFAST_ADMIN_TOKEN;
// What the page gets: producer keys limited to the demo account, and to the
// account of the breakdown test.
const DEMO_KEY = process.env.HOLDFAST_DEMO_KEY;
const GRANTS_KEY = process.env.HOLDFAST_GRANTS_KEY;
const TEAM_KEY = process.env.HOLDFAST_TEAM_KEY;
// A key for an account that does not exist yet (`<demo account>-new`).
const NEW_KEY = process.env.HOLDFAST_NEW_KEY;
if (!BASE || !BIN || !SHOTS || !ADMIN_TOKEN || !DEMO_KEY || !GRANTS_KEY || !TEAM_KEY || !NEW_KEY) {
  console.error("set HOLDFAST_BASE_URL, HOLDFAST_BIN, HOLDFAST_SCREENSHOTS, HOLDFAST_ADMIN_TOKEN, HOLDFAST_DEMO_KEY, HOLDFAST_GRANTS_KEY, HOLDFAST_TEAM_KEY and HOLDFAST_NEW_KEY");
  process.exit(2);
}

function check(cond, what) {
  if (!cond) throw new Error(`expected ${what}`);
}
function eq(actual, expected, what) {
  if (actual !== expected) {
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

async function getJson(path) {
  const res = await fetch(`${BASE}${path}`, { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } });
  if (!res.ok) throw new Error(`GET ${path}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

// POST /v1/accounts/{id}/grants with the admin token (creating the account).
async function adminGrant(account, grant) {
  const path = `/v1/accounts/${encodeURIComponent(account)}/grants`;
  const res = await fetch(`${BASE}${path}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify({ create: true, ...grant }),
  });
  if (!res.ok) throw new Error(`POST ${path}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

// PUT /v1/accounts/{id}/spenders/{spender_id} with the admin token.
async function adminSpender(account, spender, body) {
  const path = `/v1/accounts/${encodeURIComponent(account)}/spenders/${encodeURIComponent(spender)}`;
  const res = await fetch(`${BASE}${path}`, {
    method: "PUT",
    headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!res.ok) throw new Error(`PUT ${path}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

async function audit() {
  try {
    await run(BIN, ["audit"], { env: process.env });
  } catch (err) {
    throw new Error(`holdfast audit exited ${err.code}: ${err.stdout}${err.stderr}`);
  }
}

// The ledger after a flow: the account and the batch the page ran, exactly.
async function checkLedger(batchId, want) {
  const b = await getJson(`/v1/batches/${encodeURIComponent(batchId)}`);
  eq(b.state, "completed", "batch state");
  eq(b.mode, want.mode, "batch mode");
  for (const k of ["run", "succeeded", "failed", "skipped", "reserved", "captured", "released", "overrun"]) {
    eq(b.figures[k], want[k], `batch ${k}`);
  }
  const a = await getJson(`/v1/accounts/${encodeURIComponent(ACCOUNT)}`);
  eq(a.balance, want.balance, "account balance");
  eq(a.held, 0, "account held");
  eq(a.available, want.balance, "account available");
  await audit();
}


async function waitForPreview(page, text) {
  await page.locator("#preview-line").filter({ hasText: text }).waitFor({ timeout: 10_000 });
}

// The breakdown under the preview line, as shown: one entry per line, and
// the list found by its accessible name (its label), inside the live region.
async function breakdown(page, label) {
  const list = page.locator("#preview[aria-live=polite]").getByRole("list", { name: label, exact: true });
  await list.waitFor({ timeout: 10_000 });
  return list.locator("li").evaluateAll((lis) => lis.map((li) => ({
    grant: li.dataset.grantId,
    source: li.dataset.source,
    text: li.textContent.replace(/\s+/g, " ").trim(),
    expires: li.querySelector("time") ? li.querySelector("time").dateTime : null,
  })));
}

// A day as the page (and the server's sentences) write expiry dates, in UTC:
// "1 January 2027".
const MONTHS = ["January", "February", "March", "April", "May", "June", "July",
  "August", "September", "October", "November", "December"];
function day(iso) {
  const t = new Date(iso);
  return `${t.getUTCDate()} ${MONTHS[t.getUTCMonth()]} ${t.getUTCFullYear()}`;
}

function eqJson(actual, expected, what) {
  eq(JSON.stringify(actual), JSON.stringify(expected), what);
}

// The summary of a batch other than the last one seen: the page's next batch.
let lastBatchId = null;
async function finishedBatch(page) {
  await page.waitForFunction((last) => {
    const s = document.getElementById("summary");
    return !s.hidden && s.dataset.batchId && s.dataset.batchId !== last;
  }, lastBatchId, { timeout: 30_000 });
  await page.locator("#generate-all:enabled").waitFor({ timeout: 10_000 });
  lastBatchId = await page.locator("#summary").getAttribute("data-batch-id");
  return lastBatchId;
}

async function summaryFigures(page) {
  const t = async (id) => (await page.locator(id).textContent()).trim();
  return {
    generated: await t("#sum-generated"),
    failed: await t("#sum-failed"),
    charged: await t("#sum-charged"),
    released: await t("#sum-released"),
  };
}

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

// Credits at the start: 197. The flows run in order on the same account.
// Photos 3, 6 and 9 cost 2 credits less than estimated (the page's simulate
// payload), so a batch releases 2 credits for each of them that ran.
test("the key from the address is used, and kept out of the address bar", async (page) => {
  await waitForPreview(page, "This action will cost ~120 credits. You have 197 credits.");
  eq(page.url(), `${BASE}/demo`, "address after loading");
  eq(await page.locator("#api-key").inputValue(), DEMO_KEY, "the key field");
  eq(await page.locator("#api-key").getAttribute("type"), "password", "the key is masked");
  // Without a key the page asks for one, and nothing can be started.
  await page.locator("#api-key").fill("");
  await page.locator("#preview").filter({ hasText: "Enter an API key for this account." }).waitFor({ timeout: 10_000 });
  check(await page.locator("#generate-all").isDisabled(), "Generate All disabled without a key");
  // A wrong key is refused by the server.
  await page.locator("#api-key").fill("hf_live_aaaaaaaaaaaa_0000000000000000000000000000000000000000");
  await page.locator("#preview").filter({ hasText: "not a valid API key" }).waitFor({ timeout: 10_000 });
  await page.locator("#api-key").fill(DEMO_KEY);
  await page.locator("#api-key").blur();
  await waitForPreview(page, "This action will cost ~120 credits. You have 197 credits.");
});

test("enough credits: Generate All runs every item to the end", async (page) => {
  await waitForPreview(page, "This action will cost ~120 credits. You have 197 credits.");
  // The account's one grant (a plain manual one, from `holdfast account grant`).
  const lines = await breakdown(page, "The 120 credits come from, in this order:");
  eq(lines.length, 1, "breakdown lines");
  eq(lines[0].source, "manual", "breakdown source");
  eq(lines[0].text, "120 from granted credits", "breakdown line");
  eq(lines[0].expires, null, "breakdown expiry");
  eq(await page.locator("#preview-expiry").count(), 0, "no expiry notice");
  await page.screenshot({ path: join(SHOTS, "preview.png") });
  // Keyboard: the button is reachable and activates with Enter.
  await page.locator("#generate-all").focus();
  await page.keyboard.press("Enter");
  await page.locator("#progress-block").waitFor({ state: "visible" });
  await page.waitForFunction(() => {
    const p = document.getElementById("progress");
    return p.value >= 2 && p.value < p.max;
  }, null, { timeout: 20_000 });
  await page.screenshot({ path: join(SHOTS, "progress.png") });
  const batchId = await finishedBatch(page);
  check(batchId, "a batch id on the summary");
  eq(await page.locator("#progress").evaluate((p) => [p.value, p.max].join("/")), "10/10", "progress bar");
  const s = await summaryFigures(page);
  eq(s.generated, "10", "summary generated");
  eq(s.failed, "0", "summary failed");
  eq(s.charged, "114 credits", "summary charged");
  eq(s.released, "6 credits", "summary released");
  await waitForPreview(page, "You have 83 credits.");
  await page.screenshot({ path: join(SHOTS, "summary.png") });
  await checkLedger(batchId, {
    mode: "all_or_nothing", run: 10, succeeded: 10, failed: 0, skipped: 0,
    reserved: 120, captured: 114, released: 6, overrun: 0, balance: 83,
  });
});

test("not enough: nothing starts; Generate first 6 runs exactly 6", async (page) => {
  await waitForPreview(page, "This action will cost ~120 credits. You have 83 credits.");
  const before = await getJson(`/v1/accounts/${encodeURIComponent(ACCOUNT)}`);
  await page.locator("#generate-all").click();
  const dialog = page.locator("dialog#short");
  await dialog.waitFor({ state: "visible" });
  eq((await page.locator("#short-message").textContent()).trim(),
    "You have enough credits to generate 6 out of 10 items.", "dialog message");
  // Nothing was held and nothing started.
  const during = await getJson(`/v1/accounts/${encodeURIComponent(ACCOUNT)}`);
  eq(during.held, 0, "held while the dialog is open");
  eq(during.balance, before.balance, "balance while the dialog is open");
  // Focus is inside the dialog, on the first choice.
  eq(await page.evaluate(() => document.activeElement.id), "choose-first-fit", "focused choice");
  const first = page.locator("#choose-first-fit");
  check((await first.textContent()).startsWith("Generate first 6"), "a Generate first 6 button");
  await page.screenshot({ path: join(SHOTS, "insufficient-dialog.png") });
  await first.click();
  await dialog.waitFor({ state: "hidden" });
  const batchId = await finishedBatch(page);
  const s = await summaryFigures(page);
  eq(s.generated, "6", "summary generated");
  eq(s.charged, "68 credits", "summary charged");
  eq(s.released, "4 credits", "summary released");
  eq(await page.locator("td.status[data-state=succeeded]").count(), 6, "items done");
  eq(await page.locator("td.status[data-state=skipped]").count(), 4, "items not run");
  await checkLedger(batchId, {
    mode: "first_fit", run: 6, succeeded: 6, failed: 0, skipped: 4,
    reserved: 72, captured: 68, released: 4, overrun: 0, balance: 15,
  });
});

test("not enough: select items manually runs exactly the selection", async (page) => {
  // An edited cost: photo 7 now costs 5.
  await page.locator("#cost-photo-07").fill("5");
  await waitForPreview(page, "This action will cost ~113 credits. You have 15 credits.");
  await page.locator("#generate-all").click();
  await page.locator("dialog#short").waitFor({ state: "visible" });
  eq((await page.locator("#short-message").textContent()).trim(),
    "You have enough credits to generate 1 out of 10 items.", "dialog message");
  await page.locator("#choose-select").click();
  const submit = page.locator("#select-submit");
  check(await submit.isDisabled(), "submit disabled with nothing selected");
  await page.locator("#select-photo-03").check();
  await page.locator("#select-photo-07").check();
  check(await submit.isDisabled(), "submit disabled when over the available credits");
  check((await page.locator("#select-total").textContent()).includes("more than"), "over-budget note");
  await page.screenshot({ path: join(SHOTS, "select-items.png") });
  await page.locator("#select-photo-03").uncheck();
  check(await submit.isEnabled(), "submit enabled within the available credits");
  await submit.click();
  const batchId = await finishedBatch(page);
  eq((await page.locator("#sum-generated").textContent()).trim(), "1", "summary generated");
  eq((await page.locator("#sum-charged").textContent()).trim(), "5 credits", "summary charged");
  eq(await page.locator("#status-photo-07").getAttribute("data-state"), "succeeded", "photo-07 ran");
  await checkLedger(batchId, {
    mode: "selected", run: 1, succeeded: 1, failed: 0, skipped: 9,
    reserved: 5, captured: 5, released: 0, overrun: 0, balance: 10,
  });
  await page.locator("#cost-photo-07").fill("12");
});

test("not enough: add credits grants the shortfall, then runs everything", async (page) => {
  await waitForPreview(page, "This action will cost ~120 credits. You have 10 credits.");
  await page.locator("#generate-all").click();
  await page.locator("dialog#short").waitFor({ state: "visible" });
  const add = page.locator("#choose-add-credits");
  eq((await add.textContent()).trim(), "Add 110 credits", "add credits label");
  await add.click();
  const batchId = await finishedBatch(page);
  eq((await page.locator("#sum-generated").textContent()).trim(), "10", "summary generated");
  await checkLedger(batchId, {
    mode: "all_or_nothing", run: 10, succeeded: 10, failed: 0, skipped: 0,
    reserved: 120, captured: 114, released: 6, overrun: 0, balance: 6,
  });
});

test("breakdown: each grant the batch draws from, with its source and expiry", async (page) => {
  // Another account, with two grants of different sources: a plan allowance
  // that expires in 20 minutes (before a batch's deadline, an hour by
  // default) and a top-up that never expires. Burn-down order: the plan
  // allowance first (it expires sooner), then the top-up.
  const account = `${ACCOUNT}-grants`;
  const planExpiry = new Date(Math.floor(Date.now() / 1000) * 1000 + 20 * 60_000).toISOString();
  await adminGrant(account, { grant_id: "plan-browser", source: "plan", amount: 80, expires_at: planExpiry });
  await adminGrant(account, { grant_id: "topup-browser", source: "purchase", amount: 100 });
  // The demo account's key may not use this account: the page says so.
  await page.locator("#account").fill(account);
  await page.locator("#preview").filter({ hasText: `this API key may not use account \`${account}\`` })
    .waitFor({ timeout: 10_000 });
  check(await page.locator("#generate-all").isDisabled(), "Generate All disabled for another account");
  // With a key of that account it works.
  await page.locator("#api-key").fill(GRANTS_KEY);
  await waitForPreview(page, "This action will cost ~120 credits. You have 180 credits.");
  const planDay = day(planExpiry);
  let lines = await breakdown(page, "The 120 credits come from, in this order:");
  eqJson(lines.map((l) => [l.grant, l.source, l.text]), [
    ["plan-browser", "plan", `80 from your plan allowance (resets on ${planDay})`],
    ["topup-browser", "purchase", "40 from top-ups"],
  ], "breakdown lines");
  eq(new Date(lines[0].expires).getTime(), new Date(planExpiry).getTime(), "plan expiry <time datetime>");
  eq(lines[1].expires, null, "the top-up has no expiry");
  const notice = (await page.locator("#preview[aria-live=polite] #preview-expiry").textContent()).trim();
  check(notice.startsWith("80 of these credits expire on ") && notice.includes("before this batch's deadline"),
    `the expiry notice, got ${JSON.stringify(notice)}`);
  // Short: the breakdown is what the first items that fit would use.
  await page.locator("#cost-photo-01").fill("80");
  await waitForPreview(page, "This action will cost ~188 credits. You have 180 credits.");
  lines = await breakdown(page, "Generating the first 9 would use 176 credits, in this order:");
  eqJson(lines.map((l) => [l.grant, l.text]), [
    ["plan-browser", `80 from your plan allowance (resets on ${planDay})`],
    ["topup-browser", "96 from top-ups"],
  ], "breakdown lines when short");
  // Back to the demo account, its key and its prices.
  await page.locator("#cost-photo-01").fill("12");
  await page.locator("#account").fill(ACCOUNT);
  await page.locator("#api-key").fill(DEMO_KEY);
  await waitForPreview(page, "This action will cost ~120 credits. You have 6 credits.");
  eq(await page.locator("#preview-expiry").count(), 0, "no expiry notice for the demo account");
  await audit();
});

test("spender: a member limited by the team's limit sees the team, not the account", async (page) => {
  // A workspace with plenty of credits; its team `design` may use 100 a
  // month, its member `ann` 300: for Ann's 120-credit batch the team binds.
  const account = `${ACCOUNT}-team`;
  await adminGrant(account, { amount: 1000 });
  await adminSpender(account, "design", { kind: "team", limit: 100, period: "month" });
  await adminSpender(account, "ann", { parent: "design", kind: "member", limit: 300, period: "month" });
  await page.locator("#account").fill(account);
  await page.locator("#api-key").fill(TEAM_KEY);
  await page.locator("#spender").fill("ann");
  await waitForPreview(page, "This action will cost ~120 credits. You have 100 credits.");
  const advice = (await page.locator("#preview-advice").textContent()).trim();
  check(advice.startsWith("Your team 'design' has 100 of its 100 monthly credits left: enough for 8 of 10 items. It resets on "),
    `the team's sentence under the preview, got ${JSON.stringify(advice)}`);
  await page.locator("#generate-all").click();
  const dialog = page.locator("dialog#short");
  await dialog.waitFor({ state: "visible" });
  eq((await page.locator("#short-title").textContent()).trim(),
    "Limited by your team 'design': nothing was started", "dialog title");
  check((await page.locator("#short-message").textContent()).startsWith("Your team 'design' has 100 of its 100 monthly credits left"),
    "the team's sentence in the dialog");
  eq(await page.locator("#choose-add-credits").isVisible(), false, "no Add credits when the team binds");
  const raise = page.locator("#choose-raise-limit");
  eq(await raise.isVisible(), true, "the raise-limit option");
  eq((await raise.textContent()).trim(), "Ask an admin to raise the limit of team 'design' by 20 credits", "raise-limit label");
  await page.screenshot({ path: join(SHOTS, "limited-by-team-dialog.png") });
  await page.locator("#choose-cancel").click();
  await dialog.waitFor({ state: "hidden" });
  // Nothing was held, at any level.
  const a = await getJson(`/v1/accounts/${encodeURIComponent(account)}`);
  eq(a.held, 0, "account held");
  await page.locator("#spender").fill("");
  await page.locator("#account").fill(ACCOUNT);
  await page.locator("#api-key").fill(DEMO_KEY);
  await waitForPreview(page, "This action will cost ~120 credits. You have 6 credits.");
  await audit();
});

test("unknown account: one message says how to create it; in demo mode a button does", async (page) => {
  const account = `${ACCOUNT}-new`;
  const res = await fetch(`${BASE}/v1/accounts/${encodeURIComponent(account)}`,
    { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } });
  eq(res.status, 404, "the account does not exist before the test");
  await page.locator("#account").fill(account);
  await page.locator("#api-key").fill(NEW_KEY);
  const missing = page.locator("#preview[aria-live=polite] #missing-account");
  await missing.waitFor({ timeout: 10_000 });
  const text = (await missing.textContent()).replace(/\s+/g, " ").trim();
  check(text.startsWith(`Account “${account}” does not exist yet.`), `the message, got ${JSON.stringify(text)}`);
  check(text.includes(`holdfast account grant ${account} 200 --create`), `the command, got ${JSON.stringify(text)}`);
  check(text.includes(`POST /v1/accounts/${account}/grants`), `the admin call, got ${JSON.stringify(text)}`);
  // Said once, in words a person can act on: not again in the balance line,
  // and not the raw "unknown account".
  await page.waitForTimeout(300);
  const main = (await page.locator("main").textContent()).replace(/\s+/g, " ");
  eq(main.split("does not exist").length - 1, 1, "times the page says the account does not exist");
  check(!main.toLowerCase().includes("unknown account"), `no raw "unknown account" on the page: ${main}`);
  check(await page.locator("#generate-all").isDisabled(), "Generate All disabled until the account exists");
  // Demo mode (HOLDFAST_DEMO_GRANTS=1): the page offers to create it.
  const create = page.locator("#create-account");
  eq((await create.textContent()).trim(), `Create “${account}” with 200 credits`, "the button");
  await page.screenshot({ path: join(SHOTS, "unknown-account.png") });
  await create.click();
  await waitForPreview(page, "This action will cost ~120 credits. You have 200 credits.");
  check(await page.locator("#generate-all").isEnabled(), "Generate All enabled once it exists");
  const a = await getJson(`/v1/accounts/${encodeURIComponent(account)}`);
  eq(a.balance, 200, "the new account's balance");
  eq(a.held, 0, "the new account's held credits");
  await page.locator("#account").fill(ACCOUNT);
  await page.locator("#api-key").fill(DEMO_KEY);
  await waitForPreview(page, "This action will cost ~120 credits. You have 6 credits.");
  await audit();
});

mkdirSync(SHOTS, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "holdfast-chromium-"));
let passed = 0;
let failed = 0;
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 900, height: 1180 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = context.pages()[0] || (await context.newPage());
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  // The key in the fragment: browsers never send it to the server.
  await page.goto(`${BASE}/demo#key=${encodeURIComponent(DEMO_KEY)}`);
  for (const t of tests) {
    try {
      await t.fn(page);
      if (pageErrors.length) throw new Error(`script errors: ${pageErrors.splice(0).join("; ")}`);
      passed += 1;
      console.log(`ok   ${t.name}`);
    } catch (err) {
      failed += 1;
      console.log(`FAIL ${t.name}\n     ${err.message}`);
      await page.screenshot({ path: join(profile, "..", `holdfast-browser-fail-${failed}.png`) }).catch(() => {});
    }
  }
} catch (err) {
  failed += 1;
  console.log(`FAIL browser setup\n     ${err.message}`);
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed === tests.length ? 0 : 1);
