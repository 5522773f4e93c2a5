"""The ``exo-lab`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import exo_lab
from exo_lab import _blas, defaults
from exo_lab.cluster.agent import AgentConfig, default_state_dir, run_agent
from exo_lab.cluster.client import ClusterClient
from exo_lab.cluster.coordinators import register_server
from exo_lab.cluster.display import topology_text
from exo_lab.cluster.topology import Topology
from exo_lab.models import list_cached
from exo_lab.models.presets import DTYPE_NAMES, PRESETS
from exo_lab.paths import models_dir
from exo_lab.placement.preview import preview, this_machine
from exo_lab.sim.cli import add_cli as add_sim

# Imported inside the commands that need them, so that `exo-lab node` and `exo-lab sim` start
# without them: exo_lab.ui.dashboard (Panel and Bokeh, seconds to import), exo_lab.bench and
# exo_lab.models.synthetic (MLX).

DASHBOARD_PORT = defaults.DASHBOARD_PORT


def _serve(args: argparse.Namespace) -> int:
    stop = _stop_on_signal()
    print(f"loading {args.model} ...", flush=True)
    server = exo_lab.serve(
        args.model,
        port=args.port,
        host=args.host,
        name=args.name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefix_cache_bytes=None if args.prefix_cache_mb is None else int(args.prefix_cache_mb * 2**20),
    )
    _announce(server)
    register_server(server)  # the JupyterLab side panel finds it (exo_lab.cluster.coordinators)
    _wait_for_signal(server, stop)
    return 0


def _up(args: argparse.Namespace) -> int:
    from exo_lab.member import AUTO, Member, MemberConfig  # MLX (instances): see the note at the top

    stop = _stop_on_signal()
    model = None if args.no_model else (args.model or AUTO)
    print(
        f"exo_lab {exo_lab.__version__}: joining the cluster as {args.node_name or socket.gethostname()} ...",
        flush=True,
    )
    member = Member(
        MemberConfig(
            model=model,
            name=args.name,
            node_name=args.node_name or socket.gethostname(),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            agent_host=args.agent_host,
            agent_port=args.agent_port,
            probe_port=args.probe_port,
            state_dir=Path(args.state_dir) if args.state_dir else None,
            cluster_key=args.cluster_key,
            peers=args.peer,
            mdns=not args.no_mdns,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            verbose=args.verbose,
        )
    ).start()
    assert member.server is not None and member.cluster is not None
    print(f"exo_lab API: {member.server.url}  (OpenAI base URL {member.server.openai_base_url}, BLAS: {_blas.name()})")
    print(f"  instances: curl {member.server.url}/instances   (launch: POST /instance, see /openapi.json)")
    print(f"  models:    curl {member.server.url}/v1/models", flush=True)
    member.launch_model()
    stop_dashboard = None
    if not args.no_dashboard:
        stop_dashboard = _start_up_dashboard(member, args)
    print("Press Ctrl-C to stop.", flush=True)
    _wait_for_signal(member.server, stop)
    if stop_dashboard is not None:
        stop_dashboard()
    member.stop()
    return 0


def _quiet_dashboard_logs(args: argparse.Namespace) -> None:
    """Panel and Bokeh log every session and periodic callback at INFO: keep them for -v."""
    for name in ("bokeh", "panel"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.WARNING)


def _start_up_dashboard(member, args: argparse.Namespace):
    """The dashboard of ``exo-lab up`` (the cluster, its instances, a chat box) on another port.

    It starts on a thread, so that Ctrl-C and SIGTERM are handled at once (Panel takes a moment to
    import); returns a function that stops it.
    """
    started: list = []

    def start() -> None:
        from exo_lab.ui.dashboard import DashboardSource, serve_dashboard

        _quiet_dashboard_logs(args)
        try:
            started.append(
                serve_dashboard(
                    DashboardSource(
                        cluster=member.cluster,
                        registry=member.server.registry,
                        api_url=member.server.url,
                        control=member.control,
                    ),
                    port=args.dashboard_port,
                    host=args.dashboard_host,
                    token=member.server.api_key,  # off loopback the page needs the API key (or a generated token)
                )
            )
        except OSError as exc:  # the API keeps serving without it
            print(f"exo-lab: warning: {exc}", file=sys.stderr, flush=True)
            return
        if member.cluster.registration is not None:
            member.cluster.registration.update(dashboard_url=started[0].url)  # the panel's "Open dashboard" button
        _announce_dashboard(started[0], "exo_lab dashboard")

    thread = threading.Thread(target=start, name="exo-lab-dashboard-start", daemon=True)
    thread.start()

    def stop() -> None:
        thread.join(30)
        for dashboard in started:
            dashboard.stop()

    return stop


def _announce_dashboard(dashboard, label: str) -> None:
    """Print the dashboard's URL: with its generated token off loopback; saying it needs the API key when that
    is its token (the key is not printed again)."""
    if dashboard.token is None:
        print(f"{label}: {dashboard.url}", flush=True)
    elif dashboard.token_generated:
        print(
            f"{label}: {dashboard.login_url}  (reachable from other machines: the token signs a browser in)", flush=True
        )
    else:
        print(
            f"{label}: {dashboard.url}  (reachable from other machines: sign in with the API key, "
            f"{dashboard.url}/login?token=API_KEY)",
            flush=True,
        )


def _dashboard(args: argparse.Namespace) -> int:
    from exo_lab.ui.dashboard import DashboardSource, serve_dashboard

    stop = _stop_on_signal()
    _quiet_dashboard_logs(args)
    cluster = topology = None
    if args.local:
        print(f"starting {args.local} local node agent(s) ...", flush=True)
        cluster = exo_lab.local_cluster(args.local, cluster_key=args.cluster_key)
    elif args.connect:
        cluster = exo_lab.connect(args.connect, cluster_key=args.cluster_key)
    elif args.discover:
        cluster = exo_lab.discover(cluster_key=args.cluster_key)
    elif args.topology:
        topology = Topology.load(args.topology)
    try:
        dashboard = serve_dashboard(
            DashboardSource(cluster=cluster, topology=topology, bench=args.bench), port=args.port, host=args.host
        )
        what = (
            f"{len(cluster.nodes)} node(s)"
            if cluster is not None
            else "a what-if cluster"
            if topology is not None
            else "this machine"
        )
        _announce_dashboard(dashboard, f"exo_lab dashboard for {what}")
        if dashboard.source.api_url:  # a cluster is served: its API lists, launches and stops instances too
            print(f"exo_lab API: {dashboard.source.api_url}", flush=True)
        if cluster is not None and cluster.registration is not None:
            cluster.registration.update(dashboard_url=dashboard.url)  # the JupyterLab panel's dashboard button
        print("Press Ctrl-C to stop.", flush=True)
        _wait_for_signal(dashboard, stop)
    finally:
        if cluster is not None:
            cluster.close()  # deletes the instances launched from the dashboard; stops --local agents
    return 0


def _announce(server: exo_lab.Server) -> None:
    name = server.registry.names()[0]
    print(f"exo_lab API: {server.url}  (OpenAI base URL {server.openai_base_url}, BLAS: {_blas.name()})")
    print(f"  models:  curl {server.url}/v1/models")
    print(
        f"  chat:    curl {server.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
    )
    print("Press Ctrl-C to stop.", flush=True)


def _stop_on_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM, installed before anything starts serving.

    A signal that arrives while the model loads or the server starts still stops it cleanly
    (exit status 0) once it is up, instead of killing the process half-way.
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait_for_signal(server, stop: threading.Event) -> None:
    """Serve until ``stop`` is set (or the server stops by itself), then stop the server."""
    while server.running and not stop.wait(0.5):
        pass
    print("stopping ...", flush=True)
    server.stop()


def _models_list(args: argparse.Namespace) -> int:
    print(f"cached in {models_dir()}:")
    for name in list_cached():
        print(f"  {name}")
    print("synthetic presets (use as 'synthetic:<preset>'; 'demo' is 'tiny'):")
    for name, preset in PRESETS.items():
        print(f"  {name:16s} {preset.description}")
    return 0


def _models_synth(args: argparse.Namespace) -> int:
    from exo_lab.models.synthetic import create  # MLX: see the note at the top

    print(create(args.path, args.preset, args.seed, args.dtype, args.quantize, args.overwrite))
    return 0


def _models_card(args: argparse.Namespace) -> int:
    card = exo_lab.ModelCard.from_dir(exo_lab.resolve(args.model), name=args.model)
    print(json.dumps(card.to_json(), indent=2))
    return 0


def _node(args: argparse.Namespace) -> int:
    config = AgentConfig(
        name=args.name or socket.gethostname(),
        host=args.host,
        port=args.port,
        probe_port=args.probe_port,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        cluster_key=args.cluster_key,
        peers=args.peer,
        mdns=not args.no_mdns,
        probe_interval_s=args.probe_interval,
        probe_while_serving=args.probe_while_serving,
        refresh_profile=args.refresh_profile,
        parent_pid=args.exit_with_parent,
    )
    return run_agent(config)


def _status(args: argparse.Namespace) -> int:
    if args.connect:  # the low-level client: reading the topology needs no MLX
        cluster = ClusterClient.connect(args.connect, cluster_key=args.cluster_key)
    else:
        cluster = ClusterClient.discover(timeout=args.timeout, cluster_key=args.cluster_key)
    if args.probe:
        cluster.probe_links()
    if args.json:
        print(json.dumps(cluster.topology.to_json(), indent=2))
    else:
        print(topology_text(cluster.topology))
    return 0


def _instances(args: argparse.Namespace) -> int:
    from exo_lab.cluster import instances as cluster_instances

    cluster = ClusterClient.connect(args.connect or [f"127.0.0.1:{defaults.AGENT_PORT}"], cluster_key=args.cluster_key)
    if args.action == "delete":
        if not args.id:
            print("exo-lab: error: exo-lab instances delete ID", file=sys.stderr)
            return 2
        try:
            found = cluster_instances.find(cluster, args.id)
        except KeyError as exc:
            print(f"exo-lab: error: {exc.args[0]}", file=sys.stderr)
            return 1
        how = cluster_instances.stop(cluster, found)
        print(f"deleted {found.id} ({found.name}) through its {'owner' if how == 'owner' else 'nodes'}")
        return 0
    found = cluster_instances.gather(cluster)
    if args.json:
        print(json.dumps([i.to_json() for i in found], indent=2))
        return 0
    if not found:
        print("no instances")
        return 0
    names = {n.id: n.name for n in cluster.nodes}
    print(f"{'id':12s} {'name':20s} {'state':10s} {'loaded':>9s}  {'nodes':24s} owner")
    for i in found:
        loaded = f"{i.loaded[0]}/{i.loaded[1]}" if i.loaded[1] else "-"
        nodes = ",".join(names.get(n, n) for n in i.nodes)
        print(f"{i.id:12s} {i.name[:20]:20s} {i.state:10s} {loaded:>9s}  {nodes[:24]:24s} {i.owner.get('label', '?')}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    if args.topology:
        topology = Topology.load(args.topology)
    elif args.connect:
        topology = ClusterClient.connect(args.connect, cluster_key=args.cluster_key).topology
    elif args.discover:
        topology = ClusterClient.discover(cluster_key=args.cluster_key).topology
    else:
        topology = this_machine()
    plans = preview(topology, args.model, args.context, args.prompt_tokens, args.batch, args.objective)
    if args.json:
        print(json.dumps(plans.to_json(), indent=2))
    else:
        print(plans.table(args.limit))
    return 0 if plans.plans else 1


def _write_traces(result: Any, where: Path) -> None:
    """Each traced plan's Chrome trace JSON under ``where``, and its per-token breakdown printed."""
    from exo_lab.engine.trace import Trace

    where.mkdir(parents=True, exist_ok=True)
    for p in result.plans:
        if p.trace:
            trace = Trace.from_json(p.trace)
            path = trace.save(where / f"trace-plan{p.index}-{trace.id}.json")
            print(
                f"plan #{p.index} {p.description}: trace {path} (clocks within +-{trace.uncertainty_ns / 1e3:.0f} us)"
            )
            print(trace.table())


