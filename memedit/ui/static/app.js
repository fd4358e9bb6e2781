// memedit ui: the page. Plain JavaScript, no build step, no network beyond this server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const S = {
  sid: null, info: null, R: 64, disp: 192, nums: [], view: "current",
  cells: new Map(), masks: new Map(), selected: null, hover: null, painting: null,
  copy: null, paste: null, previews: new Map(), matchesOn: false, scores: new Map(),
  job: null,
};

// ---------------------------------------------------------------------------------------
// Talking to the server.

async function api(path, body) {
  const opt = body === undefined ? {method: "GET"} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opt);
  let data;
  try {
    data = await r.json();
  } catch (e) {  // not JSON: an error, even with a 2xx status
    throw new Error(`HTTP ${r.status}: expected a JSON answer, got one that does not parse`);
  }
  if (!r.ok) {
    throw Object.assign(new Error(data.error || `HTTP ${r.status}`), {status: r.status});
  }
  return data;
}
const sapi = (path, body) => api(`/api/s/${S.sid}/${path}`, body);

function say(text, kind) {
  const m = $("#message");
  m.textContent = text || "";
  m.className = kind || "";
}

function act(fn) {
  return async (ev) => {
    try { await fn(ev); } catch (e) { say(e.message, "error"); }
  };
}

function num(v) {  // a number when the field holds one, else the text (the server says why)
  const t = String(v).trim();
  return t !== "" && isFinite(Number(t)) ? Number(t) : t;
}

function settings() {
  return {
    method: $("#method").value, rank: num($("#rank").value),
    shrinkage: num($("#shrinkage").value), taps: $("#taps").value,
    erase_units: num($("#erase-units").value),
    solver: {optimizer: $("#optimizer").value, steps: num($("#steps").value),
             learning_rate: num($("#lr").value), loss: $("#loss").value},
  };
}

// ---------------------------------------------------------------------------------------
// Jobs: start, poll, show progress.

function showJob(j) {
  const bar = $("#job-bar");
  let text = `${j.kind}: ${j.phase}`;
  if (j.message) text += ` (${j.message})`;
  if (j.loss !== undefined) text += ` · step ${j.step}/${j.steps}, loss ${j.loss.toPrecision(4)}`;
  text += ` ${j.elapsed.toFixed(1)} s`;
  if (j.expected) text += ` / ~${j.expected.toFixed(1)} s`;
  if (j.cancelling) text = `${j.kind}: cancelling…`;
  if (j.status === "error") text = `${j.kind}: failed`;
  if (j.status === "done") text = `${j.kind}: done in ${j.elapsed.toFixed(1)} s`;
  if (j.status === "cancelled") text = `${j.kind}: cancelled after ${j.elapsed.toFixed(1)} s`;
  $("#job-status").textContent = text;
  const frac = j.status === "running" ? j.fraction : j.status === "cancelled" ? 0 : 1;
  if (frac === null || frac === undefined) {
    const guess = j.expected ? Math.min(0.95, j.elapsed / j.expected) : null;
    bar.classList.toggle("busy", guess === null);
    bar.style.width = guess === null ? "100%" : `${100 * guess}%`;
  } else {
    bar.classList.remove("busy");
    bar.style.width = `${100 * frac}%`;
  }
  if (j.losses) drawLosses(j.losses);
}

function setBusy(busy) {
  for (const id of ["#execute", "#erase", "#overfit", "#search"]) $(id).disabled = busy;
  const cancel = $("#cancel-job");
  cancel.hidden = !busy;
  cancel.disabled = false;
}

async function cancelJob() {
  if (!S.job) return;
  $("#cancel-job").disabled = true;
  try {
    showJob(await sapi("job/cancel", {id: S.job}));
  } catch (e) {  // it ended meanwhile: the poll shows how
    $("#cancel-job").disabled = false;
    throw e;
  }
}

