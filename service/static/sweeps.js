// Sweeps (a table of training runs, filling in live) and two models compared, over the public HTTP API only.

import { ApiError, getJSON, imageURL, request } from "./api.js";
import { $, el } from "./dom.js";

const ACTIVE = new Set(["queued", "running"]);
const PRESETS = { "seed-table2": "seed-table2: the seed's Table 2 (9 rows, 20 epochs each)" };
const EXAMPLE_BASE = '{"epochs": 5}';
const EXAMPLE_GRID = '{"gamma": [0.3, 0.4, 0.5], "batch_size": [100, 200]}';
const LIVE_MS = 2000; // the chosen sweep's table while rows are queued or running
const FIGURES_MS = 10000; // its figures meanwhile (each is drawn by the server from every row's metrics)
const IDLE_MS = 15000; // the list of sweeps when nothing runs

const state = {
  sweep: null, // the sweep shown
  timer: null,
  listTimer: null,
  figuresAt: 0,
  compareGen: 0,
};

// ---- small helpers ----------------------------------------------------------------------------------------------

function pct(v) {
  return v === null || v === undefined ? "" : `${(v * 100).toFixed(1)}%`;
}

function errorText(e) {
  return e instanceof ApiError ? e.message : `unexpected error: ${e.message || e}`;
}

