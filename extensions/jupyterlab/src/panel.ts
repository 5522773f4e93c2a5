// The side panel: the cluster graph, its nodes, the instances and their state, and a button that
// opens the dashboard. It reads the server extension every few seconds while it is visible.
import { Session } from '@jupyterlab/services';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  ApiError,
  ICoordinator,
  IDashboardReply,
  IInstance,
  IInstancesReply,
  INode,
  ITopologyReply,
  requestAPI
} from './api';
import { drawGraph, drawLegend, gib, memory, usageClass } from './renderer';

export const REFRESH_MS = 3000;

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  cls = '',
  text: string | null = null,
  parent: Element | null = null
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (cls) {
    node.className = cls;
  }
  if (text !== null) {
    node.textContent = text;
  }
  if (parent) {
    parent.appendChild(node);
  }
  return node;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

const STATE_CLASS: Record<string, string> = {
  alive: 'ok',
  ready: 'ok',
  running: 'ok',
  launching: 'busy',
  loading: 'busy',
  replacing: 'busy',
  prepared: 'busy',
  failed: 'bad',
  gone: 'off',
  stopped: 'off'
};

function badge(state: string, parent: Element): HTMLElement {
  return el('span', `exo-lab-badge exo-lab-state-${STATE_CLASS[state] || 'off'}`, state, parent);
}

/** Where the panel finds the notebook of a kernel coordinator (the sessions JupyterLab knows). */
export interface ISessionLookup {
  running(): IterableIterator<Session.IModel>;
}

export class ClusterPanel extends Widget {
  constructor(private readonly sessions: ISessionLookup | null = null) {
    super();
    this.id = 'exo-lab-panel';
    this.addClass('exo-lab-panel');
    this.title.caption = 'exo_lab cluster';

    const header = el('div', 'exo-lab-header', null, this.node);
    const titleRow = el('div', 'exo-lab-title-row', null, header);
    el('h2', 'exo-lab-title', 'exo_lab cluster', titleRow);
    this.refreshButton = el('button', 'exo-lab-icon-button', null, titleRow);
    this.refreshButton.title = 'Refresh now';
    this.refreshButton.setAttribute('aria-label', 'Refresh now');
    this.refreshButton.innerHTML =
      '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true"><path fill="currentColor" d="M17.65 6.35A7.96 7.96 0 0 0 12 4a8 8 0 1 0 7.75 10h-2.08A6 6 0 1 1 12 6c1.66 0 3.14.69 4.22 1.78L13 11h7V4z"/></svg>';
    this.refreshButton.addEventListener('click', () => void this.refresh());
    this.subtitle = el('div', 'exo-lab-subtitle', 'connecting…', header);
    this.dashboardButton = el('button', 'exo-lab-dashboard-button', null, header);
    el('span', '', 'Open dashboard', this.dashboardButton);
    this.dashboardButton.insertAdjacentHTML(
      'beforeend',
      '<svg viewBox="0 0 24 24" width="14" height="14" aria-hidden="true"><path fill="currentColor" d="M14 3v2h3.59l-9.83 9.83 1.41 1.41L19 6.41V10h2V3zm5 16H5V5h7V3H5a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h14a2 2 0 0 0 2-2v-7h-2z"/></svg>'
    );
    this.dashboardButton.addEventListener('click', () => this.openDashboard());

    this.coordinatorRow = el('div', 'exo-lab-coordinator', null, this.node);
    this.errorBox = el('div', 'exo-lab-error', null, this.node);
    this.emptyBox = el('div', 'exo-lab-empty', null, this.node);

    this.body = el('div', 'exo-lab-body', null, this.node);
    // the graph: drawn by the renderer the notebook widget and the dashboard use (classes exo-*)
    const graphSection = el('section', 'exo-lab-section exo-lab-graph-section exo-topo exo-topo-bare', null, this.body);
    const graph = el('div', 'exo-graph', null, graphSection);
    this.graphHost = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
    this.graphHost.setAttribute('class', 'exo-svg');
    this.graphHost.setAttribute('role', 'img');
    this.graphHost.setAttribute('aria-label', 'cluster graph');
    graph.appendChild(this.graphHost);
    this.legend = el('div', 'exo-legend', null, graph);

    const instSection = el('section', 'exo-lab-section', null, this.body);
    const instHead = el('div', 'exo-lab-section-head', null, instSection);
    el('h3', 'exo-lab-section-title', 'Instances', instHead);
    this.instancesCount = el('span', 'exo-lab-count', '', instHead);
    this.instancesList = el('div', 'exo-lab-instances-list', null, instSection);

    const nodesSection = el('section', 'exo-lab-section', null, this.body);
    const nodesHead = el('div', 'exo-lab-section-head', null, nodesSection);
    el('h3', 'exo-lab-section-title', 'Nodes', nodesHead);
    this.nodesCount = el('span', 'exo-lab-count', '', nodesHead);
    this.nodesList = el('div', 'exo-lab-nodes-list', null, nodesSection);

    this.renderEmpty(null);
  }

