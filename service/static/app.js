// ConvLens's web page: predict, look inside, explain, train and choose models, all over the public HTTP API.

import { ApiError, bindKey, getJSON, imageForm, imageURL, request } from "./api.js";
import { $, el } from "./dom.js";
import { LineChart } from "./chart.js";
import { followEvents } from "./sse.js";

const WATCH_STORE = "convlens.watchJob";
const ACTIVE = new Set(["queued", "running"]);

const state = {
  image: null, // the Blob every image endpoint gets
  imageName: "",
  classes: [], // the chosen model's classes
  layerChannels: [], // channels of the current projection grid, in grid order
  grid: null, // [rows, cols] of that grid, from the server's X-ConvLens-Grid
  watch: null, // {id, abort: AbortController}
  jobsTimer: null,
};

// ---- small helpers --------------------------------------------------------------------------------------------

function model() {
  return $("#model-select").value || undefined;
}

function pct(v) {
  return v === null || v === undefined ? "" : `${(v * 100).toFixed(1)}%`;
}

function errorText(e) {
  return e instanceof ApiError ? e.message : `unexpected error: ${e.message || e}`;
}

/** Run `fn` with `panel` marked busy (spinner, aria-busy) and its error line cleared, or filled on failure. */
async function busy(panel, fn, errEl = null) {
  const err = errEl || $(":scope > .error", panel);
  panel.setAttribute("aria-busy", "true");
  if (err) err.textContent = "";
  try {
    return await fn();
  } catch (e) {
    if (e.name === "AbortError") return undefined;
    if (err) err.textContent = errorText(e);
    else showGlobal(errorText(e));
    return undefined;
  } finally {
    panel.setAttribute("aria-busy", "false");
  }
}

function showGlobal(message) {
  const g = $("#global-msg");
  g.textContent = message;
  g.hidden = !message;
}

/** Swap an <img>'s object URL, freeing the old one. */
function setImage(img, url) {
  if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  img.dataset.objectUrl = url;
  img.src = url;
  img.hidden = false;
}

/** Only the newest of overlapping requests for one panel may paint it. */
const generations = new Map();
function nextGen(name) {
  const g = (generations.get(name) || 0) + 1;
  generations.set(name, g);
  return () => generations.get(name) === g;
}

// ---- models ---------------------------------------------------------------------------------------------------

async function loadModels() {
  const list = await busy($("#models"), () => getJSON("/models"), $("#models-err"));
  if (!list) return;
  const select = $("#model-select");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "", text: `the default model${list.default ? ` (${list.default})` : ""}` }));
  for (const m of list.models) select.append(el("option", { value: m.id, text: m.id }));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;

  const body = $("#models-table tbody");
  body.replaceChildren();
  if (!list.models.length) {
    body.append(el("tr", {}, el("td", { colspan: 8, text: "No model yet: train one below." })));
  }
  for (const m of list.models) {
    const action = m.default
      ? el("strong", { text: "default" })
      : el("button", { type: "button", class: "small", text: "Make default", onclick: () => makeDefault(m.id) });
    body.append(
      el(
        "tr",
        { "data-model": m.id },
        el("th", { scope: "row" }, m.id),
        el("td", { text: m.arch }),
        el("td", { text: m.dataset || "" }),
        el("td", { text: pct(m.accuracy) }),
        el("td", { text: m.epoch ?? "" }),
        el("td", { text: m.source }),
        el("td", { text: new Date(m.created).toLocaleString() }),
        el("td", {}, action),
      ),
    );
  }
  $("#models-msg").textContent = list.default ? `Requests without a model use ${list.default}.` : "";
}

async function makeDefault(id) {
  const done = await busy(
    $("#models"),
    () => request(`/models/${encodeURIComponent(id)}/default`, { method: "POST" }),
    $("#models-err"),
  );
  if (!done) return;
  await loadModels();
  $("#models-msg").textContent = `${id} is now the default model.`;
  if (!model()) modelChanged();
}