def _bench(args: argparse.Namespace) -> int:
    from exo_lab.bench import BenchError

    model = args.model or args.model_option
    if args.url and args.instance:
        print("exo-lab: error: --url and --instance are two targets: give one", file=sys.stderr)
        return 2
    if not (args.url or args.instance or model):
        print("exo-lab: error: bench needs a model to launch, --instance ID or --url URL", file=sys.stderr)
        return 2
    if args.trace is not None and (args.url or args.instance):
        print("exo-lab: error: --trace traces the plans bench launches, not --url or --instance", file=sys.stderr)
        return 2
    cluster = None
    try:
        try:
            if args.url:
                result = _bench_url(args, model)
            else:
                if args.local:
                    cluster = exo_lab.local_cluster(args.local, cluster_key=args.cluster_key)
                elif args.connect:
                    cluster = exo_lab.connect(args.connect, cluster_key=args.cluster_key)
                else:
                    cluster = exo_lab.discover(cluster_key=args.cluster_key)
                result = _bench_cluster(args, cluster, model)
        except BenchError as exc:
            print(f"exo-lab: error: {exc}", file=sys.stderr)
            return 2
        print(result.table())
        if result.calibration and cluster is not None:
            for node, where in result.calibration.stored.items():
                c = result.calibration.constants[node]
                print(
                    f"  {cluster.node(node).name}: decode x{c['decode_efficiency']:.3g}, "
                    f"prefill x{c['prefill_efficiency']:.3g}, +{1000 * c['hop_overhead_s']:.3g} ms per message, "
                    f"batch rows x{c.get('row_efficiency', 1.0):.3g}, "
                    f"+{1000 * c.get('step_overhead_s', 0.0):.3g} ms per step, "
                    f"+{1000 * c.get('request_overhead_s', 0.0):.3g} ms per request "
                    f"-> {where or 'NOT stored'}"
                )
        if args.trace is not None:
            _write_traces(result, Path(args.trace))
        if result.components:
            from exo_lab.bench.components import COMPONENTS

            before, after = result.components["before"], result.components["after"]
            print("calibration per component, from the traces (prediction error %, before -> after):")
            print("  " + ", ".join(f"{c} {before[c]:.1f} -> {after[c]:.1f}" for c in COMPONENTS if c in before))
        if args.json:
            print(f"wrote {result.save(args.json)}")
        if args.plot:
            print(f"wrote {result.save_plot(args.plot)}")
        return 0 if _any_ok(result) else 1
    finally:
        if cluster is not None:
            cluster.close()  # stops --local agents; an instance measured with --instance is not ours: it stays