function fmtValue(v) {
  if (v === null || v === undefined) return "";
  if (Array.isArray(v)) return `[${v.map(fmtValue).join(", ")}]`;
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function fmtWall(s) {
  if (s === null || s === undefined) return "";
  if (s < 120) return `${s.toFixed(0)} s`;
  return s < 7200 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`;
}

/** Swap an <img>'s object URL for a new one, freeing the old. */
function setImage(img, url) {
  if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  img.dataset.objectUrl = url;
  img.src = url;
  img.hidden = false;
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

function th(text, scope = "col") {
  return el("th", { scope, text });
}

// ---- sweeps: the page's part ----------------------------------------------------------------------------------

function buildSweeps(root) {
  const presetSelect = el(
    "select",
    { name: "preset", id: "sweep-preset" },
    el("option", { value: "", text: "none: the base and grid below" }),
    ...Object.entries(PRESETS).map(([v, t]) => el("option", { value: v, text: t })),
  );
  const form = el(
    "form",
    { id: "sweep-form", class: "sweep-form", novalidate: true },
    el("h3", { text: "Start a sweep" }),
    el("label", {}, "Preset", presetSelect),
    el("label", {}, "Sweep id (optional)", el("input", { name: "id", id: "sweep-id", maxlength: 60, autocomplete: "off", placeholder: "a timestamp id" })),
    el("label", {}, "Base training config (JSON: fields every row shares)",
      el("textarea", { name: "base", id: "sweep-base", rows: 3, spellcheck: "false", "aria-describedby": "sweep-form-hint" })),
    el("label", {}, "Grid (JSON: a field and the values it takes; one row per combination)",
      el("textarea", { name: "grid", id: "sweep-grid", rows: 3, spellcheck: "false", "aria-describedby": "sweep-form-hint" })),
    el("p", { class: "hint", id: "sweep-form-hint", text: "With a preset, the base and grid are optional (a grid multiplies its rows). At most 64 rows; every row is validated before any is queued. Needs the API key when the server has one." }),
    el("div", { class: "buttons" }, el("button", { type: "submit", id: "sweep-submit", text: "Start the sweep" })),
    el("p", { class: "error", id: "sweep-form-err", role: "alert" }),
    el("p", { class: "msg", id: "sweep-form-msg", role: "status" }),
  );
  presetSelect.value = "seed-table2";
  $("textarea[name=base]", form).value = "";
  $("textarea[name=grid]", form).value = "";
  $("textarea[name=base]", form).placeholder = EXAMPLE_BASE;
  $("textarea[name=grid]", form).placeholder = EXAMPLE_GRID;

  const list = el(
    "div",
    { class: "sweep-list" },
    el("div", { class: "sweep-list-head" }, el("h3", { text: "Sweeps" }),
      el("button", { type: "button", class: "small", id: "sweeps-refresh", text: "Refresh" })),
    el("div", { class: "table-wrap" },
      el("table", { id: "sweeps-list" },
        el("caption", { class: "visually-hidden", text: "Every sweep, newest first" }),
        el("thead", {}, el("tr", {}, th("Sweep"), th("Rows"), th("Status"), th("Progress"), th("Created"), th("Show"))),
        el("tbody"))),
    el("p", { class: "error", id: "sweeps-err", role: "alert" }),
  );
  const detail = el(
    "div",
    { id: "sweep-detail", class: "sweep-detail", hidden: true },
    el("div", { class: "sweep-detail-head" },
      el("h3", { id: "sweep-title" }),
      el("button", { type: "button", class: "small danger", id: "sweep-cancel", text: "Cancel the sweep" })),
    el("progress", { id: "sweep-progress", max: 1, value: 0, "aria-labelledby": "sweep-title" }),
    el("p", { class: "msg", id: "sweep-status", role: "status" }),
    el("p", { class: "error", id: "sweep-err", role: "alert" }),
    el("div", { class: "table-wrap" }, el("table", { id: "sweep-table", class: "sweep-table" })),
    el("div", { class: "figs" },
      el("figure", {}, el("img", { id: "sweep-curves", alt: "validation accuracy per epoch of every row", hidden: true }),
        el("figcaption", { text: "Validation accuracy per epoch, one line per row (curves.png)." })),
      el("figure", {}, el("img", { id: "sweep-table-img", alt: "the sweep's table as an image", hidden: true }),
        el("figcaption", { text: "The table as an image (table.png), with the seed's numbers beside a preset's rows." }))),
  );
  root.replaceChildren(el("div", { class: "sweeps-top" }, form, list), detail);
  form.addEventListener("submit", submitSweep);
  $("#sweeps-refresh").addEventListener("click", () => loadSweeps());
  $("#sweep-cancel").addEventListener("click", cancelSweep);
}

/** The POST /sweeps body from the form; throws a readable Error for JSON that does not parse. */
function sweepBody(form) {
  const body = {};
  const preset = form.elements.preset.value;
  if (preset) body.preset = preset;
  const id = form.elements.id.value.trim();
  if (id) body.id = id;
  for (const name of ["base", "grid"]) {
    const text = form.elements[name].value.trim();
    if (!text) continue;
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new Error(`${name}: not JSON (${e.message})`);
    }
    if (!value || typeof value !== "object" || Array.isArray(value)) throw new Error(`${name}: give a JSON object {"field": ...}`);
    body[name] = value;
  }
  return body;
}

async function submitSweep(e) {
  e.preventDefault();
  const form = e.currentTarget;
  const err = $("#sweep-form-err");
  const msg = $("#sweep-form-msg");
  err.textContent = "";
  msg.textContent = "";
  let body;
  try {
    body = sweepBody(form);
  } catch (x) {
    err.textContent = x.message;
    return;
  }
  const button = $("#sweep-submit");
  button.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    const out = await getJSON("/sweeps", { method: "POST", json: body });
    msg.textContent = `Sweep ${out.id} is queued: ${out.run_ids.length} rows.`;
    await loadSweeps();
    showSweep(out.id);
  } catch (x) {
    err.textContent = errorText(x);
  } finally {
    button.disabled = false;
    form.setAttribute("aria-busy", "false");
  }
}

function countsText(counts) {
  return Object.entries(counts || {})
    .map(([status, n]) => `${n} ${status}`)
    .join(", ");
}

async function loadSweeps() {
  clearTimeout(state.listTimer);
  let active = false;
  try {
    const list = await getJSON("/sweeps", { query: { limit: 50 } });
    $("#sweeps-err").textContent = "";
    const body = $("#sweeps-list tbody");
    body.replaceChildren();
    if (!list.sweeps.length) body.append(el("tr", {}, el("td", { colspan: 6, text: "No sweep yet: start one." })));
    for (const s of list.sweeps) {
      active ||= Object.keys(s.counts || {}).some((k) => ACTIVE.has(k));
      const show = el("button", { type: "button", class: "small", text: "Show", "aria-label": `Show sweep ${s.id}`, onclick: () => showSweep(s.id) });
      body.append(
        el(
          "tr",
          { "data-sweep": s.id, "aria-current": s.id === state.sweep ? "true" : null },
          el("th", { scope: "row" }, s.id, s.preset ? el("span", { class: "tag", text: s.preset }) : null),
          el("td", { text: String(s.total) }),
          el("td", { text: countsText(s.counts) }),
          el("td", { text: pct(s.progress) }),
          el("td", { text: new Date(s.created * 1000).toLocaleString() }),
          el("td", {}, show),
        ),
      );
    }
  } catch (e) {
    $("#sweeps-err").textContent = errorText(e);
  }
  state.listTimer = setTimeout(loadSweeps, active ? LIVE_MS * 2 : IDLE_MS);
}

// ---- one sweep: its live table, its figures, cancel -------------------------------------------------------------

function showSweep(id) {
  state.sweep = id;
  state.figuresAt = 0;
  for (const tr of document.querySelectorAll("#sweeps-list tr[data-sweep]")) {
    if (tr.dataset.sweep === id) tr.setAttribute("aria-current", "true");
    else tr.removeAttribute("aria-current");
  }
  $("#sweep-detail").hidden = false;
  $("#sweep-title").textContent = `Sweep ${id}`;
  $("#sweep-err").textContent = "";
  for (const img of [$("#sweep-curves"), $("#sweep-table-img")]) img.hidden = true;
  refreshSweep();
}

function sweepHead(table) {
  const cells = [th("Row"), ...table.varying.map((f) => th(f)), th("Status"), th("Progress"), th("Best val (epoch)")];
  cells.push(th("Test"), th("Train"), th("Wall"), th("Worker"));
  if (table.preset) cells.push(th("Seed's test / train"));
  return el("thead", {}, el("tr", {}, ...cells));
}

function sweepRow(table, r) {
  const best = r.best_val_acc === null || r.best_val_acc === undefined ? "" : `${pct(r.best_val_acc)} (${r.best_epoch ?? "?"})`;
  const status = r.status + (r.cancel_requested && ACTIVE.has(r.status) ? " (cancelling)" : "");
  const ref = r.reference ? `${pct(r.reference.test_acc)} / ${pct(r.reference.train_acc)}` : "";
  const progress = el("progress", { max: 1, value: r.progress, "aria-label": `row ${r.index} progress` });
  return el(
    "tr",
    { "data-run": r.id, "data-status": r.status },
    el("th", { scope: "row", text: r.id }),
    ...table.varying.map((f) => el("td", { text: fmtValue(r.values[f]) })),
    el("td", { class: `status ${r.status}`, text: status, title: r.error || "" }),
    el("td", { class: "num" }, progress, ` ${pct(r.progress)}`),
    el("td", { class: "num", text: best }),
    el("td", { class: "num", text: pct(r.test_acc) }),
    el("td", { class: "num", text: pct(r.train_acc) }),
    el("td", { class: "num", text: fmtWall(r.wall_s) }),
    el("td", { text: r.worker || "" }),
    table.preset ? el("td", { class: "num", text: ref }) : null,
  );
}

function renderSweep(table) {
  const active = table.rows.some((r) => ACTIVE.has(r.status));
  $("#sweep-table").replaceChildren(
    el("caption", { class: "visually-hidden", text: `Sweep ${table.id}: one row per training run` }),
    sweepHead(table),
    el("tbody", {}, ...table.rows.map((r) => sweepRow(table, r))),
  );
  $("#sweep-progress").value = table.progress;
  const what = table.preset ? `preset ${table.preset}, ` : "";
  $("#sweep-status").textContent = `${what}${table.total} rows: ${countsText(table.counts)} (${pct(table.progress)} done)${active ? "; updating live" : ""}.`;
  $("#sweep-cancel").hidden = !active;
  $("#sweep-detail").dataset.active = String(active);
  return active;
}

async function loadFigures(id) {
  for (const [name, img] of [["curves.png", $("#sweep-curves")], ["table.png", $("#sweep-table-img")]]) {
    try {
      const { url } = await imageURL(`/sweeps/${encodeURIComponent(id)}/${name}`);
      if (state.sweep === id) setImage(img, url);
      else URL.revokeObjectURL(url);
    } catch (e) {
      if (state.sweep === id) $("#sweep-err").textContent = errorText(e);
    }
  }
}

async function refreshSweep() {
  clearTimeout(state.timer);
  const id = state.sweep;
  if (!id) return;
  let active = false;
  const detail = $("#sweep-detail");
  detail.setAttribute("aria-busy", "true");
  try {
    const table = await getJSON(`/sweeps/${encodeURIComponent(id)}`);
    if (state.sweep !== id) return;
    const wasActive = detail.dataset.active === "true";
    active = renderSweep(table);
    if (!active || Date.now() - state.figuresAt > FIGURES_MS) {
      // While it runs, now and then; once it is done, once more (the last rows' final numbers).
      if (active || wasActive || state.figuresAt === 0) await loadFigures(id);
      state.figuresAt = Date.now();
    }
    if (wasActive && !active) loadCompareModels(); // finished rows are models now
  } catch (e) {
    if (state.sweep === id) $("#sweep-err").textContent = errorText(e);
  } finally {
    detail.setAttribute("aria-busy", "false");
  }
  if (active && state.sweep === id) state.timer = setTimeout(refreshSweep, LIVE_MS);
}

async function cancelSweep() {
  const id = state.sweep;
  if (!id) return;
  const button = $("#sweep-cancel");
  button.disabled = true;
  try {
    const out = await getJSON(`/sweeps/${encodeURIComponent(id)}`, { method: "DELETE" });
    const parts = [`${out.cancelled.length} rows cancelled`];
    if (out.stopping.length) parts.push(`${out.stopping.length} stopping at their next step`);
    if (out.finished.length) parts.push(`${out.finished.length} already finished`);
    $("#sweep-err").textContent = "";
    $("#sweep-status").textContent = `Sweep ${id}: ${parts.join(", ")}.`;
  } catch (e) {
    $("#sweep-err").textContent = errorText(e);
  } finally {
    button.disabled = false;
  }
  await refreshSweep();
  loadSweeps();
}

// ---- compare two models ---------------------------------------------------------------------------------------

function buildCompare(root) {
  const select = (name, label) =>
    el("label", {}, label, el("select", { name, id: `compare-${name}`, required: true }));
  const form = el(
    "form",
    { id: "compare-form", class: "controls" },
    select("a", "First model"),
    select("b", "Second model"),
    el("label", {}, "Images",
      el("select", { name: "split", id: "compare-split" },
        el("option", { value: "val", text: "validation (held out by both)" }),
        el("option", { value: "test", text: "test set" }))),
    el("button", { type: "submit", id: "compare-submit", text: "Compare" }),
    el("button", { type: "button", class: "small", id: "compare-models-refresh", text: "Refresh the models" }),
    el("p", { class: "hint", text: "Same dataset only; a model compared with itself agrees 100%. The first comparison of a pair runs both models over every image (minutes on a CPU for the test set); after that it is cached." }),
  );
  const result = el(
    "div",
    { id: "compare-result", hidden: true },
    el("dl", { id: "compare-summary", class: "compare-summary" }),
    el("div", { class: "cols" },
      el("div", {}, el("h4", { id: "compare-table-h", text: "Right and wrong" }),
        el("div", { class: "table-wrap" },
          el("table", { id: "compare-table", class: "compare-2x2", "aria-labelledby": "compare-table-h" }))),
      el("div", {}, el("h4", { id: "compare-differ-h", text: "Classes where they differ most" }),
        el("div", { class: "table-wrap" }, el("table", { id: "compare-differ", "aria-labelledby": "compare-differ-h" })))),
    el("h4", { id: "compare-per-class-h", text: "Accuracy per class" }),
    el("div", { class: "table-wrap" }, el("table", { id: "compare-per-class", "aria-labelledby": "compare-per-class-h" })),
    el("figure", { class: "compare-figure" },
      el("img", { id: "compare-img", alt: "per-class accuracy of both models, the right/wrong table, and conv1's filters side by side, each first-model filter beside its matched second-model filter", hidden: true }),
      el("figcaption", { id: "compare-img-cap", text: "conv1: each filter of the first model beside the second model's filter matched to it one-to-one (cosine similarity under each pair)." })),
  );
  root.replaceChildren(
    form,
    el("progress", { id: "compare-progress", max: 1, value: 0, hidden: true, "aria-label": "comparison progress" }),
    el("p", { class: "msg", id: "compare-msg", role: "status" }),
    el("p", { class: "error", id: "compare-err", role: "alert" }),
    result,
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    compare();
  });
  $("#compare-models-refresh").addEventListener("click", () => loadCompareModels());
}

async function loadCompareModels() {
  try {
    const list = await getJSON("/models");
    const [a, b] = [$("#compare-a"), $("#compare-b")];
    const chosen = [a.value, b.value];
    for (const s of [a, b]) {
      s.replaceChildren(...list.models.map((m) => el("option", { value: m.id, text: m.dataset ? `${m.id} (${m.dataset})` : m.id })));
    }
    const ids = list.models.map((m) => m.id);
    a.value = ids.includes(chosen[0]) ? chosen[0] : ids[0] || "";
    b.value = ids.includes(chosen[1]) ? chosen[1] : ids[1] || ids[0] || "";
    $("#compare-submit").disabled = !ids.length;
    if (!ids.length) $("#compare-msg").textContent = "No model yet: train one (or run a sweep) first.";
  } catch (e) {
    $("#compare-err").textContent = errorText(e);
  }
}

function comparing(on) {
  $("#compare").setAttribute("aria-busy", on ? "true" : "false");
  $("#compare-submit").disabled = on;
}

async function compare() {
  const gen = ++state.compareGen;
  const fresh = () => gen === state.compareGen;
  const query = { models: `${$("#compare-a").value},${$("#compare-b").value}`, split: $("#compare-split").value };
  const [msg, bar, err] = [$("#compare-msg"), $("#compare-progress"), $("#compare-err")];
  err.textContent = "";
  msg.textContent = "Comparing...";
  $("#compare-result").hidden = true;
  comparing(true);
  try {
    for (;;) {
      const res = await request("/compare", { query });
      if (!fresh()) return;
      const body = await res.json();
      if (res.status !== 202) {
        bar.hidden = true;
        msg.textContent = "";
        renderCompare(body);
        await loadCompareFigure(query, fresh);
        return;
      }
      bar.hidden = false;
      bar.value = body.progress || 0;
      const eta = body.eta_s ? `, about ${Math.ceil(body.eta_s)} s left` : "";
      msg.textContent = `Running both models over the images: ${Math.round((body.progress || 0) * 100)}%${eta}.`;
      await sleep(Math.min(Math.max(Number(res.headers.get("Retry-After")) || 1, 0.5), 3) * 1000);
      if (!fresh()) return;
    }
  } catch (e) {
    if (fresh()) {
      bar.hidden = true;
      msg.textContent = "";
      err.textContent = errorText(e);
    }
  } finally {
    if (fresh()) comparing(false);
  }
}

async function loadCompareFigure(query, fresh) {
  try {
    const { url } = await imageURL("/compare", { query: { ...query, format: "png" } });
    if (fresh()) setImage($("#compare-img"), url);
    else URL.revokeObjectURL(url);
  } catch (e) {
    if (fresh()) $("#compare-err").textContent = errorText(e);
  }
}

function renderCompare(r) {
  const { a, b } = r.models;
  const f = r.filters || {};
  const conv1 = f.mean_similarity === undefined
    ? f.note || "not comparable"
    : `mean cosine similarity ${f.mean_similarity.toFixed(3)} matched (${f.unmatched_mean_similarity.toFixed(3)} in their own order)`;
  const items = [
    ["Images", `${r.n} (${r.split})`],
    [`Accuracy of ${a}`, pct(r.accuracy.a)],
    [`Accuracy of ${b}`, pct(r.accuracy.b)],
    ["Agreement (same answer)", pct(r.agreement)],
    ["conv1 filters", conv1],
  ];
  $("#compare-summary").replaceChildren(
    ...items.flatMap(([k, v], i) => [el("dt", { text: k }), el("dd", { text: v, "data-item": ["n", "acc-a", "acc-b", "agreement", "conv1"][i] })]),
  );
  const t = r.table;
  $("#compare-table").replaceChildren(
    el("thead", {}, el("tr", {}, el("td"), th(`${b} right`), th(`${b} wrong`))),
    el("tbody", {},
      el("tr", {}, th(`${a} right`, "row"), el("td", { "data-cell": "both_right", text: String(t.both_right) }),
        el("td", { "data-cell": "a_right_b_wrong", text: String(t.a_right_b_wrong) })),
      el("tr", {}, th(`${a} wrong`, "row"), el("td", { "data-cell": "a_wrong_b_right", text: String(t.a_wrong_b_right) }),
        el("td", { "data-cell": "both_wrong", text: String(t.both_wrong) }))),
  );
  $("#compare-differ").replaceChildren(
    el("thead", {}, el("tr", {}, th("Class"), th("Answered differently"), th(a), th(b), th("Change (points)"))),
    el("tbody", {}, ...r.differ_most.map((d) => el("tr", { "data-class": d.class },
      th(d.class, "row"), el("td", { text: pct(d.disagreement) }), el("td", { text: pct(d.acc_a) }),
      el("td", { text: pct(d.acc_b) }), el("td", { text: `${d.delta >= 0 ? "+" : ""}${(d.delta * 100).toFixed(1)}` })))),
  );
  $("#compare-per-class").replaceChildren(
    el("thead", {}, el("tr", {}, th("Class"), th(a), th(b))),
    el("tbody", {}, ...r.per_class.map((p) => el("tr", { "data-class": p.class },
      th(p.class, "row"), el("td", { text: pct(p.a) }), el("td", { text: pct(p.b) })))),
  );
  $("#compare-result").hidden = false;
  $("#compare-result").dataset.models = `${a},${b}`;
}

// ---- start ----------------------------------------------------------------------------------------------------

function start() {
  const sweeps = $("#sweeps-body");
  const comp = $("#compare-body");
  if (sweeps) {
    buildSweeps(sweeps);
    loadSweeps();
  }
  if (comp) {
    buildCompare(comp);
    loadCompareModels();
  }
  document.body.dataset.sweepsReady = "true";
}

start();
