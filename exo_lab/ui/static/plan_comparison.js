// exo_lab plan comparison: the ranked table of plans, the selected plan's details and its Launch button.
// Model traits (all computed in Python; this only draws): rows (one per plan shown), infeasible, summary,
// selected, limit, measured (the rows carry the comparison), launch ({index, state, text}).

function html(tag, cls = "", text = null, parent = null) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function fixed(v, big = 100, mid = 10) {
  if (v === undefined || v === null || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  return a >= 10000 ? Math.round(v).toLocaleString("en-US") : a >= big ? v.toFixed(0) : a >= mid ? v.toFixed(1) : v.toFixed(2);
}

const fmtTps = (v) => fixed(v);
const fmtSeconds = (s) => `${fixed(s)} s`;
const fmtGB = (bytes) => fixed((bytes || 0) / 1e9);
const fmtMs = (s) => `${fixed(s * 1000)} ms`;
const fmtPct = (f) => (f > 0 && f < 0.005 ? "<1%" : `${Math.round(100 * f)}%`);

function usageClass(frac) {
  return frac >= 0.9 ? "crit" : frac >= 0.7 ? "warn" : "ok";
}

const STRATEGY = { single: "single", pipeline: "pipeline", tensor: "tensor", "pipeline-tensor": "pipeline + tensor" };
const METRICS = {
  ttft_s: { label: "TTFT", higherIsBetter: false, fmt: fmtSeconds },
  prefill_tps: { label: "prefill", higherIsBetter: true, fmt: fmtTps },
  decode_tps: { label: "decode", higherIsBetter: true, fmt: fmtTps },
};

// "measured 31.0 · 0.91×", coloured by whether the plan did better or worse than predicted.
function measuredBadge(row, key, parent) {
  const m = row.measured && row.measured[key];
  if (!m) return;
  const spec = METRICS[key];
  const better = spec.higherIsBetter ? m.ratio >= 1.1 : m.ratio <= 0.9;
  const worse = spec.higherIsBetter ? m.ratio <= 0.9 : m.ratio >= 1.1;
  const cls = better ? "better" : worse ? "worse" : "even";
  const b = html("div", `exo-meas ${cls}`, null, parent);
  html("span", "exo-meas-v", spec.fmt(m.measured).replace(/ s$/, ""), b);
  html("span", "exo-meas-r", `${m.ratio.toFixed(2)}×`, b);
  b.title = `${spec.label}: measured ${spec.fmt(m.measured)}, predicted ${spec.fmt(m.predicted)} ` +
    `(${m.ratio.toFixed(2)}× the prediction)`;
}

function strategyPill(strategy, parent) {
  return html("span", `exo-strategy s-${strategy}`, STRATEGY[strategy] || strategy, parent);
}

function stageChips(row, parent) {
  const box = html("div", "exo-stages", null, parent);
  row.stages.forEach((st, i) => {
    if (i) html("span", "exo-arrow", "→", box);
    const chip = html("span", "exo-chip", null, box);
    chip.style.setProperty("--exo-stage", st.color);
    html("i", "exo-dot", null, chip);
    chip.append(st.text);
    chip.title = `stage ${st.stage}: ${st.node_names.join(" + ")}, layers ${st.layers[0]}-${st.layers[1] - 1}` +
      (st.tensor_size > 1 ? `, tensor parallel x${st.tensor_size}` : "") + `, ${st.dtype}`;
  });
  return box;
}

function memoryCell(row, td) {
  for (const m of row.memory) {
    const line = html("div", "exo-mem", null, td);
    line.style.setProperty("--exo-stage", m.color);
    html("i", "exo-dot", null, line);
    html("span", "exo-mem-name", m.name, line);
    const bar = html("span", "exo-mem-bar", null, line);
    const fill = html("span", `exo-mem-fill ${usageClass(m.frac)}`, null, bar);
    fill.style.width = `${Math.min(100, 100 * m.frac).toFixed(1)}%`;
    html("span", "exo-mem-v", `${fmtGB(m.used_bytes)} / ${fmtGB(m.capacity_bytes)}`, line);
    line.title = `${m.name}: ${fmtGB(m.used_bytes)} GB of ${fmtGB(m.capacity_bytes)} GB available (${fmtPct(m.frac)})`;
  }
}

function bottleneckCell(text, td) {
  const m = /^(.*?)\s*\((.*)\)$/.exec(text || "");
  html("div", "exo-bn", m ? m[1] : text || "–", td);
  if (m) html("div", "exo-bn-sub", m[2], td);
}

const COLUMNS = [["#", "c-rank"], ["Plan", "c-plan"], ["Memory used / free (GB)", "c-mem"], ["TTFT", "c-num c-ttft"],
  ["Prefill tok/s", "c-num c-prefill"], ["Decode tok/s", "c-num c-decode"], ["Bottleneck", "c-bn"]];

// A listbox of plans; each row is a CSS grid with the same columns as the header, and the explanation
// on a line of its own under the plan, as wide as the row.
function drawTable(parent, state, select) {
  const { rows, summary, selected } = state;
  const table = html("div", "exo-plan-table", null, parent);
  const head = html("div", "exo-plan-head", null, table);
  head.setAttribute("aria-hidden", "true");
  const objective = summary.objective === "ttft" ? "c-ttft" : "c-decode";
  for (const [name, cls] of COLUMNS) {
    const th = html("div", cls, name, head);
    if (cls.includes(objective)) {
      th.classList.add("objective");
      th.title = "the plans are ranked by this";
    }
  }
  const list = html("div", "exo-plan-list", null, table);
  list.setAttribute("role", "listbox");
  list.setAttribute("aria-label", `Plans for ${summary.model || "the model"}, best first`);
  for (const row of rows) {
    const i = row.index;
    const isSel = i === selected;
    const tr = html("div", ["exo-plan-row", isSel ? "selected" : "", i === 0 ? "best" : ""].filter(Boolean).join(" "), null, list);
    tr.dataset.index = String(i);
    tr.tabIndex = isSel || (selected < 0 && i === 0) ? 0 : -1;
    tr.setAttribute("role", "option");
    tr.setAttribute("aria-selected", String(isSel));
    tr.setAttribute("aria-label", `#${i} ${row.description}: decode ${fmtTps(row.decode_tps)} tok/s, ` +
      `TTFT ${fmtSeconds(row.ttft_s)}, prefill ${fmtTps(row.prefill_tps)} tok/s. ${row.explanation}`);
    tr.addEventListener("click", () => select(i, false));

    const rank = html("div", "c-rank", null, tr);
    html("div", "exo-rank", `#${i}`, rank);
    if (i === 0) html("div", "exo-best", "best", rank);

    const plan = html("div", "c-plan", null, tr);
    const top = html("div", "exo-plan-top", null, plan);
    strategyPill(row.strategy, top);
    html("span", "exo-plan-meta", `${row.num_nodes} node${row.num_nodes === 1 ? "" : "s"} · ` +
      `${row.num_ranks} rank${row.num_ranks === 1 ? "" : "s"}`, top);
    if (row.split === "fastest") html("span", "exo-split", "fastest-first", top);
    if (row.split === "layers") html("span", "exo-split", "balanced for prompts", top);
    stageChips(row, plan).title = row.description;

    memoryCell(row, html("div", "c-mem", null, tr));

    const ttft = html("div", "c-num c-ttft", null, tr);
    html("div", "exo-v", fmtSeconds(row.ttft_s), ttft);
    measuredBadge(row, "ttft_s", ttft);
    const pre = html("div", "c-num c-prefill", null, tr);
    html("div", "exo-v", fmtTps(row.prefill_tps), pre);
    measuredBadge(row, "prefill_tps", pre);

    const dec = html("div", "c-num c-decode", null, tr);
    const d = html("div", "exo-decode", null, dec);
    const spark = html("span", "exo-spark", null, d);
    const rel = Math.max(0, Math.min(1, row.decode_rel || 0));
    html("span", "exo-spark-fill", null, spark).style.width = `${(100 * rel).toFixed(1)}%`;
    spark.title = `${fmtPct(rel)} of the best plan's decode tok/s`;
    html("span", "exo-v", fmtTps(row.decode_tps), d);
    measuredBadge(row, "decode_tps", dec);

    bottleneckCell(row.bottleneck, html("div", "c-bn", null, tr));
    html("div", "exo-why", row.explanation, tr);
  }
  return list;
}

function breakdownSection(row, parent) {
  const s = html("div", "exo-section", null, parent);
  const total = row.breakdown.reduce((a, b) => a + b.seconds, 0);
  html("div", "exo-section-title", `One decode token · ${fmtMs(total)}`, s);
  const kind = (name) => (name.startsWith("compute") ? "compute" : name.startsWith("all-reduce") ? "allreduce" : "link");
  const bar = html("div", "exo-stack", null, s);
  for (const b of row.breakdown) {
    if (b.frac < 0.002) continue;
    const seg = html("span", `exo-seg ${kind(b.name)}`, null, bar);
    seg.style.width = `${(100 * b.frac).toFixed(2)}%`;
    seg.title = `${b.name}: ${fmtMs(b.seconds)} (${fmtPct(b.frac)})`;
  }
  const list = html("table", "exo-kv", null, s);
  for (const b of row.breakdown.slice(0, 6)) {
    const tr = html("tr", "", null, list);
    const th = html("th", "", null, tr);
    html("i", `exo-key ${kind(b.name)}`, null, th);
    th.append(b.name);
    html("td", "", `${fmtMs(b.seconds)} · ${fmtPct(b.frac)}`, tr);
  }
  if (row.breakdown.length > 6) html("div", "exo-muted", `+ ${row.breakdown.length - 6} smaller`, s);
}

function stagesSection(row, parent) {
  const s = html("div", "exo-section", null, parent);
  html("div", "exo-section-title", "Stages", s);
  const list = html("table", "exo-kv exo-stage-list", null, s);
  for (const st of row.stages) {
    const tr = html("tr", "", null, list);
    const th = html("th", "", null, tr);
    const chip = html("span", "exo-chip", null, th);
    chip.style.setProperty("--exo-stage", st.color);
    html("i", "exo-dot", null, chip);
    chip.append(`stage ${st.stage}`);
    const layers = st.layers[1] - st.layers[0] === 1 ? `layer ${st.layers[0]}` : `layers ${st.layers[0]}-${st.layers[1] - 1}`;
    const tp = st.tensor_size > 1 ? ` · x${st.tensor_size}` : "";
    html("td", "", `${st.node_names.join(" + ")} · ${layers}${tp} · ${st.dtype}`, tr);
  }
  const reasons = (row.dtypes || []).filter((d) => d.reason);
  if (reasons.length) {
    const dl = html("div", "exo-dtypes", null, s);
    for (const d of reasons) {
      const line = html("div", "", null, dl);
      html("b", "", `${d.node} ${d.dtype}: `, line);
      line.append(d.reason);
    }
  }
}

function drawDetail(parent, state, onLaunch) {
  const { rows, selected, launch, summary } = state;
  const row = rows.find((r) => r.index === selected);
  if (!row) return;
  const box = html("div", "exo-plan-detail", null, parent);
  box.setAttribute("aria-live", "polite");
  const head = html("div", "exo-detail-head", null, box);
  const title = html("div", "exo-detail-title", null, head);
  html("span", "", `Plan #${row.index}`, title);
  strategyPill(row.strategy, title);
  html("span", "exo-plan-meta", `${row.backend} backend · decode ${fmtTps(row.decode_tps)} tok/s · TTFT ${fmtSeconds(row.ttft_s)}`, title);

  const act = html("div", "exo-launch", null, head);
  if (!row.launchable) html("span", "exo-launch-hint", summary.no_launch || "cannot launch this plan", act);
  const running = launch && launch.index === row.index && launch.state === "running";
  const btn = html("button", "exo-launch-btn", running ? "Launching…" : "Launch", act);
  btn.type = "button";
  btn.dataset.focusKey = "launch";
  if (!row.launchable || running) {
    btn.disabled = true;
    btn.setAttribute("aria-disabled", "true");
  }
  btn.title = row.launchable ? `Start plan #${row.index} on the cluster` : summary.no_launch || "cannot launch this plan";
  // A disabled button gets no mouse events: the wrapper carries the tooltip too.
  act.title = btn.title;
  btn.addEventListener("click", (ev) => {
    ev.stopPropagation();
    if (!btn.disabled) onLaunch(row.index);
  });

  if (launch && launch.index === row.index && launch.text) {
    html("div", `exo-launch-status ${launch.state || ""}`, launch.text, box);
  }
  const grid = html("div", "exo-detail-grid", null, box);
  stagesSection(row, grid);
  breakdownSection(row, grid);
}

function drawInfeasible(parent, state, openRef) {
  const { infeasible, summary } = state;
  if (!summary.infeasible) return;
  const det = html("details", "exo-infeasible", null, parent);
  det.open = openRef.open;
  det.addEventListener("toggle", () => { openRef.open = det.open; });
  const n = summary.infeasible;
  html("summary", "", `${n} infeasible candidate${n === 1 ? "" : "s"}`, det).dataset.focusKey = "infeasible";
  const ul = html("ul", "", null, det);
  for (const p of infeasible) {
    const li = html("li", "", null, ul);
    strategyPill(p.strategy, li);
    html("span", "exo-inf-desc", p.description.replace(/^[a-z-]+: /, ""), li);
    html("span", "exo-inf-reason", p.reason, li);
  }
  if (n > infeasible.length) html("div", "exo-muted", `… and ${n - infeasible.length} more`, det);
}

function render({ model, el }) {
  const root = html("div", "exo-plans", null, el);
  const openRef = { open: null };
  let focusIndex = null;

  const state = () => ({
    rows: model.get("rows") || [],
    infeasible: model.get("infeasible") || [],
    summary: model.get("summary") || {},
    selected: model.get("selected") ?? -1,
    limit: model.get("limit") || 10,
    launch: model.get("launch") || {},
  });
  const select = (i, focus) => {
    focusIndex = focus ? i : null;
    if (model.get("selected") !== i) {
      model.set("selected", i); // fires change:selected, which redraws
      model.save_changes();
    } else if (focus) {
      draw();
    }
  };
  const onLaunch = (i) => model.send({ event: "launch", index: i });

  const draw = () => {
    const s = state();
    const focused = el.ownerDocument.activeElement;
    const hadFocus = focused && root.contains(focused) && focused.classList.contains("exo-plan-row");
    const focusKey = focused && root.contains(focused) && focused.dataset ? focused.dataset.focusKey : null;
    root.replaceChildren();
    if (openRef.open === null) openRef.open = s.summary.count === 0;

    const header = html("div", "exo-header", null, root);
    html("div", "exo-title", `Plans for ${s.summary.model || "?"}`, header);
    const sub = [`${s.summary.count} feasible`];
    if (s.summary.infeasible) sub.push(`${s.summary.infeasible} infeasible`);
    sub.push(`ranked by ${s.summary.objective === "ttft" ? "TTFT" : "decode tok/s"}`);
    if (s.summary.context) sub.push(`context ${s.summary.context}`, `prompt ${s.summary.prompt_tokens}`, `batch ${s.summary.batch}`);
    html("div", "exo-subtitle", sub.join(" · "), header);

    if (!s.rows.length) {
      html("div", "exo-empty", s.summary.infeasible
        ? "No plan fits this cluster: every candidate needs more memory than a node has (see below)."
        : "No plans: the cluster has no live nodes.", root);
    } else {
      const measured = s.rows.some((r) => r.measured && Object.keys(r.measured).length);
      if (measured) {
        const legend = html("div", "exo-meas-legend", null, root);
        const sample = html("div", "exo-meas even", null, legend);
        html("span", "exo-meas-v", "measured", sample);
        html("span", "exo-meas-r", "×ratio", sample);
        legend.append("under a prediction: what a bench measured, and measured ÷ predicted");
      }
      const wrap = html("div", `exo-table-wrap${measured ? " has-measured" : ""}`, null, root);
      const table = drawTable(wrap, s, select);
      table.addEventListener("keydown", (ev) => {
        const tr = ev.target.closest && ev.target.closest(".exo-plan-row");
        if (!tr) return;
        const i = Number(tr.dataset.index);
        const last = s.rows[s.rows.length - 1].index;
        const to = { ArrowDown: Math.min(i + 1, last), ArrowUp: Math.max(i - 1, 0), Home: 0, End: last,
          Enter: i, " ": i }[ev.key];
        if (to === undefined) return;
        ev.preventDefault();
        select(to, true);
      });
      if (s.summary.count > s.summary.initial_limit) {
        const more = html("div", "exo-more", null, root);
        const showingAll = s.rows.length >= s.summary.count;
        const btn = html("button", "exo-link-btn",
          showingAll ? `Show the top ${s.summary.initial_limit}` : `Show all ${s.summary.count} plans`, more);
        btn.type = "button";
        btn.dataset.focusKey = "more";
        html("span", "exo-muted", `showing ${s.rows.length} of ${s.summary.count}`, more);
        btn.addEventListener("click", () => {
          model.set("limit", showingAll ? s.summary.initial_limit : s.summary.count);
          model.save_changes();
        });
      }
      drawDetail(root, s, onLaunch);
    }
    drawInfeasible(root, s, openRef);

    const want = focusIndex ?? (hadFocus ? s.selected : null);
    if (want !== null) {
      const tr = root.querySelector(`.exo-plan-row[data-index="${want}"]`);
      if (tr) tr.focus();
    } else if (focusKey) {  // a redraw must not drop the keyboard focus from a button
      const again = root.querySelector(`[data-focus-key="${focusKey}"]`);
      if (again) again.focus();
    }
    focusIndex = null;
  };

  const events = ["change:rows", "change:infeasible", "change:summary", "change:selected", "change:limit", "change:launch"];
  for (const ev of events) model.on(ev, draw);
  draw();
  return () => {
    for (const ev of events) model.off(ev, draw);
  };
}

export default { render };
