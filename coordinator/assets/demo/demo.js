// Reference page for Holdfast: preview, Generate All, progress, and the
// choices offered when the credits are short. Plain JavaScript, no build step.
"use strict";

const ITEM_COUNT = 10;
const ITEM_COST = 12;
// The simulate generator's latency per item, staggered so progress is visible.
const LATENCY_MS = 300;
const LATENCY_STEP_MS = 150;
const POLL_MS = 250;
const TERMINAL = new Set(["completed", "expired", "cancelled", "denied"]);

const fmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const n = (x) => fmt.format(x);
// Expiry days as the server's sentences write them ("1 January 2027"), in
// UTC like the server, so the breakdown and the expiry notice agree.
const dayFmt = new Intl.DateTimeFormat("en-GB", {
  day: "numeric", month: "long", year: "numeric", timeZone: "UTC",
});
const credits = (x) => `${n(x)} ${x === 1 ? "credit" : "credits"}`;
const $ = (id) => document.getElementById(id);

const items = Array.from({ length: ITEM_COUNT }, (_, i) => ({
  item_id: `photo-${String(i + 1).padStart(2, "0")}`,
  name: `Product photo ${i + 1}`,
  // Higher runs first under priority_fit: the hero shots first.
  priority: i < 3 ? 3 - i : 0,
  cost: ITEM_COST,
}));

let busy = false;
let lastDecision = null;
let previewSeq = 0;
let previewTimer = null;

function accountId() {
  return $("account").value.trim();
}

// The spender a batch is charged to (a team, a member, a key), if any.
function spenderId() {
  return $("spender").value.trim();
}

// A request body for the account, charged to the spender when one is named.
function charged(body) {
  const spender = spenderId();
  if (spender) body.spender_id = spender;
  return body;
}

// The API key the page sends. It comes from the address's fragment
// (/demo#key=hf_live_…: browsers never send a fragment to the server), which
// is then removed from the address bar, or from the field; it is kept in this
// tab's session storage only.
const KEY_STORAGE = "holdfast-api-key";

function apiKey() {
  return $("api-key").value.trim();
}

function loadKey() {
  const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  let key = "";
  if (match) {
    key = decodeURIComponent(match[1]);
    history.replaceState(null, "", location.pathname + location.search);
  } else {
    try {
      key = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      key = "";
    }
  }
  $("api-key").value = key;
  storeKey();
}

function storeKey() {
  try {
    if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage may be off; the field still holds the key for this page.
  }
}

function newBatchId() {
  const uuid = globalThis.crypto && crypto.randomUUID
    ? crypto.randomUUID()
    : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
  return `demo-${uuid}`;
}

