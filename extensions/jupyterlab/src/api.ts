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

export interface IInstanceOnNode {
  node: string;
  node_name: string;
  state: string;
  ranks: number;
  ranks_alive: number;
  reserved_bytes: number;
}

export interface IInstance {
  id: string;
  name?: string;
  model?: string;
  state: string;
  error?: string | null;
  loaded_layers?: number;
  total_layers?: number;
  strategy?: string;
  description?: string;
  node_names?: string[];
  predicted_decode_tps?: number;
  predicted_ttft_s?: number;
  replacements?: number;
  on_nodes: IInstanceOnNode[];
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
  other_instances: IInstance[];
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

/** GET `/exo-lab/api/<endpoint>` as JSON, with Jupyter's credentials. */
export async function requestAPI<T>(
  endpoint: string,
  query: Record<string, string | null | undefined> = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const params = Object.entries(query)
    .filter(([, v]) => v !== null && v !== undefined && v !== '')
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v as string)}`)
    .join('&');
  const url = URLExt.join(settings.baseUrl, 'exo-lab', 'api', endpoint) + (params ? `?${params}` : '');
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, {}, settings);
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
