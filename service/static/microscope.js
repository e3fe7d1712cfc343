// The Microscope: what each channel of a layer looks for on its own (feature visualization), over the public API
// only: GET /visualize for a few channels and their variants, POST /atlas + GET /atlas/{id} for a whole layer as a
// queued job, POST /predict to classify a rendered image, GET /topk for a channel's top-9 dataset examples and their
// deconvnet projections.

import { ApiError, getJSON, imageForm, imageURL, request } from "./api.js";
import { $, el } from "./dom.js";

const LAYERS = [
  ["conv1", "conv1"],
  ["layer1", "layer1 (conv2_x)"],
  ["layer2", "layer2 (conv3_x)"],
  ["layer3", "layer3 (conv4_x)"],
  ["layer4", "layer4 (conv5_x)"],
];
const VARIANTS = [
  { key: "channel", query: { objective: "channel" }, caption: "channel: maximizes the map's mean" },
  { key: "neuron", query: { objective: "neuron" }, caption: "neuron: maximizes its centre position" },
  { key: "negative", query: { objective: "negative" }, caption: "negative: drives it lowest" },
  { key: "diversity", query: { objective: "channel", diversity: 4 }, caption: "diversity: four different images" },
];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1500;

const ms = { gen: 0, detailGen: 0, params: null, atlas: null, grid: null, done: [], sheetChunks: -1 };


const model = () => $("#model-select")?.value || undefined;
const errorText = (e) => (e instanceof ApiError ? e.message : `unexpected error: ${e.message || e}`);
const sleep = (ms_) => new Promise((r) => setTimeout(r, ms_));

function build(root) {
  const layer = el("select", { name: "layer", id: "ms-layer" }, ...LAYERS.map(([v, t]) => el("option", { value: v, text: t })));
  layer.value = "layer3";
  const objective = el(
    "select",
    { name: "objective", id: "ms-objective" },
    ...["channel", "neuron", "negative"].map((o) => el("option", { value: o, text: o })),
  );
  root.replaceChildren(
    el("p", {
      class: "hint",
      id: "ms-help",
      text:
        "The synthesized image that drives each channel hardest, for the chosen model. Visualize a few channels " +
        "(a list such as 0,1,2,3), or render a whole layer as an atlas job on the queue. Choose a channel to see it " +
        "larger with its variants beside the dataset images that drive it hardest, and classify the rendered image.",
    }),
    el(
      "form",
      { id: "ms-form", class: "controls", "aria-describedby": "ms-help" },
      el("label", { for: "ms-layer" }, "Layer", layer),
      el("label", {}, "Channels", el("input", { name: "channels", value: "0,1,2,3,4,5,6,7", size: 16, spellcheck: "false" })),
      el("label", { for: "ms-objective" }, "Objective", objective),
      el("label", {}, "Steps", el("input", { name: "steps", type: "number", min: 1, max: 2048, value: 128 })),
      el("label", {}, "Seed", el("input", { name: "seed", type: "number", min: 0, value: 0 })),
      el("button", { type: "submit", id: "ms-visualize" }, "Visualize"),
      el("button", { type: "button", id: "ms-atlas-start", class: "small", onclick: startAtlas }, "Whole layer (atlas job)"),
    ),
    el("p", { id: "ms-msg", class: "msg", role: "status" }),
    el("progress", { id: "ms-progress", max: 1, value: 0, hidden: true, "aria-label": "progress" }),
    el("p", { id: "ms-err", class: "error", role: "alert" }),
    el("div", { id: "ms-grid", class: "ms-grid", role: "list", "aria-label": "channel visualizations" }),
    buildAtlasView(),
    buildDetail(),
  );
  $("#ms-form").addEventListener("submit", (e) => {
    e.preventDefault();
    visualizeChannels();
  });
}

function buildAtlasView() {
  return el(
    "figure",
    { id: "ms-atlas", hidden: true },
    el("img", { id: "ms-sheet", class: "pixelated", alt: "", onclick: sheetClick }),
    el("figcaption", { id: "ms-atlas-cap" }),
    el(
      "form",
      { id: "ms-open", class: "controls" },
      el("label", {}, "Open channel", el("input", { name: "channel", type: "number", min: 0, value: 0 })),
      el("button", { type: "submit", class: "small" }, "Open"),
      el("button", { type: "button", id: "ms-atlas-cancel", class: "small danger", onclick: cancelAtlas, hidden: true }, "Cancel atlas"),
    ),
  );
}

