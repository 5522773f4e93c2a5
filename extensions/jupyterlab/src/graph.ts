// The cluster graph in SVG, sized for a side panel: nodes on a circle (area ∝ memory, a ring for
// memory in use), links labelled with latency and bandwidth (labels made by the server, the same
// ones the notebook's TopologyWidget draws, see exo_lab/ui/static/topology.js).
import { IEdge, INode, ITopology } from './api';

const SVG_NS = 'http://www.w3.org/2000/svg';
const GIB = 1024 ** 3;

export function svg(tag: string, attrs: Record<string, string | number> = {}, parent?: Element): SVGElement {
  const el = document.createElementNS(SVG_NS, tag) as SVGElement;
  for (const [k, v] of Object.entries(attrs)) {
    el.setAttribute(k, String(v));
  }
  if (parent) {
    parent.appendChild(el);
  }
  return el;
}

export function gib(bytes: number | undefined): string {
  const v = (bytes || 0) / GIB;
  return v >= 10 ? v.toFixed(0) : v.toFixed(1);
}

export interface IMemory {
  total: number;
  avail: number;
  frac: number;
}

export function memory(node: INode): IMemory {
  const p = node.profile || {};
  const total = p.memory_total_bytes || 0;
  const avail = p.memory_available_bytes ?? total;
  const frac = total ? Math.min(1, Math.max(0, (total - avail) / total)) : 0;
  return { total, avail, frac };
}

export function usageClass(frac: number): string {
  return frac >= 0.9 ? 'crit' : frac >= 0.7 ? 'warn' : 'ok';
}

let measureCtx: CanvasRenderingContext2D | null = null;
function textWidth(text: string, font: string): number {
  if (!measureCtx) {
    measureCtx = document.createElement('canvas').getContext('2d');
  }
  if (!measureCtx) {
    return text.length * 6.5;
  }
  measureCtx.font = font;
  return measureCtx.measureText(text).width;
}

const FONT = '11px system-ui, -apple-system, "Segoe UI", sans-serif';

interface IPlaced {
  x: number;
  y: number;
  r: number;
  above: boolean;
}

/** Nodes on a circle, clockwise from the top (an even count turned so that two sit side by side). */
function layout(nodes: INode[], width: number, height: number): IPlaced[] {
  const n = nodes.length;
  const maxMem = Math.max(1, ...nodes.map(x => memory(x).total));
  const rMax = n <= 2 ? 30 : n <= 4 ? 26 : n <= 8 ? 20 : 14;
  const radii = nodes.map(x => Math.max(10, rMax * Math.sqrt(memory(x).total / maxMem)));
  if (n === 1) {
    return [{ x: width / 2, y: rMax + 18, r: radii[0], above: false }];
  }
  const start = -Math.PI / 2 - (n % 2 === 0 ? Math.PI / n : 0); // even counts: the first at the top left
  const unit = nodes.map((_, i) => {
    const a = start + (2 * Math.PI * i) / n;
    return [Math.cos(a), Math.sin(a)];
  });
  const xs = unit.map(u => u[0]);
  const ys = unit.map(u => u[1]);
  const spanX = Math.max(...xs) - Math.min(...xs);
  const spanY = Math.max(...ys) - Math.min(...ys);
  const padX = Math.max(rMax + 10, n <= 4 ? 56 : 44);
  const padTop = rMax + (n > 2 ? 40 : 14);
  const padBottom = rMax + 44;
  const sx = spanX > 1e-9 ? Math.max(0, width - 2 * padX) / spanX : 0;
  const sy = spanY > 1e-9 ? Math.max(0, height - padTop - padBottom) / spanY : 0;
  const midX = (Math.max(...xs) + Math.min(...xs)) / 2;
  const midY = (Math.max(...ys) + Math.min(...ys)) / 2;
  const cy = n === 2 ? rMax + 18 : padTop + (height - padTop - padBottom) / 2;
  return unit.map(([ux, uy], i) => ({
    x: width / 2 + (ux - midX) * Math.min(sx, 260),
    y: n === 2 ? cy : cy + (uy - midY) * Math.min(sy, 220),
    r: radii[i],
    above: n > 2 && uy < midY - 1e-6
  }));
}

