// adx serve: the inspection page. Scores and maps come from /api/predict once per image; the threshold
// slider relabels, re-outlines and re-marks everything here, in the browser, without asking the server again.
// Normalised values: 0.5 = the calibrated threshold; the map PNG holds norm_map x 255 (mask = value >= 128).
"use strict";

const state = { card: null, results: [], gallery: null, k: 500 };
const $ = (id) => document.getElementById(id);
const PARALLEL = 4;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
const fmt = (x, digits = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));
const threshold = () => state.k / 1000;

// The decision at the slider's position; at the calibrated position the server's own label is used exactly.
function decide(predScore, predLabel) {
  if (predScore === null || predScore === undefined) return null;
  return state.k === 500 ? Boolean(predLabel) : predScore >= threshold();
}
// The smallest map byte that counts as defect at the slider's position (128 at 0.5, like pred_mask).
const cut = () => Math.max(0, Math.ceil(threshold() * 255 - 1e-9));

// ---- colour map: the jet-like table of adx.visualize.colormap -----------------------------------------
const TABLE = [[0, 0, 0, 128], [0.15, 0, 0, 255], [0.4, 0, 255, 255], [0.65, 255, 255, 0], [1, 255, 0, 0]];
const JET = (() => {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let v = 0; v < 256; v++) {
    const x = v / 255;
    let i = 0;
    while (i < TABLE.length - 2 && x > TABLE[i + 1][0]) i++;
    const [p0, ...c0] = TABLE[i];
    const [p1, ...c1] = TABLE[i + 1];
    const f = Math.min(1, Math.max(0, (x - p0) / (p1 - p0)));
    for (let c = 0; c < 3; c++) lut[v * 3 + c] = Math.round(c0[c] + f * (c1[c] - c0[c]));
  }
  return lut;
})();

function loadImage(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot decode the PNG the server sent"));
    img.src = "data:image/png;base64," + b64;
  });
}
function pixelsOf(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, c.width, c.height).data;
}

// ---- one uploaded image -------------------------------------------------------------------------------
function drawResult(r) {
  if (!r.map) return;
  const { w, h, map, rgb } = r;
  const heat = $("show-heat").checked;
  const outline = $("show-outline").checked;
  const ctx = r.canvas.getContext("2d");
  const out = ctx.createImageData(w, h);
  const d = out.data;
  const a = heat ? 0.45 : 0;
  for (let i = 0; i < w * h; i++) {
    const v = map[i];
    for (let c = 0; c < 3; c++) d[i * 4 + c] = (1 - a) * rgb[i * 4 + c] + a * JET[v * 3 + c];
    d[i * 4 + 3] = 255;
  }
  if (outline) {
    const t = cut();
    const inside = (x, y) => x >= 0 && y >= 0 && x < w && y < h && map[y * w + x] >= t;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (inside(x, y) && !(inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1))) {
          const i = (y * w + x) * 4;
          d[i] = 255; d[i + 1] = 255; d[i + 2] = 255;
        }
      }
    }
  }
  ctx.putImageData(out, 0, 0);
}

function labelResult(r) {
  if (!r.data) return;
  const decision = decide(r.data.pred_score, r.data.pred_label);
  const label = decision === null ? "uncalibrated" : decision ? "anomalous" : "normal";
  r.node.dataset.label = label;
  r.node.classList.toggle("anomalous", decision === true);
  r.badge.className = "badge " + label;
  r.badge.textContent = label;
}

function renderSummary() {
  const done = state.results.filter((r) => r.data);
  const bad = done.filter((r) => r.node.dataset.label === "anomalous").length;
  const failed = state.results.filter((r) => r.error).length;
  $("inspect-summary").textContent = state.results.length
    ? `${done.length} scored: ${bad} anomalous, ${done.length - bad} normal` + (failed ? `; ${failed} refused` : "")
    : "";
}

