// agentrl viewer: a live, server-filtered, virtualised table of trajectories; trajectory pages; plots; config.
"use strict";

const ROW_H = 26, PAGE = 200, OVERSCAN = 12;
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const shortId = (id) => { const m = /^(.{8}).*-(\d+)$/.exec(id); return m ? `${m[1]}-${m[2]}` : id.slice(0, 12); };

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(await r.text());
  return r.json();
}

// ------------------------------------------------------------------ table state

const table = {
  query: "",          // the filter as a query string (server-side filtering)
  total: 0,           // rows matching it with seq <= maxSeq
  maxSeq: null,       // the newest sequence the table shows (stable offsets while scrolled down)
  cache: new Map(),   // offset (newest first) -> row
  loading: new Set(), // pages being fetched
  waiting: 0,         // rows that arrived while the user was scrolled down
  source: null,       // EventSource
  generation: 0,      // bumps on every filter change; stale responses are dropped
};

function filterQuery() {
  const params = new URLSearchParams();
  for (const el of $("#filters").elements) {
    if (!el.name) continue;
    if (el.type === "checkbox") { if (el.checked) params.set(el.name, "1"); }
    else if (el.value.trim()) params.set(el.name, el.value.trim());
  }
  return params.toString();
}

function setFiltersFrom(query) {
  const params = new URLSearchParams(query);
  for (const el of $("#filters").elements) {
    if (!el.name) continue;
    if (el.type === "checkbox") el.checked = params.get(el.name) === "1";
    else el.value = params.get(el.name) ?? "";
  }
}

async function resetTable(query) {
  table.query = query; table.generation += 1; table.cache.clear(); table.loading.clear();
  table.maxSeq = null; table.waiting = 0; table.total = 0;
  $("#new-rows").hidden = true; $("#scroller").scrollTop = 0;
  if (table.source) table.source.close();
  const gen = table.generation;
  try {
    await loadPage(0, gen);
    $("#filter-error").textContent = "";
  } catch (err) {
    $("#filter-error").textContent = err.message;
    return;
  }
  table.source = new EventSource("/api/events?" + query);
  table.source.addEventListener("rows", (ev) => { if (gen === table.generation) onLiveRows(JSON.parse(ev.data)); });
}

async function loadPage(page, gen = table.generation) {
  if (table.loading.has(page)) return;
  table.loading.add(page);
  const params = new URLSearchParams(table.query);
  params.set("offset", page * PAGE); params.set("limit", PAGE);
  if (table.maxSeq !== null) params.set("max_seq", table.maxSeq);
  try {
    const data = await getJSON("/api/rows?" + params);
    if (gen !== table.generation) return;
    if (table.maxSeq === null) table.maxSeq = data.head_seq;
    table.total = data.total;
    data.rows.forEach((row, i) => table.cache.set(page * PAGE + i, row));
  } finally {
    table.loading.delete(page);
  }
  renderTable();
}

function atTop() { return $("#scroller").scrollTop < ROW_H / 2; }

function onLiveRows(ev) {
  const fresh = ev.rows.filter((r) => table.maxSeq === null || r.seq > table.maxSeq);
  if (!atTop()) {
    table.waiting += fresh.length === ev.rows.length ? ev.added : fresh.length;
    const button = $("#new-rows");
    button.textContent = `▲ ${table.waiting} new`; button.hidden = false;
    return;
  }
  if (fresh.length === ev.rows.length && ev.rows.length === ev.added) {
    const shifted = new Map();
    for (const [offset, row] of table.cache) shifted.set(offset + fresh.length, row);
    fresh.forEach((row, i) => shifted.set(i, row));
    table.cache = shifted;
  } else {
    table.cache.clear();
    ev.rows.forEach((row, i) => table.cache.set(i, row));
  }
  table.maxSeq = Math.max(table.maxSeq ?? 0, ev.head_seq);
  table.total = ev.total;
  renderTable();
}

function flags(r) {
  const out = [];
  if (r.is_eval) out.push('<span class="flag">eval</span>');
  if (r.attempt > 0) out.push(`<span class="flag">attempt ${r.attempt}</span>`);
  if (r.resumed) out.push('<span class="flag resumed">resumed</span>');
  if (r.aborts > 0) out.push(`<span class="flag abort">aborts ${r.aborts}</span>`);
  return out.join("");
}

