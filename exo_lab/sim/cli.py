"""``exo-lab sim up | down | status | exec``: simulated clusters from the shell."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import threading
from typing import Any

from exo_lab import defaults
from exo_lab.sim import cluster, state
from exo_lab.sim.cgroups import CgroupError
from exo_lab.sim.cluster import SimCluster, SimError
from exo_lab.sim.netns import NetnsError
from exo_lab.sim.spec import SimSpec, SpecError

log = logging.getLogger(__name__)


def _spec(args: argparse.Namespace) -> Any:

    flags_used = args.nodes is not None or args.link or args.no_lan or args.lan_rate
    if args.spec and flags_used:
        raise SpecError("give either a spec file or --nodes/--link/--no-lan/--lan-rate, not both")
    if args.spec:
        spec = SimSpec.from_file(args.spec)
        if args.name:
            spec = SimSpec(name=args.name, hosts=spec.hosts, lan=spec.lan, links=spec.links)
        return spec
    return SimSpec.from_flags(
        args.nodes if args.nodes is not None else 3,
        links=args.link,
        lan=not args.no_lan,
        lan_rate=args.lan_rate,
        name=args.name or "sim",
    )


def _root_line(address: str | None, devices: list[str]) -> str:
    if address is None:
        return "this machine: no link into the sim (--no-root-link); nodes through the relay only"
    return f"this machine: {address} on {', '.join(devices) or '-'}; it reaches every host at each of its addresses"


def print_hosts(sim: Any) -> None:
    rows = [("host", "namespace", "addresses", "node", "node (loopback relay)")]
    for h in sim.hosts.values():
        rows.append((h.name, h.netns, " ".join(h.addresses), h.url, h.local_url or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("  " + _root_line(sim.root_address, sim._require_state().root_links))


def _up(args: argparse.Namespace) -> int:

    spec = _spec(args)
    command = shlex.split(args.node_command) if args.node_command else None
    sim = SimCluster(
        spec,
        node_command=command,
        cluster_key=args.cluster_key,
        base_dir=args.base_dir,
        port=args.port,
        peers=not args.no_peers,
        root_link=not args.no_root_link,
    )
    stop = threading.Event()
    handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        sim.up(wait=args.wait)
    except BaseException:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        raise
    print(f"sim {spec.name!r} is up; state in {state.path_for(spec.name)}")
    print_hosts(sim)
    print(f"Python: exo_lab.sim.SimCluster.attach({spec.name!r}).cluster()   shell: exo-lab sim exec HOST -- CMD")
    if args.detach:
        st = sim._require_state()
        st.owner_pid = None
        st.save()
        print(f"detached; take it down with: exo-lab sim down --name {spec.name}", flush=True)
        return 0
    print("Press Ctrl-C to take it down.", flush=True)
    path = state.path_for(spec.name)
    while not stop.wait(0.5):
        if not path.exists():  # someone ran `sim down` for us
            print(f"sim {spec.name!r} was taken down elsewhere", flush=True)
            return 0
    print("taking the sim down ...", flush=True)
    sim.down()
    return 0


def _pick_name(args: argparse.Namespace) -> str:

    if args.name:
        return args.name
    names = [st.name for st in state.all_states()]
    if len(names) == 1:
        return names[0]
    if not names:
        raise FileNotFoundError("no sim is up")
    raise ValueError(f"several sims are up ({', '.join(names)}); say which with --name (or --all for down)")


def _down(args: argparse.Namespace) -> int:

    if args.all:
        names = cluster.down_all()
        print(f"took down {len(names)} sim(s){': ' + ', '.join(names) if names else ''}")
        return 0
    name = _pick_name(args)
    cluster.down(name)
    print(f"sim {name!r} is down")
    return 0


def _status(args: argparse.Namespace) -> int:

    reports = cluster.list_sims()
    if args.name:
        reports = [r for r in reports if r["name"] == args.name]
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    if not reports:
        print("no sim is up")
        return 0
    for r in reports:
        owner = f"owner pid {r['owner_pid']}" if r["owner_running"] else "detached"
        dead = [p["role"] for p in r["processes"] if not p["running"]]
        print(
            f"sim {r['name']!r} ({r['status']}, index {r['index']}, {owner})"
            + (f"; not running: {', '.join(dead)}" if dead else "")
        )
        for name, h in r["hosts"].items():
            node = "up" if h["node_running"] else "DOWN"
            addrs = " ".join(h["addresses"])
            print(f"  {name:8s} {h['netns']:24s} {addrs:32s} {h['url']}  {h['local_url'] or '-'}  node {node}")
        print("  " + _root_line(r["root_address"], list(r["root_links"])))
    return 0


def _exec(args: argparse.Namespace) -> int:

    sim = SimCluster.attach(_pick_name(args))
    argv = args.argv[1:] if args.argv and args.argv[0] == "--" else args.argv
    if not argv:
        raise ValueError("give a command to run, e.g. exo-lab sim exec a -- ip addr")
    return sim.exec(args.host, argv, check=False, capture_output=False).returncode


def _guard(func: Any) -> Any:
    """Print sim errors as one line (the top-level CLI only knows ValueError and OSError)."""

    def run(args: argparse.Namespace) -> int:

        try:
            return func(args)
        except (SimError, NetnsError, CgroupError) as exc:
            print(f"exo-lab sim: error: {exc}", file=sys.stderr)
            return 2

    return run


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``sim`` and its commands on the top-level ``exo-lab`` sub-parsers."""
    sim = sub.add_parser("sim", help="simulated multi-host clusters (network namespaces, shaped links)")
    ssub = sim.add_subparsers(dest="sim_command", required=True)

    p = ssub.add_parser("up", help="build a simulated cluster and start a node per host")
    p.add_argument("spec", nargs="?", help="spec file (.yaml/.json); or use --nodes/--link")
    p.add_argument("--nodes", type=int, help="number of hosts, named a, b, c ... (default 3)")
    p.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="A-B:KEY=VALUE,...",
        help="a cable, e.g. a-b:rate=1gbit,delay=2ms,loss=0.001 (repeatable)",
    )
    p.add_argument("--no-lan", action="store_true", help="no shared LAN, only the cables")
    p.add_argument("--lan-rate", help="shape each LAN port, e.g. 1gbit")
    p.add_argument("--name", help="sim name (default: the spec's, or 'sim')")
    p.add_argument(
        "--node-command",
        help="command per host instead of the exo_lab node; "
        "placeholders {port} {name} {state_dir} {cluster_key} {lan_addr} {python} {peers}",
    )
    p.add_argument(
        "--port", type=int, default=defaults.AGENT_PORT, help="node port inside each host (default %(default)s)"
    )
    p.add_argument("--cluster-key", help="shared node secret (default: random)")
    p.add_argument("--base-dir", help="where node state dirs and logs go")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every node's HTTP (0: no wait)")
    p.add_argument("--no-peers", action="store_true", help="do not pass --peer; nodes find each other by mDNS")
    p.add_argument(
        "--no-root-link",
        action="store_true",
        help="leave this machine's network alone: no device or route into the sim (nodes via the relay only)",
    )
    p.add_argument("--detach", action="store_true", help="leave the sim running and exit")
    p.set_defaults(func=_guard(_up))

    p = ssub.add_parser("down", help="remove a sim: processes, namespaces, devices, cgroups")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--name", help="which sim (default: the only one)")
    g.add_argument("--all", action="store_true", help="every recorded sim")
    p.set_defaults(func=_guard(_down))

    p = ssub.add_parser("status", help="list sims, their hosts and addresses")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(_status))

    p = ssub.add_parser("exec", help="run a command inside a simulated host")
    p.add_argument("--name", help="which sim (default: the only one)")
    p.add_argument("host")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_guard(_exec))


def main(argv: list[str] | None = None) -> int:
    """Run the ``sim`` commands alone: ``python -m exo_lab.sim.cli up ...``."""
    parser = argparse.ArgumentParser(prog="exo-lab")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sim", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"exo-lab sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
