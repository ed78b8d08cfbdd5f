// The incontext playground: plain JS over the public API, no build step.
// The chain of turns is the server's lineage (GET /v1/runs/{id}/lineage); the page keeps only
// the current run id, in the URL hash, so a reload or a shared link shows the same timeline.
// Besides the plain edit, the Task picker runs the workflows (POST /v1/models/{workflow}/runs,
// docs/workflows.md): their runs are runs, so progress, the timeline and results are shared.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "incontext.apiKey";
const FIELDS = ["prompt", "image_url", "guidance_scale", "num_images", "aspect_ratio", "output_format", "seed", "preserve", "num_inference_steps", "model",
  "reference_image_url", "logo_image_url", "mask_image_url"];
// Both second images share one upload slot, so their errors show there.
const ERROR_SLOTS = { reference_image_url: "err-second", logo_image_url: "err-second" };

// The form of each workflow the page offers (incontext/workflows.py's inputs): the prompt's
// label and placeholder (required ones are sent even when empty, so the server names the
// error), the second image's field, and whether a mask may be given. A workflow the server
// lists that is not here is not offered.
const PLAIN_EDIT = { prompt: { label: "Instruction", placeholder: "make the red circle blue" } };
const WORKFLOW_FORMS = {
  "object-removal": {
    label: "Remove an object",
    prompt: { label: "What to remove", placeholder: "the red circle", required: true },
  },
  "background-replace": {
    label: "Replace the background",
    prompt: { label: "Instruction (optional)", placeholder: "replace the background with the one in the second image" },
    second: { field: "reference_image_url", label: "Reference image (its background is used)" },
  },
  "logo-placement": {
    label: "Place a logo",
    prompt: { label: "Instruction (optional)", placeholder: "put the logo from the second image in the bottom right" },
    second: { field: "logo_image_url", label: "Logo" },
    mask: true,
  },
  "segmentation": {
    label: "Segment",
    prompt: { label: "What to segment", placeholder: "the red circle", required: true },
    pngOnly: true,  // its output is the mask
  },
};
// The plain edit's fields that a workflow does not take.
const EDIT_ONLY = ["num-images", "aspect", "preserve", "model"];

const state = {
  models: [],
  workflows: [],      // the listing's workflow cards the page has a form for
  slots: { second: null, mask: null },  // a workflow's other images: data: URI or URL
  source: null,       // {url, runId?, index?, label}: what the next edit starts from
  tree: null,         // the lineage answer for the current run
  current: null,      // id of the run shown
  watching: null,     // id of the run whose progress is shown
};

// ---------------------------------------------------------------- API

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, body) {
    super(`${body.code}: ${body.message}`);
    this.status = status;
    this.code = body.code;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) throw new ApiError(response.status, await errorBody(response));
  return response.json();
}

async function errorBody(response) {
  try {
    const body = await response.json();
    if (body && body.code) return body;
  } catch (_) { /* not JSON */ }
  return { code: `HTTP_${response.status}`, message: response.statusText || "request failed", errors: [] };
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header);
// reconnects with Last-Event-ID, so no step is lost or shown twice. Resolves with the run.
async function watchRun(runId, onEvent) {
  let lastId = null;
  for (let attempt = 0; attempt < 6; attempt++) {
    const headers = { ...authHeaders(), ...(lastId ? { "Last-Event-ID": lastId } : {}) };
    let response;
    try {
      response = await fetch(`/v1/runs/${runId}/events`, { headers });
    } catch (_) {
      await sleep(500 * (attempt + 1));
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await errorBody(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (event.id) lastId = event.id;
          if (!event.event) continue;
          const data = JSON.parse(event.data);
          if (event.event === "end") return data;
          onEvent(event.event, data);
        }
      }
    } catch (_) { /* the connection dropped: resume below */ }
    await sleep(300);
  }
  return api(`/v1/runs/${runId}`);  // the stream kept failing: one plain read
}