function rowHtml(r) {
  const versions = r.version_min >= 0 ? `v${r.version_min}..${r.version_max}` : "–";
  return `<div class="row" data-seq="${r.seq}" data-id="${esc(r.id)}">` +
    `<span>#${r.seq}</span><span title="${esc(r.id)}">${esc(shortId(r.id))}</span><span>${esc(r.group_id.slice(0, 8))}</span>` +
    `<span class="num">${r.reward.toFixed(3)}</span><span class="st-${r.status}">${r.status}</span>` +
    `<span class="num">${r.turns}</span><span class="num">${r.trained}/${r.tokens}</span><span>${versions}</span>` +
    `<span class="num">${r.staleness}</span><span>${esc(r.worker)}</span><span>${esc(r.env)}</span><span>${flags(r)}</span></div>`;
}

function renderTable() {
  const scroller = $("#scroller");
  $("#spacer").style.height = `${table.total * ROW_H}px`;
  const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_H) - OVERSCAN);
  const last = Math.min(table.total, Math.ceil((scroller.scrollTop + scroller.clientHeight) / ROW_H) + OVERSCAN);
  const html = [];
  for (let i = first; i < last; i++) {
    const row = table.cache.get(i);
    if (row) html.push(rowHtml(row));
    else { html.push('<div class="row placeholder">…</div>'); loadPage(Math.floor(i / PAGE)); }
  }
  const rows = $("#rows");
  rows.style.transform = `translateY(${first * ROW_H}px)`;
  rows.innerHTML = html.join("");
  $("#count").textContent = `${table.total} trajectories match` + (table.maxSeq ? ` (newest #${table.maxSeq})` : "");
}

// ------------------------------------------------------------------ trajectory page

let current = null;

function tokenStyle(mode, t, i) {
  const mask = t.mask[i], v = t.versions[i], lp = t.logprobs[i];
  if (mode === "mask") return ["tk-" + mask, ""];
  if (v < 0) return ["tk-0", ""];
  if (mode === "version") {
    const stale = Math.max(0, current.newest_version - v), span = Math.max(1, current.maxStale);
    return ["", `background:hsl(${210 - 210 * Math.min(1, stale / span)},75%,82%)`];
  }
  const p = Math.exp(lp);
  return ["", `background:hsl(${120 * p},70%,${70 + 12 * p}%)`];
}

function tokensHtml(seg, mode) {
  const t = current.tokens, out = [];
  for (let i = seg.start; i < seg.end; i++) {
    const [cls, style] = tokenStyle(mode, t, i);
    const piece = t.pieces ? t.pieces[i] : `⟨${t.ids[i]}⟩`;
    const title = `#${i} id=${t.ids[i]} mask=${t.mask[i]} v=${t.versions[i]} logprob=${t.logprobs[i]}`;
    out.push(`<span class="${cls}" style="${style}" title="${title}">${esc(piece)}</span>`);
  }
  return out.join("");
}

function segmentHtml(seg, mode) {
  const t = current.tokens, n = seg.end - seg.start;
  let trained = 0;
  for (let i = seg.start; i < seg.end; i++) trained += t.mask[i];
  const bits = [`<b>${esc(seg.kind)}${seg.tool ? " " + esc(seg.tool) : ""}${seg.part ? ` (part ${seg.part})` : ""}</b>`];
  if (n) bits.push(`tokens ${seg.start}..${seg.end}`, trained === n ? `trained ${n}` : trained ? `trained ${trained}/${n}` : `masked ${n}`);
  for (const [k, label] of [["temperature", "T"], ["finish_reason", "finish"], ["reward", "reward"]]) {
    if (seg[k] !== undefined && seg[k] !== null) bits.push(`${label}=${esc(seg[k])}`);
  }
  if (seg.seconds) bits.push(`${seg.seconds.toFixed(2)}s`);
  let body;
  const who = seg.info && seg.info.attempt !== undefined ? `attempt ${esc(seg.info.attempt)}` : "an earlier attempt";
  if (seg.kind === "abort") body = `<div class="abort-mark">✂ ${who} was cut here (token ${seg.start})${seg.text ? ": " + esc(seg.text) : ""}</div>`;
  else if (!n) body = `<div class="tokens">${esc(seg.text || "")}</div>`;
  else if (!t.pieces && mode === "mask") body = `<div class="tokens"><span class="tk-${trained === n ? 1 : 0}">${esc(seg.text || "(no tokenizer: token ids below)")}</span></div><div class="tokens">${tokensHtml(seg, mode)}</div>`;
  else body = `<div class="tokens">${tokensHtml(seg, mode)}</div>`;
  return `<div class="segment ${esc(seg.kind)}"><div class="seghead">${bits.join(" · ")}</div>${body}</div>`;
}