  /** Read the server extension now and redraw. */
  async refresh(): Promise<void> {
    if (this.inFlight) {
      return this.inFlight;
    }
    this.inFlight = this.load().finally(() => {
      this.inFlight = null;
    });
    return this.inFlight;
  }

  openDashboard(): void {
    if (this.dashboardUrl) {
      window.open(this.dashboardUrl, '_blank', 'noopener');
    }
  }

  get dashboardAvailable(): boolean {
    return this.dashboardUrl !== null;
  }

  protected onAfterShow(msg: Message): void {
    void this.refresh();
    this.schedule();
  }

  protected onAfterHide(msg: Message): void {
    this.unschedule();
  }

  protected onResize(msg: Widget.ResizeMessage): void {
    this.redrawGraph();
  }

  dispose(): void {
    this.unschedule();
    super.dispose();
  }

  private schedule(): void {
    this.unschedule();
    this.timer = window.setInterval(() => {
      if (this.isVisible && !document.hidden) {
        void this.refresh();
      }
    }, REFRESH_MS);
  }

  private unschedule(): void {
    if (this.timer !== null) {
      window.clearInterval(this.timer);
      this.timer = null;
    }
  }

  private async load(): Promise<void> {
    const query = { coordinator: this.coordinatorId };
    try {
      const [topo, instances, dashboard] = await Promise.all([
        requestAPI<ITopologyReply>('topology', query),
        requestAPI<IInstancesReply>('instances', query).catch(() => null),
        requestAPI<IDashboardReply>('dashboard-url', query).catch(() => null)
      ]);
      this.error = '';
      this.topology = topo;
      this.instances = instances;
      this.dashboardUrl = dashboard?.url ?? null;
      this.dashboardHint = dashboard?.hint ?? '';
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && this.coordinatorId) {
        this.coordinatorId = null; // that coordinator has gone: follow the newest one
        return this.load();
      }
      this.error = err instanceof Error ? err.message : String(err);
    }
    this.lastRead = new Date();
    this.render();
  }

  private render(): void {
    const topo = this.topology;
    this.node.dataset.ready = '1';
    this.errorBox.textContent = this.error;
    this.errorBox.style.display = this.error ? '' : 'none';
    this.dashboardButton.disabled = this.dashboardUrl === null;
    this.dashboardButton.title = this.dashboardUrl ? `Open ${this.dashboardUrl} in a new tab` : this.dashboardHint;
    if (!topo || !topo.coordinator) {
      this.subtitle.textContent = this.error ? 'not connected' : 'no cluster running';
      this.renderEmpty(topo ? topo.hint : null);
      return;
    }
    this.emptyBox.style.display = 'none';
    this.body.style.display = '';
    const nodes = topo.topology.nodes || [];
    const alive = nodes.filter(n => n.state === 'alive').length;
    const links = (topo.topology.edges || []).filter(e => e.ok).length;
    this.subtitle.textContent = `${alive} of ${plural(nodes.length, 'node')} alive · ${plural(links, 'link')}`;
    this.refreshButton.title = this.lastRead ? `Refresh now (last read ${this.lastRead.toLocaleTimeString()})` : 'Refresh now';
    this.renderCoordinator(topo.coordinator, topo.coordinators);
    this.redrawGraph();
    this.renderNodes(nodes);
    this.renderInstances();
  }

  private renderEmpty(hint: string | null): void {
    this.body.style.display = 'none';
    this.coordinatorRow.style.display = 'none';
    this.emptyBox.style.display = '';
    this.emptyBox.replaceChildren();
    if (this.error) {
      return;
    }
    el('div', 'exo-lab-empty-title', 'No cluster yet', this.emptyBox);
    el('p', '', 'Start one in a notebook; this panel finds it by itself:', this.emptyBox);
    el('pre', 'exo-lab-code', 'import exo_lab\nc = exo_lab.local_cluster(2)', this.emptyBox);
    el('p', '', 'or in a terminal:', this.emptyBox);
    el('pre', 'exo-lab-code', 'exo-lab up', this.emptyBox);
    if (hint === null && !this.topology) {
      this.emptyBox.replaceChildren(el('div', 'exo-lab-muted', 'Reading the cluster…'));
    }
  }

  private coordinatorName(c: ICoordinator): string {
    if (c.kernel_id && this.sessions) {
      for (const s of this.sessions.running()) {
        if (s.kernel && s.kernel.id === c.kernel_id) {
          return `${s.path.split('/').pop() || s.path} (kernel)`;
        }
      }
    }
    return c.label;
  }

  private renderCoordinator(current: ICoordinator, all: ICoordinator[]): void {
    const row = this.coordinatorRow;
    row.style.display = '';
    row.replaceChildren();
    el('span', 'exo-lab-coordinator-label', 'via', row);
    if (all.length > 1) {
      const select = el('select', 'exo-lab-select', null, row);
      for (const c of all) {
        const option = el('option', '', this.coordinatorName(c), select);
        option.value = c.id;
        option.selected = c.id === current.id;
      }
      select.addEventListener('change', () => {
        this.coordinatorId = select.value;
        void this.refresh();
      });
    } else {
      const name = el('span', 'exo-lab-coordinator-name', this.coordinatorName(current), row);
      name.title = `${current.label} · pid ${current.pid}` + (current.fingerprint ? ` · key ${current.fingerprint}` : '');
    }
    if (current.api_url) {
      const a = el('a', 'exo-lab-link', 'API', row);
      a.href = current.api_url;
      a.target = '_blank';
      a.rel = 'noopener';
      a.title = `OpenAI-compatible API at ${current.api_url}/v1`;
    }
  }

  private redrawGraph(): void {
    const topo = this.topology;
    if (!topo || !topo.coordinator) {
      return;
    }
    const width = Math.max(220, this.graphHost.parentElement?.clientWidth || 300);
    const n = (topo.topology.nodes || []).length;
    const height = n <= 2 ? 210 : Math.min(560, 380 + Math.max(0, n - 4) * 30);
    const state = { topology: topo.topology, highlight: {}, selected: this.selected };
    drawGraph(this.graphHost, state, width, height, id => {
      this.selected = id;
      this.redrawGraph();
      this.renderNodes(topo.topology.nodes || []);
    });
    drawLegend(this.legend, topo.topology);
  }

  private renderNodes(nodes: INode[]): void {
    this.nodesCount.textContent = String(nodes.length);
    this.nodesList.replaceChildren();
    if (!nodes.length) {
      el('div', 'exo-lab-muted', 'No node answers.', this.nodesList);
      return;
    }
    for (const n of [...nodes].sort((a, b) => a.name.localeCompare(b.name))) {
      const p = n.profile || {};
      const mem = memory(n);
      const gone = n.state !== 'alive';
      const card = el('div', `exo-lab-card exo-lab-node-row${gone ? ' gone' : ''}${n.id === this.selected ? ' selected' : ''}`, null, this.nodesList);
      card.dataset.nodeId = n.id;
      card.addEventListener('click', () => {
        this.selected = this.selected === n.id ? '' : n.id;
        this.redrawGraph();
        this.renderNodes(nodes);
      });
      const top = el('div', 'exo-lab-card-top', null, card);
      el('span', 'exo-lab-node-name', n.name, top);
      badge(n.state, top);
      const bar = el('div', 'exo-lab-bar', null, card);
      const fill = el('div', `exo-lab-bar-fill ${usageClass(mem.frac)}`, null, bar);
      fill.style.width = gone ? '0' : `${(mem.frac * 100).toFixed(1)}%`;
      const facts = el('div', 'exo-lab-facts', null, card);
      el('span', '', gone ? 'not reachable' : `${gib(mem.avail)} / ${gib(mem.total)} GiB free`, facts);
      if (p.cpu_count) {
        el('span', '', plural(p.cpu_count, 'core'), facts);
      }
      const chipText = [p.cpu_model || 'unknown chip', (p.mlx_devices || []).join(', '), p.blas || '']
        .filter(Boolean)
        .join(' · ');
      const chip = el('div', 'exo-lab-chip', chipText, card);
      chip.title = chipText;
      if (n.id === this.selected) {
        const more = el('div', 'exo-lab-details', null, card);
        el('div', '', `id ${n.id}`, more);
        el('div', '', (n.addresses || []).map(a => `${a}:${n.port}`).join(', '), more);
        if (p.memory_bandwidth_gb_per_s) {
          el('div', '', `memory bandwidth ${Number(p.memory_bandwidth_gb_per_s).toFixed(0)} GB/s`, more);
        }
      }
    }
  }

  private renderInstances(): void {
    const reply = this.instances;
    const list = this.instancesList;
    list.replaceChildren();
    const mine = reply ? reply.instances : [];
    const others = reply ? reply.other_instances : [];
    const live = mine.filter(i => i.state !== 'stopped');
    this.instancesCount.textContent = String(live.length);
    if (!live.length && !others.length) {
      const empty = el('div', 'exo-lab-muted', null, list);
      empty.append('None running. Launch one from the notebook: ');
      el('code', '', 'cluster.launch(model)', empty);
      return;
    }
    for (const inst of [...live, ...others]) {
      this.renderInstance(inst, list, others.includes(inst));
    }
  }

  private renderInstance(inst: IInstance, list: HTMLElement, foreign: boolean): void {
    const card = el('div', `exo-lab-card exo-lab-instance exo-lab-instance-${STATE_CLASS[inst.state] || 'off'}`, null, list);
    card.dataset.instanceId = inst.id;
    const top = el('div', 'exo-lab-card-top', null, card);
    el('span', 'exo-lab-instance-name', inst.name || `instance ${inst.id}`, top);
    badge(inst.state, top);
    const model = (inst.model || '').replace(/\/+$/, '').split('/').pop() || '';
    if (model && model !== inst.name) {
      const m = el('div', 'exo-lab-chip', model, card);
      m.title = inst.model || '';
    }
    const plan = inst.description || (foreign ? 'launched by another coordinator' : '');
    if (plan) {
      el('div', 'exo-lab-plan', plan, card);
    }
    const total = inst.total_layers || 0;
    if (inst.state === 'loading' || inst.state === 'launching' || inst.state === 'replacing') {
      const bar = el('div', 'exo-lab-bar', null, card);
      const fill = el('div', 'exo-lab-bar-fill busy', null, bar);
      fill.style.width = total ? `${((100 * (inst.loaded_layers || 0)) / total).toFixed(0)}%` : '0';
    }
    const facts: string[] = [];
    if (total) {
      facts.push(`${inst.loaded_layers || 0}/${total} layers`);
    }
    const tps = inst.predicted_decode_tps;
    if (tps) {
      facts.push(`~${tps >= 100 ? tps.toFixed(0) : tps.toFixed(1)} tok/s predicted`);
    }
    const ranks = inst.on_nodes.reduce((s, n) => s + n.ranks, 0);
    const alive = inst.on_nodes.reduce((s, n) => s + n.ranks_alive, 0);
    if (ranks) {
      facts.push(`${alive}/${ranks} ranks alive`);
    }
    if (inst.replacements) {
      facts.push(`re-placed ${inst.replacements}×`);
    }
    if (facts.length) {
      const tags = el('div', 'exo-lab-tags', null, card);
      for (const f of facts) {
        el('span', 'exo-lab-tag', f, tags);
      }
    }
    if (inst.error) {
      el('div', 'exo-lab-instance-error', inst.error, card);
    }
  }

  private readonly subtitle: HTMLElement;
  private readonly refreshButton: HTMLButtonElement;
  private readonly dashboardButton: HTMLButtonElement;
  private readonly coordinatorRow: HTMLElement;
  private readonly errorBox: HTMLElement;
  private readonly emptyBox: HTMLElement;
  private readonly body: HTMLElement;
  private readonly graphHost: SVGSVGElement;
  private readonly legend: HTMLElement;
  private readonly nodesCount: HTMLElement;
  private readonly nodesList: HTMLElement;
  private readonly instancesCount: HTMLElement;
  private readonly instancesList: HTMLElement;
  private topology: ITopologyReply | null = null;
  private instances: IInstancesReply | null = null;
  private dashboardUrl: string | null = null;
  private dashboardHint = '';
  private coordinatorId: string | null = null;
  private selected = '';
  private error = '';
  private lastRead: Date | null = null;
  private timer: number | null = null;
  private inFlight: Promise<void> | null = null;
}