function parseEvent(block) {
  const event = { data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const name = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (name === "data") event.data += (event.data ? "\n" : "") + value;
    else event[name] = value;
  }
  return event;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- errors beside their fields

function clearErrors() {
  for (const el of document.querySelectorAll(".err")) el.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showError(error) {
  const body = error instanceof ApiError ? error.body : { code: "ERROR", message: String(error.message || error), errors: [] };
  if (error instanceof ApiError && error.status === 401) {
    $("key-box").open = true;
    return say("err-key", body.code, body.message, $("api-key"));
  }
  const fieldErrors = (body.errors || []).filter((e) => e.field);
  if (!fieldErrors.length) return say(fieldFor(body) || "err-form", body.code, body.message);
  for (const e of fieldErrors) {
    const name = e.field.replace(/^input\./, "");
    const slot = ERROR_SLOTS[name] || `err-${name}`;
    say(FIELDS.includes(name) && $(slot) ? slot : "err-form", body.code, e.message || body.message);
  }
}

// Image errors have their own codes and name input.image_url only in errors[]; some come without.
function fieldFor(body) {
  if (["INVALID_IMAGE", "IMAGE_TOO_LARGE", "UNSUPPORTED_FORMAT", "IMAGE_FETCH_FAILED"].includes(body.code)) return "err-image_url";
  if (body.code === "MODEL_NOT_FOUND" || body.code === "MODEL_UNAVAILABLE") return "err-model";
  return null;
}

function say(slot, code, message, field) {
  const el = $(slot);
  el.innerHTML = "";
  const strong = document.createElement("code");
  strong.textContent = code;
  el.append(strong, ` ${message}`);
  const input = field || document.querySelector(`[aria-describedby~="${slot}"]`);
  if (input) input.setAttribute("aria-invalid", "true");
}

// ---------------------------------------------------------------- the source image

function setSource(source) {
  state.source = source;
  const img = $("source-img");
  img.hidden = !source;
  if (source) {
    img.src = source.url;
    img.alt = source.label;
  }
  $("continuing").hidden = !(source && source.runId);
  $("continuing-text").textContent = source && source.runId ? source.label : "";
  $("drop-help").hidden = Boolean(source && source.runId);
}

function readFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    $("image-url").value = "";
    setSource({ url: reader.result, label: `uploaded image ${file.name || ""}`.trim() });
  };
  reader.readAsDataURL(file);
}

function bindSourceInputs() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => readFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    readFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) readFile(file);
  });
  $("image-url").addEventListener("change", (e) => {
    const url = e.target.value.trim();
    setSource(url ? { url, label: "image from URL" } : null);
  });
  $("new-chain").addEventListener("click", () => {
    setSource(null);
    $("file").value = "";
    $("file").click();
  });
}

// A workflow's other image (the reference or logo, the mask): a file or a URL, with a thumbnail.
function bindSlot(name) {
  const put = (url) => {
    state.slots[name] = url || null;
    $(`${name}-img`).hidden = !url;
    if (url) $(`${name}-img`).src = url;
  };
  $(`${name}-file`).addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return put(null);
    const reader = new FileReader();
    reader.onload = () => {
      $(`${name}-url`).value = "";
      put(reader.result);
    };
    reader.readAsDataURL(file);
  });
  $(`${name}-url`).addEventListener("change", (e) => {
    $(`${name}-file`).value = "";
    put(e.target.value.trim());
  });
}

// ---------------------------------------------------------------- models, workflows and presets

async function loadModels() {
  try {
    state.models = (await api("/v1/models")).items;
  } catch (error) {
    return showError(error);
  }
  state.workflows = state.models.filter((m) => m.kind === "workflow" && WORKFLOW_FORMS[m.id]);
  state.models = state.models.filter((m) => m.kind !== "workflow");
  const select = $("model");
  for (const model of state.models) {
    const option = new Option(model.id + (model.default ? " (default)" : ""), model.id, model.default, model.default);
    select.append(option);
  }
  for (const workflow of state.workflows) $("task").append(new Option(`${WORKFLOW_FORMS[workflow.id].label} (${workflow.id})`, workflow.id));
  select.addEventListener("change", applyPreset);
  $("task").addEventListener("change", applyTask);
  applyTask();
}

// Shows the fields the chosen task takes, and its model's preset.
function applyTask() {
  const task = $("task").value;
  const form = task ? WORKFLOW_FORMS[task] : PLAIN_EDIT;
  const card = state.workflows.find((w) => w.id === task);
  $("task-help").hidden = !card;
  $("task-help").textContent = card ? `${card.description}.` : "";
  $("prompt-label").textContent = form.prompt.label;
  $("prompt").placeholder = form.prompt.placeholder;
  $("second-box").hidden = !form.second;
  if (form.second) $("second-legend").textContent = form.second.label;
  $("mask-box").hidden = !form.mask;
  for (const id of EDIT_ONLY) $(id).parentElement.hidden = Boolean(task);
  $("format").parentElement.hidden = Boolean(form.pngOnly);
  // What a workflow keeps of the input is kept bit for bit only in PNG: its default.
  if (task) $("format").value = "png";
  $("submit").textContent = task ? `Run ${task}` : "Edit";
  applyPreset();
}