const LEGENDS = {
  mask: '<i class="tk-1"></i>trained (mask 1) <i class="tk-0"></i>masked (mask 0)',
  version: '<i style="background:hsl(210,75%,82%)"></i>newest policy <i style="background:hsl(0,75%,82%)"></i>stalest <i class="tk-0"></i>not sampled',
  logprob: '<i style="background:hsl(0,70%,70%)"></i>p≈0 <i style="background:hsl(120,70%,82%)"></i>p≈1 <i class="tk-0"></i>not sampled',
};

function renderTokens() {
  const mode = document.querySelector('input[name="colour"]:checked')?.value || "mask";
  $("#legend").innerHTML = LEGENDS[mode];
  $("#segments").innerHTML = current.segments.map((s) => segmentHtml(s, mode)).join("");
}

function groupHtml(d) {
  const me = d.summary.seq;
  const rows = d.siblings.map((s) => `<tr class="${s.seq === me ? "me" : ""}"><td><a href="#/t/${s.seq}">#${s.seq}</a></td>` +
    `<td>${esc(shortId(s.id))}</td><td class="st-${s.status}">${s.status}</td><td>${s.reward.toFixed(3)}</td>` +
    `<td>${s.advantage === null || s.advantage === undefined ? "–" : s.advantage.toFixed(3)}</td><td>${s.trained}/${s.tokens}</td>` +
    `<td>${s.version_min >= 0 ? `v${s.version_min}..${s.version_max}` : "–"}</td></tr>`).join("");
  const finals = d.siblings.filter((s) => s.status !== "aborted").length;
  return `<h3>Group ${esc(d.ids.group_id.slice(0, 8))}: ${finals} of ${d.summary.group_size} final trajectories in view` +
    `${d.siblings.length > finals ? ` (+${d.siblings.length - finals} aborted attempts)` : ""}</h3>` +
    `<table class="siblings" id="siblings"><tr><th>seq</th><th>id</th><th>status</th><th>reward</th><th>advantage</th><th>tokens</th><th>versions</th></tr>${rows}</table>` +
    `<p class="kv">advantages: ${esc(d.advantage_source)} (over the group's final trajectories)</p>`;
}

function attemptsHtml(d) {
  if (d.attempts.length < 2 && !d.summary.resumed) return "";
  const items = d.attempts.map((a) => `<a href="#/t/${a.seq}">attempt ${a.attempt} · ${a.status} · #${a.seq}</a>`).join(" → ");
  return `<h3>Attempts of task ${esc(d.ids.task_id.slice(0, 8))}</h3><p id="attempts">${items}</p>`;
}

async function showTrajectory(seq) {
  const box = $("#traj");
  box.innerHTML = "loading…";
  let d;
  try { d = await getJSON(`/api/traj/${seq}`); } catch (err) { box.textContent = err.message; return; }
  const t = d.tokens;
  let maxStale = 0;
  for (const v of t.versions) if (v >= 0) maxStale = Math.max(maxStale, d.newest_version - v);
  current = {...d, maxStale};
  const s = d.summary;
  box.innerHTML = `<h2>#${s.seq} ${esc(d.ids.id)}</h2>` +
    `<div class="kv"><span>status <b class="st-${s.status}">${s.status}</b></span><span>reward <b>${s.reward.toFixed(3)}</b></span>` +
    `<span>tokens <b>${s.trained}/${s.tokens}</b> trained</span><span>versions <b>${s.version_min >= 0 ? `v${s.version_min}..${s.version_max}` : "–"}</b></span>` +
    `<span>staleness <b>${s.staleness}</b></span><span>worker <b>${esc(s.worker)}</b></span><span>env <b>${esc(s.env)}</b></span>` +
    `<span>attempt <b>${s.attempt}</b></span><span>published <b>${new Date(s.published * 1000).toLocaleString()}</b></span></div>` +
    attemptsHtml(d) +
    `<div class="modes">colour tokens by <label><input type="radio" name="colour" value="mask" checked> loss mask</label>` +
    `<label><input type="radio" name="colour" value="version"> policy version</label>` +
    `<label><input type="radio" name="colour" value="logprob"> logprob</label><span id="legend" class="legend"></span>` +
    (t.pieces ? "" : ' <span class="kv">(no tokenizer found: token ids shown)</span>') + `</div>` +
    `<div id="segments"></div>` + groupHtml(d) +
    `<h3>Metadata</h3><pre>${esc(JSON.stringify(d.metadata, null, 2))}</pre>`;
  for (const radio of document.querySelectorAll('input[name="colour"]')) radio.addEventListener("change", renderTokens);
  renderTokens();
}

