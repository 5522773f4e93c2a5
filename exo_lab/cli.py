"""The ``exo-lab`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

import exo_lab
from exo_lab.api.server import DEFAULT_PORT


def _serve(args: argparse.Namespace) -> int:
    print(f"loading {args.model} ...", flush=True)
    server = exo_lab.serve(args.model, port=args.port, host=args.host, name=args.name)
    _announce(server)
    _wait_for_signal(server)
    return 0


def _up(args: argparse.Namespace) -> int:
    print(f"exo_lab {exo_lab.__version__}: starting a local node with model {args.model!r} ...", flush=True)
    server = exo_lab.serve(args.model, port=args.port, host=args.host, name=args.name)
    _announce(server)
    _wait_for_signal(server)
    return 0


def _announce(server: exo_lab.Server) -> None:
    name = server.registry.names()[0]
    from exo_lab import _blas

    print(f"exo_lab API: {server.url}  (OpenAI base URL {server.openai_base_url}, BLAS: {_blas.name()})")
    print(f"  models:  curl {server.url}/v1/models")
    print(
        f"  chat:    curl {server.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
    )
    print("Press Ctrl-C to stop.", flush=True)


def _wait_for_signal(server: exo_lab.Server) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while server.running and not stop.wait(0.5):
        pass
    print("stopping ...", flush=True)
    server.stop()


def _models_list(args: argparse.Namespace) -> int:
    from exo_lab.models import list_cached
    from exo_lab.models.synthetic import PRESETS
    from exo_lab.paths import models_dir

    print(f"cached in {models_dir()}:")
    for name in list_cached():
        print(f"  {name}")
    print("synthetic presets (use as 'synthetic:<preset>'; 'demo' is 'tiny'):")
    for name, preset in PRESETS.items():
        print(f"  {name:12s} {preset.description}")
    return 0


def _models_card(args: argparse.Namespace) -> int:
    card = exo_lab.ModelCard.from_dir(exo_lab.resolve(args.model), name=args.model)
    print(json.dumps(card.to_json(), indent=2))
    return 0


def _node(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exo_lab.cluster.agent import AgentConfig, default_state_dir, run_agent

    config = AgentConfig(
        name=args.name or __import__("socket").gethostname(),
        host=args.host,
        port=args.port,
        probe_port=args.probe_port,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        cluster_key=args.cluster_key,
        peers=args.peer,
        mdns=not args.no_mdns,
        probe_interval_s=args.probe_interval,
        refresh_profile=args.refresh_profile,
    )
    return run_agent(config)


def _status(args: argparse.Namespace) -> int:
    from exo_lab.cluster.display import topology_text

    if args.connect:
        cluster = exo_lab.connect(args.connect, cluster_key=args.cluster_key)
    else:
        cluster = exo_lab.discover(timeout=args.timeout, cluster_key=args.cluster_key)
    if args.probe:
        cluster.probe_links()
    if args.json:
        print(json.dumps(cluster.topology.to_json(), indent=2))
    else:
        print(topology_text(cluster.topology))
    return 0


def _preview(args: argparse.Namespace) -> int:
    from exo_lab.cluster.topology import Topology
    from exo_lab.placement.preview import preview, this_machine

    if args.topology:
        topology = Topology.load(args.topology)
    elif args.connect:
        topology = exo_lab.connect(args.connect, cluster_key=args.cluster_key).topology
    elif args.discover:
        topology = exo_lab.discover(cluster_key=args.cluster_key).topology
    else:
        topology = this_machine()
    plans = preview(topology, args.model, args.context, args.prompt_tokens, args.batch, args.objective)
    if args.json:
        print(json.dumps(plans.to_json(), indent=2))
    else:
        print(plans.table(args.limit))
    return 0 if plans.plans else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-lab", description="Distributed LLM inference on MLX, from Jupyter.")
    parser.add_argument("--version", action="version", version=f"exo_lab {exo_lab.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    def api_args(p: argparse.ArgumentParser, model_default: str | None) -> None:
        if model_default is None:
            p.add_argument("--model", "-m", required=True, help="path, cached name, hub id, 'demo' or 'synthetic:<preset>'")
        else:
            p.add_argument("--model", "-m", default=model_default, help="model to serve (default: %(default)s)")
        p.add_argument("--name", help="the model id clients send (default: the model's name)")
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
        p.add_argument("--port", type=int, default=DEFAULT_PORT)

    p = sub.add_parser("serve", help="serve one model behind the OpenAI-compatible API")
    api_args(p, None)
    p.set_defaults(func=_serve)

    p = sub.add_parser("up", help="the main job: a local node serving the demo model")
    api_args(p, "demo")
    p.set_defaults(func=_up)

    p = sub.add_parser("node", help="run the node agent of this machine")
    p.add_argument("--name", help="node name (default: the hostname)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all, so peers can reach it)")
    p.add_argument("--port", type=int, default=52416)
    p.add_argument("--probe-port", type=int, help="link-probe port (default: port + 1; 0 picks one)")
    p.add_argument("--state-dir", help="where the node id and cluster key live")
    p.add_argument("--cluster-key", help="shared secret of the cluster (or EXO_LAB_CLUSTER_KEY)")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a peer to join without mDNS")
    p.add_argument("--no-mdns", action="store_true", help="do not advertise or browse with mDNS")
    p.add_argument("--probe-interval", type=float, default=60.0, help="seconds between link measurements")
    p.add_argument("--refresh-profile", action="store_true", help="re-run the device microbenchmarks")
    p.set_defaults(func=_node)

    p = sub.add_parser("status", help="nodes and links of the cluster, as tables")
    p.add_argument("--connect", nargs="+", metavar="HOST:PORT", help="agents to ask (default: discover by mDNS)")
    p.add_argument("--cluster-key")
    p.add_argument("--timeout", type=float, default=3.0, help="mDNS discovery time")
    p.add_argument("--probe", action="store_true", help="measure links now")
    p.add_argument("--json", action="store_true", help="print the topology JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("preview", help="ranked ways to split a model over a cluster (live, what-if, or this machine)")
    p.add_argument("model", help="model name/path, or a config.json (for models you do not have)")
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

    models = sub.add_parser("models", help="synthetic models and the model cache")
    msub = models.add_subparsers(dest="models_command", required=True)
    from exo_lab.models import synthetic

    synthetic.add_cli(msub)
    p = msub.add_parser("list", help="cached models and synthetic presets")
    p.set_defaults(func=_models_list)
    p = msub.add_parser("card", help="print a model's card (shape, bytes per layer) as JSON")
    p.add_argument("model")
    p.set_defaults(func=_models_card)

    from exo_lab.sim.cli import add_cli as add_sim

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