// A model's preset (its default steps and guidance) fills the fields; steps can be changed.
// A workflow's is the preset of the model it runs on.
function applyPreset() {
  const task = $("task").value;
  const model = task ? state.workflows.find((w) => w.id === task) : state.models.find((m) => m.id === $("model").value);
  if (!model) return;
  const steps = model.defaults.num_inference_steps;
  const select = $("steps");
  select.innerHTML = "";
  select.append(new Option(`model preset: ${steps} steps, guidance ${model.defaults.guidance_scale}`, ""));
  for (const n of [4, 8, 12, 28, 50].filter((n) => n !== steps)) select.append(new Option(`${n} steps`, String(n)));
  $("guidance").value = model.defaults.guidance_scale;
  $("guidance-out").value = model.defaults.guidance_scale;
}

// ---------------------------------------------------------------- submitting and watching

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const task = $("task").value;
  const input = task ? workflowInput(task) : editInput();
  if ($("seed").value !== "") input.seed = Number($("seed").value);
  if ($("steps").value) input.num_inference_steps = Number($("steps").value);
  const model = task || $("model").value || "flux-pro/kontext";
  $("submit").disabled = true;
  try {
    const run = await api(`/v1/models/${model}/runs`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ input }),
    });
    location.hash = `run=${run.id}`;
    await follow(run.id);
  } catch (error) {
    showError(error);
  } finally {
    $("submit").disabled = false;
  }
}

function editInput() {
  const input = {
    prompt: $("prompt").value,
    image_url: state.source ? state.source.url : "",
    guidance_scale: Number($("guidance").value),
    num_images: Number($("num-images").value),
    output_format: $("format").value,
    preserve: $("preserve").value,
    return_mask: true,
  };
  if ($("aspect").value) input.aspect_ratio = $("aspect").value;
  return input;
}

// Only the fields the workflow takes: its input schema ignores others, and a user would
// expect a hidden field to have no effect.
function workflowInput(task) {
  const form = WORKFLOW_FORMS[task];
  const input = { image_url: state.source ? state.source.url : "", guidance_scale: Number($("guidance").value) };
  const prompt = $("prompt").value;
  if (form.prompt.required || prompt.trim()) input.prompt = prompt;
  if (!form.pngOnly) input.output_format = $("format").value;
  if (form.second && state.slots.second) input[form.second.field] = state.slots.second;
  if (form.mask && state.slots.mask) input.mask_image_url = state.slots.mask;
  return input;
}

async function follow(runId) {
  state.watching = runId;
  $("live").hidden = false;
  $("live-preview").hidden = true;
  $("bar").value = 0;
  $("live-text").textContent = "Starting…";
  $("cancel").hidden = false;
  let run;
  try {
    run = await watchRun(runId, (kind, data) => {
      if (state.watching !== runId) return;
      if (kind === "queued") $("live-text").textContent = data.queue_position ? `Queued: ${data.queue_position} ahead` : "Queued: next";
      else if (kind === "running") $("live-text").textContent = "Running…";
      else if (kind === "step") {
        $("bar").value = data.step / data.total_steps;
        $("live-text").textContent = `Step ${data.step} of ${data.total_steps}`;
        if (data.preview) {
          $("live-preview").src = data.preview;
          $("live-preview").hidden = false;
        }
      }
    });
  } finally {
    $("cancel").hidden = true;
  }
  if (state.watching !== runId) return;
  $("bar").value = run.status_code === "succeeded" ? 1 : $("bar").value;
  $("live-text").textContent = `${run.status_code} in ${seconds(run.duration_ms)}`;
  if (run.status_code === "failed") say("err-form", run.failure_code || "FAILED", run.failure_message || "the run failed");
  await show(runId);
}

async function cancel() {
  if (!state.watching) return;
  try {
    await api(`/v1/runs/${state.watching}/cancel`, { method: "POST" });
  } catch (error) {
    showError(error);
  }
}

// ---------------------------------------------------------------- the timeline

