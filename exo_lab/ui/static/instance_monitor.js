// exo_lab instance monitor: plain DOM + SVG, no external libraries (works offline).
// Model traits (all computed in Python): summary {name, model, state, error, busy, pending, replacements, plan},
// progress {done, total, ranks: [{rank, node, layers, done, total}]},
// requests [{t, prompt_tokens, completion_tokens, ttft_s, prompt_tps, generation_tps, total_s}] (oldest first),
// stats {requests, tokens, last_decode_tps, mean_decode_tps, last_ttft_s, last_prompt_tps}.

const SVG_NS = "http://www.w3.org/2000/svg";
const SHOWN_ROWS = 6;
const STATE_TEXT = {
  launching: "launching", loading: "loading", ready: "ready", replacing: "re-placing", failed: "failed",
  stopped: "stopped",
};

function html(tag, cls = "", text = null, parent = null) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function svg(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  if (parent) parent.appendChild(node);
  return node;
}

function num(v, digits = null) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  if (digits !== null) return v.toFixed(digits);
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
}

function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  return s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms` : `${s.toFixed(2)} s`;
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8);
}

function layers(l) {
  return l[1] - l[0] === 1 ? `layer ${l[0]}` : `layers ${l[0]}-${l[1] - 1}`;
}

// A round step (1, 2, 2.5 or 5 times a power of ten) giving about four gridlines up to ``v``.
function niceStep(v) {
  if (!(v > 0)) return 1;
  const raw = v / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

function bar(parent, frac, cls = "") {
  const track = html("div", "exo-im-bar " + cls, null, parent);
  const fill = html("div", "exo-im-bar-fill", null, track);
  fill.style.width = `${Math.max(0, Math.min(1, frac)) * 100}%`;
  return track;
}

function tile(parent, label, value, unit, sub) {
  const t = html("div", "exo-im-tile", null, parent);
  html("div", "exo-im-tile-label", label, t);
  const v = html("div", "exo-im-tile-value", null, t);
  html("span", "", value, v);
  if (unit) html("span", "exo-im-unit", unit, v);
  html("div", "exo-im-tile-sub", sub || "\u00a0", t);
  return t;
}

function drawHeader(head, summary) {
  head.replaceChildren();
  const state = summary.state || "ready";
  const top = html("div", "exo-im-head-row", null, head);
  html("span", "exo-im-name", summary.name || "instance", top);
  const badge = html("span", `exo-im-state ${state}`, null, top);
  badge.dataset.state = state;
  html("i", "exo-im-dot", null, badge);
  html("span", "", STATE_TEXT[state] || state, badge);
  const plan = summary.plan;
  const meta = [];
  if (plan) {
    meta.push(plan.strategy, `${plan.backend} backend`, `${plan.nodes.length} node${plan.nodes.length === 1 ? "" : "s"}`,
      `${plan.ranks} rank${plan.ranks === 1 ? "" : "s"}`);
  } else {
    meta.push("one process");
  }
  if (summary.replacements) meta.push(`re-placed ${summary.replacements}×`);
  html("span", "exo-im-meta", meta.join(" · "), top);
  if (summary.busy) {
    const n = summary.pending || 1;
    html("span", "exo-im-busy", n > 1 ? `generating ${n} requests…` : "generating…", top);
  }
  if (plan) html("div", "exo-im-plan", plan.description, head);
  else if (summary.model) html("div", "exo-im-plan", summary.model, head);
  if (summary.error) html("div", "exo-im-error", summary.error, head);
}

function drawProgress(box, progress, state) {
  box.replaceChildren();
  const total = progress.total || 0;
  const done = progress.done || 0;
  const ranks = progress.ranks || [];
  if (!ranks.length) {
    box.style.display = "none";
    return;
  }
  box.style.display = "";
  const loading = ["launching", "loading", "replacing"].includes(state);
  const head = html("div", "exo-im-section-head", null, box);
  html("span", "exo-im-section-title", loading ? "Loading" : "Shards", head);
  html("span", "exo-im-progress-text", `${done} / ${total} layers${loading ? "" : " loaded"}`, head);
  bar(box, total ? done / total : 0, loading ? "loading" : state === "failed" ? "failed" : "done").classList.add("exo-im-total");
  const grid = html("div", "exo-im-ranks", null, box);
  for (const r of ranks) {
    const row = html("div", "exo-im-rank", null, grid);
    row.dataset.rank = r.rank;
    html("span", "exo-im-rank-id", `rank ${r.rank}`, row);
    html("span", "exo-im-rank-node", r.node, row);
    html("span", "exo-im-rank-layers", layers(r.layers), row);
    bar(row, r.total ? r.done / r.total : 0, r.done >= r.total ? "done" : "loading");
    html("span", "exo-im-rank-count", `${r.done}/${r.total}`, row);
  }
}

function drawTiles(box, summary, stats) {
  box.replaceChildren();
  const plan = summary.plan;
  const predicted = plan ? plan.decode_tps : null;
  const last = stats.last_decode_tps;
  let decodeSub = stats.mean_decode_tps != null ? `mean ${num(stats.mean_decode_tps)}` : "no requests yet";
  if (predicted) decodeSub += ` · predicted ${num(predicted)}`;
  tile(box, "Requests", String(stats.requests || 0), "", `${stats.tokens || 0} tokens generated`);
  tile(box, "Decode", num(last), "tok/s", decodeSub);
  tile(box, "Time to first token", seconds(stats.last_ttft_s), "",
    plan ? `predicted ${seconds(plan.ttft_s)} for ${plan.prompt_tokens} tokens` : "last request");
  tile(box, "Prefill", num(stats.last_prompt_tps), "tok/s", plan ? `predicted ${num(plan.prefill_tps)}` : "last request");
}

function drawChart(box, requests, summary, width) {
  box.replaceChildren();
  const head = html("div", "exo-im-section-head", null, box);
  html("span", "exo-im-section-title", "Decode tokens/s over time", head);
  const points = requests.filter((r) => r.completion_tokens > 1 && r.generation_tps > 0);
  const predicted = summary.plan ? summary.plan.decode_tps : null;
  const legend = html("span", "exo-im-legend", null, head);
  const lm = html("span", "", null, legend);
  html("i", "lg-measured", null, lm);
  html("span", "", "measured, per request", lm);
  const H = 150;
  const W = Math.max(280, width);
  const root = svg("svg", { class: "exo-im-chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H }, box);
  if (!points.length) {
    svg("rect", { x: 0.5, y: 0.5, width: W - 1, height: H - 1, rx: 6, class: "exo-im-chart-empty-bg" }, root);
    const t = svg("text", { x: W / 2, y: H / 2 + 4, "text-anchor": "middle", class: "exo-im-chart-empty" }, root);
    t.textContent = "Tokens/s appear here as requests finish.";
    return;
  }
  const maxMeasured = Math.max(...points.map((p) => p.generation_tps));
  const showPredicted = predicted && predicted <= 2.5 * maxMeasured;
  if (predicted) {
    const lp = html("span", "", null, legend);
    html("i", "lg-predicted", null, lp);
    html("span", "", showPredicted ? `predicted ${num(predicted)}` : `predicted ${num(predicted)} (above the chart)`, lp);
  }
  const top = Math.max(maxMeasured, showPredicted ? predicted : 0) * 1.08;
  const step = niceStep(top);
  const nTicks = Math.max(1, Math.ceil(top / step));
  const yMax = step * nTicks;
  const pad = { l: 44, r: 12, t: 10, b: 22 };
  const iw = W - pad.l - pad.r;
  const ih = H - pad.t - pad.b;
  const t0 = points[0].t;
  const t1 = points[points.length - 1].t;
  const span = Math.max(t1 - t0, 1e-9);
  const x = (t) => pad.l + (points.length === 1 ? iw / 2 : ((t - t0) / span) * iw);
  const y = (v) => pad.t + ih - (v / yMax) * ih;
  for (let i = 0; i <= nTicks; i++) {
    const v = step * i;
    svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: i ? "exo-im-grid" : "exo-im-axis" }, root);
    const lab = svg("text", { x: pad.l - 6, y: y(v) + 3.5, "text-anchor": "end", class: "exo-im-tick" }, root);
    lab.textContent = v >= 1000 ? `${+(v / 1000).toFixed(2)}k` : String(+v.toFixed(2));
  }
  const ticks = points.length === 1 ? [t0] : [t0, t0 + span / 2, t1];
  ticks.forEach((t, i) => {
    const anchor = points.length === 1 ? "middle" : ["start", "middle", "end"][i];
    const lab = svg("text", { x: x(t), y: H - 6, "text-anchor": anchor, class: "exo-im-tick" }, root);
    lab.textContent = clock(t);
  });
  if (showPredicted) {
    svg("line", { x1: pad.l, x2: W - pad.r, y1: y(predicted), y2: y(predicted), class: "exo-im-predicted" }, root);
  }
  if (points.length > 1) {
    const line = points.map((p) => `${x(p.t).toFixed(1)},${y(p.generation_tps).toFixed(1)}`);
    svg("path", {
      d: `M${x(t0).toFixed(1)},${y(0)} L${line.join(" L")} L${x(t1).toFixed(1)},${y(0)} Z`, class: "exo-im-area",
    }, root);
    svg("path", { d: `M${line.join(" L")}`, class: "exo-im-line" }, root);
  }
  for (const p of points) {
    const c = svg("circle", { cx: x(p.t), cy: y(p.generation_tps), r: 3, class: "exo-im-point" }, root);
    const tip = svg("title", {}, c);
    tip.textContent = `${clock(p.t)} · ${num(p.generation_tps)} tok/s · ${p.completion_tokens} tokens · TTFT ${seconds(p.ttft_s)}`;
  }
}

function drawTable(box, requests) {
  box.replaceChildren();
  const head = html("div", "exo-im-section-head", null, box);
  html("span", "exo-im-section-title", "Recent requests", head);
  if (!requests.length) {
    html("div", "exo-im-empty", "None yet: generate, chat or send an API request to this instance.", box);
    return;
  }
  if (requests.length > SHOWN_ROWS) html("span", "exo-im-muted", `newest ${SHOWN_ROWS} of ${requests.length}`, head);
  const table = html("table", "exo-im-table", null, box);
  const hr = html("tr", "", null, html("thead", "", null, table));
  const cols = [["finished", ""], ["prompt", "num"], ["generated", "num"], ["TTFT", "num"],
    ["prefill tok/s", "num"], ["decode tok/s", "num"], ["total", "num"]];
  for (const [c, cls] of cols) html("th", cls, c, hr);
  const body = html("tbody", "", null, table);
  for (const r of requests.slice(-SHOWN_ROWS).reverse()) {
    const tr = html("tr", "", null, body);
    html("td", "", clock(r.t), tr);
    html("td", "num", String(r.prompt_tokens), tr);
    html("td", "num", String(r.completion_tokens), tr);
    html("td", "num", seconds(r.ttft_s), tr);
    html("td", "num", num(r.prompt_tps), tr);
    html("td", "num strong", r.completion_tokens > 1 ? num(r.generation_tps) : "–", tr);
    html("td", "num", seconds(r.total_s), tr);
  }
}

function render({ model, el }) {
  const root = html("div", "exo-im", null, el);
  const head = html("div", "exo-im-head", null, root);
  const progress = html("div", "exo-im-section exo-im-progress", null, root);
  const tiles = html("div", "exo-im-tiles", null, root);
  const chart = html("div", "exo-im-section exo-im-chart-box", null, root);
  const table = html("div", "exo-im-section exo-im-requests", null, root);
  let width = 0;

  const draw = () => {
    const summary = model.get("summary") || {};
    const stats = model.get("stats") || {};
    const requests = model.get("requests") || [];
    root.dataset.state = summary.state || "";
    drawHeader(head, summary);
    drawProgress(progress, model.get("progress") || {}, summary.state);
    drawTiles(tiles, summary, stats);
    width = chart.clientWidth || 600;
    drawChart(chart, requests, summary, width);
    drawTable(table, requests);
  };
  const events = ["change:summary", "change:progress", "change:requests", "change:stats"];
  for (const ev of events) model.on(ev, draw);
  const resize = typeof ResizeObserver === "undefined" ? null : new ResizeObserver(() => {
    if (Math.abs((chart.clientWidth || 600) - width) > 1) draw();
  });
  if (resize) resize.observe(chart);
  draw();
  return () => {
    for (const ev of events) model.off(ev, draw);
    if (resize) resize.disconnect();
  };
}

export default { render };