def _any_ok(result) -> bool:
    return any(p.ok for p in result.plans) and all(pt.ok for p in result.plans for pt in p.points)


def _bench_url(args: argparse.Namespace, model: str | None):
    from exo_lab.bench import bench_url

    tokenizer = None
    if args.tokenizer:
        from mlx_lm.utils import load_tokenizer  # MLX: see the note at the top

        tokenizer = load_tokenizer(exo_lab.resolve(args.tokenizer))
    return bench_url(
        args.url,
        model,
        args.api_key,
        args.pp,
        args.tg,
        args.concurrency,
        args.repeat,
        warmup=args.warmup,
        tokenizer=tokenizer,
        progress=not args.no_progress,
    )


def _bench_cluster(args: argparse.Namespace, cluster, model: str | None):
    if args.instance:
        return cluster.bench(
            instance=args.instance,
            pp=args.pp,
            tg=args.tg,
            repeat=args.repeat,
            concurrency=args.concurrency,
            warmup=args.warmup,
            progress=not args.no_progress,
        )
    return cluster.bench(
        model,
        pp=args.pp,
        tg=args.tg,
        repeat=args.repeat,
        concurrency=args.concurrency,
        select=args.plans if args.plans in ("all", "best") else int(args.plans),
        strategies=args.strategy.split(",") if args.strategy else None,
        warmup=args.warmup,
        calibrate=args.calibrate,
        progress=not args.no_progress,
        trace=args.trace is not None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-lab", description="Distributed LLM inference on MLX, from Jupyter.")
    parser.add_argument("--version", action="version", version=f"exo_lab {exo_lab.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    def api_args(p: argparse.ArgumentParser, model_default: str | None, optional: bool = False) -> None:
        if optional:
            p.add_argument(
                "--model",
                "-m",
                help="launch this model on the best plan of the cluster (default: the demo model when this "
                "machine is alone, nothing when it joins others)",
            )
        elif model_default is None:
            p.add_argument(
                "--model", "-m", required=True, help="path, cached name, hub id, 'demo' or 'synthetic:<preset>'"
            )
        else:
            p.add_argument("--model", "-m", default=model_default, help="model to serve (default: %(default)s)")
        p.add_argument("--name", help="the model id clients send (default: the model's name)")
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
        p.add_argument("--port", type=int, default=defaults.API_PORT)
        p.add_argument("--api-key", help=f"require this key from API clients (or {defaults.API_KEY}; default: none)")
        p.add_argument("--max-batch", type=int, default=16, help="requests decoding together (default: %(default)s)")
        p.add_argument(
            "--max-queue",
            type=int,
            default=256,
            help="requests waiting beyond those; more get 429 (default: %(default)s)",
        )

    p = sub.add_parser("serve", help="serve one model behind the OpenAI-compatible API")
    api_args(p, None)
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        metavar="MB",
        help="KV caches of finished requests kept for prompts that start alike (default: 1024; 0: none)",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "up", help="the main job: this machine as a cluster member (node agent, API, dashboard); on its own, the demo"
    )
    api_args(p, None, optional=True)
    p.add_argument("--no-model", action="store_true", help="launch no model (launch later: POST /instance, dashboard)")
    p.add_argument("--node-name", help="this node's name (default: the hostname)")
    p.add_argument("--agent-host", default="0.0.0.0", help="the node agent's address (default: all, for peers)")
    p.add_argument("--agent-port", type=int, default=defaults.AGENT_PORT, help="(default: %(default)s)")
    p.add_argument("--probe-port", type=int, help="the agent's link-probe port (default: agent port + 1; 0 picks one)")
    p.add_argument("--state-dir", help="where the node id and cluster key live")
    p.add_argument(
        "--cluster-key",
        help=f"shared secret of the cluster, 16+ characters (better: {defaults.CLUSTER_KEY}, which ps does not show)",
    )
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a peer agent to join without mDNS")
    p.add_argument("--no-mdns", action="store_true", help="do not advertise or browse with mDNS")
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=DASHBOARD_PORT,
        help="port of the dashboard (default: %(default)s; 0 picks one)",
    )
    p.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="address of the dashboard (default: loopback only; elsewhere it needs the API key or a printed token)",
    )
    p.add_argument("--no-dashboard", action="store_true", help="serve the API only")
    p.set_defaults(func=_up)

    p = sub.add_parser("dashboard", help="the cluster dashboard in the browser (Panel)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--connect", nargs="+", metavar="HOST:PORT", help="the node agents of a running cluster")
    where.add_argument("--local", type=int, metavar="N", help="start N node agents on this machine (loopback)")
    where.add_argument("--discover", action="store_true", help="find the cluster's agents by mDNS")
    where.add_argument("--topology", help="show a what-if cluster spec (JSON/YAML, see exo_lab/sim/specs)")
    p.add_argument(
        "--cluster-key",
        help=f"shared secret of the cluster, 16+ characters (better: {defaults.CLUSTER_KEY}, which ps does not show)",
    )
    p.add_argument("--bench", metavar="FILE", help="bench results to chart (JSON from exo-lab bench --json)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: loopback only; elsewhere the page needs the token printed at start)",
    )
    p.add_argument("--port", type=int, default=DASHBOARD_PORT, help="(default: %(default)s; 0 picks one)")
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("node", help="run the node agent of this machine")
    p.add_argument("--name", help="node name (default: the hostname)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all, so peers can reach it)")
    p.add_argument("--port", type=int, default=defaults.AGENT_PORT)
    p.add_argument("--probe-port", type=int, help="link-probe port (default: port + 1; 0 picks one)")
    p.add_argument("--state-dir", help="where the node id and cluster key live")
    p.add_argument(
        "--cluster-key",
        help=f"shared secret of the cluster, 16+ characters (better: {defaults.CLUSTER_KEY}, which ps does not show)",
    )
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a peer to join without mDNS")
    p.add_argument("--no-mdns", action="store_true", help="do not advertise or browse with mDNS")
    p.add_argument("--probe-interval", type=float, default=60.0, help="seconds between link measurements")
    p.add_argument(
        "--probe-while-serving",
        action="store_true",
        help="measure links on schedule even while an instance serving requests uses them (default: wait until it is quiet)",
    )
    p.add_argument("--refresh-profile", action="store_true", help="re-run the device microbenchmarks")
    p.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    p.set_defaults(func=_node)

    p = sub.add_parser("status", help="nodes and links of the cluster, as tables")
    p.add_argument("--connect", nargs="+", metavar="HOST:PORT", help="agents to ask (default: discover by mDNS)")
    p.add_argument("--cluster-key")
    p.add_argument("--timeout", type=float, default=3.0, help="mDNS discovery time")
    p.add_argument("--probe", action="store_true", help="measure links now")
    p.add_argument("--json", action="store_true", help="print the topology JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("instances", help="the cluster's instances: list them, or delete one")
    p.add_argument("action", nargs="?", choices=["list", "delete"], default="list")
    p.add_argument("id", nargs="?", help="the instance to delete")
    p.add_argument("--connect", nargs="+", metavar="HOST:PORT", help="agents to ask (default: this machine's agent)")
    p.add_argument("--cluster-key")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_instances)

    p = sub.add_parser("preview", help="ranked ways to split a model over a cluster (live, what-if, or this machine)")
    p.add_argument(
        "model",
        help="model name/path, a config.json, or a shipped what-if model "
        "(deepseek-v3, kimi-k2, qwen3-235b-a22b, gpt-oss-120b, glm-4.6; add @4bit, @8bit, ...)",
    )
    p.add_argument("--topology", help="a what-if cluster spec (JSON/YAML, see exo_lab/sim/specs)")
    p.add_argument("--connect", nargs="+", metavar="HOST:PORT", help="plan on the live cluster of these agents")
    p.add_argument("--discover", action="store_true", help="plan on the cluster found by mDNS")
    p.add_argument("--cluster-key")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--objective", choices=["decode", "ttft"], default="decode")
    p.add_argument("--limit", type=int, default=10, help="rows to print")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_preview)

    p = sub.add_parser(
        "bench",
        help="sweep prompt and generation lengths and concurrency: on plans launched in turn (measured against "
        "their predictions), an instance already running (--instance) or any OpenAI-compatible server (--url)",
    )
    p.add_argument("model", nargs="?", help="model to launch: name/path, 'demo' or 'synthetic:<preset>'")
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="with --url: the model id it serves")
    p.add_argument("--plans", default="best", help="all, best, or N (the N best launchable plans; default: best)")
    p.add_argument("--strategy", help="only these strategies, comma-separated (single,pipeline,tensor)")
    p.add_argument(
        "--pp", default="512", help="prompt tokens after the chat template, comma-separated sizes (default: 512)"
    )
    p.add_argument("--tg", default="128", help="generated tokens (EOS ignored), comma-separated sizes (default: 128)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each combination (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests first (default: 1)")
    p.add_argument("--concurrency", default="1,4,8", help="concurrent request counts (default: 1,4,8)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit the cost model's per-node factors to the measurements and store them on the nodes",
    )
    p.add_argument("--json", metavar="PATH", help="write the result document (schema exo_lab.bench/2)")
    p.add_argument("--plot", metavar="PATH", help="write the charts as a standalone HTML page")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--instance", metavar="ID", help="measure this running instance of the cluster (no launch)")
    target.add_argument(
        "--url",
        help="measure an OpenAI-compatible server (exo_lab, mlx_lm.server, exo, llama.cpp), e.g. http://h:8080/v1",
    )
    p.add_argument("--api-key", help="with --url: the server's API key")
    p.add_argument(
        "--tokenizer", metavar="MODEL", help="with --url: a local model whose tokenizer makes prompts of exactly --pp"
    )
    p.add_argument(
        "--trace",
        nargs="?",
        const=".",
        metavar="DIR",
        help="trace one more request per plan on every rank: Chrome trace JSON in DIR (default: .) and the "
        "per-token breakdown, measured beside predicted",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--connect", nargs="+", metavar="HOST:PORT", help="agents to bench on (default: discover)")
    where.add_argument("--local", type=int, metavar="N", help="start N local agents on loopback for the run")
    p.add_argument("--cluster-key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)

    models = sub.add_parser("models", help="synthetic models and the model cache")
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser("synth", help="create a synthetic model in the Hugging Face layout")
    p.add_argument("path")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES))
    p.add_argument(
        "--quantize",
        type=lambda v: int(v) if v.isdigit() else v,
        metavar="BITS|RECIPE",
        help="affine bits (2, 3, 4, 6, 8) or a mixed per-layer recipe (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_models_synth)
    p = msub.add_parser("list", help="cached models and synthetic presets")
    p.set_defaults(func=_models_list)
    p = msub.add_parser("card", help="print a model's card (shape, bytes per layer) as JSON")
    p.add_argument("model")
    p.set_defaults(func=_models_card)

    add_sim(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("tornado.access").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args) or 0
    except (exo_lab.models.ModelNotFoundError, exo_lab.ClusterError, FileExistsError, ValueError, OSError) as exc:
        print(f"exo-lab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
