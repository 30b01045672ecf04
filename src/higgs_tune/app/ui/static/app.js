// higgs-tune ui: the page's logic. Every action is one call to the JSON API (server.py);
// nothing is computed here that the library computes.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;
let prepJob = null;   // id of the running prepare job
let runTimer = null;  // polling of the run folder

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function audioUrl(path) { return "/api/audio?path=" + encodeURIComponent(path); }
function fmt(v, d = 3) { return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : esc(v ?? "–"); }

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
async function guarded(errId, fn) {
  $(errId).textContent = "";
  try { return await fn(); } catch (e) { $(errId).textContent = e.message; }
}

// ----------------------------------------------------------------------------- tabs
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
function showTab(name) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll("section.tab").forEach((s) => s.classList.toggle("active", s.id === "tab-" + name));
}

// ----------------------------------------------------------------------------- data
function dataForm() {
  return {
    kind: $("data-kind").value, source: $("data-source").value, language: $("data-language").value,
    model: $("data-model").value, out: $("data-out").value,
    skip_invalid: $("data-skip-invalid").checked, overwrite: $("data-overwrite").checked,
  };
}
$("btn-demo-data").addEventListener("click", () => {
  if (!INFO.demo) { $("data-error").textContent = "the bundled demo data is not next to this installation"; return; }
  $("data-kind").value = "manifest";
  $("data-source").value = INFO.demo.manifest;
  if (!$("data-model").value) $("data-model").value = "tiny-model";
  $("data-out").value = "cache/train";
});
$("btn-make-tiny").addEventListener("click", () => guarded("data-error", async () => {
  $("btn-make-tiny").disabled = true;
  try {
    const r = await api("/api/make-tiny", {out: $("data-model").value || "tiny-model"});
    $("data-model").value = r.path;
  } finally { $("btn-make-tiny").disabled = false; }
}));
$("btn-prepare").addEventListener("click", () => guarded("data-error", async () => {
  const job = await api("/api/prepare", dataForm());
  prepJob = job.id;
  showPrepJob(job);
  pollPrep();
}));
async function pollPrep() {
  if (!prepJob) return;
  const job = await guarded("data-error", () => api("/api/job?id=" + encodeURIComponent(prepJob)));
  if (!job) return;
  showPrepJob(job);
  if (job.state === "running" || job.state === "stopping") { setTimeout(pollPrep, 700); return; }
  prepJob = null;
  if (job.state === "finished") {
    const cache = $("data-out").value;
    await inspectCache(cache);
    if (!$("cfg-train_cache").value) $("cfg-train_cache").value = cache;
    if (!$("cfg-model").value) $("cfg-model").value = $("data-model").value;
  }
}
function showPrepJob(job) {
  const [done, total] = job.progress || [0, 0];
  const bar = job.state === "finished" ? '<progress id="prep-progress" max="1" value="1"></progress>'
    : total ? `<progress id="prep-progress" max="${total}" value="${done}"></progress> ${done}/${total} clips`
    : '<progress id="prep-progress"></progress>';
  $("prep-status").innerHTML = `${bar} <span class="state ${job.state}" id="prep-state">${job.state}</span>`;
  $("prep-log").hidden = false;
  $("prep-log").textContent = job.log;
}
$("btn-inspect").addEventListener("click", () => inspectCache($("data-out").value));
async function inspectCache(cache) {
  const r = await guarded("data-error", () => api("/api/inspect?cache=" + encodeURIComponent(cache)));
  if (!r) return;
  const s = r.summary;
  $("inspect-card").hidden = false;
  $("inspect-title").textContent = s.cache_dir;
  let h = `<table><tr><th>clips</th><th>hours</th><th>speakers</th><th>languages</th><th>duration min / median / max (s)</th><th>rejected rows</th></tr>
    <tr><td class="num">${s.clips}</td><td class="num">${s.hours.toFixed(4)}</td><td class="num">${Object.keys(s.speakers).length}</td>
    <td>${Object.entries(s.languages).map(([k, v]) => `${esc(k)} (${v.clips})`).join(", ")}</td>
    <td class="num">${fmt(s.duration_s.min, 2)} / ${fmt(s.duration_s.median, 2)} / ${fmt(s.duration_s.max, 2)}</td>
    <td class="num">${s.rejects.length}</td></tr></table>`;
  h += "<h3>Speakers</h3><table><tr><th>speaker</th><th>clips</th><th>seconds</th><th>languages</th></tr>" +
    Object.entries(s.speakers).map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${v.clips}</td><td class="num">${v.seconds.toFixed(1)}</td><td>${esc(Object.keys(v.languages).join(", "))}</td></tr>`).join("") + "</table>";
  if (s.outliers.length) {
    h += "<h3>Text/audio outliers (characters per second far from the speaker's median)</h3><table><tr><th>id</th><th>detail</th></tr>" +
      s.outliers.map((o) => `<tr><td>${esc(o.id)}</td><td>${esc(JSON.stringify(o))}</td></tr>`).join("") + "</table>";
  } else h += '<p class="muted">no text/audio outliers</p>';
  if (s.rejects.length) {
    h += "<h3>Rejected rows</h3><table><tr><th>row</th><th>reason</th></tr>" +
      s.rejects.map((x) => `<tr><td>${esc(x.line ?? x.id ?? "")}</td><td>${esc(x.reason)}</td></tr>`).join("") + "</table>";
  }
  $("inspect-summary").innerHTML = h;
  $("inspect-text").textContent = r.text;
  $("clips").innerHTML = "<tr><th></th><th>id</th><th>speaker</th><th>lang</th><th>s</th><th>transcript</th></tr>" +
    r.clips.map((c, i) => `<tr><td><button class="play" data-i="${i}">▶</button></td><td>${esc(c.id)}</td><td>${esc(c.speaker)}</td><td>${esc(c.language)}</td><td class="num">${c.duration_s.toFixed(2)}</td><td>${esc(c.text)}</td></tr>`).join("");
  document.querySelectorAll("#clips button.play").forEach((b) => b.addEventListener("click", () => {
    const c = r.clips[+b.dataset.i];
    $("clip-player").src = audioUrl(c.audio);
    $("clip-text").textContent = `${c.id}: ${c.text}`;
    $("clip-player").play().catch(() => {});
    if (!$("gen-ref").value) { $("gen-ref").value = c.audio; $("gen-ref-text").value = c.text; $("gen-language").value = c.language; }
  }));
}

// ----------------------------------------------------------------------------- train
function fillPresets() {
  $("cfg-preset").innerHTML = INFO.presets.map((p) => `<option value="${esc(p.name)}">${esc(p.name)}</option>`).join("");
  const demo = INFO.presets.find((p) => p.name.startsWith("demo"));
  if (demo) $("cfg-preset").value = demo.name;
  $("cfg-pathways").innerHTML = INFO.config.pathways.map((p) => `<label><input type="checkbox" name="pathway" value="${esc(p)}"> ${esc(p)}</label>`).join("");
  const hasFamily = INFO.config.fields.includes("family");
  document.querySelectorAll(".fam").forEach((e) => { e.hidden = !hasFamily; });
  applyPreset();
}
function applyPreset() {
  const p = INFO.presets.find((x) => x.name === $("cfg-preset").value);
  if (!p) return;
  $("cfg-about").textContent = p.about;
  for (const f of ["model", "output_dir", "train_cache", "eval_cache", "mode", "max_steps", "learning_rate", "lora_r", "family"]) {
    const v = p.values[f];
    const el = $("cfg-" + f);
    if (v === undefined || v === null) continue;
    if (typeof v === "string" && v.includes("${")) {  // a preset placeholder: keep what the user typed
      el.placeholder = f === "eval_cache" ? "(optional: empty = no held-out cache)" : v + " (fill in)";
      continue;
    }
    el.value = v;
  }
  const pw = p.values.pathways || [];
  document.querySelectorAll("input[name=pathway]").forEach((c) => { c.checked = pw.includes(c.value); });
}
$("cfg-preset").addEventListener("change", applyPreset);
function trainForm(action) {
  const f = {preset: $("cfg-preset").value, extra: $("cfg-extra").value, action};
  for (const k of ["model", "output_dir", "train_cache", "eval_cache", "mode", "learning_rate"]) f[k] = $("cfg-" + k).value.trim();
  if (INFO.config.fields.includes("family")) f.family = $("cfg-family").value.trim();
  for (const k of ["max_steps", "lora_r"]) if ($("cfg-" + k).value) f[k] = Number($("cfg-" + k).value);
  if (f.learning_rate !== "" && !isNaN(Number(f.learning_rate))) f.learning_rate = Number(f.learning_rate);
  f.pathways = [...document.querySelectorAll("input[name=pathway]:checked")].map((c) => c.value);
  return f;
}
function showProblems(problems) {
  $("cfg-problems").innerHTML = (problems || []).map((p) => `<li>${esc(p)}</li>`).join("");
}
$("btn-check").addEventListener("click", () => guarded("train-error", async () => {
  const r = await api("/api/config", trainForm("check"));
  showProblems(r.problems);
  $("cfg-yaml-box").hidden = !r.ok;
  $("cfg-yaml-box").open = r.ok;
  $("cfg-yaml").textContent = r.yaml;
}));
for (const [id, action] of [["btn-start", "start"], ["btn-resume", "resume"], ["btn-restart", "overwrite"]]) {
  $(id).addEventListener("click", () => guarded("train-error", async () => {
    if (action === "overwrite" && !confirm("Start over: higgs-tune's files in the output folder (checkpoints, metrics, samples) are replaced. Continue?")) return;
    const r = await api("/api/train", trainForm(action));
    showProblems(r.problems);
    if (!r.ok) return;
    $("cfg-yaml-box").hidden = true;
    $("gen-run").value = $("cfg-output_dir").value;
    startRunPolling();
  }));
}
$("btn-stop").addEventListener("click", () => guarded("train-error", async () => {
  const job = window.RUN_JOB;
  if (job) await api("/api/job/stop", {id: job.id});
  startRunPolling();
}));
$("btn-refresh").addEventListener("click", () => startRunPolling());
function startRunPolling() {
  if (runTimer) clearTimeout(runTimer);
  pollRun();
}
async function pollRun() {
  const dir = $("cfg-output_dir").value.trim();
  if (!dir) return;
  const r = await guarded("train-error", () => api("/api/run?dir=" + encodeURIComponent(dir)));
  if (!r) return;
  showRun(r);
  const live = r.job && (r.job.state === "running" || r.job.state === "stopping");
  if (live) runTimer = setTimeout(pollRun, 1500);
}
function showRun(r) {
  window.RUN_JOB = r.job;
  $("run-dir").textContent = r.run_dir;
  const state = r.job ? r.job.state : "none";
  $("job-state").textContent = state;
  $("job-state").className = "state " + state;
  $("btn-stop").disabled = state !== "running";
  const busy = state === "running" || state === "stopping";
  for (const id of ["btn-start", "btn-resume", "btn-restart"]) $(id).disabled = busy;
  const last = r.last;
  $("run-last").textContent = last ? `step ${last.step}: loss ${fmt(last.loss)}, audio loss ${fmt(last.audio_loss)}` : "";
  $("charts").innerHTML = r.charts.join("");
  $("run-warnings").innerHTML = r.warnings.map((w) => `<div class="warn"><b>${esc(w.code)}</b> (step ${esc(w.step)}${w.count > 1 ? `, ${w.count}×` : ""}): ${esc(w.message)}</div>`).join("");
  $("samples").innerHTML = r.samples.length ? r.samples.map((s) => `<div><b>step ${s.step}</b><div class="players">` +
    s.files.map((f) => `<div class="player"><div>${esc(f.name)}${f.status ? ` · ${f.status[1]} frames, ${f.status[0] ? '<span class="ok">ended by itself</span>' : '<span class="bad">hit the length limit</span>'}` : ""}</div><audio class="sample" controls preload="none" src="${audioUrl(f.path)}"></audio></div>`).join("") + "</div></div>").join("")
    : "none yet";
  $("run-checkpoints").innerHTML = r.checkpoints.length ? r.checkpoints.map((c) => `${esc(c.name)} (step ${c.step})`).join(", ") : "none yet";
  $("train-log").textContent = r.job ? r.job.log : "";
  if (r.checkpoints.length) fillCheckpoints(r.checkpoints);
}

// ----------------------------------------------------------------------------- listen
$("btn-gen-load").addEventListener("click", () => guarded("gen-error", async () => {
  const r = await api("/api/run?dir=" + encodeURIComponent($("gen-run").value));
  fillCheckpoints(r.checkpoints);
  if (!r.checkpoints.length) $("gen-error").textContent = "no complete checkpoint in " + r.run_dir + " yet";
}));
let ckptPicked = false;  // the user ticked checkpoints: keep their choice; else the newest is ticked
$("gen-checkpoints").addEventListener("change", () => { ckptPicked = true; });
function fillCheckpoints(list) {
  const before = new Set([...document.querySelectorAll("input[name=ckpt]:checked")].map((c) => c.value));
  const tick = (c, i) => (ckptPicked ? before.has(c.path) : i === 0);
  $("gen-checkpoints").innerHTML = list.map((c, i) => `<label><input type="checkbox" name="ckpt" value="${esc(c.path)}"${tick(c, i) ? " checked" : ""}> ${esc(c.name)}</label>`).join("");
  const sel = $("exp-checkpoint").value;
  $("exp-checkpoint").innerHTML = list.map((c) => `<option value="${esc(c.path)}">${esc(c.name)} (step ${c.step})</option>`).join("");
  if (expPicked && list.some((c) => c.path === sel)) $("exp-checkpoint").value = sel;
}
let expPicked = false;  // likewise for the export: the newest until the user picks one
$("exp-checkpoint").addEventListener("change", () => { expPicked = true; });
$("gen-upload").addEventListener("change", () => guarded("gen-error", async () => {
  const file = $("gen-upload").files[0];
  if (!file) return;
  const r = await fetch("/api/upload?name=" + encodeURIComponent(file.name), {method: "POST", body: file});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error);
  $("gen-ref").value = data.path;
}));
$("btn-generate").addEventListener("click", () => guarded("gen-error", async () => {
  $("btn-generate").disabled = true;
  $("gen-busy").textContent = "generating…";
  try {
    const r = await api("/api/generate", {
      text: $("gen-text").value, ref_audio: $("gen-ref").value, ref_text: $("gen-ref-text").value,
      language: $("gen-language").value, with_base: $("gen-with-base").checked, base_model: $("gen-base").value,
      checkpoints: [...document.querySelectorAll("input[name=ckpt]:checked")].map((c) => c.value),
      temperature: Number($("gen-temp").value), max_new_tokens: Number($("gen-max").value), seed: Number($("gen-seed").value),
      asr_model: $("gen-asr").value, speaker_model: $("gen-spk").value,
    });
    $("gen-results").innerHTML = r.results.map((x) => `<div class="player result"><div><b>${esc(x.label)}</b> · ${x.seconds} s, ${x.frames} frames, ${x.stopped ? '<span class="ok">ended by itself</span>' : '<span class="bad">hit the length limit</span>'}</div>
      <audio class="generated" controls src="${audioUrl(x.path)}"></audio>
      ${"cer" in x ? `<div>CER ${fmt(x.cer)} · heard: “${esc(x.transcript)}”</div>` : ""}${"sim" in x ? `<div>SIM ${fmt(x.sim)}</div>` : ""}
      ${x.notes.map((n) => `<div class="muted">${esc(n)}</div>`).join("")}</div>`).join("");
    $("gen-busy").textContent = r.scored ? "" : "CER/SIM: give an ASR and a speaker model to score the outputs";
  } finally { $("btn-generate").disabled = false; if ($("gen-busy").textContent === "generating…") $("gen-busy").textContent = ""; }
}));

// ----------------------------------------------------------------------------- export
$("btn-export").addEventListener("click", () => guarded("exp-error", async () => {
  $("btn-export").disabled = true;
  $("exp-busy").textContent = " exporting…";
  try {
    const r = await api("/api/export", {checkpoint: $("exp-checkpoint").value, out: $("exp-out").value, dtype: $("exp-dtype").value, overwrite: $("exp-overwrite").checked});
    $("exp-result").innerHTML = `<p class="ok">exported to ${esc(r.out_dir)} (${r.merged_lora ? "LoRA merged" : "full weights"}, ${r.num_parameters.toLocaleString()} parameters)</p>
      <h3>Files</h3><p>${r.files.map(esc).join(", ")}</p>
      ${r.notes.length ? "<h3>Notes</h3><ul>" + r.notes.map((n) => `<li>${esc(n)}</li>`).join("") + "</ul>" : ""}
      ${Object.entries(r.card).map(([k, v]) => `<h3>${esc(k)}</h3><pre class="card-text">${esc(v)}</pre>`).join("")}`;
  } finally { $("btn-export").disabled = false; $("exp-busy").textContent = ""; }
}));

// ----------------------------------------------------------------------------- start
(async () => {
  INFO = await api("/api/info");
  $("roots").textContent = "files under: " + INFO.roots.join(" · ");
  $("data-kind").innerHTML = Object.entries(INFO.source_kinds).map(([k, v]) => `<option value="${esc(k)}">${esc(v.label)}</option>`).join("");
  fillPresets();
})();