async function loadClasses() {
  const select = $("#explain-form select[name=target]");
  let id = model();
  try {
    if (!id) id = (await getJSON("/models")).default;
    if (!id) return;
    const detail = await getJSON(`/models/${encodeURIComponent(id)}`);
    state.classes = detail.classes;
    pickLayer(detail.cam_layer);
  } catch {
    return; // the panels that need a model say why
  }
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "", text: "the predicted class" }));
  state.classes.forEach((c) => select.append(el("option", { value: c, text: c })));
  if (state.classes.includes(chosen)) select.value = chosen;
}

/** The model's own default layer (the deepest whose map is at least 4x4 at its input size) in both layer pickers. */
function pickLayer(layer) {
  for (const select of document.querySelectorAll("#explain-form select[name=layer], #inside select[name=layer]")) {
    if (![...select.options].some((o) => o.value === layer)) continue;
    for (const o of select.options) {
      o.dataset.label ??= o.textContent;
      o.textContent = o.dataset.label + (o.value === layer ? ", this model's default" : "");
    }
    select.value = layer;
  }
}

function modelChanged() {
  loadFilters();
  loadClasses();
  if (state.image) analyse();
}

// ---- predict --------------------------------------------------------------------------------------------------

async function loadGallery() {
  const box = $("#gallery");
  const msg = $("#gallery-msg");
  box.setAttribute("aria-busy", "true");
  try {
    const g = await getJSON("/gallery", { query: { count: 30 } });
    box.replaceChildren();
    for (const item of g.images) {
      const img = el("img", { alt: "", class: "pixelated", width: 48, height: 48 });
      const btn = el(
        "button",
        {
          type: "button",
          class: "thumb",
          "data-index": item.index,
          title: `test image ${item.index}: ${item.class}`,
          "aria-label": `test image ${item.index}, a ${item.class}`,
          onclick: () => chooseGallery(item, btn),
        },
        img,
        el("span", { text: item.class }),
      );
      box.append(btn);
      imageURL(item.url)
        .then(({ url }) => {
          img.src = url;
        })
        .catch(() => {});
    }
    msg.textContent = `${g.images.length} of the ${g.total} ${g.dataset} ${g.split} images.`;
  } catch (e) {
    msg.textContent = `No gallery: ${errorText(e)}`;
  } finally {
    box.setAttribute("aria-busy", "false");
  }
}

async function chooseGallery(item, btn) {
  for (const b of document.querySelectorAll("#gallery .thumb[aria-pressed]")) b.removeAttribute("aria-pressed");
  btn.setAttribute("aria-pressed", "true");
  try {
    const res = await request(item.url);
    const blob = await res.blob();
    setCurrent(blob, `test image ${item.index} (true class: ${item.class})`);
  } catch (e) {
    $("#predict-err").textContent = errorText(e);
  }
}

function setCurrent(blob, caption) {
  state.image = blob;
  state.imageName = caption;
  const img = $("#current-img");
  setImage(img, URL.createObjectURL(blob));
  img.alt = caption;
  $("#current-cap").textContent = caption;
  analyse();
}

function analyse() {
  predict();
  lookInside();
  explain();
}

async function predict() {
  if (!state.image) return;
  const fresh = nextGen("predict");
  const bars = $("#predict-bars");
  await busy(
    $("#predict-panel"),
    async () => {
      const out = await getJSON("/predict", {
        method: "POST",
        query: { top_k: 5, model: model() },
        form: imageForm(state.image, "files"),
      });
      if (!fresh()) return;
      const p = out.predictions[0];
      $("#predict-model").textContent = `Answered by model ${out.model}.`;
      bars.replaceChildren(
        ...p.top_k.map((c) =>
          el(
            "li",
            { "data-class": c.name },
            el("span", { class: "name", text: c.name }),
            el(
              "span",
              { class: "bar", role: "presentation" },
              el("span", { style: `width: ${(c.probability * 100).toFixed(1)}%` }),
            ),
            el("span", { class: "prob", text: pct(c.probability) }),
          ),
        ),
      );
    },
    $("#predict-err"),
  ).then(() => {
    if (fresh() && $("#predict-err").textContent) {
      bars.replaceChildren();
      $("#predict-model").textContent = "";
    }
  });
}

