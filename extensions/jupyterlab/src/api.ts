// The exo_lab server extension's JSON routes (exo_lab/jupyter/handlers.py), typed.
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IProfile {
  memory_total_bytes?: number;
  memory_available_bytes?: number;
  cpu_model?: string;
  cpu_count?: number;
  system?: string;
  machine?: string;
  mlx_devices?: string[];
  blas?: string;
  memory_bandwidth_gb_per_s?: number;
}

export interface INode {
  id: string;
  name: string;
  addresses: string[];
  port: number;
  state: string;
  profile: IProfile;
}

export interface IEdge {
  source: string;
  target: string;
  ok: boolean;
  label: string;
  width: number;
  rdma: boolean;
  gone: boolean;
  rtt_ms?: number;
  rtt_ms_p95?: number;
  bandwidth_mbit_per_s?: number;
  src_address?: string;
  dst_address?: string;
  error?: string;
}

export interface ITopology {
  nodes: INode[];
  edges: IEdge[];
}

export interface ICoordinator {
  id: string;
  pid: number;
  kind: string;
  label: string;
  kernel_id: string | null;
  api_url: string | null;
  dashboard_url: string | null;
  fingerprint: string | null;
  agent_count: number;
  instance_count: number;
  created: number;
}

/** Who launched an instance: a coordinator's id and label, and the API that serves it. */
export interface IOwner {
  coordinator?: string;
  label?: string;
  api?: string | null;
}

/** An instance of the cluster, wherever it was launched (GET /exo-lab/api/instances). */
export interface IInstance {
  id: string;
  name: string;
  model: string;
  owner: IOwner;
  state: string;
  loaded: [number, number];
  error?: string | null;
  nodes: string[];
  node_names: string[];
  ranks_alive: number | null;
  reserved_bytes: Record<string, number>;
  mine: boolean;
  description?: string;
  strategy?: string;
  predicted_decode_tps?: number;
  predicted_ttft_s?: number;
  replacements?: number;
}

/** A ranked placement plan (GET /exo-lab/api/previews); POST it back to launch it. */
export interface IPlan {
  model: string;
  strategy: string;
  ranks: { rank: number; node_id: string; node_name?: string; layers: [number, number] }[];
  backend: string;
  memory_bytes: Record<string, number>;
  memory_capacity_bytes: Record<string, number>;
  node_names: Record<string, string>;
  decode_tps: number | null;
  ttft_s: number | null;
  bottleneck: string;
  explanation: string;
  feasible: boolean;
  reason: string | null;
  description: string;
  [key: string]: unknown;
}

export interface IPreviewsReply {
  coordinator: ICoordinator;
  model: string;
  objective: string;
  plans: IPlan[];
  infeasible: IPlan[];
}

/** The answer to a launch: the instance as it starts loading. */
export interface ILaunchReply {
  id: string;
  name: string;
  model: string;
  state: string;
  coordinator: string;
}

export interface ITopologyReply {
  coordinator: ICoordinator | null;
  coordinators: ICoordinator[];
  topology: ITopology;
  hint: string | null;
}

export interface IInstancesReply {
  coordinator: ICoordinator | null;
  instances: IInstance[];
  hint: string | null;
}

export interface IDashboardReply {
  url: string | null;
  hint: string | null;
}

/** An error answer of the server extension, with the message it gave. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

/** `method` on `/exo-lab/api/<endpoint>` (GET by default), as JSON, with Jupyter's credentials. */
export async function requestAPI<T>(
  endpoint: string,
  query: Record<string, string | null | undefined> = {},
  init: { method?: string; body?: unknown } = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const params = Object.entries(query)
    .filter(([, v]) => v !== null && v !== undefined && v !== '')
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v as string)}`)
    .join('&');
  const url = URLExt.join(settings.baseUrl, 'exo-lab', 'api', endpoint) + (params ? `?${params}` : '');
  const request: RequestInit = { method: init.method || 'GET' };
  if (init.body !== undefined) {
    request.body = JSON.stringify(init.body);
    request.headers = { 'Content-Type': 'application/json' };
  }
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, request, settings);
  } catch (error) {
    throw new ApiError(0, `the Jupyter server does not answer: ${error}`);
  }
  const text = await response.text();
  let data: any = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && (data.message || data.reason)) || response.statusText || 'request failed';
    if (response.status === 404 && !data) {
      throw new ApiError(404, 'the exo_lab server extension is not enabled: run `jupyter server extension enable exo_lab.jupyter` and restart JupyterLab');
    }
    throw new ApiError(response.status, message);
  }
  return data as T;
}

/** Launch `plan` (a plan from the previews, or an index into them) of `model` on the coordinator's cluster. */
export function launchInstance(
  coordinator: string | null,
  model: string,
  plan: IPlan | number,
  name: string | null = null
): Promise<ILaunchReply> {
  return requestAPI<ILaunchReply>('instances', { coordinator }, { method: 'POST', body: { model_id: model, plan, name } });
}

/** Stop an instance of the coordinator's cluster, whoever launched it. */
export function stopInstance(coordinator: string | null, id: string): Promise<{ id: string; stopped_by: string }> {
  return requestAPI('instances/' + encodeURIComponent(id), { coordinator }, { method: 'DELETE' });
}