async function show(runId) {
  try {
    state.tree = await api(`/v1/runs/${runId}/lineage`);
  } catch (error) {
    return showError(error);
  }
  state.current = runId;
  if (location.hash !== `#run=${runId}`) history.replaceState(null, "", `#run=${runId}`);
  const run = byId(runId);
  drawTimeline();
  drawResults(run);
  const first = run.output && run.output.outputs[0];
  // A segmentation's output is its mask: the next edit keeps the image that was segmented.
  if (first && run.model_id !== "segmentation") setSource({ url: first.url, runId, index: 0, label: `Continuing from turn ${depth(runId)}, image 1` });
  else if (!state.source) setSource(null);
}

// A turn's prompt, and the workflow it ran ("segmentation: the red circle").
const what = (run) => [WORKFLOW_FORMS[run.model_id] && run.model_id, run.prompt].filter(Boolean).join(": ");

const byId = (id) => state.tree.items.find((item) => item.id === id);

function depth(id) {
  let n = 1;
  for (let item = byId(id); item && item.parent_run_id && byId(item.parent_run_id); item = byId(item.parent_run_id)) n++;
  return n;
}

function onPath(id) {
  for (let item = byId(state.current); item; item = item.parent_run_id ? byId(item.parent_run_id) : null) {
    if (item.id === id) return true;
  }
  return false;
}

function drawTimeline() {
  const list = $("timeline");
  list.innerHTML = "";
  for (const item of state.tree.items) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "turn" + (onPath(item.id) ? "" : " off-path");
    if (item.id === state.current) button.setAttribute("aria-current", "step");
    const parent = item.parent_run_id && byId(item.parent_run_id);
    const thumb = item.output && item.output.outputs[0];
    const label = `Turn ${depth(item.id)}` + (parent && !onPath(item.id) ? ` (branch from turn ${depth(parent.id)})` : "");
    button.setAttribute("aria-label", `${label}: ${what(item)}, ${item.status_code}`);
    if (thumb) {
      const img = document.createElement("img");
      img.src = thumb.url;
      img.alt = "";
      button.append(img);
    }
    const title = document.createElement("span");
    title.className = "label";
    title.textContent = label;
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = `${what(item)} · ${item.status_code}`;
    button.append(title, prompt);
    button.addEventListener("click", () => show(item.id));
    li.append(button);
    list.append(li);
  }
  $("timeline-box").hidden = false;
}

// ---------------------------------------------------------------- results

function drawResults(run) {
  const box = $("results");
  box.innerHTML = "";
  $("results-box").hidden = false;
  $("results-title").textContent = `Turn ${depth(run.id)}: ${what(run)}`;
  const images = run.output ? run.output.outputs : [];
  $("results-meta").textContent = run.output
    ? `${images.length} image${images.length > 1 ? "s" : ""} in ${seconds(run.duration_ms)}, cost $${run.cost}`
    : run.failure_code ? `${run.status_code}: ${run.failure_code} ${run.failure_message || ""}` : run.status_code;
  const before = run.source_url; // null once the server's retention deleted the run's input
  images.forEach((output, i) => box.append(resultFigure(run, output, i, before)));
}

function resultFigure(run, output, i, before) {
  const figure = $("result-tpl").content.firstElementChild.cloneNode(true);
  const compare = figure.querySelector(".compare");
  const after = figure.querySelector(".after");
  after.src = output.url;
  after.alt = `turn ${depth(run.id)}, image ${i + 1}: after the edit`;
  const split = figure.querySelector(".split");
  if (before) {
    const beforeImg = figure.querySelector(".before");
    beforeImg.src = before;
    beforeImg.alt = "before the edit";
    split.setAttribute("aria-label", `before/after split of image ${i + 1}: left of it is before, right is after`);
    const divider = figure.querySelector(".divider");
    const move = () => {
      after.style.clipPath = `inset(0 0 0 ${split.value}%)`;
      divider.style.left = `${split.value}%`;
    };
    split.addEventListener("input", move);
    move();
  } else {
    compare.classList.add("single");  // an upload the server no longer has: nothing to compare with
  }
  const facts = [`seed ${output.seed}`, `${output.width}×${output.height}`];
  if (output.changed_share != null) facts.push(`${(output.changed_share * 100).toFixed(1)} % changed`);
  facts.push(`${seconds(run.duration_ms)}`, `$${(Number(run.cost) / run.output.outputs.length).toFixed(2)}`);
  if (!before) facts.push("original not kept by the server");
  figure.querySelector(".facts").textContent = facts.join(" · ");
  if (output.mask_url) {
    const toggle = figure.querySelector(".mask-toggle");
    toggle.hidden = false;
    const canvas = figure.querySelector(".mask");
    figure.querySelector(".show-mask").addEventListener("change", (e) => {
      canvas.hidden = !e.target.checked;
      if (e.target.checked && !canvas.width) paintMask(canvas, output.mask_url);
    });
  }
  if (output.boxes || output.placement) drawFound(figure, run, output, i);
  const download = figure.querySelector(".download");
  download.href = output.url;
  download.download = `incontext-${run.id.slice(0, 8)}-${i + 1}.${output.content_type === "image/png" ? "png" : "jpg"}`;
  download.setAttribute("aria-label", `download image ${i + 1}`);
  const go = figure.querySelector(".continue");
  go.setAttribute("aria-label", `continue from image ${i + 1} of turn ${depth(run.id)}`);
  go.addEventListener("click", () => {
    state.current = run.id;
    setSource({ url: output.url, runId: run.id, index: i, label: `Continuing from turn ${depth(run.id)}, image ${i + 1}` });
    drawTimeline();
    $("prompt").focus();
  });
  return figure;
}