function bindDrop() {
  const drop = $("#drop");
  const input = $("#file-input");
  input.addEventListener("change", () => {
    if (input.files && input.files[0]) setCurrent(input.files[0], `your file ${input.files[0].name}`);
  });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) setCurrent(file, `your file ${file.name}`);
  });
}

// ---- look inside ----------------------------------------------------------------------------------------------

async function loadFilters() {
  for (const method of ["channels", "rgb"]) {
    const panel = $(`#filters-${method}-panel`);
    busy(panel, async () => {
      const { url } = await imageURL("/filters", { query: { layer: "conv1", method, model: model() } });
      setImage($(`#filters-${method}`), url);
    });
  }
}

function insideOptions() {
  const f = new FormData($("#inside-form"));
  return Object.fromEntries(f.entries());
}

async function lookInside() {
  if (!state.image) return;
  const opts = insideOptions();
  const fresh = nextGen("inside");
  $("#channel-detail").hidden = true;
  // The old chips name the previous image's strongest channels: none is offered until this image's arrive.
  const chips = $("#channel-buttons");
  chips.replaceChildren();
  busy($("#featuremaps-panel"), async () => {
    const { url } = await imageURL("/featuremaps", {
      method: "POST",
      query: { layer: opts.layer, channels: opts.channels, model: model() },
      form: imageForm(state.image),
    });
    if (fresh()) setImage($("#featuremaps"), url);
  });
  await busy($("#projections-panel"), async () => {
    const { url, res } = await imageURL("/reconstruct", {
      method: "POST",
      query: { ...opts, model: model() },
      form: imageForm(state.image),
    });
    if (!fresh()) return;
    setImage($("#projections"), url);
    const channels = (res.headers.get("X-ConvLens-Channels") || "").split(",").filter(Boolean).map(Number);
    state.layerChannels = opts.mode === "each" ? channels : [];
    state.grid = (res.headers.get("X-ConvLens-Grid") || "").split(",").map(Number); // rows,cols
    state.inside = opts;
    chips.replaceChildren(
      ...state.layerChannels.map((c) =>
        el("button", { type: "button", class: "chip", "data-channel": c, text: `ch ${c}`, onclick: () => showChannel(c) }),
      ),
    );
  });
}

/** A click on the projection grid: which tile (the server says the grid's shape; the input is the first tile). */
function gridClick(e) {
  const n = state.layerChannels.length + 1;
  if (n < 2 || !state.grid) return;
  const img = e.currentTarget;
  const rect = img.getBoundingClientRect();
  const [rows, cols] = state.grid;
  const col = Math.floor(((e.clientX - rect.left) / rect.width) * cols);
  const row = Math.floor(((e.clientY - rect.top) / rect.height) * rows);
  const tile = row * cols + col;
  if (tile >= 1 && tile < n) showChannel(state.layerChannels[tile - 1]);
}

async function showChannel(channel) {
  const opts = state.inside || insideOptions();
  const panel = $("#channel-detail");
  const fresh = nextGen("channel");
  panel.hidden = false;
  for (const b of document.querySelectorAll("#channel-buttons .chip")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.channel) === channel));
  }
  const heading = $("#channel-h");
  heading.textContent = `Channel ${channel} of ${opts.layer}`;
  heading.focus({ preventScroll: true });
  panel.scrollIntoView({ block: "nearest", behavior: "smooth" });
  const list = $("#topk");
  list.replaceChildren();
  busy(panel, async () => {
    const { url } = await imageURL("/reconstruct", {
      method: "POST",
      query: { ...opts, channels: String(channel), mode: "each", scale: 6, model: model() },
      form: imageForm(state.image),
    });
    if (fresh()) setImage($("#channel-projection"), url);
  });
  await loadTopk(opts, channel, fresh);
}