function buildDetail() {
  return el(
    "div",
    { id: "ms-detail", hidden: true },
    el("h3", { id: "ms-detail-h", tabindex: "-1" }),
    el(
      "div",
      { class: "ms-side" },
      el(
        "div",
        { class: "ms-variants" },
        ...VARIANTS.map((v) =>
          el(
            "figure",
            { class: "ms-variant", "data-variant": v.key, "aria-busy": "false" },
            el("img", { class: "pixelated", alt: "", hidden: true }),
            el("figcaption", { text: v.caption }),
          ),
        ),
      ),
      buildTopk(),
    ),
    el(
      "div",
      { class: "buttons" },
      el("button", { type: "button", id: "ms-classify", onclick: classify }, "Classify this image (/predict)"),
      el("a", { id: "ms-npy", href: "#", download: "" }, "its values (npy)"),
    ),
    el("ol", { id: "ms-predict", class: "ms-predict", "aria-label": "what the model calls this image" }),
    el("p", { id: "ms-detail-err", class: "error", role: "alert" }),
  );
}

/** The channel's top-9 dataset examples: each image patch beside its deconvnet projection (GET /topk). */
function buildTopk() {
  return el(
    "section",
    { id: "ms-topk-sec", "aria-labelledby": "ms-topk-h", "aria-busy": "false" },
    el("h4", { id: "ms-topk-h", text: "Top-9 dataset examples: the patch it sees, and its deconvnet projection" }),
    el("p", { id: "ms-topk-msg", class: "hint", role: "status" }),
    el("progress", { id: "ms-topk-progress", max: 1, value: 0, hidden: true, "aria-label": "top-k index progress" }),
    el("ol", { id: "ms-topk", class: "topk ms-topk", "aria-labelledby": "ms-topk-h" }),
    el("p", { id: "ms-topk-err", class: "error", role: "alert" }),
  );
}

function formParams() {
  const f = $("#ms-form");
  const num = (name, lo) => Math.max(lo, Math.floor(Number(f.elements[name].value) || lo));
  return {
    layer: f.elements.layer.value,
    channels: f.elements.channels.value.replace(/\s+/g, ""),
    objective: f.elements.objective.value,
    steps: num("steps", 1),
    seed: num("seed", 0),
    model: model(),
  };
}

function status(text, fraction = null) {
  $("#ms-msg").textContent = text;
  const bar = $("#ms-progress");
  bar.hidden = fraction === null;
  if (fraction !== null) bar.value = fraction;
}

function fail(e, where = "#ms-err") {
  if (e && e.name === "AbortError") return;
  $(where).textContent = errorText(e);
}

/** GET /visualize until it answers 200: a 202 reports progress, a 429 asks to wait (Retry-After). */
async function visualizeJSON(query, fresh, label) {
  for (;;) {
    let res;
    try {
      res = await request("/visualize", { query: { ...query, format: "json" } });
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 429)) throw e;
      if (!fresh()) return null;
      status(`${label}: the server is busy with other visualizations; waiting...`);
      await sleep(3000);
      continue;
    }
    if (!fresh()) return null;
    const body = await res.json();
    if (res.status !== 202) return body;
    const eta = body.eta_s ? `, about ${Math.ceil(body.eta_s)} s left` : "";
    status(`${label}: ${Math.round((body.progress || 0) * 100)}%${eta}`, body.progress || 0);
    await sleep(Math.min(Math.max(Number(res.headers.get("Retry-After")) || 1, 0.5), 2) * 1000);
  }
}

