// exo_lab's one cluster-graph renderer: plain SVG, no external libraries (works offline).
//
// The default export is an anywidget module ({render}) with model traits: topology (Topology.to_json()
// + precomputed "edges"), selected_node, highlight ({nodes: {id: {label, color}}, edges: [[a, b], ...]}),
// title, error. It runs in notebooks (exo_lab.ui.TopologyWidget) and in the Panel dashboard (Panel's
// AnyWidgetComponent). The JupyterLab side panel bundles this same file and calls the named exports
// drawGraph / drawLegend (and the small helpers gib, memory, usageClass) for its graph.

const SVG_NS = "http://www.w3.org/2000/svg";
const GIB = 1024 ** 3;
const LABEL_FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";

function svg(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  if (parent) parent.appendChild(node);
  return node;
}

function html(tag, cls = "", text = null, parent = null) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

export function gib(bytes) {
  const v = (bytes || 0) / GIB;
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(0) : v.toFixed(1);
}

function gflops(v) {
  if (v === undefined || v === null) return "–";
  return v >= 1000 ? `${(v / 1000).toFixed(1)} T` : v >= 10 ? v.toFixed(0) : v.toFixed(1);
}

let measureCtx = null;
function textWidth(text, font = LABEL_FONT) {
  if (!measureCtx) measureCtx = document.createElement("canvas").getContext("2d");
  if (!measureCtx) return text.length * 6.2;
  measureCtx.font = font;
  return measureCtx.measureText(text).width;
}

export function memory(node) {
  const p = node.profile || {};
  const total = p.memory_total_bytes || 0;
  const avail = p.memory_available_bytes ?? total;
  return { total, avail, used: Math.max(0, total - avail), frac: total ? Math.min(1, Math.max(0, (total - avail) / total)) : 0 };
}

export function usageClass(frac) {
  return frac >= 0.9 ? "crit" : frac >= 0.7 ? "warn" : "ok";
}

const NAME_FONT = "600 12.5px system-ui, -apple-system, 'Segoe UI', sans-serif";
const LINE_H = 15;
const PILL_H = 22;

function nodeLines(n) {
  const mem = memory(n);
  const gone = n.state !== "alive";
  return [
    ["exo-node-name", n.name + (gone ? " (gone)" : ""), NAME_FONT],
    ["exo-node-chip", (n.profile || {}).cpu_model || "unknown chip", LABEL_FONT],
    ["exo-node-free", gone ? "not reachable" : `${gib(mem.avail)} / ${gib(mem.total)} GiB free`, LABEL_FONT],
  ];
}

// Nodes on a circle (first at the top; an even count turned so that no node sits on the side),
// stretched to fill the box that remains once room for the labels is kept.
function layout(nodes, width, height, hiNodes) {
  const n = nodes.length;
  const maxMem = Math.max(1, ...nodes.map((x) => memory(x).total));
  const rMax = Math.max(24, Math.min(46, Math.min(width, height) * 0.1));
  const radii = nodes.map((x) => Math.max(14, rMax * Math.sqrt(memory(x).total / maxMem)));
  const labelW = Math.max(...nodes.map((x) => Math.max(...nodeLines(x).map(([, t, f]) => textWidth(t, f)))));
  const blockH = 3 * LINE_H + (Object.keys(hiNodes).length ? PILL_H : 0);
  const padX = Math.max(rMax + 12, labelW / 2 + 10);
  const padY = rMax + 30 + blockH;
  const start = -Math.PI / 2 + (n % 2 === 0 ? Math.PI / n : 0);
  const unit = nodes.map((_, i) => {
    const a = start + (2 * Math.PI * i) / n;
    return [Math.cos(a), Math.sin(a)];
  });
  const xs = unit.map((u) => u[0]);
  const ys = unit.map((u) => u[1]);
  const spanX = Math.max(...xs) - Math.min(...xs);
  const spanY = Math.max(...ys) - Math.min(...ys);
  let sx = spanX > 1e-9 ? Math.max(0, width - 2 * padX) / spanX : 0;
  let sy = spanY > 1e-9 ? Math.max(0, height - 2 * padY) / spanY : 0;
  if (sx && sy) {
    sx = Math.min(sx, 2.1 * sy);
    sy = Math.min(sy, 1.6 * sx);
  }
  sx = Math.min(sx, 300);
  sy = Math.min(sy, 260);
  const midX = (Math.max(...xs) + Math.min(...xs)) / 2;
  const midY = (Math.max(...ys) + Math.min(...ys)) / 2;
  return unit.map(([ux, uy], i) => {
    const y = height / 2 + (uy - midY) * sy;
    return { x: width / 2 + (ux - midX) * sx, y, r: radii[i], above: n > 1 && uy < midY - 1e-6, labelW, blockH };
  });
}