async function loadTopk(opts, channel, fresh) {
  const msg = $("#topk-msg");
  const bar = $("#topk-progress");
  const err = $("#channel-detail > .error");
  const query = { layer: opts.layer, channel, k: 9, images: true, rule: opts.rule, shortcut: opts.shortcut, model: model() };
  msg.textContent = "Finding the dataset images that most activate this channel...";
  for (;;) {
    let res;
    try {
      res = await request("/topk", { query });
    } catch (e) {
      if (fresh()) {
        msg.textContent = "";
        bar.hidden = true;
        err.textContent = errorText(e);
      }
      return;
    }
    if (!fresh()) return;
    const body = await res.json();
    if (res.status === 202) {
      bar.hidden = false;
      bar.value = body.progress || 0;
      const eta = body.eta_s ? `, about ${Math.ceil(body.eta_s)} s left` : "";
      msg.textContent = `Building the top-k index over the validation images: ${Math.round((body.progress || 0) * 100)}%${eta}.`;
      const wait = Math.min(Math.max(Number(res.headers.get("Retry-After")) || 1, 0.5), 2);
      await new Promise((r) => setTimeout(r, wait * 1000));
      continue;
    }
    bar.hidden = true;
    msg.textContent = `The ${body.k} ${body.split || ""} images (of ${body.num_images}) that most activate channel ${channel}: the patch it sees, and its projection.`;
    $("#topk").replaceChildren(
      ...body.hits.map((h) =>
        el(
          "li",
          { class: "hit" },
          el("img", { src: h.patch_png, class: "pixelated", alt: `image ${h.image} patch` }),
          el("img", { src: h.projection_png, class: "pixelated", alt: `image ${h.image} projection` }),
          el("span", { text: `#${h.rank + 1} ${h.class ?? ""} (${h.value.toFixed(2)})` }),
        ),
      ),
    );
    return;
  }
}

// ---- explain --------------------------------------------------------------------------------------------------

async function explain() {
  if (!state.image) return;
  const f = Object.fromEntries(new FormData($("#explain-form")).entries());
  const fresh = nextGen("explain");
  const all = f.method === "all";
  await busy($("#explain-panel"), async () => {
    const { url, res } = await imageURL("/explain", {
      method: "POST",
      query: {
        method: f.method,
        target: f.target,
        layer: f.layer,
        view: all ? "figure" : "overlay",
        size: all ? undefined : 256,
        model: model(),
      },
      form: imageForm(state.image),
    });
    if (!fresh()) return;
    const img = $("#explain-img");
    setImage(img, url);
    img.classList.toggle("wide", all);
    const target = res.headers.get("X-ConvLens-Target");
    const predicted = res.headers.get("X-ConvLens-Predicted");
    const methods = res.headers.get("X-ConvLens-Methods") || f.method;
    img.alt = `${methods} explanation of class ${target}`;
    $("#explain-cap").textContent = `${methods.replaceAll(",", ", ")}: why the model would say ${target} (it predicts ${predicted}).`;
  });
}

// ---- train ----------------------------------------------------------------------------------------------------

const lossChart = new LineChart($("#loss-chart"), {
  xLabel: "step",
  integerX: true,
  series: [{ key: "loss", name: "train loss", color: "#c0392b" }],
});
const accChart = new LineChart($("#acc-chart"), {
  xLabel: "epoch",
  integerX: true,
  yMin: 0,
  yMax: 1,
  series: [
    { key: "train", name: "train acc", color: "#2c7fb8" },
    { key: "eval", name: "val/test acc", color: "#e67e22" },
  ],
});
$("#loss-chart").dataset.title = "Training loss per step:";
$("#acc-chart").dataset.title = "Accuracy per epoch:";

function addRecord(rec) {
  if (rec.kind === "step") lossChart.add("loss", rec.step, rec.loss);
  else if (rec.kind === "epoch") {
    accChart.add("train", rec.epoch, rec.train_acc);
    accChart.add("eval", rec.epoch, rec.val_acc ?? rec.test_acc);
  }
}

/** The training config's fields, as the API publishes them (OpenAPI's TrainConfig): names, types, bounds,
 * choices and defaults (the seed's recipe). The form is built from them, so a new field needs no page change. */
let configSchema = null;