async function runJob(path, body, onDone) {
  await followJob(await sapi(path, body), onDone);
}

async function followJob(j, onDone) {  // polls job j until it ends; onDone(result) if done
  S.job = j.id;
  setBusy(true);
  try {
    while (j.status === "running") {
      showJob(j);
      await new Promise((r) => setTimeout(r, 150));
      j = await sapi(`job?id=${j.id}`);
    }
    showJob(j);
  } finally {
    setBusy(false);
  }
  if (j.status === "error") throw new Error(j.error);
  if (j.status === "cancelled") {
    say(`${j.kind}: cancelled; nothing was changed`, "ok");
    return;
  }
  await onDone(j.result);
}

// ---------------------------------------------------------------------------------------
// The grid.

function makeCell(n) {
  const cell = document.createElement("div");
  cell.className = "cell";
  cell.dataset.imgnum = n;
  cell.style.width = cell.style.height = `${S.disp}px`;
  const img = document.createElement("img");
  img.className = "base";
  img.alt = `image ${n}`;
  const heat = document.createElement("img");
  heat.className = "heat";
  heat.alt = "";
  const canvas = document.createElement("canvas");
  canvas.className = "paint";
  canvas.width = canvas.height = S.disp;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = n;
  cell.append(img, heat, canvas, label);
  canvas.addEventListener("mousedown", (ev) => startStroke(n, ev));
  canvas.addEventListener("mousemove", (ev) => moveBrush(n, ev));
  canvas.addEventListener("mouseleave", () => { S.hover = null; drawCell(n); });
  return cell;
}

async function loadGrid() {
  const text = $("#images").value;
  const seq = S.gridSeq = (S.gridSeq || 0) + 1;
  const res = await sapi("grid", {images: text, which: S.view});
  if (seq !== S.gridSeq) return;  // a later request owns the grid
  S.nums = res.images;
  const grid = $("#grid");
  const cells = new Map();
  grid.replaceChildren();
  res.images.forEach((n, i) => {
    const cell = S.cells.get(n) || makeCell(n);
    const showPreview = S.view === "current" && S.previews.has(n);
    cell.querySelector("img.base").src = showPreview ? S.previews.get(n) : res.urls[i];
    cell.dataset.src = res.urls[i];
    cells.set(n, cell);
    grid.append(cell);
  });
  S.cells = cells;
  for (const n of S.nums) { labelCell(n); drawCell(n); }
  if (S.matchesOn) await loadMatches();
  else for (const c of S.cells.values()) c.classList.remove("matches");
}

function labelCell(n) {
  const cell = S.cells.get(n);
  if (!cell) return;
  const s = S.scores.get(n);
  cell.querySelector(".label").textContent = s === undefined ? n : `${n} · ${s.toFixed(2)}`;
  cell.classList.toggle("selected", S.selected === n);
  cell.classList.toggle("paste-target", S.paste && S.paste.imgnum === n);
  let badge = cell.querySelector(".badge");
  const showPreview = S.view === "current" && S.previews.has(n);
  if (showPreview && !badge) {
    badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "paste preview";
    cell.append(badge);
  } else if (!showPreview && badge) badge.remove();
}

// ---------------------------------------------------------------------------------------
// Painting masks: one Uint8Array (R x R) per image, drawn scaled over the image.

function maskOf(n) {
  if (!S.masks.has(n)) S.masks.set(n, new Uint8Array(S.R * S.R));
  return S.masks.get(n);
}

function canvasPos(ev) {
  const r = ev.target.getBoundingClientRect();
  return [(ev.clientX - r.left) / r.width * S.R, (ev.clientY - r.top) / r.height * S.R];
}