function rectsOverlap(a, b) {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

function circleHitsRect(c, r) {
  const nx = Math.max(r.x, Math.min(c.x, r.x + r.w));
  const ny = Math.max(r.y, Math.min(c.y, r.y + r.h));
  return (c.x - nx) ** 2 + (c.y - ny) ** 2 < (c.r + 6) ** 2;
}

function overlapArea(a, b) {
  return Math.max(0, Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x)) *
    Math.max(0, Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y));
}

// An edge's label on one line ("0.05 ms · 65 Gbit/s") or, where an edge is short, on two.
function labelShapes(label) {
  const one = { lines: [label], w: textWidth(label) + 14, h: 20 };
  const parts = label.split(" · ");
  if (parts.length < 2) return [one];
  return [one, { lines: parts, w: Math.max(...parts.map((t) => textWidth(t))) + 12, h: 8 + 13 * parts.length }];
}

// Edge labels at the midpoint, slid along the edge when they would cover another label or a node; then on
// two lines; then beside the edge; else where they cover least. Labels stay inside the drawing (``bounds``).
function placeEdgeLabel(p, q, label, placed, circles, bounds) {
  const shapes = labelShapes(label);
  const len = Math.hypot(q.x - p.x, q.y - p.y) || 1;
  const nx = -(q.y - p.y) / len;
  const ny = (q.x - p.x) / len;
  const spots = [];
  for (const shape of shapes) {
    for (const t of [0.5, 0.4, 0.6, 0.32, 0.68, 0.25, 0.75]) {
      spots.push({ shape, x: p.x + (q.x - p.x) * t, y: p.y + (q.y - p.y) * t });
    }
  }
  for (const d of [1, -1, 2, -2, 3, -3]) {
    const shape = shapes[shapes.length - 1];
    const off = d * (shape.h / 2 + 6);
    spots.push({ shape, x: (p.x + q.x) / 2 + nx * off, y: (p.y + q.y) / 2 + ny * off });
  }
  let best = null;
  for (const s of spots) {
    const box = { x: s.x - s.shape.w / 2, y: s.y - s.shape.h / 2, w: s.shape.w, h: s.shape.h };
    const outside = box.w * box.h - overlapArea(box, bounds);
    const covered = outside + placed.reduce((a, b) => a + overlapArea(box, b), 0) +
      circles.reduce((a, c) => a + (circleHitsRect(c, box) ? overlapArea(box, { x: c.x - c.r, y: c.y - c.r, w: 2 * c.r, h: 2 * c.r }) + 1 : 0), 0);
    if (covered === 0) return { ...s, box };
    if (!best || covered < best.covered) best = { ...s, box, covered };
  }
  return best;
}

function edgeKey(a, b) {
  return a < b ? `${a}\u0000${b}` : `${b}\u0000${a}`;
}

/** Draw ``state`` ({topology, highlight, selected}) into ``svgEl``, ``width`` x ``height`` px;
 *  ``onSelect(id)`` is called with a clicked node's id ("" to clear the selection). */