/** A field's own schema: `anyOf: [X, null]` (an optional field) is X, marked nullable. */
function fieldSchema(prop) {
  const parts = prop.anyOf || [];
  const own = parts.find((p) => p.type !== "null");
  return own ? { ...prop, ...own, nullable: parts.some((p) => p.type === "null") } : { ...prop, nullable: false };
}

function configInput(name, f) {
  const label = (f.title || name).replace(/_/g, " ");
  const hint = f.description ? { title: f.description } : {};
  if (f.type === "boolean") {
    const box = el("input", { name, type: "checkbox" });
    box.checked = f.default === true;
    return el("label", hint, box, ` ${label}`);
  }
  let input;
  if (f.enum) {
    input = el("select", { name }, ...f.enum.map((v) => el("option", { text: String(v) })));
    input.value = String(f.default ?? f.enum[0]);
  } else if (f.type === "array") {
    input = el("input", { name, spellcheck: "false", value: (f.default || []).join(",") });
  } else {
    const bounds = {};
    if (f.minimum !== undefined) bounds.min = f.minimum;
    if (f.maximum !== undefined) bounds.max = f.maximum;
    const step = f.type === "integer" ? {} : { step: "any" };
    input = el("input", { name, type: "number", ...bounds, ...step });
    if (f.default !== undefined && f.default !== null) input.value = String(f.default);
    else if (f.nullable) input.placeholder = "none";
  }
  return el("label", hint, `${label} `, input);
}

async function loadConfigFields() {
  const spec = await getJSON("/openapi.json");
  configSchema = spec.components.schemas.TrainConfig.properties;
  const fields = Object.entries(configSchema).map(([name, prop]) => configInput(name, fieldSchema(prop)));
  $("#config-fields").replaceChildren(...fields);
}

function trainConfig(form) {
  const f = new FormData(form);
  const cfg = {};
  for (const [name, prop] of Object.entries(configSchema || {})) {
    const s = fieldSchema(prop);
    if (s.type === "boolean") cfg[name] = f.get(name) !== null;
    else if (s.type === "array") cfg[name] = String(f.get(name) || "").split(/[\s,]+/).filter(Boolean).map(Number);
    else {
      const raw = String(f.get(name) ?? "").trim();
      if (raw === "" && s.nullable) continue;
      cfg[name] = s.enum ? raw : Number(raw);
    }
  }
  return { cfg, runId: String(f.get("run_id") || "").trim() };
}

async function submitTraining(e) {
  e.preventDefault();
  const form = e.currentTarget;
  const button = $("#train-submit");
  const msg = $("#train-msg");
  const { cfg, runId } = trainConfig(form);
  button.disabled = true;
  msg.textContent = "Submitting...";
  const job = await busy(form, () => getJSON("/train", { method: "POST", json: cfg, query: { run_id: runId } }), $("#train-err"));
  button.disabled = false;
  msg.textContent = job ? `Job ${job.id} is ${job.status}.` : "";
  if (job) {
    watchJob(job.id);
    loadJobs();
  }
}

// ---- the watched job across training time: conv1 at every epoch, and the layer statistics ---------------------

const lapse = { id: null, playing: false, records: [] };
const LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"];
const STATS = ["weight_norm", "grad_norm", "update_ratio", "dead", "act_mean"];

function lapseReset(id) {
  const path = `/jobs/${encodeURIComponent(id)}`;
  Object.assign(lapse, { id, playing: false, records: [] });
  setPlaying(false);
  const slider = $("#lapse-epoch");
  Object.assign(slider, { min: 0, max: 0, value: 0, disabled: true });
  $("#lapse-play").disabled = true;
  $("#lapse-img").hidden = true;
  $("#lapse-label").textContent = "";
  $("#lapse-msg").textContent = "";
  $("#lapse-gif").href = `${path}/filters.gif`;
  $("#lapse-gif").hidden = true;
  $("#layers-png").href = `${path}/layers.png`;
  $("#layer-stats-msg").textContent = "";
  renderLayerStats();
}

/** conv1 of the watched job at `epoch` (undefined: the latest) on the run's colour scale; the answer's headers
 * give the range of the slider. Resolves true when it painted. */
