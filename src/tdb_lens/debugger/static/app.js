// tdb_lens debugger front end: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";
const $ = (id) => document.getElementById(id);
const COLS = [["activation", "act"], ["write_magnitude", "write"], ["direct_effect", "direct"], ["total_effect", "act*grad"]];
const urlToken = new URLSearchParams(location.search).get("token");
let state = {prompt: "", other_prompt: null, target: null, distractor: null, interventions: [], trace: null};
let lastTable = null;

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function fmt(x) { return x === null || x === undefined || Number.isNaN(x) ? "-" : (x >= 0 ? "+" : "") + x.toFixed(3); }
function color(x, s) {
  if (x === null || !s) return "transparent";
  const a = Math.min(Math.abs(x) / s, 1).toFixed(2);
  return x >= 0 ? `rgba(33,102,172,${a})` : `rgba(178,24,43,${a})`;
}
function bar(x, s) {
  if (x === null || x === undefined) return "<td data-v='NaN'>-</td>";
  const w = s ? Math.min(Math.abs(x) / s, 1) * 100 : 0, c = x >= 0 ? "#2166ac55" : "#b2182b55";
  return `<td data-v='${x}' style='background:linear-gradient(90deg,${c} ${w.toFixed(0)}%,transparent ${w.toFixed(0)}%)'>${fmt(x)}</td>`;
}

async function api(path, body) {
  const headers = {"Content-Type": "application/json"};
  if (urlToken) headers["X-TDB-Token"] = urlToken;
  const r = await fetch(path, {method: body === undefined ? "GET" : "POST", headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({detail: `HTTP ${r.status}`}));
  if (!r.ok) {
    const d = Array.isArray(data.detail) ? data.detail.map((e) => `${e.loc.slice(-1)[0]}: ${e.msg}`).join("; ") : data.detail;
    throw new Error(d || `HTTP ${r.status}`);
  }
  return data;
}

function saveUrl() {
  const q = new URLSearchParams(location.search);
  history.replaceState(null, "", "?" + q.toString() + "#" + new URLSearchParams({s: JSON.stringify(state)}).toString());
}
function loadUrl() {
  const s = new URLSearchParams(location.hash.slice(1)).get("s");
  if (s) { try { state = Object.assign(state, JSON.parse(s)); } catch (e) { /* ignore a broken link */ } }
  $("prompt").value = state.prompt || ""; $("other").value = state.other_prompt || "";
  $("target").value = state.target || ""; $("distractor").value = state.distractor || "";
}
function readInputs() {
  state.prompt = $("prompt").value; state.other_prompt = $("other").value || null;
  state.target = $("target").value || null; state.distractor = $("distractor").value || null;
}
function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }

function renderState() {
  $("trace-info").innerHTML = state.trace
    ? `<span class="chip" id="trace-chip">tracing ${esc(state.trace.node)}${state.trace.through ? " through " + esc(state.trace.through) : ""}<button id="untrace">x</button></span>` : "";
  if (state.trace) $("untrace").onclick = () => { state.trace = null; refresh(); };
  $("interventions").innerHTML = state.interventions.map((iv, i) =>
    `<span class="chip intervention">${esc(iv.method)} ${esc(iv.node)}${iv.quantile !== null && iv.quantile !== undefined ? " = quantile " + iv.quantile
      : iv.value !== null && iv.value !== undefined ? " = " + iv.value : ""}<button data-i="${i}">x</button></span>`).join("");
  document.querySelectorAll("#interventions button").forEach((b) => { b.onclick = () => { state.interventions.splice(+b.dataset.i, 1); refresh(); }; });
}