export function drawGraph(svgEl, state, width, height, onSelect) {
  const { topology, highlight, selected } = state;
  const nodes = (topology && topology.nodes) || [];
  const edges = (topology && topology.edges) || [];
  svgEl.replaceChildren();
  svgEl.setAttribute("width", width);
  svgEl.setAttribute("height", height);
  svgEl.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const bg = svg("rect", { class: "exo-bg", x: 0, y: 0, width, height }, svgEl);
  bg.addEventListener("click", () => onSelect(""));
  if (!nodes.length) {
    svg("text", { class: "exo-empty", x: width / 2, y: height / 2, "text-anchor": "middle" }, svgEl).textContent =
      "No nodes yet";
    return;
  }

  const hiNodes = (highlight && highlight.nodes) || {};
  const pos = layout(nodes, width, height, hiNodes);
  const at = new Map(nodes.map((n, i) => [n.id, { ...pos[i], node: n }]));
  const hiEdges = new Set(((highlight && highlight.edges) || []).map(([a, b]) => edgeKey(a, b)));
  const dimNodes = Object.keys(hiNodes).length > 0;
  const dimEdges = hiEdges.size > 0;

  const edgeLayer = svg("g", { class: "exo-edges" }, svgEl);
  const labelLayer = svg("g", { class: "exo-edge-labels" }, svgEl);
  const nodeLayer = svg("g", { class: "exo-nodes" }, svgEl);

  const circles = [...at.values()].map((p) => ({ x: p.x, y: p.y, r: p.r + 6 }));
  // Node label blocks are taken first, so that edge labels keep clear of them.
  const placed = [...at.values()].map((p) => {
    const top = p.above ? p.y - (p.r + 4.5 + 14 + p.blockH) : p.y + p.r + 4.5 + 11;
    return { x: p.x - p.labelW / 2, y: top, w: p.labelW, h: p.blockH + 4 };
  });
  // Highlighted edges last, so they draw on top and get the first pick of label spots.
  const ordered = [...edges].sort((e, f) => hiEdges.has(edgeKey(e.source, e.target)) - hiEdges.has(edgeKey(f.source, f.target)));
  const labelOrder = [...ordered].reverse();
  const labelSpot = new Map();
  for (const e of labelOrder) {
    const p = at.get(e.source);
    const q = at.get(e.target);
    if (!p || !q) continue;
    const spot = placeEdgeLabel(p, q, e.label, placed, circles, { x: 0, y: 0, w: width, h: height });
    placed.push(spot.box);
    labelSpot.set(e, spot);
  }
  for (const e of ordered) {
    const p = at.get(e.source);
    const q = at.get(e.target);
    if (!p || !q) continue;
    const hi = hiEdges.has(edgeKey(e.source, e.target));
    const touchesSel = selected && (e.source === selected || e.target === selected);
    const cls = ["exo-edge", e.ok ? "" : "failed", e.gone ? "gone" : "", e.rdma ? "rdma" : "", hi ? "hi" : "",
      dimEdges && !hi ? "dim" : "", touchesSel ? "sel" : ""].filter(Boolean).join(" ");
    const ends = { "data-source": e.source, "data-target": e.target };
    const g = svg("g", { class: cls, ...ends }, edgeLayer);
    svg("line", { class: "exo-edge-hit", x1: p.x, y1: p.y, x2: q.x, y2: q.y }, g);
    svg("line", { class: "exo-edge-line", x1: p.x, y1: p.y, x2: q.x, y2: q.y, "stroke-width": e.width }, g);
    const tip = e.ok
      ? `${p.node.name} ↔ ${q.node.name}\n${e.src_address} ↔ ${e.dst_address}\nRTT ${e.rtt_ms} ms (p95 ${e.rtt_ms_p95 ?? "?"} ms), ${Math.round(e.bandwidth_mbit_per_s)} Mbit/s${e.rdma ? ", RDMA" : ""}`
      : `${p.node.name} ↔ ${q.node.name}: ${e.error || "unreachable"}`;
    svg("title", {}, g).textContent = tip;

    const spot = labelSpot.get(e);
    const lg = svg("g", { class: cls.replace("exo-edge", "exo-edge-label"), transform: `translate(${spot.x},${spot.y})`, ...ends },
      labelLayer);
    const { w, h, lines } = spot.shape;
    svg("rect", { x: -w / 2, y: -h / 2, width: w, height: h, rx: Math.min(10, h / 2) }, lg);
    lines.forEach((line, i) => {
      const y = lines.length === 1 ? 0.5 : -h / 2 + 4 + 13 * i + 6.5;
      svg("text", { x: 0, y, "text-anchor": "middle", "dominant-baseline": "middle" }, lg).textContent = line;
    });
    svg("title", {}, lg).textContent = tip;
  }

  for (const n of nodes) {
    const p = at.get(n.id);
    const mem = memory(n);
    const hi = hiNodes[n.id];
    const gone = n.state !== "alive";
    const cls = ["exo-node", gone ? "gone" : "", n.id === selected ? "selected" : "", hi ? "hi" : "",
      dimNodes && !hi ? "dim" : ""].filter(Boolean).join(" ");
    const g = svg("g", {
      class: cls, transform: `translate(${p.x},${p.y})`, "data-node-id": n.id, "data-node-name": n.name, tabindex: 0, role: "button",
      "aria-label": `${n.name}: ${gib(mem.avail)} of ${gib(mem.total)} GiB free${gone ? ", gone" : ""}`,
    }, nodeLayer);
    if (hi && hi.color) g.style.setProperty("--exo-node-color", hi.color);
    const select = () => onSelect(n.id === selected ? "" : n.id);
    g.addEventListener("click", (ev) => { ev.stopPropagation(); select(); });
    g.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(); }
    });

    svg("circle", { class: "exo-node-halo", r: p.r + 11 }, g);
    const ringR = p.r + 4.5;
    svg("circle", { class: "exo-mem-track", r: ringR }, g);
    if (!gone && mem.total) {
      const c = 2 * Math.PI * ringR;
      svg("circle", {
        class: `exo-mem-used ${usageClass(mem.frac)}`, r: ringR, transform: "rotate(-90)",
        "stroke-dasharray": `${(mem.frac * c).toFixed(2)} ${c.toFixed(2)}`,
      }, g);
    }
    svg("circle", { class: "exo-node-body", r: p.r }, g);
    if (p.r >= 22) {
      svg("text", { class: "exo-node-mem", y: -1, "text-anchor": "middle" }, g).textContent = gib(mem.total);
      svg("text", { class: "exo-node-unit", y: 12, "text-anchor": "middle" }, g).textContent = "GiB";
    } else {
      svg("text", { class: "exo-node-unit", y: 4, "text-anchor": "middle" }, g).textContent = gib(mem.total);
    }

    const lines = nodeLines(n);
    const pill = hi && hi.label ? 1 : 0;
    const blockH = lines.length * LINE_H + pill * PILL_H;
    let y = p.above ? -(ringR + 14 + blockH) + 11 : ringR + 23;
    const label = svg("g", { class: "exo-node-label" }, g);
    for (const [c, t] of lines) {
      svg("text", { class: c, y, "text-anchor": "middle" }, label).textContent = t;
      y += LINE_H;
    }
    if (pill) {
      const w = textWidth(hi.label) + 16;
      const pg = svg("g", { class: "exo-node-pill", transform: `translate(0,${y + 2})` }, label);
      svg("rect", { x: -w / 2, y: -11, width: w, height: 19, rx: 9.5 }, pg);
      svg("text", { x: 0, y: 0, "text-anchor": "middle", "dominant-baseline": "middle" }, pg).textContent = hi.label;
    }
    svg("title", {}, g).textContent = `${n.name} (${n.id})\n${(n.addresses || []).join(", ")}`;
  }
}

