// normdino viewer: upload to /predict, then draw image | anomaly map | mask from the 16-bit map, and
// re-threshold in the browser from the model's calibration table (no new request).
"use strict";

const $ = (id) => document.getElementById(id);
const PNG16_MAX = 65535;

const state = {
  models: [],
  result: null,     // the /predict answer
  images: null,     // Uint8Array (n, H, W, C)
  maps: null,       // Uint16Array (n, H, W)
  colorIndex: null, // Uint8Array(65536): 16-bit value -> colour-map index
  slice: 0,
  fpr: 0.05,
  opacity: 0.5,
  threshold: NaN,
  imageThreshold: NaN,
  maskPixels: 0,
  volumeMaskFraction: NaN,
};
window.normdinoViewer = state;

function setState(name) { document.body.dataset.state = name; }

// ---------------------------------------------------------------- requests

function authHeaders() {
  const token = sessionStorage.getItem("normdino-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) $("token-form").classList.remove("hidden");
  if (!response.ok) {
    let message = `The server answered ${response.status}.`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// ---------------------------------------------------------------- calibration

function interpLog(fprs, values, fpr) {
  // Threshold at fpr, linear in log(FPR) between calibrated points (as the detector does).
  const x = Math.log(fpr);
  if (fpr <= fprs[0]) return values[0];
  if (fpr >= fprs[fprs.length - 1]) return values[values.length - 1];
  let lo = 0, hi = fprs.length - 1;
  while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (fprs[mid] <= fpr) lo = mid; else hi = mid; }
  const x0 = Math.log(fprs[lo]), x1 = Math.log(fprs[hi]);
  const t = x1 > x0 ? (x - x0) / (x1 - x0) : 0;
  return values[lo] + t * (values[hi] - values[lo]);
}

function sliderToFpr(position) {
  const c = state.result.viewer.calibration, lo = Math.log(c.fprs[0]), hi = Math.log(c.fprs[c.fprs.length - 1]);
  return Math.exp(lo + (hi - lo) * position / 1000);
}

function fprToSlider(fpr) {
  const c = state.result.viewer.calibration, lo = Math.log(c.fprs[0]), hi = Math.log(c.fprs[c.fprs.length - 1]);
  return Math.round(1000 * (Math.log(fpr) - lo) / (hi - lo));
}

const fmt = (v) => (Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(4) : v.toExponential(3));
const pct = (v) => (v >= 0.1 ? `${(v * 100).toFixed(0)} %` : v >= 0.01 ? `${(v * 100).toFixed(1)} %` : `${(v * 100).toFixed(2)} %`);

// ---------------------------------------------------------------- models

async function loadModels() {
  try {
    const health = await (await api("/health")).json();
    $("health").textContent = `server ok · v${health.version}`;
    $("health").className = "pill ok";
    state.models = (await (await api("/models")).json()).models;
  } catch (err) {
    $("health").textContent = "not connected";
    $("health").className = "pill bad";
    showError(err.message);
    return;
  }
  const select = $("model");
  select.innerHTML = "";
  for (const m of state.models) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.name;
    select.appendChild(option);
  }
  hideError();
  showModel();
}

function currentModel() { return state.models.find((m) => m.name === $("model").value); }

function showModel() {
  const m = currentModel();
  if (!m) return;
  const backbone = m.backbone.split("/").filter(Boolean).pop() || m.backbone;  // a local folder: its last part
  $("model-info").textContent = `${m.method} · ${backbone} · calibrated FPR ${pct(m.fpr_range[0])}–${pct(m.fpr_range[1])}`;
  $("model-info").title = `backbone: ${m.backbone}`;
  $("random-banner").classList.toggle("hidden", !m.random_weights);
}

// ---------------------------------------------------------------- upload

async function upload(file) {
  const model = currentModel();
  if (!model) { showError("No model is loaded: check the server and the token."); return; }
  hideError();
  setState("busy");
  $("progress").classList.remove("hidden");
  $("progress-text").textContent = "Uploading and processing…";
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  // Keep the FPR chosen on the previous result, within this model's calibrated range.
  const fpr = state.result ? Math.min(model.fpr_range[1], Math.max(model.fpr_range[0], state.fpr)) : model.default_fpr;
  try {
    if (state.result) api(`/results/${state.result.id}`, { method: "DELETE" }).catch(() => {});
    const answer = await (await api(`/predict?model=${encodeURIComponent(model.name)}&fpr=${fpr}`,
                                    { method: "POST", body: form })).json();
    $("progress-text").textContent = "Loading the maps…";
    const [images, maps] = await Promise.all([
      api(answer.viewer.images).then((r) => r.arrayBuffer()),
      api(answer.viewer.maps).then((r) => r.arrayBuffer()),
    ]);
    show(answer, new Uint8Array(images), new Uint16Array(maps));
    setState("ready");
  } catch (err) {
    showError(err.message);
    setState("error");
  } finally {
    $("progress").classList.add("hidden");
  }
}

function showError(message) { $("error").textContent = message; $("error").classList.remove("hidden"); }
function hideError() { $("error").classList.add("hidden"); }

// ---------------------------------------------------------------- display

function show(answer, images, maps) {
  state.result = answer;
  state.images = images;
  state.maps = maps;
  state.fpr = answer.fpr;
  const v = answer.viewer;
  // 16-bit value -> colour index over the display range, computed once per result.
  const [vmin, vmax] = answer.display_range;
  state.colorIndex = new Uint8Array(PNG16_MAX + 1);
  for (let value = 0; value <= PNG16_MAX; value++) {
    const t = (scoreOf(value) - vmin) / (vmax - vmin);
    state.colorIndex[value] = Math.round(Math.min(1, Math.max(0, t)) * 255);
  }
  for (const id of ["canvas-image", "canvas-map", "canvas-mask"]) {
    const canvas = $(id);
    canvas.width = v.width;
    canvas.height = v.height;
    canvas.style.aspectRatio = `${v.width} / ${v.height * v.pixel_aspect}`;
    const labels = canvas.parentElement.querySelector(".labels");
    labels.innerHTML = Object.entries(v.labels).filter(([, text]) => text)
      .map(([where, text]) => `<span class="${where}">${text}</span>`).join("");
  }
  drawColorbar(answer);
  $("orientation-note").classList.toggle("hidden", answer.kind !== "volume" || Boolean(v.plane));
  $("empty").classList.add("hidden");
  for (const id of ["panels", "colorbar-row", "result", "controls", "downloads"]) $(id).classList.remove("hidden");
  $("random-banner").classList.toggle("hidden", !answer.random_weights);

  const isVolume = answer.kind === "volume";
  $("slice-controls").classList.toggle("hidden", !isVolume);
  $("volume-mask-label").classList.toggle("hidden", !isVolume);
  $("volume-mask").classList.toggle("hidden", !isVolume);
  $("slice").max = String(v.n - 1);
  state.slice = isVolume ? v.slice_scores.indexOf(Math.max(...v.slice_scores)) : 0;
  $("slice").value = String(state.slice);
  $("fpr").value = String(fprToSlider(state.fpr));
  showFiles(answer);
  rethreshold();
}

function drawColorbar(answer) {
  const canvas = $("colorbar"), ctx = canvas.getContext("2d"), lut = answer.viewer.colormap;
  const data = ctx.createImageData(256, 1);
  for (let i = 0; i < 256; i++) data.data.set([...lut[i], 255], 4 * i);
  ctx.putImageData(data, 0, 0);
  $("cbar-min").textContent = fmt(answer.display_range[0]);
  $("cbar-max").textContent = fmt(answer.display_range[1]);
}

function rethreshold() {
  const r = state.result, c = r.viewer.calibration;
  state.threshold = interpLog(c.fprs, c.pixel_thresholds, state.fpr);
  state.imageThreshold = interpLog(c.fprs, c.image_thresholds, state.fpr);
  $("fpr-value").textContent = pct(state.fpr);
  $("mask-title").textContent = `Mask at ${pct(state.fpr)} FPR`;
  $("pixel-threshold").textContent = fmt(state.threshold);
  $("image-threshold").textContent = fmt(state.imageThreshold);
  const anomalous = r.score > state.imageThreshold;
  $("verdict").textContent = anomalous ? "ANOMALOUS" : "NORMAL";
  $("verdict").className = `verdict ${anomalous ? "anomalous" : "normal"}`;
  $("score").textContent = fmt(r.score);
  const [vmin, vmax] = r.display_range;
  const t = Math.min(1, Math.max(0, (state.threshold - vmin) / (vmax - vmin)));
  $("cbar-marker").style.left = `calc(${(t * 100).toFixed(2)}% - 1px)`;
  if (r.kind === "volume") {
    const cut = maskCut(), maps = state.maps;
    let count = 0;
    for (let i = 0; i < maps.length; i++) if (maps[i] > cut) count++;
    state.volumeMaskFraction = count / maps.length;
    $("volume-mask").textContent = `${pct(state.volumeMaskFraction)} of shown slices`;
    drawSlicePlot();
  }
  render();
}

function scoreOf(value) {
  // The score a 16-bit map value stands for: low + value / 65535 * (high - low).
  const [low, high] = state.result.viewer.map_range;
  return low + value / PNG16_MAX * (high - low);
}

function maskCut() {
  // Largest 16-bit value whose score is not above the threshold (-1 if none): mask = value > cut.
  const [low, high] = state.result.viewer.map_range;
  let value = Math.floor((state.threshold - low) / (high - low) * PNG16_MAX);
  value = Math.min(PNG16_MAX, Math.max(-1, value));
  while (value + 1 <= PNG16_MAX && scoreOf(value + 1) <= state.threshold) value++;
  while (value >= 0 && scoreOf(value) > state.threshold) value--;
  return value;
}

function render() {
  const r = state.result, v = r.viewer, n = v.width * v.height, ch = v.channels;
  const images = state.images.subarray(state.slice * n * ch, (state.slice + 1) * n * ch);
  const maps = state.maps.subarray(state.slice * n, (state.slice + 1) * n);
  const lut = v.colormap, alpha = state.opacity, cut = maskCut();
  const gray = new Uint8ClampedArray(n * 4), heat = new Uint8ClampedArray(n * 4), mask = new Uint8ClampedArray(n * 4);
  const inMask = new Uint8Array(n);
  let count = 0;
  for (let i = 0; i < n; i++) {
    if (maps[i] > cut) { inMask[i] = 1; count++; }
  }
  const w = v.width, h = v.height;
  for (let i = 0; i < n; i++) {
    const g0 = images[i * ch], g1 = ch === 3 ? images[i * ch + 1] : g0, g2 = ch === 3 ? images[i * ch + 2] : g0;
    const o = 4 * i;
    gray[o] = g0; gray[o + 1] = g1; gray[o + 2] = g2; gray[o + 3] = 255;
    const color = lut[state.colorIndex[maps[i]]];
    heat[o] = (1 - alpha) * g0 + alpha * color[0];
    heat[o + 1] = (1 - alpha) * g1 + alpha * color[1];
    heat[o + 2] = (1 - alpha) * g2 + alpha * color[2];
    heat[o + 3] = 255;
    if (inMask[i]) {
      const x = i % w, y = (i / w) | 0;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !inMask[i - 1] || !inMask[i + 1] || !inMask[i - w] || !inMask[i + w];
      const a = edge ? 1 : alpha * 0.6;
      mask[o] = (1 - a) * g0 + a * 255; mask[o + 1] = (1 - a) * g1 + a * 59; mask[o + 2] = (1 - a) * g2 + a * 48;
    } else {
      mask[o] = g0; mask[o + 1] = g1; mask[o + 2] = g2;
    }
    mask[o + 3] = 255;
  }
  for (const [id, data] of [["canvas-image", gray], ["canvas-map", heat], ["canvas-mask", mask]]) {
    $(id).getContext("2d").putImageData(new ImageData(data, w, h), 0, 0);
  }
  state.maskPixels = count;
  $("mask-pixels").textContent = `${count} px (${pct(count / n)})`;
  if (r.kind === "volume") {
    const score = v.slice_scores[state.slice], flagged = score > state.imageThreshold;
    $("slice-value").textContent = `${v.slice_indices[state.slice]} (${state.slice + 1} of ${v.n})`;
    $("slice-score").textContent = `slice score ${fmt(score)}${flagged ? " · above the image threshold" : ""}`;
  }
  document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
}

function drawSlicePlot() {
  const canvas = $("slice-plot"), v = state.result.viewer, scores = v.slice_scores;
  const width = canvas.width = canvas.clientWidth || 280, height = canvas.height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const lo = Math.min(...scores, state.imageThreshold), hi = Math.max(...scores, state.imageThreshold);
  const y = (s) => height - 4 - (hi > lo ? (s - lo) / (hi - lo) : 0.5) * (height - 8);
  const step = width / scores.length;
  scores.forEach((s, i) => {
    ctx.fillStyle = i === state.slice ? "#5aa9e6" : s > state.imageThreshold ? "#c8463f" : "#59606c";
    ctx.fillRect(i * step + 0.5, y(s), Math.max(1, step - 1), height - y(s));
  });
  ctx.strokeStyle = "#ffb020";
  ctx.setLineDash([4, 3]);
  ctx.beginPath(); ctx.moveTo(0, y(state.imageThreshold)); ctx.lineTo(width, y(state.imageThreshold)); ctx.stroke();
}

function showFiles(answer) {
  const list = $("files");
  list.innerHTML = "";
  for (const [name, url] of Object.entries(answer.files)) {
    const item = document.createElement("li"), link = document.createElement("a");
    link.href = url;
    link.textContent = name;
    link.addEventListener("click", async (event) => {
      event.preventDefault();
      try {
        const blob = await (await api(url)).blob();
        const a = document.createElement("a");
        a.href = URL.createObjectURL(blob);
        a.download = name;
        a.click();
        setTimeout(() => URL.revokeObjectURL(a.href), 1000);
      } catch (err) { showError(err.message); }
    });
    item.appendChild(link);
    list.appendChild(item);
  }
  $("expiry").textContent = `· kept ${Math.round(answer.expires_in_s / 60)} min`;
}

// ---------------------------------------------------------------- events

function bind() {
  const drop = $("drop"), input = $("file-input");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); input.value = ""; });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files; if (f.length) upload(f[0]); });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => e.preventDefault());

  $("model").addEventListener("change", showModel);
  $("fpr").addEventListener("input", () => { state.fpr = sliderToFpr(Number($("fpr").value)); rethreshold(); });
  $("opacity").addEventListener("input", () => {
    state.opacity = Number($("opacity").value) / 100;
    $("opacity-value").textContent = `${$("opacity").value} %`;
    render();
  });
  $("slice").addEventListener("input", () => { state.slice = Number($("slice").value); render(); drawSlicePlot(); });
  $("slice-plot").addEventListener("click", (e) => {
    const n = state.result.viewer.n, rect = e.target.getBoundingClientRect();
    state.slice = Math.min(n - 1, Math.max(0, Math.floor((e.clientX - rect.left) / rect.width * n)));
    $("slice").value = String(state.slice);
    render(); drawSlicePlot();
  });
  document.addEventListener("keydown", (e) => {
    if (!state.result || state.result.kind !== "volume" || e.target.tagName === "INPUT") return;
    if (e.key === "ArrowUp" || e.key === "PageUp") { $("slice").value = String(state.slice + 1); }
    else if (e.key === "ArrowDown" || e.key === "PageDown") { $("slice").value = String(state.slice - 1); }
    else return;
    state.slice = Number($("slice").value); render(); drawSlicePlot();
  });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("normdino-token", $("token").value);
    $("token-form").classList.add("hidden");
    loadModels();
  });
}

bind();
loadModels();