/** One rendered image ([3][H][W] in [0, 1]) on a canvas. */
function drawImage(values) {
  const [r, g, b] = values;
  const h = r.length;
  const w = r[0].length;
  const canvas = el("canvas", { width: w, height: h });
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = (y * w + x) * 4;
      img.data[i] = Math.round(r[y][x] * 255);
      img.data[i + 1] = Math.round(g[y][x] * 255);
      img.data[i + 2] = Math.round(b[y][x] * 255);
      img.data[i + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

async function visualizeChannels() {
  const p = formParams();
  const gen = ++ms.gen;
  const fresh = () => gen === ms.gen;
  $("#ms-err").textContent = "";
  $("#ms-atlas").hidden = true;
  ms.atlas = null;
  const grid = $("#ms-grid");
  grid.replaceChildren();
  const panel = $("#microscope");
  panel.setAttribute("aria-busy", "true");
  status(`Rendering channels ${p.channels} of ${p.layer} (${p.steps} steps)...`);
  try {
    const body = await visualizeJSON(p, fresh, `Channels ${p.channels} of ${p.layer}`);
    if (!body || !fresh()) return;
    ms.params = p;
    grid.replaceChildren(
      ...body.channels.map((c, i) => {
        const canvas = drawImage(body.values[i]);
        canvas.setAttribute("role", "img");
        canvas.setAttribute("aria-label", `feature visualization of channel ${c}`);
        return el(
          "button",
          {
            type: "button",
            class: "ms-tile",
            role: "listitem",
            "data-channel": c,
            "aria-label": `Channel ${c} (activation ${body.activation[i].toFixed(2)}): open its variants`,
            onclick: () => openChannel(c),
          },
          canvas,
          el("span", { text: `${c}` }),
        );
      }),
    );
    status(`${body.channels.length} channels of ${body.layer}, ${body.steps} steps, objective ${body.objective}. Choose one for its variants.`);
  } catch (e) {
    if (fresh()) {
      status("");
      fail(e);
    }
  } finally {
    if (fresh()) panel.setAttribute("aria-busy", "false");
  }
}

// ---- the atlas: a whole layer as a queued job ----------------------------------------------------------------

async function startAtlas() {
  const p = formParams();
  const gen = ++ms.gen;
  $("#ms-err").textContent = "";
  $("#ms-grid").replaceChildren();
  ms.params = p;
  ms.sheetChunks = -1;
  try {
    const body = await getJSON("/atlas", {
      method: "POST",
      json: { model: p.model, layer: p.layer, channels: "all", objective: p.objective, steps: p.steps, seed: p.seed },
    });
    if (gen !== ms.gen) return;
    ms.atlas = body.id;
    $("#ms-atlas").hidden = false;
    await followAtlas(body.id, gen);
  } catch (e) {
    if (gen === ms.gen) fail(e);
  }
}

async function followAtlas(id, gen) {
  for (;;) {
    if (gen !== ms.gen) return;
    let body;
    try {
      body = await getJSON(`/atlas/${encodeURIComponent(id)}`);
    } catch (e) {
      fail(e);
      return;
    }
    if (gen !== ms.gen) return;
    showAtlas(body);
    if (body.chunks_done !== ms.sheetChunks && body.chunks_done > 0) {
      ms.sheetChunks = body.chunks_done;
      await loadSheet(body, gen);
    }
    if (TERMINAL.has(body.status)) return;
    await sleep(POLL_MS);
  }
}

function showAtlas(body) {
  const layer = body.layers[0];
  const frac = body.progress && body.progress.fraction !== undefined ? body.progress.fraction : 0;
  const eta = body.eta_s ? `, about ${Math.ceil(body.eta_s)} s left` : "";
  const what = `Atlas of ${layer.layer} (${layer.channels.length} channels, ${body.steps} steps)`;
  if (body.status === "succeeded") status(`${what}: done. Click a tile (or open a channel by number) for its variants.`);
  else if (body.status === "failed") status(`${what}: failed: ${body.error || "no reason given"}`);
  else if (body.status === "cancelled") status(`${what}: cancelled; ${body.chunks_done} of ${body.chunks_total} chunks kept.`);
  else status(`${what}: ${body.status}, ${body.chunks_done} of ${body.chunks_total} chunks${eta}.`, frac);
  $("#ms-atlas-cancel").hidden = TERMINAL.has(body.status);
  $("#ms-atlas-cap").textContent = layer.done.length
    ? `${layer.done.length} of ${layer.channels.length} channels of ${layer.layer}, each labelled with its index.`
    : "No channel finished yet.";
}

async function loadSheet(body, gen) {
  const layer = body.layers[0];
  try {
    const { url, res } = await imageURL(layer.sheet_url);
    if (gen !== ms.gen) return URL.revokeObjectURL(url);
    // The sheet says what it holds (a chunk may have finished since the status was read): clicks map by these.
    ms.grid = (res.headers.get("X-ConvLens-Grid") || "0,0").split(",").map(Number);
    ms.done = (res.headers.get("X-ConvLens-Channels") || "").split(",").filter(Boolean).map(Number);
    const img = $("#ms-sheet");
    if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
    img.dataset.objectUrl = url;
    img.src = url;
    img.alt = `Contact sheet: feature visualizations of ${ms.done.length} of ${layer.channels.length} channels of ${layer.layer}`;
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 409)) fail(e); // 409: nothing finished yet, the next poll retries
  }
  return undefined;
}