interface IBox {
  x: number;
  y: number;
  w: number;
  h: number;
}

function overlaps(a: IBox, b: IBox): boolean {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

function circleHits(c: { x: number; y: number; r: number }, b: IBox): boolean {
  const nx = Math.max(b.x, Math.min(c.x, b.x + b.w));
  const ny = Math.max(b.y, Math.min(c.y, b.y + b.h));
  return (c.x - nx) ** 2 + (c.y - ny) ** 2 < c.r ** 2;
}

function edgeTitle(e: IEdge, a: INode, b: INode): string {
  if (!e.ok) {
    return `${a.name} ↔ ${b.name}: ${e.error || 'unreachable'}`;
  }
  const bw = e.bandwidth_mbit_per_s ? `${Math.round(e.bandwidth_mbit_per_s)} Mbit/s` : '?';
  return `${a.name} ↔ ${b.name}\nRTT ${e.rtt_ms ?? '?'} ms, ${bw}${e.rdma ? ', RDMA' : ''}`;
}

/** Draw ``topology`` into ``host`` (an <svg>), ``width`` wide; returns the height used. */
export function drawGraph(
  host: SVGSVGElement,
  topology: ITopology,
  width: number,
  selected: string,
  onSelect: (id: string) => void
): number {
  // by name, so that the drawing does not jump when the agents answer in another order
  const nodes = [...(topology.nodes || [])].sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
  const edges = topology.edges || [];
  const height = nodes.length <= 2 ? 136 : Math.min(440, 290 + Math.max(0, nodes.length - 4) * 20);
  host.replaceChildren();
  host.setAttribute('width', String(width));
  host.setAttribute('height', String(height));
  host.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const bg = svg('rect', { class: 'exo-lab-graph-bg', x: 0, y: 0, width, height }, host);
  bg.addEventListener('click', () => onSelect(''));
  if (!nodes.length) {
    return height;
  }
  const pos = layout(nodes, width, height);
  const at = new Map(nodes.map((n, i) => [n.id, { ...pos[i], node: n }]));
  const placed: IBox[] = [];
  const circles = pos.map(p => ({ x: p.x, y: p.y, r: p.r + 5 }));
  const compact = nodes.length > 6;
  nodes.forEach((n, i) => {
    // the node's label block is taken first, so that edge labels keep clear of it
    const p = pos[i];
    const lines = compact ? 1 : 2;
    const w = Math.max(textWidth(n.name, `600 ${FONT}`) + 4, compact ? 0 : 96);
    const top = p.above ? p.y - (p.r + 14 + 14 * lines) : p.y + p.r + 5;
    placed.push({ x: p.x - w / 2, y: top, w, h: 14 * lines + 4 });
  });
  const edgeLayer = svg('g', { class: 'exo-lab-edges' }, host);
  const labelLayer = svg('g', { class: 'exo-lab-edge-labels' }, host);
  const nodeLayer = svg('g', { class: 'exo-lab-nodes' }, host);

  for (const e of edges) {
    const p = at.get(e.source);
    const q = at.get(e.target);
    if (!p || !q) {
      continue;
    }
    const touches = selected && (e.source === selected || e.target === selected);
    const cls = ['exo-lab-edge', e.ok ? '' : 'failed', e.gone ? 'gone' : '', e.rdma ? 'rdma' : '', touches ? 'sel' : '']
      .filter(Boolean)
      .join(' ');
    const g = svg('g', { class: cls, 'data-source': e.source, 'data-target': e.target }, edgeLayer);
    svg('line', { class: 'exo-lab-edge-line', x1: p.x, y1: p.y, x2: q.x, y2: q.y, 'stroke-width': Math.min(e.width, 7) }, g);
    svg('title', {}, g).textContent = edgeTitle(e, p.node, q.node);
    // the label sits on the edge, between the two circles: latency above bandwidth, to stay narrow
    const x = (p.x + q.x) / 2;
    const y = (p.y + q.y) / 2;
    const parts = e.label.split(' · ');
    const w = Math.max(...parts.map(t => textWidth(t, FONT))) + 14;
    const h = 8 + 13 * parts.length;
    const box = { x: x - w / 2, y: y - h / 2, w, h };
    if (placed.some(b => overlaps(b, box)) || circles.some(c => circleHits(c, box))) {
      continue; // no room: the line's tooltip still tells
    }
    placed.push(box);
    const lg = svg('g', { class: cls.replace('exo-lab-edge', 'exo-lab-edge-label'), transform: `translate(${x},${y})` }, labelLayer);
    svg('rect', { x: -w / 2, y: -h / 2, width: w, height: h, rx: 7 }, lg);
    parts.forEach((t, i) => {
      const ty = -h / 2 + 4 + 13 * i + 6.5;
      svg('text', { x: 0, y: ty, 'text-anchor': 'middle', 'dominant-baseline': 'central' }, lg).textContent = t;
    });
    svg('title', {}, lg).textContent = edgeTitle(e, p.node, q.node);
  }

  for (const n of nodes) {
    const p = at.get(n.id)!;
    const mem = memory(n);
    const gone = n.state !== 'alive';
    const cls = ['exo-lab-node', gone ? 'gone' : '', n.id === selected ? 'selected' : ''].filter(Boolean).join(' ');
    const g = svg('g', {
      class: cls,
      transform: `translate(${p.x},${p.y})`,
      'data-node-id': n.id,
      'data-node-name': n.name,
      tabindex: 0,
      role: 'button',
      'aria-label': `${n.name}: ${gib(mem.avail)} of ${gib(mem.total)} GiB free${gone ? ', gone' : ''}`
    }, nodeLayer);
    const select = () => onSelect(n.id === selected ? '' : n.id);
    g.addEventListener('click', ev => {
      ev.stopPropagation();
      select();
    });
    g.addEventListener('keydown', ev => {
      const key = (ev as KeyboardEvent).key;
      if (key === 'Enter' || key === ' ') {
        ev.preventDefault();
        select();
      }
    });
    svg('circle', { class: 'exo-lab-node-halo', r: p.r + 10 }, g);
    const ringR = p.r + 4;
    svg('circle', { class: 'exo-lab-mem-track', r: ringR }, g);
    if (!gone && mem.total) {
      const c = 2 * Math.PI * ringR;
      svg('circle', {
        class: `exo-lab-mem-used ${usageClass(mem.frac)}`,
        r: ringR,
        transform: 'rotate(-90)',
        'stroke-dasharray': `${(mem.frac * c).toFixed(2)} ${c.toFixed(2)}`
      }, g);
    }
    svg('circle', { class: 'exo-lab-node-body', r: p.r }, g);
    if (p.r >= 18) {
      svg('text', { class: 'exo-lab-node-mem', y: -1, 'text-anchor': 'middle' }, g).textContent = gib(mem.total);
      svg('text', { class: 'exo-lab-node-unit', y: 11, 'text-anchor': 'middle' }, g).textContent = 'GiB';
    }
    const lines: [string, string][] = [['exo-lab-node-name', n.name + (gone ? ' (gone)' : '')]];
    if (!compact) {
      lines.push(['exo-lab-node-free', gone ? 'not reachable' : `${gib(mem.avail)} / ${gib(mem.total)} GiB free`]);
    }
    let y = p.above ? -(ringR + 10 + 14 * (lines.length - 1)) : ringR + 17;
    const label = svg('g', { class: 'exo-lab-node-label' }, g);
    for (const [c, text] of lines) {
      svg('text', { class: c, y, 'text-anchor': 'middle' }, label).textContent = text;
      y += 14;
    }
    svg('title', {}, g).textContent = `${n.name} (${n.id})\n${(n.addresses || []).map(a => `${a}:${n.port}`).join(', ')}`;
  }
  return height;
}