// A workflow's results: the returned mask beside the image, its boxes drawn over the image
// and listed in its pixels, and logo placement's box (where the logo was allowed).
function drawFound(figure, run, output, i) {
  const found = figure.querySelector(".found");
  found.hidden = false;
  if (output.mask_url) {
    const mask = found.querySelector(".mask-out");
    mask.src = output.mask_url;
    mask.alt = `the mask ${run.model_id} returned for image ${i + 1}`;
  } else {
    found.querySelector(".mask-out").remove();
  }
  const boxes = (output.boxes || []).map((box, n) => ({ box, kind: "box", name: `region ${n + 1}` }));
  if (output.placement) boxes.push({ box: output.placement, kind: "placement", name: "logo placement" });
  const list = found.querySelector(".box-list");
  if (!boxes.length) list.append(Object.assign(document.createElement("li"), { textContent: "no regions found" }));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "boxes");
  svg.setAttribute("viewBox", `0 0 ${output.width} ${output.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");  // the list below says the same
  for (const { box, kind, name } of boxes) {
    const [x0, y0, x1, y1] = box;
    const rect = document.createElementNS(SVG, "rect");
    for (const [k, v] of Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, class: kind })) rect.setAttribute(k, v);
    svg.append(rect);
    const li = document.createElement("li");
    li.className = kind;
    li.textContent = `${name}: ${x0}, ${y0} to ${x1}, ${y1} (${x1 - x0}×${y1 - y0} px)`;
    list.append(li);
  }
  figure.querySelector(".compare").append(svg);
}

const SVG = "http://www.w3.org/2000/svg";

// The mask is white where the model's pixels are: shown as a translucent red tint there.
function paintMask(canvas, url) {
  const img = new Image();
  img.onload = () => {
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const d = pixels.data;
    for (let p = 0; p < d.length; p += 4) {
      const a = d[p];
      d[p] = 230; d[p + 1] = 30; d[p + 2] = 90; d[p + 3] = a * 0.55;
    }
    ctx.putImageData(pixels, 0, 0);
  };
  img.src = url;
}

const seconds = (ms) => (ms == null ? "–" : `${(ms / 1000).toFixed(1)} s`);

// ---------------------------------------------------------------- start

// The link `incontext serve` prints carries a key: /#key=…. Keep it in this browser and take
// it out of the address bar, so it is not bookmarked, shared or left on screen.
function takeKeyFromHash() {
  const match = location.hash.match(/(?:^#|&)key=([^&]*)/);
  if (!match) return;
  localStorage.setItem(KEY_STORE, decodeURIComponent(match[1]).trim());
  const rest = location.hash.slice(1).split("&").filter((part) => !part.startsWith("key=")).join("&");
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
}

function start() {
  takeKeyFromHash();
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, key.value.trim());
    $("err-key").textContent = "";
  });
  $("guidance").addEventListener("input", (e) => { $("guidance-out").value = e.target.value; });
  $("edit-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  bindSourceInputs();
  bindSlot("second");
  bindSlot("mask");
  loadModels();
  const match = location.hash.match(/run=([\w-]+)/);
  if (match) resume(match[1]);
}

async function resume(runId) {
  try {
    const run = await api(`/v1/runs/${runId}`);
    if (["queued", "dispatching", "running"].includes(run.status_code)) await follow(runId);
    else await show(runId);
  } catch (error) {
    showError(error);
  }
}

start();