async function showEpoch(epoch) {
  const id = lapse.id;
  const fresh = nextGen("lapse");
  const painted = await busy($("#lapse"), async () => {
    let got;
    try {
      got = await imageURL(`/jobs/${encodeURIComponent(id)}/filters`, { query: { colours: "run", epoch } });
    } catch (e) {
      if (!(e instanceof ApiError) || (e.status !== 409 && e.status !== 404)) throw e;
      if (fresh() && id === lapse.id) $("#lapse-msg").textContent = e.message; // none yet, or an older run
      return false;
    }
    if (!fresh() || id !== lapse.id) {
      URL.revokeObjectURL(got.url);
      return false;
    }
    const [lo, hi] = (got.res.headers.get("X-ConvLens-Epochs") || "0-0").split("-").map(Number);
    const shown = Number(got.res.headers.get("X-ConvLens-Epoch"));
    Object.assign($("#lapse-epoch"), { min: lo, max: hi, value: shown, disabled: hi <= lo });
    $("#lapse-play").disabled = hi <= lo;
    $("#lapse-label").textContent = `epoch ${shown}`;
    $("#lapse-msg").textContent = "";
    $("#lapse-gif").hidden = false;
    const img = $("#lapse-img");
    setImage(img, got.url);
    await img.decode().catch(() => {});
    renderLayerStats();
    return true;
  });
  return painted === true;
}

/** After an epoch: show the newest snapshot if the slider was on the newest, else keep its epoch; new statistics. */
function lapseFollow() {
  loadLayerStats();
  if (lapse.playing) return; // the play loop reads the range as it goes
  const slider = $("#lapse-epoch");
  const newest = slider.disabled || Number(slider.value) >= Number(slider.max);
  showEpoch(newest ? undefined : Number(slider.value));
}

function setPlaying(on) {
  lapse.playing = on;
  const button = $("#lapse-play");
  button.setAttribute("aria-pressed", on ? "true" : "false");
  button.textContent = on ? "Pause" : "Play";
}

/** Step through the snapshots, one every half second after it loaded, from the slider's epoch (or the first). */
async function togglePlay() {
  if (lapse.playing) {
    setPlaying(false);
    return;
  }
  const slider = $("#lapse-epoch");
  const id = lapse.id;
  let epoch = Number(slider.value) >= Number(slider.max) ? Number(slider.min) : Number(slider.value);
  setPlaying(true);
  while (lapse.playing && id === lapse.id && (await showEpoch(epoch))) {
    await new Promise((r) => setTimeout(r, 500));
    if (epoch >= Number(slider.max)) break;
    epoch += 1;
  }
  if (id === lapse.id) setPlaying(false);
}

async function loadLayerStats() {
  const id = lapse.id;
  const out = await busy($("#layer-stats-panel"), async () => {
    try {
      return await getJSON(`/jobs/${encodeURIComponent(id)}/layers`);
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 404) throw e;
      if (id === lapse.id) $("#layer-stats-msg").textContent = e.message; // a run older than the statistics
      return undefined;
    }
  });
  if (!out || id !== lapse.id) return;
  lapse.records = out.epochs;
  $("#layer-stats-msg").textContent = out.epochs.length ? "" : "No epoch has ended yet.";
  renderLayerStats();
}

function fmtStat(stat, v) {
  if (v === undefined || v === null) return "n/a";
  if (stat === "dead") return `${(v * 100).toFixed(1)}%`;
  const a = Math.abs(v);
  return a !== 0 && (a >= 1e4 || a < 1e-3) ? v.toExponential(2) : v.toPrecision(3);
}

/** The statistics of the slider's epoch (or the newest there are) as a table: a row a layer. */
function renderLayerStats() {
  const slider = $("#lapse-epoch");
  const recs = lapse.records;
  const rec = recs.find((r) => r.epoch === Number(slider.value)) || recs[recs.length - 1];
  const body = $("#layer-stats tbody");
  body.replaceChildren();
  $("#layer-stats-epoch").textContent = rec ? `${rec.epoch}${rec.epoch === 0 ? " (initialisation)" : ""}` : "-";
  if (!rec) return;
  for (const layer of LAYERS) {
    const stats = rec.layers[layer] || {};
    body.append(
      el(
        "tr",
        { "data-layer": layer },
        el("th", { scope: "row", text: layer }),
        ...STATS.map((k) => el("td", { text: fmtStat(k, stats[k]) })),
      ),
    );
  }
}