function row(table, key, value, cls = "") {
  const tr = html("tr", cls, null, table);
  html("th", "", key, tr);
  const td = html("td", "", null, tr);
  if (value instanceof Node) td.appendChild(value);
  else td.textContent = value;
  return tr;
}

function memBar(mem, parent) {
  const bar = html("div", "exo-bar", null, parent);
  const fill = html("div", `exo-bar-fill ${usageClass(mem.frac)}`, null, bar);
  fill.style.width = `${(mem.frac * 100).toFixed(1)}%`;
  return bar;
}

function matmulTable(gf, parent) {
  const byDtype = new Map();
  const ms = new Set();
  for (const [k, v] of Object.entries(gf || {})) {
    const m = /^(.*)_m(\d+)$/.exec(k);
    if (!m) continue;
    if (!byDtype.has(m[1])) byDtype.set(m[1], {});
    byDtype.get(m[1])[m[2]] = v;
    ms.add(Number(m[2]));
  }
  if (!byDtype.size) {
    html("div", "exo-muted", "not measured", parent);
    return;
  }
  const cols = [...ms].sort((a, b) => b - a);
  const t = html("table", "exo-grid", null, parent);
  const head = html("tr", "", null, html("thead", "", null, t));
  html("th", "", "dtype", head);
  for (const m of cols) html("th", "num", m === 1 ? "decode m=1" : `prefill m=${m}`, head);
  const body = html("tbody", "", null, t);
  for (const [dtype, vals] of byDtype) {
    const tr = html("tr", "", null, body);
    html("td", "", dtype, tr);
    for (const m of cols) html("td", "num", gflops(vals[m]), tr);
  }
}