// ------------------------------------------------------------------ plots and config

function plotSvg(plot) {
  const W = 520, H = 200, L = 48, B = 22, colours = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];
  const all = Object.values(plot.series).flat();
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1e-9), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const px = (x) => L + (W - L - 8) * (x - x0) / (x1 - x0), py = (y) => H - B - (H - B - 8) * (y - y0) / (y1 - y0);
  const lines = Object.entries(plot.series).map(([key, pts], i) =>
    `<polyline fill="none" stroke="${colours[i % 4]}" stroke-width="1.5" points="${pts.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ")}"><title>${esc(key)}</title></polyline>`);
  const legend = Object.keys(plot.series).map((k, i) => `<tspan fill="${colours[i % 4]}">■ ${esc(k)}  </tspan>`).join("");
  return `<div class="plot"><h4>${esc(plot.title)}</h4><svg width="${W}" height="${H}">` +
    `<line x1="${L}" y1="${H - B}" x2="${W}" y2="${H - B}" stroke="#999"/><line x1="${L}" y1="0" x2="${L}" y2="${H - B}" stroke="#999"/>` +
    `<text x="2" y="12" font-size="10">${y1.toPrecision(3)}</text><text x="2" y="${H - B}" font-size="10">${y0.toPrecision(3)}</text>` +
    `<text x="${L}" y="${H - 6}" font-size="10">${x0.toFixed(0)} s</text><text x="${W - 50}" y="${H - 6}" font-size="10">${x1.toFixed(0)} s</text>` +
    `${lines.join("")}<text x="${L + 6}" y="12" font-size="10">${legend}</text></svg><div class="kv">${esc(plot.ylabel)}</div></div>`;
}

async function showPlots() {
  const data = await getJSON("/api/metrics");
  $("#plots").innerHTML = data.plots.length ? data.plots.map(plotSvg).join("") : "<p>No metrics in the run directory yet.</p>";
}

async function showConfig() {
  $("#config").textContent = await (await fetch("/api/config")).text();
}

// ------------------------------------------------------------------ routing and start

function show(view) {
  for (const v of ["table", "traj", "plots", "config"]) $(`#${v}-view`).hidden = v !== view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.tab === view || (view === "traj" && a.dataset.tab === "table"));
}

let plotTimer = null;

function route() {
  const hash = location.hash.slice(1) || "/";
  clearInterval(plotTimer);
  const traj = /^\/t\/(\d+)$/.exec(hash);
  if (traj) { show("traj"); showTrajectory(Number(traj[1])); return; }
  if (hash === "/plots") { show("plots"); showPlots(); plotTimer = setInterval(showPlots, 10000); return; }
  if (hash === "/config") { show("config"); showConfig(); return; }
  show("table");
  const query = hash.includes("?") ? hash.slice(hash.indexOf("?") + 1) : "";
  if (query !== table.query || table.source === null) { setFiltersFrom(query); resetTable(query); }
  else renderTable();
}

async function refreshInfo() {
  try {
    const info = await getJSON("/api/info");
    $("#run").textContent = info.run;
    const badge = $("#mode");
    badge.textContent = info.live ? (info.reading ? "live" : "live (reader stopped)") : (info.reading ? "replay: reading" : "replay: stored run");
    badge.classList.toggle("live", info.live);
    $("#stats").textContent = `${info.rows} of at most ${info.max_rows} in memory · newest v${info.newest_version}`;
  } catch (err) { $("#mode").textContent = "disconnected"; }
}

let filterTimer = null;
$("#filters").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => { const q = filterQuery(); location.hash = q ? `#/?${q}` : "#/"; }, 250);
});
$("#filters").addEventListener("submit", (ev) => ev.preventDefault());
$("#scroller").addEventListener("scroll", () => {
  renderTable();
  if (atTop() && table.waiting) resetTable(table.query);
});
$("#new-rows").addEventListener("click", () => resetTable(table.query));
$("#rows").addEventListener("click", (ev) => {
  const row = ev.target.closest(".row[data-seq]");
  if (row) location.hash = `#/t/${row.dataset.seq}`;
});
$("#back").addEventListener("click", (ev) => { ev.preventDefault(); location.hash = table.query ? `#/?${table.query}` : "#/"; });
window.addEventListener("hashchange", route);
window.addEventListener("resize", renderTable);
refreshInfo(); setInterval(refreshInfo, 1000);
route();