function renderTable(t) {
  lastTable = t;
  const sides = t.compare ? ["left", "diff", "right"] : ["left"];
  $("objective").innerHTML = `<b>${esc(t.objective_name)}</b> = ${t.objective.map(fmt).join(" | ")} <span id="row-count">${t.rows.length} nodes</span>`;
  const head = ["<tr><th class='l'>node</th><th class='l'>token</th><th>actions</th>"];
  for (const [c, short] of COLS) for (const s of sides) head.push(`<th data-col="${c}" data-side="${s}" title="${c}">${short}${sides.length > 1 ? " " + s : ""}</th>`);
  $("nodes").tHead.innerHTML = head.join("") + "</tr>";
  const val = (r, c, s) => { const v = r.values[c]; if (!v || v[0] === null) return null; return s === "left" ? v[0] : s === "right" ? v[1] : (v[1] === null ? null : v[1] - v[0]); };
  const scale = {};
  for (const [c] of COLS) for (const s of sides) scale[c + s] = Math.max(0, ...t.rows.map((r) => Math.abs(val(r, c, s) || 0)));
  const body = t.rows.map((r) => {
    const isHead = r.family === "head";
    const tok = r.key_token === null ? JSON.stringify(r.token) : `${JSON.stringify(r.token)} \u2190 ${JSON.stringify(r.key_token)}`;
    const acts = (isHead ? ["q", "k", "v"].map((s) => `<button class="trace-${s}" title="trace through ${s}">${s}</button>`).join("")
      : r.family.endsWith("embed") ? "" : `<button class="trace" title="trace upstream">trace</button>`) +
      `<button class="ablate">ablate</button>` + (r.family.endsWith("embed") ? "" : `<button class="unit">unit</button>`);
    const cells = COLS.flatMap(([c]) => sides.map((s) => bar(val(r, c, s), scale[c + s])));
    return `<tr data-node="${esc(r.node)}" data-family="${esc(r.family)}"><td class="l">${esc(r.node)}</td><td class="l">${esc(tok)}</td><td class="acts">${acts}</td>${cells.join("")}</tr>`;
  });
  $("nodes").tBodies[0].innerHTML = body.join("");
  document.querySelectorAll("#nodes tbody tr").forEach((tr) => {
    const node = tr.dataset.node;
    tr.querySelectorAll("button").forEach((b) => {
      b.onclick = () => {
        const cls = b.className;
        if (cls.startsWith("trace")) { state.trace = {node, through: cls === "trace" ? null : cls.slice(6)}; refresh(); }
        else if (cls === "ablate") { state.interventions = state.interventions.filter((i) => i.node !== node).concat([{node, method: "zero", value: null}]); refresh(); }
        else if (cls === "unit") openUnit(node);
      };
    });
  });
  document.querySelectorAll("#nodes thead th[data-col]").forEach((th) => { th.onclick = () => sortBy(th); });
  renderTokens(t);
  renderLogits(t.meta.logits);
  // a steering quantile's basis from the server: exact over every harvested token, or a sample
  const chips = document.querySelectorAll("#interventions .intervention");
  (t.meta.interventions || []).forEach((iv, i) => {
    if (!iv.basis || !chips[i] || chips[i].querySelector(".basis")) return;
    chips[i].insertBefore(Object.assign(document.createElement("span"), {className: "basis", textContent: ` (${iv.basis})`}),
      chips[i].querySelector("button"));
  });
}

function sortBy(th) {
  const i = Array.prototype.indexOf.call(th.parentNode.children, th), b = $("nodes").tBodies[0];
  const rows = Array.from(b.rows), asc = th.dataset.dir === "d"; th.dataset.dir = asc ? "a" : "d";
  const v = (r) => { const x = parseFloat(r.cells[i].dataset.v); return Number.isNaN(x) ? -1 : Math.abs(x); };
  rows.sort((x, y) => asc ? v(x) - v(y) : v(y) - v(x)).forEach((r) => b.appendChild(r));
}

function renderTokens(t) {
  const eff = t.meta.token_effects && t.meta.token_effects.total_effect;
  const vals = eff ? eff[0] : t.tokens[0].map(() => 0), s = Math.max(0, ...vals.map(Math.abs));
  $("tokens").innerHTML = "token embeddings' act*grad: " + t.tokens[0].map((tok, i) =>
    `<span class="tok" title="${i}: ${fmt(vals[i])}" style="background:${color(vals[i], s)}">${esc(tok)}</span>`).join("");
}

function renderLogits(lt) {
  const two = lt.logits.length && lt.logits[0].length === 2;
  $("logits").tHead.innerHTML = "<tr><th class='l'>token</th><th>logit</th><th>prob</th>" + (two ? "<th>right</th><th>prob</th><th>diff</th>" : "") + "</tr>";
  const s = Math.max(0, ...lt.logits.flat().map(Math.abs));
  $("logits").tBodies[0].innerHTML = lt.tokens.map((tok, i) => {
    const lg = lt.logits[i], p = lt.probs[i];
    return `<tr><td class="l">${esc(JSON.stringify(tok))}</td>${bar(lg[0], s)}<td>${p[0].toFixed(3)}</td>` +
      (two ? `${bar(lg[1], s)}<td>${p[1].toFixed(3)}</td>${bar(lg[1] - lg[0], s)}` : "") + "</tr>";
  }).join("");
}

function heat(tokens, acts, s) {
  return tokens.map((tok, i) => `<span class="tok" title="${fmt(acts[i])}" style="background:${color(acts[i], s)}">${esc(tok)}</span>`).join("");
}

