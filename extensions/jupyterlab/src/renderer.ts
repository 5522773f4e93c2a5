// The cluster graph is drawn by exo_lab's one renderer, the anywidget ES module of the Python package
// (exo_lab/ui/static/topology.js, also used by the notebook widget and the Panel dashboard). The build
// bundles that file from the package's static dir; this module gives its exports their types.
// @ts-expect-error: a plain JavaScript module, typed below
import * as topology from '../../../exo_lab/ui/static/topology.js';

import { INode, ITopology } from './api';

/** What the renderer draws: the topology, a plan overlay and the selected node. */
export interface IGraphState {
  topology: ITopology;
  highlight: { nodes?: Record<string, { label?: string; color?: string }>; edges?: [string, string][] };
  selected: string;
}

export interface IMemory {
  total: number;
  avail: number;
  used: number;
  frac: number;
}

/** Draw ``state`` into ``svg`` (class ``exo-svg``); ``onSelect`` gets a clicked node's id. */
export const drawGraph: (
  svg: SVGSVGElement,
  state: IGraphState,
  width: number,
  height: number,
  onSelect: (id: string) => void
) => void = topology.drawGraph;

/** The legend under the graph. */
export const drawLegend: (legend: HTMLElement, topology: ITopology) => void = topology.drawLegend;

/** Bytes as GiB, for labels. */
export const gib: (bytes: number | undefined) => string = topology.gib;

/** A node's memory: total, available, used and the fraction in use. */
export const memory: (node: INode) => IMemory = topology.memory;

/** ``ok``, ``warn`` or ``crit`` for a fraction of memory in use. */
export const usageClass: (frac: number) => string = topology.usageClass;