function requestItems() {
  return items.map((it, i) => {
    const simulate = { latency_ms: LATENCY_MS + i * LATENCY_STEP_MS };
    // Every third photo turns out 2 credits cheaper than its estimate: the
    // difference is released back to the account when the batch closes.
    if ((i + 1) % 3 === 0 && it.cost > 2) simulate.actual_cost = it.cost - 2;
    return {
      item_id: it.item_id,
      estimated_cost: it.cost,
      priority: it.priority,
      payload: { title: it.name, simulate },
    };
  });
}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (apiKey()) init.headers.Authorization = `Bearer ${apiKey()}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  return { status: res.status, ok: res.ok, data };
}

// The API's answer for an account that does not exist (404, problem type
// `urn:holdfast:problem:unknown-account`).
function isUnknownAccount(r) {
  const type = r.data && typeof r.data.type === "string" ? r.data.type : "";
  return r.status === 404 && type.endsWith(":unknown-account");
}

// What a new account gets from the page's "Create" button (demo mode only).
const NEW_ACCOUNT_CREDITS = 200;

function code(text) {
  const c = document.createElement("code");
  c.textContent = text;
  return c;
}

// One message for an account that does not exist: how to create it, and in
// demo mode (HOLDFAST_DEMO_GRANTS=1) a button that does, with credits.
function showMissingAccount(id) {
  const preview = $("preview");
  preview.dataset.state = "missing";
  const text = document.createElement("p");
  text.id = "missing-account";
  text.className = "preview-text";
  text.append(
    `Account “${id}” does not exist yet. An operator creates it with `,
    code(`holdfast account grant ${id} ${NEW_ACCOUNT_CREDITS} --create`),
    " (or an admin key with ",
    code(`POST /v1/accounts/${encodeURIComponent(id)}/grants {"amount": ${NEW_ACCOUNT_CREDITS}, "create": true}`),
    "); then this page prices the batch.",
  );
  const parts = [text];
  if (document.body.dataset.demoGrants === "on") {
    const button = document.createElement("button");
    button.type = "button";
    button.id = "create-account";
    button.textContent = `Create “${id}” with ${credits(NEW_ACCOUNT_CREDITS)}`;
    button.addEventListener("click", async () => {
      button.disabled = true;
      const r = await api("POST", "/demo/grant", { account_id: id, amount: NEW_ACCOUNT_CREDITS });
      if (!r.ok) {
        showError(problemText(r));
        button.disabled = false;
        return;
      }
      showError("");
      refresh();
    });
    parts.push(button);
  }
  preview.replaceChildren(...parts);
  $("balance").textContent = "\u00a0";
  $("generate-all").disabled = true;
}

function problemText(r) {
  const d = r.data || {};
  if (Array.isArray(d.errors) && d.errors.length) {
    return d.errors.map((e) => `${e.field}: ${e.reason}`).join("; ");
  }
  return d.detail || d.title || `HTTP ${r.status}`;
}

// ---- items table -----------------------------------------------------------

function renderItems() {
  const body = $("items").tBodies[0];
  body.replaceChildren();
  for (const it of items) {
    const tr = document.createElement("tr");
    const name = document.createElement("td");
    name.textContent = it.name;
    const prio = document.createElement("td");
    prio.className = "num";
    prio.textContent = n(it.priority);
    const cost = document.createElement("td");
    cost.className = "num";
    const input = document.createElement("input");
    input.type = "number";
    input.min = "1";
    input.step = "1";
    input.value = String(it.cost);
    input.id = `cost-${it.item_id}`;
    input.setAttribute("aria-label", `Cost of ${it.name} in credits`);
    input.addEventListener("input", () => {
      const v = Number.parseInt(input.value, 10);
      if (Number.isInteger(v) && v > 0) {
        it.cost = v;
        schedulePreview();
      }
    });
    cost.append(input);
    const status = document.createElement("td");
    status.className = "status";
    status.id = `status-${it.item_id}`;
    status.textContent = "—";
    tr.append(name, prio, cost, status);
    body.append(tr);
  }
}

function setItemStatus(itemId, state) {
  const cell = $(`status-${itemId}`);
  if (!cell) return;
  const words = {
    queued: "queued", pending: "running", succeeded: "done", failed: "failed",
    cancelled: "cancelled", skipped: "not run",
  };
  cell.dataset.state = state;
  cell.textContent = words[state] || state;
}

// ---- preview -----------------------------------------------------------------

function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(refresh, 200);
}

async function refreshBalance() {
  const id = accountId();
  if (!id) {
    $("balance").textContent = "\u00a0";
    return;
  }
  const r = await api("GET", `/v1/accounts/${encodeURIComponent(id)}`);
  if (r.ok) {
    const a = r.data;
    $("balance").textContent =
      `Balance ${credits(a.balance)} · held ${n(a.held)} · available ${n(a.available)}`;
  } else if (isUnknownAccount(r)) {
    // The preview area says it once, with what to do.
    $("balance").textContent = "\u00a0";
  } else {
    $("balance").textContent = problemText(r);
  }
}

async function refresh() {
  const seq = ++previewSeq;
  const id = accountId();
  const preview = $("preview");
  if (!id) {
    preview.dataset.state = "error";
    preview.textContent = "Enter an account id.";
    $("generate-all").disabled = true;
    return;
  }
  if (!apiKey()) {
    preview.dataset.state = "error";
    preview.textContent = "Enter an API key for this account.";
    $("balance").textContent = "\u00a0";
    $("generate-all").disabled = true;
    return;
  }
  refreshBalance();
  const r = await api("POST", "/v1/preview", charged({ account_id: id, items: requestItems() }));
  if (seq !== previewSeq) return; // a newer preview is on its way
  if (isUnknownAccount(r)) {
    showMissingAccount(id);
    return;
  }
  if (!r.ok) {
    preview.dataset.state = "error";
    preview.textContent = problemText(r);
    $("generate-all").disabled = true;
    return;
  }
  const p = r.data;
  preview.dataset.state = p.fits ? "fits" : "short";
  const line = document.createElement("span");
  line.id = "preview-line";
  line.textContent =
    `This action will cost ~${credits(p.total_cost)}. You have ${credits(p.available)}.`;
  const advice = document.createElement("span");
  advice.id = "preview-advice";
  advice.className = "advice";
  advice.textContent = p.fits
    ? ` Enough for all ${n(items.length)} items.`
    : ` ${p.advice || ""}`;
  const text = document.createElement("p");
  text.className = "preview-text";
  text.append(line, document.createElement("br"), advice);
  preview.replaceChildren(text, ...renderBreakdown(p));
  $("generate-all").disabled = busy;
}

// Where a grant's credits come from, in the words of the preview's message.
function sourceWords(source, expires) {
  const plain = {
    plan: "your plan credits", purchase: "top-ups",
    promotion: "promotional credits", manual: "granted credits",
  };
  const dated = {
    plan: ["your plan allowance", "resets on"], purchase: ["top-ups", "expire on"],
    promotion: ["promotional credits", "expire on"], manual: ["granted credits", "expire on"],
  };
  if (!expires) return { what: plain[source] || `${source} credits` };
  const [what, verb] = dated[source] || [`${source} credits`, "expire on"];
  return { what, verb };
}

// The preview's breakdown: one line per grant the batch would draw from, in
// burn-down order (when it fits: the whole cost; when it does not: what the
// first items that fit would use), then the expiry notice, if any.
function renderBreakdown(p) {
  const draws = Array.isArray(p.breakdown) ? p.breakdown : [];
  const out = [];
  if (draws.length) {
    const drawn = draws.reduce((s, d) => s + d.amount, 0);
    const box = document.createElement("div");
    box.id = "preview-breakdown";
    box.className = "breakdown";
    const label = document.createElement("p");
    label.id = "preview-breakdown-label";
    label.className = "breakdown-label";
    label.textContent = p.fits
      ? `The ${credits(drawn)} come from, in this order:`
      : `Generating the first ${n(p.first_fit.count)} would use ${credits(drawn)}, in this order:`;
    const list = document.createElement("ul");
    list.setAttribute("aria-labelledby", label.id);
    for (const d of draws) {
      const li = document.createElement("li");
      li.dataset.grantId = d.grant_id;
      li.dataset.source = d.source;
      const amount = document.createElement("span");
      amount.className = "amount";
      amount.textContent = n(d.amount);
      const words = sourceWords(d.source, d.expires_at);
      li.append(amount, ` from ${words.what}`);
      const at = d.expires_at ? new Date(d.expires_at) : null;
      if (at && !Number.isNaN(at.getTime())) {
        const time = document.createElement("time");
        time.dateTime = d.expires_at;
        time.textContent = dayFmt.format(at);
        li.append(` (${words.verb} `, time, ")");
      }
      list.append(li);
    }
    box.append(label, list);
    out.push(box);
  }
  if (p.expiry_notice) {
    const notice = document.createElement("p");
    notice.id = "preview-expiry";
    notice.className = "expiry-notice";
    notice.textContent = p.expiry_notice;
    out.push(notice);
  }
  return out;
}

// ---- submitting and following a batch --------------------------------------

function setBusy(on) {
  busy = on;
  $("generate-all").disabled = on;
  $("account").disabled = on;
  $("api-key").disabled = on;
  for (const input of $("items").querySelectorAll("input")) input.disabled = on;
}

function showError(text) {
  const e = $("error");
  e.textContent = text;
  e.hidden = !text;
}

async function submit(mode, itemIds) {
  showError("");
  const body = charged({ batch_id: newBatchId(), account_id: accountId(), items: requestItems() });
  if (mode) body.mode = mode;
  if (itemIds) body.item_ids = itemIds;
  setBusy(true);
  let r;
  try {
    r = await api("POST", "/v1/batches", body);
  } catch (err) {
    setBusy(false);
    showError(`Could not reach the server: ${err.message}`);
    return;
  }
  const d = r.data || {};
  if (r.ok && d.decision === "granted") {
    await follow(body.batch_id, d);
    return;
  }
  setBusy(false);
  if (r.ok && d.decision === "insufficient") {
    openShortDialog(d);
    return;
  }
  showError(d.decision === "rejected" ? d.message || problemText(r) : problemText(r));
}

async function follow(batchId, decision) {
  $("summary").hidden = true;
  const block = $("progress-block");
  block.hidden = false;
  block.dataset.batchId = batchId;
  const bar = $("progress");
  const runIds = new Set(decision.item_ids || items.map((it) => it.item_id));
  for (const it of items) setItemStatus(it.item_id, runIds.has(it.item_id) ? "queued" : "skipped");
  bar.max = Math.max(runIds.size, 1);
  bar.value = 0;
  $("progress-label").textContent = `Generating ${n(runIds.size)} of ${n(items.length)} items`;
  $("progress-text").textContent = `0 of ${n(runIds.size)} done`;
  let view = null;
  for (;;) {
    const r = await api("GET", `/v1/batches/${encodeURIComponent(batchId)}`);
    refreshBalance();
    if (r.ok) {
      view = r.data;
      const f = view.figures;
      const done = f.succeeded + f.failed + f.cancelled;
      bar.max = Math.max(f.run, 1);
      bar.value = done;
      $("progress-text").textContent =
        `${n(done)} of ${n(f.run)} done · ${n(f.succeeded)} generated, ${n(f.failed)} failed`;
      for (const it of view.items || []) setItemStatus(it.item_id, it.state);
      if (TERMINAL.has(view.state)) break;
    } else if (r.status !== 503) {
      showError(problemText(r));
      break;
    }
    await new Promise((res) => setTimeout(res, POLL_MS));
  }
  if (view) showSummary(view);
  setBusy(false);
  block.dataset.state = "done";
  refresh();
}

function showSummary(view) {
  const f = view.figures;
  $("summary").hidden = false;
  $("summary").dataset.batchId = view.batch_id;
  $("summary-title").textContent =
    view.state === "completed" ? "Batch finished" : `Batch ${view.state}`;
  $("sum-generated").textContent = n(f.succeeded);
  $("sum-failed").textContent = n(f.failed);
  $("sum-charged").textContent = credits(f.captured);
  $("sum-released").textContent = credits(f.released);
  const notRun = f.skipped + f.cancelled;
  $("summary-note").textContent =
    `${n(f.succeeded)} of ${n(f.items_total)} items generated` +
    (notRun ? `; ${n(notRun)} not run and not charged.` : ".") +
    ` ${credits(f.reserved)} were held; what was not charged went back to the account.`;
}

// ---- the "not enough credits" dialog ---------------------------------------

function openShortDialog(d) {
  lastDecision = d;
  const dialog = $("short");
  $("short-choices").hidden = false;
  $("select-form").hidden = true;
  $("short-error").hidden = true;
  const by = d.limited_by || {};
  $("short-title").textContent = by.level === "spender"
    ? `Limited by your ${by.kind || "spender"} '${by.spender_id}': nothing was started`
    : "Not enough credits: nothing was started";
  $("short-message").textContent = d.message;
  $("short-detail").textContent = d.detail || "";
  const options = d.options || [];
  const first = options.find((o) => o.action === "generate_first_fit");
  const firstBtn = $("choose-first-fit");
  firstBtn.hidden = !first;
  if (first) {
    firstBtn.textContent = `Generate first ${n(first.item_count)} (${credits(first.credits)})`;
  }
  const add = options.find((o) => o.action === "add_credits");
  const addBtn = $("choose-add-credits");
  addBtn.hidden = !add;
  if (add) {
    const grants = document.body.dataset.demoGrants === "on";
    addBtn.textContent = `Add ${credits(add.credits)}`;
    addBtn.disabled = !grants;
    addBtn.title = grants ? "" : "Demo grants are off: start the server with HOLDFAST_DEMO_GRANTS=1";
  }
  // A spender's limit binds: more credits in the account would not help;
  // an admin raises the limit (PUT /v1/accounts/{id}/spenders/{spender_id}).
  const raise = options.find((o) => o.action === "raise_limit");
  const raiseBtn = $("choose-raise-limit");
  raiseBtn.hidden = !raise;
  if (raise) {
    raiseBtn.textContent = raise.label;
    raiseBtn.title = "Only an admin can raise a spender's limit";
  }
  dialog.showModal();
  (first ? firstBtn : $("choose-select")).focus();
}

function closeShortDialog() {
  const dialog = $("short");
  if (dialog.open) dialog.close();
}

function shortError(text) {
  const e = $("short-error");
  e.textContent = text;
  e.hidden = !text;
}

function openSelect() {
  const d = lastDecision;
  $("short-choices").hidden = true;
  $("select-form").hidden = false;
  const list = $("select-list");
  list.replaceChildren();
  for (const it of items) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = it.item_id;
    box.id = `select-${it.item_id}`;
    box.addEventListener("change", updateSelectTotal);
    const name = document.createElement("span");
    name.textContent = it.name;
    const cost = document.createElement("span");
    cost.className = "cost";
    cost.textContent = credits(it.cost);
    label.append(box, name, cost);
    list.append(label);
  }
  $("select-title").textContent = `Select items (${credits(d.available)} available)`;
  updateSelectTotal();
  list.querySelector("input").focus();
}

function selectedIds() {
  return Array.from($("select-list").querySelectorAll("input:checked"), (b) => b.value);
}

function updateSelectTotal() {
  const ids = new Set(selectedIds());
  const cost = items.filter((it) => ids.has(it.item_id)).reduce((s, it) => s + it.cost, 0);
  const available = lastDecision ? lastDecision.available : 0;
  const over = cost > available;
  const total = $("select-total");
  total.dataset.over = String(over);
  total.textContent = over
    ? `${n(ids.size)} selected: ${credits(cost)}, ${credits(cost - available)} more than the ${credits(available)} available.`
    : `${n(ids.size)} selected: ${credits(cost)} of ${credits(available)} available.`;
  const submitBtn = $("select-submit");
  submitBtn.disabled = over || ids.size === 0;
  submitBtn.textContent = `Generate ${n(ids.size)} selected`;
}

// ---- wiring --------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  renderItems();
  loadKey();
  $("account").addEventListener("input", schedulePreview);
  $("spender").addEventListener("input", schedulePreview);
  $("api-key").addEventListener("input", () => {
    storeKey();
    schedulePreview();
  });
  $("generate-all").addEventListener("click", () => submit("all_or_nothing"));
  $("choose-first-fit").addEventListener("click", () => {
    closeShortDialog();
    submit("first_fit");
  });
  $("choose-select").addEventListener("click", openSelect);
  $("select-back").addEventListener("click", () => {
    $("select-form").hidden = true;
    $("short-choices").hidden = false;
    $("choose-select").focus();
  });
  $("select-submit").addEventListener("click", () => {
    const ids = selectedIds();
    closeShortDialog();
    submit("selected", ids);
  });
  $("choose-add-credits").addEventListener("click", async () => {
    const d = lastDecision;
    const add = (d.options || []).find((o) => o.action === "add_credits");
    const r = await api("POST", "/demo/grant", { account_id: d.account_id, amount: add.credits });
    if (!r.ok) {
      shortError(problemText(r));
      return;
    }
    closeShortDialog();
    submit("all_or_nothing");
  });
  $("short").addEventListener("close", () => {
    if (!busy) $("generate-all").focus();
    refresh();
  });
  refresh();
});