async function openUnit(node) {
  showError(null);
  try {
    const u = await api("/api/unit", Object.assign({}, state, {node}));
    const parts = [`<h3 id="unit-label">${esc(u.label)}</h3><div>${esc(u.sources.join(", ") || "no harvest or store entry for this unit")}</div>`];
    for (const e of u.explanations) parts.push(`<div class="explanation"><b>${esc(e.explainer)}</b>: ${esc(e.text)} <i>${esc(Object.entries(e.scores).map(([k, v]) => v === null ? "" : `${k} ${v.toFixed(3)}`).join(", "))}</i></div>`);
    const s = Math.max(0, ...u.activations.values.map(Math.abs));
    parts.push(`<div><b>on this prompt</b>: ${heat(u.activations.tokens, u.activations.values, s)}</div>`);
    for (const k of ["up", "down"]) parts.push(`<div><b>logit lens ${k}</b>: ${u.logit_lens[k].map(([t, v]) => `<span class="tok">${esc(JSON.stringify(t))} ${fmt(v)}</span>`).join(" ")}</div>`);
    const peak = Math.max(0, ...u.top_examples.concat(u.random_examples).map((e) => e.max));
    if (u.top_examples.length) parts.push("<b>top-activating examples</b>" + u.top_examples.map((e) => `<div class="example">${heat(e.tokens, e.acts, peak)}</div>`).join(""));
    if (u.random_examples.length) parts.push("<b>random examples</b>" + u.random_examples.map((e) => `<div class="example">${heat(e.tokens, e.acts, peak)}</div>`).join(""));
    if (u.top_examples.length) parts.push(`<button id="explain">Explain this unit</button> <span id="explain-out"></span>`);
    $("unit-page").innerHTML = parts.join("");
    if ($("explain")) $("explain").onclick = async () => {
      $("explain-out").textContent = "explaining and scoring...";
      try {
        const r = await api("/api/explain", Object.assign({}, state, {node}));
        await openUnit(node);  // the stored explanation with its scores
        $("explain-out").textContent = `${r.text} (${r.explainer}; ` + Object.entries(r.scores).map(([k, v]) =>
          `${k} ${v === null ? "-" : v.toFixed(3)}`).join(", ") + (r.scorer ? `; scored by ${r.scorer})` : ")");
      } catch (e) { showError(e); $("explain-out").textContent = ""; }
    };
    const m = /^L(\d+)\.H(\d+)/.exec(node);
    $("attention").innerHTML = "";
    if (m) {
      const a = await api("/api/attention", Object.assign({}, state, {layer: +m[1], head: +m[2]}));
      const rows = a.pattern.map((row, q) => `<tr><th class="l">${q}:${esc(a.tokens[q])}</th>` + row.map((x, k) => `<td title="query ${q} / key ${k}: ${x.toFixed(4)}" style="background:${color(x, 1)}"></td>`).join("") + "</tr>");
      $("attention").innerHTML = `<b>L${a.layer}.H${a.head} attention (query x key)</b><table class="attn">${rows.join("")}</table>`;
    }
  } catch (e) { showError(e); }
}

async function refresh() {
  readInputs(); saveUrl(); renderState(); showError(null);
  if (!state.prompt) return;
  $("status").textContent = "running...";
  try { renderTable(await api("/api/table", state)); $("status").textContent = "done"; }
  catch (e) { showError(e); $("status").textContent = "error"; }
}

async function doSearch() {
  showError(null);
  try {
    const r = await api("/api/search", {query: $("search-q").value, k: 10});
    $("search-results").innerHTML = r.hits.length ? "<table class='grid'>" + r.hits.map((h) =>
      `<tr><td>${h.similarity.toFixed(3)}</td><td class="l"><a href="#" class="hit" data-label="${esc(h.label)}">${esc(h.label)}</a></td><td class="l">${esc(h.text)}</td></tr>`).join("") + "</table>"
      : "<i>no hits</i>";
    document.querySelectorAll("#search-results a.hit").forEach((a) => { a.onclick = (ev) => { ev.preventDefault(); openUnit(a.dataset.label); }; });
  } catch (e) { showError(e); }
}

async function doGenerate() {
  readInputs(); showError(null);
  try {
    const r = await api("/api/generate", Object.assign({}, state, {max_new_tokens: 20}));
    $("generation").textContent = Object.entries(r).map(([k, v]) => `${k}: ${v}`).join("\n");
  } catch (e) { showError(e); }
}

$("run").onclick = refresh;
$("search-run").onclick = doSearch;
$("generate").onclick = doGenerate;
$("steer-add").onclick = () => {
  const node = $("steer-node").value.trim(), v = $("steer-value").value.trim(), q = $("steer-quantile").value.trim();
  if (!node) return;
  state.interventions = state.interventions.filter((i) => i.node !== node).concat([{node, method: $("steer-mode").value,
    value: v === "" ? null : parseFloat(v), quantile: q === "" || v !== "" ? null : parseFloat(q)}]);
  refresh();
};
api("/api/info").then((i) => { $("model").textContent = `${i.model}, ${i.n_layers} layers` + (i.store ? ", store" : "") + (i.harvests.length ? `, ${i.harvests.length} harvests` : "") +
  (i.store ? `, explainer ${i.explainer} (${i.scores.join(", ")})` : ""); }).catch(showError);
loadUrl();
if (state.prompt) refresh(); else renderState();