async function predictOne(r) {
  const form = new FormData();
  form.append("file", r.file, r.file.name);
  try {
    const resp = await fetch("/api/predict?preview=true&map=png", { method: "POST", body: form });
    const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}`, fix: "" }));
    if (!resp.ok) throw Object.assign(new Error(body.error || `HTTP ${resp.status}`), { fix: body.fix || "" });
    const [mapImg, previewImg] = await Promise.all([loadImage(body.map_png), loadImage(body.preview_png)]);
    const mapRGBA = pixelsOf(mapImg);
    r.w = mapImg.naturalWidth;
    r.h = mapImg.naturalHeight;
    r.map = new Uint8Array(r.w * r.h);
    for (let i = 0; i < r.map.length; i++) r.map[i] = mapRGBA[i * 4];
    r.rgb = pixelsOf(previewImg);
    r.canvas.width = r.w;
    r.canvas.height = r.h;
    r.data = body;
    r.node.dataset.predScore = body.pred_score === null ? "" : String(body.pred_score);
    r.node.dataset.serverLabel = String(body.pred_label);
    r.facts.textContent =
      `score ${fmt(body.image_score, 4)} · normalised ${fmt(body.pred_score)}\n` +
      `${body.format} ${body.mode}, ${body.orig_size[1]}×${body.orig_size[0]} px · ${body.decoded_as}`;
    drawResult(r);
    labelResult(r);
  } catch (err) {
    r.error = err.message;
    r.node.classList.add("error");
    r.node.dataset.testid = "result-error";
    r.node.dataset.label = "error";
    r.badge.className = "badge uncalibrated";
    r.badge.textContent = "refused";
    r.canvas.remove();
    r.facts.textContent = "";
    r.facts.appendChild(el("div", "message", err.message));
    if (err.fix) r.facts.appendChild(el("div", "muted", "Fix: " + err.fix));
  }
}

async function upload(files) {
  const queue = [];
  for (const file of files) {
    const node = el("div", "item");
    node.dataset.testid = "result";
    node.dataset.name = file.name;
    node.dataset.label = "pending";
    const canvas = el("canvas");
    const name = el("div", "name", file.name);
    const badge = el("span", "badge pending", "scoring...");
    const facts = el("div", "facts");
    facts.style.whiteSpace = "pre-line";
    node.append(canvas, name, badge, facts);
    $("results").prepend(node);
    const r = { file, node, canvas, badge, facts, data: null, error: null };
    state.results.push(r);
    queue.push(r);
  }
  document.body.dataset.pending = String(Number(document.body.dataset.pending) + queue.length);
  const worker = async () => {
    while (queue.length) {
      const r = queue.shift();
      await predictOne(r);
      document.body.dataset.pending = String(Number(document.body.dataset.pending) - 1);
      renderSummary();
    }
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
}

// ---- the run gallery ----------------------------------------------------------------------------------
function markOf(item) {
  if (item.label !== 0 && item.label !== 1) return "";
  const pred = decide(item.pred_score, item.pred_label);
  if (pred === null) return "";
  return item.label === 1 ? (pred ? "TP" : "FN") : pred ? "FP" : "TN";
}

function renderGallery() {
  const g = state.gallery;
  if (!g) return;
  const onlyErrors = $("gallery-filter").value === "errors";
  const counts = { TP: 0, TN: 0, FP: 0, FN: 0 };
  const box = $("gallery-items");
  box.textContent = "";
  for (const item of g.items) {
    const mark = markOf(item);
    if (mark) counts[mark]++;
    if (onlyErrors && mark !== "FP" && mark !== "FN") continue;
    const node = el("div", "item gitem " + mark);
    node.dataset.testid = "gallery-item";
    node.dataset.mark = mark;
    node.dataset.name = item.name;
    node.dataset.key = `${item.defect_type}/${item.name}`;
    node.dataset.score = String(item.image_score);
    if (item.panel) {
      const img = el("img");
      img.loading = "lazy";
      img.alt = item.name;
      img.src = "/api/run/file?path=" + encodeURIComponent(item.panel);
      node.append(img);
    } else node.append(el("div", "noimg", "no heatmap panel"));
    const name = el("div", "name", `${item.defect_type ? item.defect_type + "/" : ""}${item.name}`);
    if (mark) name.append(el("span", "mark " + mark, mark));
    const truth = item.label === 1 ? "anomalous" : item.label === 0 ? "normal" : "unknown";
    const pred = decide(item.pred_score, item.pred_label);
    node.append(
      name,
      el("div", "facts", `score ${fmt(item.image_score, 4)} · normalised ${fmt(item.pred_score)}`),
      el("div", "facts", `truth ${truth} · predicted ${pred === null ? "n/a" : pred ? "anomalous" : "normal"}`),
    );
    box.append(node);
  }
  $("gallery-counts").textContent = g.has_labels
    ? `${counts.FP} false positives (FP) · ${counts.FN} false negatives (FN) · ${counts.TP} TP · ${counts.TN} TN`
    : "no ground-truth labels in this run (a predict run): no FP/FN";
  $("gallery-counts").dataset.fp = String(counts.FP);
  $("gallery-counts").dataset.fn = String(counts.FN);
}

async function loadGallery() {
  const resp = await fetch("/api/run");
  if (!resp.ok) return;
  state.gallery = await resp.json();
  const g = state.gallery;
  $("tab-gallery").hidden = false;
  $("gallery-source").textContent =
    `${g.items.length} test images of ${g.folder} (${g.results_file}), sorted by score. ` +
    `Threshold ${fmt(g.threshold, 4)} from: ${g.source}.`;
  renderGallery();
}

// ---- threshold slider, model card, tabs ---------------------------------------------------------------
function onThreshold() {
  state.k = Number($("threshold").value);
  const t = threshold();
  $("threshold-value").textContent = t.toFixed(3);
  const c = state.card && state.card.calibration;
  if (c && c.image_threshold !== null && c.image_max !== null) {
    const raw = c.image_threshold + (t - 0.5) * (c.image_max - c.image_min);
    $("threshold-raw").textContent = `image score ≥ ${raw.toFixed(4)}` + (state.k === 500 ? " (calibrated)" : "");
  }
  for (const r of state.results) { labelResult(r); drawResult(r); }
  renderSummary();
  renderGallery();
}

function row(table, key, value) {
  const tr = el("tr");
  tr.append(el("th", "", key), el("td", "", value === null || value === undefined ? "n/a" : String(value)));
  table.append(tr);
}

function renderCard(card) {
  const c = card.calibration;
  const bb = card.backbone || {};
  $("model-summary").textContent =
    `${card.method} · input ${card.input_size[0]}×${card.input_size[1]} · backbone ${bb.name || "n/a"}`;
  $("threshold-source").textContent = card.calibrated
    ? `Calibrated threshold: image score ${fmt(c.image_threshold, 4)}, pixel ${fmt(c.pixel_threshold, 4)}; ` +
      `source: ${c.source}.`
    : "This model has no calibrated threshold: scores are shown without a decision.";
  $("threshold").disabled = !card.calibrated;
  const t = $("model-card");
  t.textContent = "";
  row(t, "method", card.method);
  row(t, "input size (h × w)", card.input_size.join(" × "));
  row(t, "backbone", bb.name);
  row(t, "backbone weights", bb.weights);
  row(t, "weights sha256", bb.weights_sha256);
  row(t, "image threshold", c.image_threshold);
  row(t, "pixel threshold", c.pixel_threshold);
  row(t, "threshold source", c.source);
  row(t, "validation images", `${c.n_normal} normal, ${c.n_anomalous} anomalous`);
  row(t, "normalisation", card.normalisation);
  row(t, "bundle", `${card.bundle.folder} (${card.bundle.format}, run on ${card.bundle.runtime})`);
  row(t, "exported", `${card.bundle.created} by adx ${card.bundle.adx_version}`);
  row(t, "checkpoint", `${card.bundle.checkpoint} (sha256 ${card.bundle.checkpoint_sha256})`);
  row(t, "limits", `${card.server.max_pixels / 1e6} MP per image, ${card.server.max_upload_mb} MiB per upload`);
  if (card.run) {
    row(t, "run folder", card.run.folder);
    for (const [k, v] of Object.entries(card.run.metrics || {})) row(t, "run " + k, fmt(v, 4));
    row(t, "run test images", `${card.run.n_test} (${card.run.n_anomalous} anomalous)`);
  }
  for (const [k, v] of Object.entries(card.hparams || {})) row(t, "hparam " + k, JSON.stringify(v));
}

function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const id of ["inspect", "gallery", "card"]) $(id).hidden = id !== name;
}

async function init() {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("threshold").addEventListener("input", onThreshold);
  $("threshold-reset").addEventListener("click", () => { $("threshold").value = "500"; onThreshold(); });
  $("files").addEventListener("change", (e) => { upload(Array.from(e.target.files)); e.target.value = ""; });
  $("show-heat").addEventListener("change", () => state.results.forEach(drawResult));
  $("show-outline").addEventListener("change", () => state.results.forEach(drawResult));
  $("gallery-filter").addEventListener("change", renderGallery);
  $("clear").addEventListener("click", () => { state.results = []; $("results").textContent = ""; renderSummary(); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(Array.from(e.dataTransfer.files));
  });
  const resp = await fetch("/api/model");
  state.card = await resp.json();
  renderCard(state.card);
  onThreshold();
  await loadGallery();
  document.body.dataset.ready = "true";
}

init();