async function cancelAtlas() {
  if (!ms.atlas) return;
  try {
    await request(`/atlas/${encodeURIComponent(ms.atlas)}`, { method: "DELETE" });
  } catch (e) {
    fail(e);
  }
}

/** A click on the sheet: which tile (the API gives its grid and the channels in tile order). */
function sheetClick(e) {
  if (!ms.grid || !ms.done.length) return;
  const rect = e.currentTarget.getBoundingClientRect();
  const [rows, cols] = ms.grid;
  const col = Math.floor(((e.clientX - rect.left) / rect.width) * cols);
  const row = Math.floor(((e.clientY - rect.top) / rect.height) * rows);
  const tile = row * cols + col;
  if (tile >= 0 && tile < ms.done.length) openChannel(ms.done[tile]);
}

// ---- one channel: its variants, and the image through /predict ---------------------------------------------------

function openChannel(channel) {
  const p = ms.params || formParams();
  const gen = ++ms.detailGen;
  const fresh = () => gen === ms.detailGen;
  const panel = $("#ms-detail");
  panel.hidden = false;
  panel.dataset.channel = String(channel);
  for (const b of document.querySelectorAll("#ms-grid .ms-tile")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.channel) === channel));
  }
  const h = $("#ms-detail-h");
  h.textContent = `Channel ${channel} of ${p.layer}`;
  h.focus({ preventScroll: true });
  panel.scrollIntoView({ block: "nearest", behavior: "smooth" });
  $("#ms-predict").replaceChildren();
  $("#ms-detail-err").textContent = "";
  const base = { model: p.model, layer: p.layer, channels: String(channel), steps: p.steps, seed: p.seed };
  const npy = new URL("/visualize", window.location.origin);
  for (const [k, v] of Object.entries({ ...base, format: "npy" })) if (v !== undefined) npy.searchParams.set(k, v);
  $("#ms-npy").href = npy.pathname + npy.search;
  // Side by side and at once: the top-k index answers in a moment once built, the variants take many seconds.
  loadVariants(base, channel, p.layer, fresh);
  loadTopk(p, channel, fresh);
}

/** GET /topk for the page's model until it answers 200: a 202 reports the index build's progress. */
async function loadTopk(p, channel, fresh) {
  const sec = $("#ms-topk-sec");
  const msg = $("#ms-topk-msg");
  const bar = $("#ms-topk-progress");
  $("#ms-topk").replaceChildren();
  $("#ms-topk-err").textContent = "";
  sec.setAttribute("aria-busy", "true");
  msg.textContent = `Finding the dataset images that most activate channel ${channel}...`;
  const query = { model: p.model, layer: p.layer, channel, k: 9, images: true, rule: "deconvnet" };
  try {
    for (;;) {
      const res = await request("/topk", { query });
      if (!fresh()) return;
      const body = await res.json();
      if (res.status !== 202) {
        showTopk(body, channel, p.layer);
        return;
      }
      bar.hidden = false;
      bar.value = body.progress || 0;
      const eta = body.eta_s ? `, about ${Math.ceil(body.eta_s)} s left` : "";
      msg.textContent = `Building the top-k index over the validation images: ${Math.round((body.progress || 0) * 100)}%${eta}.`;
      await sleep(Math.min(Math.max(Number(res.headers.get("Retry-After")) || 1, 0.5), 2) * 1000);
      if (!fresh()) return;
    }
  } catch (e) {
    if (fresh()) {
      msg.textContent = "";
      fail(e, "#ms-topk-err");
    }
  } finally {
    if (fresh()) {
      bar.hidden = true;
      sec.setAttribute("aria-busy", "false");
    }
  }
}