function stamp(n, x, y, erase) {
  const m = maskOf(n), R = S.R, rad = Number($("#brush-size").value) * S.R / 64;
  const r2 = rad * rad;
  for (let py = Math.max(0, Math.floor(y - rad)); py < Math.min(R, Math.ceil(y + rad)); py++) {
    for (let px = Math.max(0, Math.floor(x - rad)); px < Math.min(R, Math.ceil(x + rad)); px++) {
      const dx = px + 0.5 - x, dy = py + 0.5 - y;
      if (dx * dx + dy * dy <= r2) m[py * R + px] = erase ? 0 : 255;
    }
  }
}

function strokeTo(n, x, y) {
  const p = S.painting;
  const steps = Math.max(1, Math.ceil(Math.hypot(x - p.x, y - p.y) / 0.5));
  for (let i = 1; i <= steps; i++) {
    stamp(n, p.x + (x - p.x) * i / steps, p.y + (y - p.y) * i / steps, p.erase);
  }
  p.x = x; p.y = y;
}

function startStroke(n, ev) {
  ev.preventDefault();
  const [x, y] = canvasPos(ev);
  const prev = S.selected;
  S.selected = n;
  S.painting = {n, x, y, erase: ev.shiftKey || $("#brush-erase").checked};
  stamp(n, x, y, S.painting.erase);
  if (prev !== null && prev !== n) labelCell(prev);
  labelCell(n);
  drawCell(n);
}

function moveBrush(n, ev) {
  const [x, y] = canvasPos(ev);
  S.hover = {n, x, y};
  if (S.painting && S.painting.n === n) strokeTo(n, x, y);
  drawCell(n);
}

window.addEventListener("mouseup", act(async () => {
  if (!S.painting) return;
  const n = S.painting.n;
  S.painting = null;
  if (S.paste && S.paste.imgnum === n && S.paste.live) await doPaste(n);  // live preview
}));