function section(parent, title) {
  const s = html("div", "exo-section", null, parent);
  html("div", "exo-section-title", title, s);
  return s;
}

function drawDetails(box, state) {
  const { topology, highlight, selected } = state;
  const nodes = topology.nodes || [];
  const edges = topology.edges || [];
  box.replaceChildren();
  const node = nodes.find((n) => n.id === selected);
  if (!node) {
    const alive = nodes.filter((n) => n.state === "alive");
    const total = alive.reduce((s, n) => s + memory(n).total, 0);
    const free = alive.reduce((s, n) => s + memory(n).avail, 0);
    html("div", "exo-details-title", "Cluster", box);
    const t = html("table", "exo-kv", null, box);
    row(t, "nodes", `${alive.length} alive${nodes.length > alive.length ? `, ${nodes.length - alive.length} gone` : ""}`);
    row(t, "memory", `${gib(free)} / ${gib(total)} GiB free`);
    const ok = edges.filter((e) => e.ok);
    row(t, "links", `${ok.length} of ${(nodes.length * (nodes.length - 1)) / 2} pairs`);
    if (ok.length) {
      const slow = ok.reduce((a, b) => (a.bandwidth_mbit_per_s <= b.bandwidth_mbit_per_s ? a : b));
      const name = (id) => (nodes.find((n) => n.id === id) || { name: id }).name;
      row(t, "slowest", `${name(slow.source)} ↔ ${name(slow.target)}`);
      row(t, "", slow.label, "exo-sub");
    }
    html("div", "exo-hint", "Click a node to see its profile.", box);
    return;
  }
  const p = node.profile || {};
  const mem = memory(node);
  const head = html("div", "exo-details-head", null, box);
  html("div", "exo-details-title", node.name, head);
  html("span", `exo-badge ${node.state === "alive" ? "alive" : "gone"}`, node.state, head);
  html("div", "exo-mono exo-muted", node.id, box);
  const hi = highlight && highlight.nodes && highlight.nodes[node.id];
  if (hi && hi.label) {
    const pill = html("div", "exo-detail-pill", hi.label, box);
    if (hi.color) pill.style.setProperty("--exo-node-color", hi.color);
  }

  const ms = section(box, "Memory");
  memBar(mem, ms);
  const mt = html("table", "exo-kv", null, ms);
  row(mt, "free", `${gib(mem.avail)} of ${gib(mem.total)} GiB`);
  if (p.gpu_memory_bytes) row(mt, "GPU working set", `${gib(p.gpu_memory_bytes)} GiB`);
  if (p.memory_bandwidth_gb_per_s) row(mt, "bandwidth", `${Number(p.memory_bandwidth_gb_per_s).toFixed(0)} GB/s`);

  const cs = section(box, "Compute");
  const ct = html("table", "exo-kv", null, cs);
  row(ct, "chip", p.cpu_model || "?");
  row(ct, "cores", String(p.cpu_count ?? "?"));
  if (p.system) row(ct, "system", [p.system, p.machine].filter(Boolean).join(" "));
  row(ct, "MLX devices", (p.mlx_devices || []).join(", ") || "?");
  row(ct, "BLAS", p.blas || "?");
  const gs = section(box, "Matmul GFLOP/s");
  matmulTable(p.matmul_gflops, gs);

  const ns = section(box, "Network");
  const at = html("table", "exo-kv", null, ns);
  row(at, "addresses", (node.addresses || []).map((a) => `${a}:${node.port}`).join("\n") || "?", "exo-mono-row");
  const ls = section(box, "Links");
  const nt = html("table", "exo-kv", null, ls);
  const names = new Map(nodes.map((n) => [n.id, n.name]));
  for (const e of edges) {
    if (e.source !== node.id && e.target !== node.id) continue;
    const other = e.source === node.id ? e.target : e.source;
    const cell = document.createElement("span");
    cell.append(e.label);
    if (e.rdma) html("span", "exo-tag", "RDMA", cell);
    row(nt, names.get(other) || other, cell, e.ok ? "exo-link" : "exo-link exo-bad");
  }
}