async function watchJob(id) {
  if (state.watch) state.watch.abort.abort();
  const abort = new AbortController();
  state.watch = { id, abort };
  localStorage.setItem(WATCH_STORE, id);
  lossChart.clear();
  accChart.clear();
  lapseReset(id);
  $("#watch-id").textContent = `(job ${id})`;
  const status = $("#watch-status");
  status.textContent = "Loading the job's history...";
  const panel = $("#watch");
  panel.dataset.job = id;
  // Backfill from the metrics history, then stream what comes after it.
  let after = -1;
  try {
    const job = await getJSON(`/jobs/${encodeURIComponent(id)}`, { signal: abort.signal });
    panel.dataset.status = job.status;
    for (;;) {
      const page = await getJSON(`/jobs/${encodeURIComponent(id)}/metrics`, {
        query: { after_step: after, limit: 5000 },
        signal: abort.signal,
      });
      page.records.forEach(addRecord);
      after = page.next_after_step;
      if (!page.has_more) break;
    }
  } catch (e) {
    if (e.name === "AbortError") return;
    status.textContent = `Cannot follow job ${id}: ${errorText(e)}`;
    if (e instanceof ApiError && e.status === 404) localStorage.removeItem(WATCH_STORE);
    return;
  }
  status.textContent = `Following job ${id}...`;
  lapseFollow();
  // From one step back: an epoch record written just after the backfill read its step would be skipped by a
  // stream that starts after that step; a record seen twice replaces its point.
  await followEvents(`/jobs/${encodeURIComponent(id)}/events?after_step=${Math.max(-1, after - 1)}`, {
    signal: abort.signal,
    onEvent(name, data) {
      if (name === "epoch") lapseFollow(); // its snapshot and statistics are written before its record
      if (name === "step" || name === "epoch" || name === "final") {
        addRecord(data);
        if (name === "step") {
          status.textContent = `Job ${id}: ${panel.dataset.status || "running"}, epoch ${data.epoch}, step ${data.step}, loss ${data.loss.toFixed(3)}.`;
        }
      } else if (name === "status") {
        panel.dataset.status = data.status;
        if (data.status === "running" && $("#lapse-img").hidden) showEpoch(); // epoch 0 comes as training starts
        const p = data.progress || {};
        const where = p.step !== undefined ? `, step ${p.step}${p.total_steps ? ` of ${p.total_steps}` : ""}` : "";
        status.textContent = `Job ${id}: ${data.status}${p.phase ? ` (${p.phase})` : ""}${where}.`;
        loadJobs();
      } else if (name === "end") {
        panel.dataset.status = data.status;
        lapseFollow();
        const acc = data.metrics && data.metrics.test_acc;
        status.textContent = `Job ${id} ${data.status}${acc !== undefined && acc !== null ? `: test accuracy ${pct(acc)}` : ""}${data.error ? `: ${data.error}` : ""}.`;
        loadJobs();
        loadModels();
        return "stop";
      }
      return undefined;
    },
    onError(message) {
      status.textContent = `Job ${id}: ${message}`;
    },
  });
}

