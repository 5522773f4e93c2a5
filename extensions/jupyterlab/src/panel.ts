// The side panel: the cluster graph, its nodes, the instances of the cluster (state, load progress, owner, a
// Stop button), placement previews with a Launch button, and a button that opens the dashboard. It reads the
// server extension every few seconds while it is visible, every second while an instance loads.
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
  IPreviewsReply,
  ITopologyReply,
  launchInstance,
  requestAPI,
  stopInstance
} from './api';
import { drawGraph, drawLegend, gib, IGraphState, memory, usageClass } from './renderer';

export const REFRESH_MS = 3000;
/** How often the panel reads while an instance launches, loads or is re-placed. */
export const BUSY_REFRESH_MS = 1000;
const BUSY_STATES = new Set(['launching', 'loading', 'replacing']);
export const DEFAULT_MODEL = 'demo';

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

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function tokensPerSecond(tps: number | null | undefined): string {
  if (!tps) {
    return '';
  }
  return `~${tps >= 100 ? tps.toFixed(0) : tps.toFixed(1)} tok/s`;
}

/** The preview filter's sharding choices (the API's `sharding` values; '' for any). */
const SHARDING_CHOICES: [string, string][] = [
  ['', 'any sharding'],
  ['single', 'single node'],
  ['pipeline', 'pipeline'],
  ['tensor', 'tensor'],
  ['pipeline-tensor', 'pipeline + tensor']
];

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

    const launchSection = el('section', 'exo-lab-section exo-lab-launch-section', null, this.body);
    const launchHead = el('div', 'exo-lab-section-head', null, launchSection);
    el('h3', 'exo-lab-section-title', 'Launch', launchHead);
    const form = el('form', 'exo-lab-launch-form', null, launchSection);
    this.modelInput = el('input', 'exo-lab-input exo-lab-model-input', null, form);
    this.modelInput.value = DEFAULT_MODEL;
    this.modelInput.placeholder = 'model: demo, a path or a hub id';
    this.modelInput.setAttribute('aria-label', 'model to preview');
    this.previewButton = el('button', 'exo-lab-button exo-lab-preview-button', 'Preview', form);
    this.previewButton.type = 'submit';
    this.previewButton.title = 'Rank the ways to place this model on the cluster';
    form.addEventListener('submit', event => {
      event.preventDefault();
      void this.preview();
    });
    const filters = el('div', 'exo-lab-launch-filters', null, launchSection);
    this.shardingSelect = el('select', 'exo-lab-input exo-lab-sharding-select', null, filters);
    this.shardingSelect.setAttribute('aria-label', 'sharding');
    this.shardingSelect.title = 'Only plans of this kind';
    for (const [value, label] of SHARDING_CHOICES) {
      const option = el('option', '', label, this.shardingSelect);
      option.value = value;
    }
    const minLabel = el('label', 'exo-lab-muted exo-lab-min-nodes-label', 'min nodes', filters);
    this.minNodesInput = el('input', 'exo-lab-input exo-lab-min-nodes-input', null, minLabel);
    this.minNodesInput.type = 'number';
    this.minNodesInput.min = '1';
    this.minNodesInput.value = '1';
    this.minNodesInput.setAttribute('aria-label', 'minimum number of nodes');
    this.launchError = el('div', 'exo-lab-action-error exo-lab-launch-error', null, launchSection);
    this.launchStatus = el('div', 'exo-lab-muted exo-lab-launch-status', null, launchSection);
    this.plansList = el('div', 'exo-lab-plans-list', null, launchSection);
    this.setLaunchError('');

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
    this.polling = true;
    void this.refresh().finally(() => this.schedule());
  }

  protected onAfterHide(msg: Message): void {
    this.polling = false;
    this.unschedule();
  }

  protected onResize(msg: Widget.ResizeMessage): void {
    this.redrawGraph();
  }

  dispose(): void {
    this.polling = false;
    this.unschedule();
    super.dispose();
  }

  /** Whether an instance is launching, loading or being re-placed (the panel then reads every second). */
  get busy(): boolean {
    return (this.instances?.instances || []).some(i => BUSY_STATES.has(i.state)) || this.stopping.size > 0;
  }

  /** Read again after ``delay`` ms (default: sooner while an instance is busy), and so on while visible. */
  private schedule(delay: number | null = null): void {
    this.unschedule();
    if (!this.polling || this.isDisposed) {
      return;
    }
    this.timer = window.setTimeout(
      () => {
        this.timer = null;
        if (this.isVisible && !document.hidden) {
          void this.refresh().finally(() => this.schedule());
        } else {
          this.schedule();
        }
      },
      delay ?? (this.busy ? BUSY_REFRESH_MS : REFRESH_MS)
    );
  }

  private unschedule(): void {
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
      this.timer = null;
    }
  }

  private async load(): Promise<void> {
    const query = { coordinator: this.coordinatorId };
    try {
      let instancesError = '';
      const [topo, instances, dashboard] = await Promise.all([
        requestAPI<ITopologyReply>('topology', query),
        requestAPI<IInstancesReply>('instances', query).catch(err => {
          instancesError = errorText(err);
          return null;
        }),
        requestAPI<IDashboardReply>('dashboard-url', query).catch(() => null)
      ]);
      this.error = '';
      this.topology = topo;
      this.instances = instances;
      this.instancesError = instancesError;
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
    if (this.previews && this.previewsCoordinator !== topo.coordinator.id) {
      this.previews = null; // plans of another cluster
      this.selectedPlan = -1;
      this.launchStatus.textContent = '';
      this.setLaunchError('');
    }
    this.redrawGraph();
    this.renderNodes(nodes);
    this.renderPlans();
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
    const state: IGraphState = { topology: topo.topology, highlight: this.planHighlight(), selected: this.selected };
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

  /** The selected plan's ranks drawn on the graph (each node labelled with its ranks and layers). */
  private planHighlight(): IGraphState['highlight'] {
    const plan = this.previews?.plans[this.selectedPlan];
    if (!plan) {
      return {};
    }
    const nodes: Record<string, { label: string }> = {};
    for (const r of plan.ranks) {
      const label = `r${r.rank} [${r.layers[0]}:${r.layers[1]}]`;
      nodes[r.node_id] = { label: nodes[r.node_id] ? `${nodes[r.node_id].label} ${label}` : label };
    }
    const edges: [string, string][] = [];
    for (let i = 1; i < plan.ranks.length; i++) {
      if (plan.ranks[i - 1].node_id !== plan.ranks[i].node_id) {
        edges.push([plan.ranks[i - 1].node_id, plan.ranks[i].node_id]);
      }
    }
    return { nodes, edges };
  }

  /** Rank the plans for the model in the input on the current coordinator's cluster. */
  async preview(): Promise<void> {
    const model = this.modelInput.value.trim();
    if (!model) {
      this.setLaunchError('Enter a model to preview: demo, a local path or a Hugging Face id.');
      return;
    }
    const coordinator = this.topology?.coordinator?.id ?? this.coordinatorId;
    this.previewButton.disabled = true;
    this.setLaunchError('');
    this.launchStatus.textContent = `Ranking plans for ${model}…`;
    try {
      const reply = await requestAPI<IPreviewsReply>('previews', {
        model_id: model,
        coordinator,
        sharding: this.shardingSelect.value,
        min_nodes: this.minNodesInput.value.trim()
      });
      this.previews = reply;
      this.previewModel = model;
      this.previewsCoordinator = reply.coordinator?.id ?? coordinator ?? null;
      this.selectedPlan = reply.plans.length ? 0 : -1;
      this.launchStatus.textContent = reply.plans.length
        ? `${plural(reply.plans.length, 'plan')} for ${model}, best first: pick one and launch it.`
        : '';
      if (!reply.plans.length) {
        const why = reply.infeasible.map(p => p.reason).filter(Boolean)[0];
        this.setLaunchError(`No plan fits ${model} on this cluster${why ? `: ${why}` : '.'}`);
      }
    } catch (err) {
      this.previews = null;
      this.selectedPlan = -1;
      this.launchStatus.textContent = '';
      this.setLaunchError(errorText(err));
    } finally {
      this.previewButton.disabled = false;
    }
    this.renderPlans();
    this.redrawGraph();
  }

  /** Launch the selected plan through the coordinator (the server extension forwards it to its API). */
  async launch(name: string | null = null): Promise<void> {
    const plan = this.previews?.plans[this.selectedPlan];
    if (!plan || !this.previewModel) {
      return;
    }
    this.launching = true;
    this.setLaunchError('');
    this.launchStatus.textContent = `Launching ${name || this.previewModel}…`;
    this.renderPlans();
    try {
      const reply = await launchInstance(this.previewsCoordinator, this.previewModel, plan, name);
      this.launched.set(reply.id, { name: reply.name, model: reply.model, coordinator: reply.coordinator });
      this.launchStatus.textContent = `Launched ${reply.name} (${reply.id}): it loads below.`;
      this.previews = null; // launched: the instance card takes over
      this.selectedPlan = -1;
    } catch (err) {
      this.launchStatus.textContent = '';
      this.setLaunchError(`Could not launch: ${errorText(err)}`);
    } finally {
      this.launching = false;
    }
    this.renderPlans();
    this.redrawGraph();
    await this.refresh();
    this.schedule();
  }

  /** Stop instance ``id`` (through the coordinator that launched it, else its node agents). */
  async stop(id: string): Promise<void> {
    const coordinator = this.topology?.coordinator?.id ?? this.coordinatorId;
    this.stopping.add(id);
    this.stopErrors.delete(id);
    this.renderInstances();
    try {
      await stopInstance(coordinator, id);
      if (this.launched.has(id)) {
        this.launchStatus.textContent = ''; // "Launched ...": no longer so
      }
    } catch (err) {
      this.stopErrors.set(id, `Could not stop it: ${errorText(err)}`);
    } finally {
      this.stopping.delete(id);
    }
    await this.refresh();
    this.schedule();
  }

  private setLaunchError(text: string): void {
    this.launchError.textContent = text;
    this.launchError.style.display = text ? '' : 'none';
  }

  private renderPlans(): void {
    const list = this.plansList;
    list.replaceChildren();
    const reply = this.previews;
    if (!reply) {
      return;
    }
    reply.plans.forEach((plan, index) => {
      const selected = index === this.selectedPlan;
      const card = el('div', `exo-lab-card exo-lab-plan-card${selected ? ' selected' : ''}`, null, list);
      card.dataset.index = String(index);
      card.addEventListener('click', () => {
        this.selectedPlan = index;
        this.renderPlans();
        this.redrawGraph();
      });
      const top = el('div', 'exo-lab-card-top', null, card);
      el('span', 'exo-lab-plan-title', `#${index + 1} ${plan.strategy}`, top);
      const tps = tokensPerSecond(plan.decode_tps);
      if (tps) {
        el('span', 'exo-lab-tag', tps, top);
      }
      el('div', 'exo-lab-plan', plan.description || plan.explanation, card);
      const facts: string[] = [];
      if (plan.ttft_s) {
        facts.push(`TTFT ${(plan.ttft_s * 1000).toFixed(0)} ms`);
      }
      for (const [node, bytes] of Object.entries(plan.memory_bytes || {})) {
        facts.push(`${plan.node_names?.[node] || node} ${gib(bytes)} GiB`);
      }
      if (facts.length) {
        const tags = el('div', 'exo-lab-tags', null, card);
        for (const f of facts) {
          el('span', 'exo-lab-tag', f, tags);
        }
      }
      if (selected) {
        if (plan.bottleneck) {
          el('div', 'exo-lab-muted', `limited by ${plan.bottleneck}`, card);
        }
        const row = el('div', 'exo-lab-actions', null, card);
        const name = el('input', 'exo-lab-input exo-lab-name-input', null, row);
        name.placeholder = 'name (optional)';
        name.title = `The name to serve it under (default: ${this.previewModel})`;
        name.setAttribute('aria-label', 'name to serve it under');
        name.addEventListener('click', event => event.stopPropagation());
        const button = el('button', 'exo-lab-button exo-lab-primary exo-lab-launch-button', this.launching ? 'Launching…' : 'Launch', row);
        button.disabled = this.launching;
        button.title = 'Launch this plan on the cluster, served by the coordinator';
        button.addEventListener('click', event => {
          event.stopPropagation();
          void this.launch(name.value.trim() || null);
        });
      }
    });
    if (reply.infeasible.length) {
      el('div', 'exo-lab-muted', `${plural(reply.infeasible.length, 'more plan')} would not fit.`, list);
    }
  }

  private renderInstances(): void {
    const reply = this.instances;
    const list = this.instancesList;
    list.replaceChildren();
    const live = (reply ? reply.instances : []).filter(i => i.state !== 'stopped');
    this.instancesCount.textContent = String(live.length);
    if (this.instancesError) {
      el('div', 'exo-lab-action-error', `Cannot read the instances: ${this.instancesError}`, list);
    }
    if (!live.length) {
      const empty = el('div', 'exo-lab-muted', null, list);
      empty.append('None running. Preview a model above and launch a plan, or from the notebook: ');
      el('code', '', 'cluster.launch(model)', empty);
      return;
    }
    for (const inst of live) {
      this.renderInstance(inst, list);
    }
  }

  /** Who launched ``inst``: its notebook when the kernel is a coordinator here, else the owner's label. */
  private ownerName(inst: IInstance): string {
    const owner = inst.owner || {};
    const known = (this.topology?.coordinators || []).find(c => c.id === owner.coordinator);
    if (known) {
      return this.coordinatorName(known);
    }
    return owner.label || '';
  }

  private renderInstance(shown: IInstance, list: HTMLElement): void {
    // launched from this panel a moment ago: what the launch answered, until the cluster reports it
    const ours = this.launched.get(shown.id);
    const inst: IInstance = ours
      ? {
          ...shown,
          name: shown.name || ours.name,
          model: shown.model || ours.model,
          owner: shown.owner?.label ? shown.owner : { ...shown.owner, coordinator: ours.coordinator }
        }
      : shown;
    const card = el('div', `exo-lab-card exo-lab-instance exo-lab-instance-${STATE_CLASS[inst.state] || 'off'}`, null, list);
    card.dataset.instanceId = inst.id;
    card.dataset.state = inst.state;
    const top = el('div', 'exo-lab-card-top', null, card);
    el('span', 'exo-lab-instance-name', inst.name || `instance ${inst.id}`, top);
    badge(inst.state, top);
    const model = (inst.model || '').replace(/\/+$/, '').split('/').pop() || '';
    if (model && model !== inst.name) {
      const m = el('div', 'exo-lab-chip', model, card);
      m.title = inst.model || '';
    }
    const owner = this.ownerName(inst);
    const ownerLine = el('div', 'exo-lab-owner', null, card);
    ownerLine.textContent = owner ? `launched by ${owner}${inst.mine ? ' (this coordinator)' : ''}` : 'launched elsewhere (owner unknown)';
    if (inst.owner?.api) {
      ownerLine.title = `served at ${inst.owner.api}/v1`;
    }
    const where = inst.description || (inst.node_names || []).join(', ');
    if (where) {
      el('div', 'exo-lab-plan', where, card);
    }
    const [done, total] = inst.loaded || [0, 0];
    if (BUSY_STATES.has(inst.state)) {
      const progress = el('div', 'exo-lab-progress', null, card);
      const bar = el('div', `exo-lab-bar${total ? '' : ' indeterminate'}`, null, progress);
      bar.setAttribute('role', 'progressbar');
      bar.setAttribute('aria-valuemin', '0');
      bar.setAttribute('aria-valuemax', String(total));
      bar.setAttribute('aria-valuenow', String(done));
      const fill = el('div', 'exo-lab-bar-fill busy', null, bar);
      fill.style.width = total ? `${((100 * done) / total).toFixed(0)}%` : '30%';
      const what = inst.state === 'replacing' ? 're-placing' : inst.state;
      el('span', 'exo-lab-progress-label', total ? `${what}: ${done}/${total} layers` : `${what}…`, progress);
    }
    const facts: string[] = [];
    if (total && !BUSY_STATES.has(inst.state)) {
      facts.push(`${done}/${total} layers`);
    }
    const tps = tokensPerSecond(inst.predicted_decode_tps);
    if (tps) {
      facts.push(`${tps} predicted`);
    }
    if (inst.ranks_alive !== null && inst.ranks_alive !== undefined && inst.nodes.length) {
      facts.push(`${plural(inst.ranks_alive, 'rank')} running`);
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
    const actions = el('div', 'exo-lab-actions', null, card);
    const stopping = this.stopping.has(inst.id);
    const stop = el('button', 'exo-lab-button exo-lab-stop-button', stopping ? 'Stopping…' : 'Stop', actions);
    stop.disabled = stopping;
    stop.title = `Stop ${inst.name || inst.id} and free its memory on ${plural(inst.nodes.length, 'node')}`;
    stop.addEventListener('click', () => void this.stop(inst.id));
    const stopError = this.stopErrors.get(inst.id);
    if (stopError) {
      el('div', 'exo-lab-action-error', stopError, card);
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
  private readonly modelInput: HTMLInputElement;
  private readonly previewButton: HTMLButtonElement;
  private readonly shardingSelect: HTMLSelectElement;
  private readonly minNodesInput: HTMLInputElement;
  private readonly launchError: HTMLElement;
  private readonly launchStatus: HTMLElement;
  private readonly plansList: HTMLElement;
  private topology: ITopologyReply | null = null;
  private instances: IInstancesReply | null = null;
  private instancesError = '';
  private previews: IPreviewsReply | null = null;
  private previewModel: string | null = null;
  private previewsCoordinator: string | null = null;
  private selectedPlan = -1;
  private launching = false;
  private readonly stopping = new Set<string>();
  private readonly launched = new Map<string, { name: string; model: string; coordinator: string }>();
  private readonly stopErrors = new Map<string, string>();
  private polling = false;
  private dashboardUrl: string | null = null;
  private dashboardHint = '';
  private coordinatorId: string | null = null;
  private selected = '';
  private error = '';
  private lastRead: Date | null = null;
  private timer: number | null = null;
  private inFlight: Promise<void> | null = null;
}