/** The legend under the graph: what sizes, rings and line styles mean (only those in use). */
export function drawLegend(legend, topology) {
  const edges = topology.edges || [];
  const items = [["lg-node", "area ∝ memory"], ["lg-ring", "ring = memory in use"], ["lg-edge", "width ∝ log bandwidth"]];
  if (edges.some((e) => e.rdma)) items.push(["lg-rdma", "RDMA"]);
  if (edges.some((e) => !e.ok)) items.push(["lg-failed", "unreachable"]);
  if ((topology.nodes || []).some((n) => n.state !== "alive")) items.push(["lg-gone", "gone"]);
  legend.replaceChildren();
  for (const [cls, text] of items) {
    const item = html("span", "", null, legend);
    html("i", cls, null, item);
    item.append(text);
  }
}

function render({ model, el }) {
  const root = html("div", "exo-topo", null, el);
  const header = html("div", "exo-header", null, root);
  const titleEl = html("div", "exo-title", null, header);
  const subEl = html("div", "exo-subtitle", null, header);
  const errorEl = html("div", "exo-error", null, root);
  const body = html("div", "exo-body", null, root);
  const graph = html("div", "exo-graph", null, body);
  const svgEl = svg("svg", { class: "exo-svg", role: "img" }, graph);
  const legend = html("div", "exo-legend", null, graph);
  const details = html("div", "exo-details", null, body);

  let width = 0;
  const state = () => ({
    topology: model.get("topology") || {},
    highlight: model.get("highlight") || {},
    selected: model.get("selected_node") || "",
  });
  const onSelect = (id) => {
    if ((model.get("selected_node") || "") === id) return;
    model.set("selected_node", id); // fires change:selected_node, which redraws
    model.save_changes();
  };
  const draw = () => {
    const s = state();
    const nodes = s.topology.nodes || [];
    const alive = nodes.filter((n) => n.state === "alive").length;
    const pairs = (s.topology.edges || []).filter((e) => e.ok).length;
    titleEl.textContent = model.get("title") || "Cluster topology";
    subEl.textContent = `${alive} node${alive === 1 ? "" : "s"} alive` +
      (nodes.length > alive ? ` · ${nodes.length - alive} gone` : "") + ` · ${pairs} link${pairs === 1 ? "" : "s"}`;
    const err = model.get("error") || "";
    errorEl.textContent = err;
    errorEl.style.display = err ? "" : "none";
    const focused = el.ownerDocument.activeElement;
    const focusId = focused && focused.getAttribute ? focused.getAttribute("data-node-id") : null;
    width = graph.clientWidth || 620;
    const height = Math.min(760, 440 + Math.max(0, nodes.length - 5) * 36);
    drawGraph(svgEl, s, width, height, onSelect);
    drawDetails(details, s);
    drawLegend(legend, s.topology);
    if (focusId) {
      const again = svgEl.querySelector(`[data-node-id="${CSS.escape(focusId)}"]`);
      if (again) again.focus();
    }
  };

  const events = ["change:topology", "change:highlight", "change:selected_node", "change:title", "change:error"];
  for (const ev of events) model.on(ev, draw);
  const resize = typeof ResizeObserver === "undefined" ? null : new ResizeObserver(() => {
    if (Math.abs((graph.clientWidth || 620) - width) > 1) draw();
  });
  if (resize) resize.observe(graph);
  draw();
  return () => {
    for (const ev of events) model.off(ev, draw);
    if (resize) resize.disconnect();
  };
}

export default { render };