function showTopk(body, channel, layer) {
  const what = `channel ${channel} of ${layer}`;
  $("#ms-topk-msg").textContent =
    `The ${body.k} ${body.split || ""} images (of ${body.num_images}) that most activate ${what}, strongest first.`;
  $("#ms-topk").replaceChildren(
    ...body.hits.map((h) => {
      const name = `${what}, example ${h.rank + 1} (image ${h.image}${h.class ? `, ${h.class}` : ""})`;
      return el(
        "li",
        { class: "hit", "data-image": h.image },
        el("img", { src: h.patch_png, class: "pixelated", alt: `${name}: the patch it sees` }),
        el("img", { src: h.projection_png, class: "pixelated", alt: `${name}: its deconvnet projection` }),
        el("span", { text: `#${h.rank + 1} ${h.class ?? ""} (${h.value.toFixed(2)})` }),
      );
    }),
  );
}

/** The four variants one after another (a server renders two visualizations at once; more would wait anyway). */
async function loadVariants(base, channel, layer, fresh) {
  for (const v of VARIANTS) {
    const fig = $(`#ms-detail figure[data-variant="${v.key}"]`);
    const img = $("img", fig);
    img.hidden = true;
    fig.setAttribute("aria-busy", "true");
  }
  for (const v of VARIANTS) {
    if (!fresh()) return;
    const fig = $(`#ms-detail figure[data-variant="${v.key}"]`);
    try {
      const url = await variantURL({ ...base, ...v.query, format: "png", scale: 6 }, fresh);
      if (!url || !fresh()) return;
      const img = $("img", fig);
      if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
      img.dataset.objectUrl = url;
      img.src = url;
      img.alt = `channel ${channel} of ${layer}, ${v.caption}`;
      img.hidden = false;
    } catch (e) {
      if (fresh()) fail(e, "#ms-detail-err");
    } finally {
      fig.setAttribute("aria-busy", "false");
    }
  }
}

async function variantURL(query, fresh) {
  for (let tries = 0; tries < 60; tries++) {
    let res;
    try {
      res = await request("/visualize", { query });
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 429)) throw e;
      await sleep(3000);
      continue;
    }
    if (!fresh()) return null;
    if (res.status === 202) {
      await sleep(1500);
      continue;
    }
    return URL.createObjectURL(await res.blob());
  }
  throw new ApiError(0, "the server stayed busy; try again", null);
}

/** The channel's image exactly as rendered (its float values, not the labelled PNG) as a 32x32 PNG to /predict. */
async function classify() {
  const p = ms.params || formParams();
  const channel = Number($("#ms-detail").dataset.channel);
  const list = $("#ms-predict");
  const panel = $("#ms-detail");
  panel.setAttribute("aria-busy", "true");
  $("#ms-detail-err").textContent = "";
  try {
    const gen = ms.detailGen;
    const query = { model: p.model, layer: p.layer, channels: String(channel), steps: p.steps, seed: p.seed };
    const body = await visualizeJSON(query, () => gen === ms.detailGen, `Channel ${channel}`);
    if (!body || gen !== ms.detailGen) return;
    const blob = await new Promise((r) => drawImage(body.values[0]).toBlob(r, "image/png"));
    const answer = await getJSON("/predict", { method: "POST", query: { top_k: 3, model: p.model }, form: imageForm(blob, "files") });
    const top = answer.predictions[0].top_k;
    list.replaceChildren(
      ...top.map((t) => el("li", { "data-class": t.name, text: `${t.name}: ${(t.probability * 100).toFixed(1)}%` })),
    );
  } catch (e) {
    fail(e, "#ms-detail-err");
  } finally {
    panel.setAttribute("aria-busy", "false");
  }
}

function reset() {
  ms.gen++;
  ms.detailGen++;
  ms.atlas = null;
  ms.params = null;
  $("#ms-grid").replaceChildren();
  $("#ms-atlas").hidden = true;
  $("#ms-detail").hidden = true;
  status("");
  $("#ms-err").textContent = "";
}

function start() {
  const root = $("#microscope-body");
  if (!root) return;
  build(root);
  $("#ms-open").addEventListener("submit", (e) => {
    e.preventDefault();
    const c = Math.floor(Number(e.currentTarget.elements.channel.value));
    if (Number.isFinite(c) && c >= 0) openChannel(c);
  });
  $("#ms-layer").addEventListener("change", reset);
  $("#model-select")?.addEventListener("change", reset);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