async function cancelJob(id) {
  await busy(
    $("#train"),
    async () => {
      const out = await getJSON(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
      $("#train-msg").textContent =
        out.status === "cancelled" ? `Job ${id} is cancelled.` : `Job ${id} will stop at its next step.`;
    },
    $("#jobs-err"),
  );
  loadJobs();
}

function fmtConfig(c, k) {
  const v = c[k];
  return v === undefined || v === null ? "" : String(v);
}

async function loadJobs() {
  clearTimeout(state.jobsTimer);
  let active = false;
  try {
    const list = await getJSON("/jobs", { query: { limit: 50 } });
    $("#jobs-err").textContent = "";
    const body = $("#jobs tbody");
    body.replaceChildren();
    if (!list.jobs.length) body.append(el("tr", {}, el("td", { colspan: 12, text: "No jobs yet." })));
    for (const j of list.jobs) {
      const c = j.config || {};
      active ||= ACTIVE.has(j.status);
      const progress =
        j.step !== null && j.step !== undefined ? `step ${j.step}${j.total_steps ? `/${j.total_steps}` : ""}, epoch ${j.epoch ?? "?"}` : "";
      const actions = el(
        "td",
        { class: "actions" },
        el("button", { type: "button", class: "small", text: "Watch", onclick: () => watchJob(j.id) }),
        ACTIVE.has(j.status) && !j.cancel_requested
          ? el("button", { type: "button", class: "small danger", text: "Cancel", onclick: () => cancelJob(j.id) })
          : null,
        el("a", { href: `/jobs/${encodeURIComponent(j.id)}/curves.png`, target: "_blank", rel: "noopener", text: "curves" }),
      );
      body.append(
        el(
          "tr",
          { "data-job": j.id, "data-status": j.status },
          el("th", { scope: "row" }, j.id),
          el("td", { class: `status ${j.status}`, text: j.status + (j.cancel_requested && ACTIVE.has(j.status) ? " (cancelling)" : ""), title: j.error || "" }),
          el("td", { text: fmtConfig(c, "arch") }),
          el("td", { text: fmtConfig(c, "epochs") }),
          el("td", { text: fmtConfig(c, "batch_size") }),
          el("td", { text: `${fmtConfig(c, "optimizer")} ${fmtConfig(c, "lr")}` }),
          el("td", { text: c.milestones ? `[${c.milestones.join(", ")}] x${fmtConfig(c, "gamma")}` : "" }),
          el("td", { text: [c.crop ? "crop" : "", c.flip ? "flip" : ""].filter(Boolean).join(" + ") || "none" }),
          el("td", { text: progress }),
          el("td", { text: pct(j.best_val_acc) }),
          el("td", { text: pct(j.test_acc) }),
          actions,
        ),
      );
    }
  } catch (e) {
    $("#jobs-err").textContent = errorText(e);
  }
  state.jobsTimer = setTimeout(loadJobs, active ? 2000 : 15000);
}

// ---- start ----------------------------------------------------------------------------------------------------

function start() {
  bindKey($("#api-key"));
  $("#settings").addEventListener("submit", (e) => e.preventDefault());
  bindDrop();
  $("#model-select").addEventListener("change", modelChanged);
  $("#inside-form").addEventListener("submit", (e) => {
    e.preventDefault();
    lookInside();
  });
  for (const s of document.querySelectorAll("#inside-form select")) s.addEventListener("change", () => lookInside());
  $("#projections").addEventListener("click", gridClick);
  // A file the browser cannot show either (the API's error says what is wrong with it): no broken-image icon.
  $("#current-img").addEventListener("error", (e) => {
    e.currentTarget.hidden = true;
  });
  $("#explain-form").addEventListener("submit", (e) => {
    e.preventDefault();
    explain();
  });
  for (const s of document.querySelectorAll("#explain-form select")) s.addEventListener("change", () => explain());
  $("#train-form").addEventListener("submit", submitTraining);
  $("#train-form").addEventListener("reset", () => setTimeout(loadConfigFields)); // the API's defaults again
  loadConfigFields().catch((e) => {
    $("#train-err").textContent = `cannot read the training config's fields: ${e.message}`;
  });
  $("#jobs-refresh").addEventListener("click", loadJobs);
  $("#models-refresh").addEventListener("click", loadModels);
  $("#lapse-play").addEventListener("click", togglePlay);
  $("#lapse-epoch").addEventListener("input", (e) => {
    setPlaying(false); // a hand on the slider stops the playback
    $("#lapse-label").textContent = `epoch ${e.currentTarget.value}`;
    showEpoch(Number(e.currentTarget.value));
  });

  loadModels().then(loadClasses);
  loadFilters();
  loadGallery();
  loadJobs();
  const watched = localStorage.getItem(WATCH_STORE);
  if (watched) watchJob(watched);
  document.body.dataset.ready = "true";
}

start();