function drawCell(n) {
  const cell = S.cells.get(n);
  if (!cell) return;
  const canvas = cell.querySelector("canvas.paint");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const m = S.masks.get(n);
  if (m) {
    const off = document.createElement("canvas");
    off.width = off.height = S.R;
    const octx = off.getContext("2d");
    const im = octx.createImageData(S.R, S.R);
    const alpha = S.paste && S.paste.imgnum === n ? 50 : 120;  // the paste preview shows through
    for (let i = 0; i < m.length; i++) {
      if (m[i]) { im.data[4 * i] = 255; im.data[4 * i + 1] = 220; im.data[4 * i + 3] = alpha; }
    }
    octx.putImageData(im, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
  }
  const f = canvas.width / S.R;
  const box = (b, color) => {
    ctx.save();
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.setLineDash([5, 3]);
    ctx.strokeRect(b[2] * f, b[0] * f, (b[3] - b[2]) * f, (b[1] - b[0]) * f);
    ctx.restore();
  };
  if (S.copy && S.copy.imgnum === n && S.copy.box) box(S.copy.box, "#3c3");
  if (S.paste && S.paste.imgnum === n && S.paste.box) box(S.paste.box, "#0cf");
  if (S.hover && S.hover.n === n) {
    const rad = Number($("#brush-size").value) * S.R / 64 * f;
    ctx.beginPath();
    ctx.arc(S.hover.x * f, S.hover.y * f, rad, 0, 2 * Math.PI);
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 1.5; ctx.stroke();
    ctx.strokeStyle = "#000"; ctx.lineWidth = 0.5; ctx.stroke();
  }
}

function maskURL(n) {  // the mask as a PNG data URL at canvas size, as the reference saves it
  const m = S.masks.get(n);
  if (!m || !m.some((v) => v)) throw new Error("mask: paint a region on an image first");
  const off = document.createElement("canvas");
  off.width = off.height = S.R;
  const ctx = off.getContext("2d");
  const im = ctx.createImageData(S.R, S.R);
  for (let i = 0; i < m.length; i++) im.data.fill(m[i], 4 * i, 4 * i + 4);
  ctx.putImageData(im, 0, 0);
  return off.toDataURL("image/png");
}

function selectedRegion() {
  if (S.selected === null) throw new Error("mask: paint a region on an image first");
  return {imgnum: S.selected, mask: maskURL(S.selected)};
}

function clearMask(n) {
  S.masks.delete(n);
  drawCell(n);
}

// ---------------------------------------------------------------------------------------
// Copy, paste, context, matches, search.

async function doCopy() {
  const reg = selectedRegion();
  const res = await sapi("copy", reg);
  const old = S.copy;
  S.copy = {imgnum: res.imgnum, box: res.box};
  if (old) drawCell(old.imgnum);
  clearMask(reg.imgnum);
  renderClipboard(res);
  say(`Copied the region of image ${res.imgnum}; paint where it goes and press Paste.`, "ok");
}

function renderClipboard(copy) {
  $("#clipboard").replaceChildren();
  if (!copy) return;
  const img = document.createElement("img");
  img.src = copy.thumb;
  img.title = `copied from image ${copy.imgnum}`;
  $("#clipboard").append(img, document.createTextNode(`from image ${copy.imgnum}`));
}

async function doPaste(n) {
  const res = await sapi("paste", {imgnum: n, mask: maskURL(n)});
  const old = S.paste;
  S.paste = {imgnum: res.imgnum, box: res.box, live: true};
  S.previews.clear();
  S.previews.set(res.imgnum, res.preview);
  const cell = S.cells.get(res.imgnum);
  if (cell && S.view === "current") cell.querySelector("img.base").src = res.preview;
  if (old && old.imgnum !== res.imgnum) {
    const oc = S.cells.get(old.imgnum);
    if (oc) oc.querySelector("img.base").src = oc.dataset.src;
    labelCell(old.imgnum);
    drawCell(old.imgnum);
  }
  labelCell(res.imgnum);
  drawCell(res.imgnum);
  say(`Pasted onto image ${res.imgnum} (preview; repaint to move it). Add context, then Execute.`, "ok");
}

function renderTray(context) {
  const tray = $("#tray");
  tray.replaceChildren();
  for (const c of context) {
    const img = document.createElement("img");
    img.src = c.thumb;
    img.className = "thumb";
    img.dataset.id = c.id;
    img.title = `image ${c.imgnum}: click to remove`;
    img.addEventListener("click", act(async () => {
      const res = await sapi("context/remove", {id: c.id});
      renderTray(res.context);
      if (S.matchesOn) await loadMatches();
    }));
    tray.append(img);
  }
}

async function addContext() {
  const reg = selectedRegion();
  const res = await sapi("context", reg);
  clearMask(reg.imgnum);
  renderTray(res.context);
  say(`Context: ${res.context.length} example(s).`, "ok");
  if (S.matchesOn) await loadMatches();
}

async function loadMatches() {
  const res = await sapi("matches", {images: S.nums, quantile: num($("#quantile").value),
                                     settings: settings()});
  res.images.forEach((n, i) => {
    const cell = S.cells.get(n);
    if (!cell) return;
    cell.querySelector("img.heat").src = res.overlays[i];
    cell.classList.add("matches");
  });
  say(`Matches above the ${res.quantile} quantile (threshold ${res.threshold.toFixed(3)}).`, "ok");
}

async function toggleMatches() {
  if (S.matchesOn) {
    S.matchesOn = false;
    for (const c of S.cells.values()) c.classList.remove("matches");
  } else {
    await loadMatches();
    S.matchesOn = true;
  }
  $("#show-matches").classList.toggle("on", S.matchesOn);
}

async function search() {
  const top = Math.min(Math.max(S.nums.length, 1), S.info.limits.grid);
  await runJob("search", {count: num($("#search-count").value), top, settings: settings()},
    async (res) => {
      S.scores = new Map(res.images.map((n, i) => [n, res.scores[i]]));
      $("#images").value = res.images.join(",");
      await loadGrid();
      say(`Search: the ${res.images.length} best matches, best first.`, "ok");
    });
}

// ---------------------------------------------------------------------------------------
// Edits.

function drawLosses(losses) {
  const c = $("#loss-plot"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!losses || !losses.length) return;
  const lo = Math.min(...losses), hi = Math.max(...losses);
  ctx.beginPath();
  losses.forEach((v, i) => {
    const x = 4 + (c.width - 8) * i / Math.max(losses.length - 1, 1);
    const y = c.height - 4 - (c.height - 8) * (hi > lo ? (v - lo) / (hi - lo) : 0.5);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.strokeStyle = "#2c5fb3"; ctx.lineWidth = 1.5; ctx.stroke();
  $("#loss-text").textContent =
    `loss ${losses[0].toPrecision(4)} → ${losses[losses.length - 1].toPrecision(4)}`;
}

function renderEdits(edits) {
  const ol = $("#edits");
  ol.replaceChildren();
  for (const e of edits) {
    const li = document.createElement("li");
    li.dataset.id = e.id;
    li.className = e.active ? "on" : "off";
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = e.active; box.className = "edit-toggle";
    box.title = "apply / revert this edit";
    box.addEventListener("change", act(async () => {
      renderEdits((await sapi(`edits/${e.id}/active`, {active: box.checked})).edits);
      await loadGrid();
    }));
    const desc = document.createElement("span");
    desc.className = "desc";
    desc.textContent = `${e.id} ${e.kind} ${e.method} r${e.rank} ${e.layer} · ` +
      `L1 ${e.loss_before.toFixed(3)}→${e.loss_after.toFixed(3)} · ${e.seconds.toFixed(1)} s`;
    li.append(box, desc);
    if (e.has_spec) {
      const a = document.createElement("a");
      a.href = `/api/s/${S.sid}/edits/${e.id}/spec.json`; a.download = `${e.id}-spec.json`;
      a.textContent = "spec"; a.className = "edit-spec";
      li.append(a);
    }
    const f = document.createElement("a");
    f.href = `/api/s/${S.sid}/edits/${e.id}/edit.zip`; f.download = "";
    f.textContent = "edit"; f.className = "edit-file";
    li.append(f);
    if (e.can_evaluate) {
      const ev = document.createElement("button");
      ev.textContent = "before/after"; ev.className = "edit-eval";
      ev.addEventListener("click", act(() => evaluate(e.id)));
      li.append(ev);
    }
    const rv = document.createElement("button");
    rv.textContent = "×"; rv.className = "edit-revert"; rv.title = "revert and remove";
    rv.addEventListener("click", act(async () => {
      renderEdits((await sapi(`edits/${e.id}/revert`, {})).edits);
      await loadGrid();
    }));
    li.append(rv);
    ol.append(li);
  }
}

async function afterEdit(res) {
  S.previews.clear();
  if (S.paste) {
    S.paste.live = false;
    S.masks.delete(S.paste.imgnum);
  }
  const info = await refreshInfo();
  renderEdits(info.edits);
  drawLosses(res.edit.losses);
  S.view = "current";
  $("#toggle-view").textContent = "Showing: edited";
  await loadGrid();
  say(`${res.edit.id}: ${res.edit.kind} done, L1 at the paste ${res.edit.loss_before.toFixed(4)} → ` +
      `${res.edit.loss_after.toFixed(4)}.`, "ok");
}

async function execute() {
  await runJob("execute", {settings: settings()}, afterEdit);
}

async function erase() {
  const reg = selectedRegion();
  await runJob("erase", {...reg, settings: settings()}, async (res) => {
    clearMask(reg.imgnum);
    await afterEdit(res);
  });
}

async function overfit() {
  await runJob("overfit", {steps: num($("#overfit-steps").value), learning_rate: 0.01,
                           settings: settings()}, afterEdit);
}

async function evaluate(id) {
  await runJob("evaluate", {edit: id, images: $("#eval-images").value,
                            quantile: num($("#eval-quantile").value)}, showEvaluation);
}

function showEvaluation(res) {
  const m = res.metrics, sp = m.specificity, ef = m.efficacy;
  const rows = [
    ["edit", res.edit], ["held-out latents", m.num_latents],
    ["threshold (quantile)", `${m.threshold.toFixed(3)} (${m.quantile})`],
    ["latents matched", m.context_match.latents.toFixed(3)],
    ["pixels matched", m.context_match.pixels.toFixed(4)],
    ["change inside", sp.inside_mean_abs_change.toFixed(4)],
    ["change outside", sp.outside_mean_abs_change.toFixed(4)],
    ["specificity ratio", sp.ratio === null
      ? "undefined (nothing matched, or nothing changed outside)" : sp.ratio.toFixed(2)],
  ];
  if (ef) rows.push(["efficacy (cosine gain)", ef.cosine_gain.toFixed(4)]);
  const div = $("#evaluation");
  div.replaceChildren();
  const img = document.createElement("img");
  img.src = res.strip; img.title = `original | edited: images ${res.pictured.join(", ")}`;
  const table = document.createElement("table");
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
  div.append(img, table);
  say(`Evaluated ${res.edit} on ${m.num_latents} held-out latents.`, "ok");
}

function fillSettings(st) {  // the form shows the settings of a replayed spec
  if (!st) return;
  $("#method").value = st.method; $("#rank").value = st.rank;
  $("#shrinkage").value = st.shrinkage; $("#taps").value = st.taps;
  $("#erase-units").value = st.erase_units; $("#optimizer").value = st.solver.optimizer;
  $("#steps").value = st.solver.steps; $("#lr").value = st.solver.learning_rate;
  $("#loss").value = st.solver.loss;
}

async function replay(ev) {
  const file = ev.target.files[0];
  if (!file) return;
  const text = await file.text();
  ev.target.value = "";
  await runJob("replay", {spec: text}, async (res) => {
    const info = await refreshInfo();
    renderTray(info.context);
    renderClipboard(info.copy);
    const olds = [S.copy, S.paste].filter((x) => x).map((x) => x.imgnum);
    S.copy = info.copy && {imgnum: info.copy.imgnum, box: null};
    S.paste = info.paste && {imgnum: info.paste.imgnum, box: null, live: false};
    for (const n of olds) { labelCell(n); drawCell(n); }
    $("#layer").value = info.layer;
    fillSettings(res.edit.settings);
    await afterEdit(res);
  });
}

// ---------------------------------------------------------------------------------------
// Session, layer and statistics.

async function refreshInfo() {
  S.info = await sapi("state");
  return S.info;
}

async function pollStats() {
  for (;;) {
    const all = await api("/api/statistics");
    const st = all[$("#layer").value];
    $("#stats-bar").style.width = `${100 * st.fraction}%`;
    $("#stats-text").textContent = st.state === "ready" ? `C of ${st.layer}: ready`
      : st.state === "error" ? `C of ${st.layer}: ${st.message}`
      : `C of ${st.layer}: ${Math.round(100 * st.fraction)}%`;
    if (st.state !== "running") return;
    await new Promise((r) => setTimeout(r, 300));
  }
}

async function openSession() {  // this tab's session (kept across reloads), else a new one
  const sid = sessionStorage.getItem("memedit-session");
  if (sid) {
    try {
      return await api(`/api/s/${sid}/state`);
    } catch (e) {
      if (e.status !== 404) throw e;  // 404: expired, or the server restarted
    }
  }
  const info = await api("/api/sessions", {});
  sessionStorage.setItem("memedit-session", info.session);
  return info;
}

async function resumeJob(j) {  // a job the page started before it was reloaded
  say(`${j.kind} is still running (started before the page was reloaded).`);
  await followJob(j, async (res) => {
    if (res.edit) {
      const info = await refreshInfo();
      renderTray(info.context);
      renderClipboard(info.copy);
      S.copy = info.copy && {imgnum: info.copy.imgnum, box: null};
      S.paste = info.paste && {imgnum: info.paste.imgnum, box: null, live: false};
      await afterEdit(res);
    } else if (j.kind === "search") {
      $("#images").value = res.images.join(",");
      await loadGrid();
      say(`Search: the ${res.images.length} best matches, best first.`, "ok");
    } else if (j.kind === "evaluate") {
      showEvaluation(res);
    }
  });
}

async function start() {
  const info = await openSession();
  S.sid = info.session; S.info = info; S.R = info.resolution;
  S.disp = S.R <= 256 ? S.R * Math.max(1, Math.round(160 / S.R)) : 256;
  $("#model").textContent = `${info.model} (${info.architecture}, ${S.R} px)`;
  const sel = $("#layer");
  for (const name of info.layers) sel.add(new Option(name, name, false, name === info.layer));
  $("#brush-size").max = 32;
  renderEdits(info.edits);
  renderTray(info.context);
  renderClipboard(info.copy);
  S.copy = info.copy && {imgnum: info.copy.imgnum, box: null};
  S.paste = info.paste && {imgnum: info.paste.imgnum, box: null, live: false};
  pollStats().catch((e) => say(e.message, "error"));
  await loadGrid();
  say("Paint on an image, then Copy; paint on another, then Paste; add context; Execute.");
  if (info.job && info.job.status === "running") await resumeJob(info.job);
}

function bind() {
  $("#show").addEventListener("click", act(async () => { S.scores.clear(); await loadGrid(); }));
  $("#images").addEventListener("keydown", act(async (ev) => {
    if (ev.key === "Enter") { S.scores.clear(); await loadGrid(); }
  }));
  $("#toggle-view").addEventListener("click", act(async () => {
    S.view = S.view === "current" ? "original" : "current";
    $("#toggle-view").textContent = S.view === "current" ? "Showing: edited" : "Showing: original";
    await loadGrid();
  }));
  $("#revert-all").addEventListener("click", act(async () => {
    renderEdits((await sapi("revert_all", {})).edits);
    await loadGrid();
  }));
  $("#brush-size").addEventListener("input", () => {
    $("#brush-size-text").textContent = $("#brush-size").value;
  });
  $("#clear-mask").addEventListener("click", () => { if (S.selected !== null) clearMask(S.selected); });
  $("#copy").addEventListener("click", act(doCopy));
  $("#paste").addEventListener("click", act(() => doPaste(selectedRegion().imgnum)));
  $("#add-context").addEventListener("click", act(addContext));
  $("#show-matches").addEventListener("click", act(toggleMatches));
  $("#quantile").addEventListener("change", act(async () => { if (S.matchesOn) await loadMatches(); }));
  $("#search").addEventListener("click", act(search));
  $("#execute").addEventListener("click", act(execute));
  $("#erase").addEventListener("click", act(erase));
  $("#overfit").addEventListener("click", act(overfit));
  $("#cancel-job").addEventListener("click", act(cancelJob));
  $("#spec-file").addEventListener("change", act(replay));
  $("#optimizer").addEventListener("change", () => {
    // Gauss–Newton needs far fewer steps than Adam: 20 come close to the loss of the
    // reference's 2001 Adam steps on the demo.
    const steps = $("#steps");
    if ($("#optimizer").value === "gauss_newton" && steps.value === "2001") steps.value = "20";
    if ($("#optimizer").value === "adam" && steps.value === "20") steps.value = "2001";
  });
  $("#layer").addEventListener("change", act(async () => {
    await sapi("layer", {layer: $("#layer").value});
    S.matchesOn = false;
    $("#show-matches").classList.remove("on");
    await pollStats();
  }));
}

bind();
start().catch((e) => say(e.message, "error"));
