"""Chaos: kill a random worker, agent or coordinator mid-generation on a simulated cluster; count the damage.

Run (root, iproute2): .venv/bin/python benchmarks/chaos.py [--rounds 10] [--streams 3] [--seed 0]

A simulated cluster (:class:`exo_lab.sim.SimCluster`) of 3 hosts on one LAN, each running ``exo-lab up``
(agent + coordinator + API, no model); this process sits in the root namespace, which is on the sim's LAN.
Each round:

1. a random host (the *owner*) launches the demo model as a 2-node pipeline on two random hosts
   (``POST /instance`` on its API) and it is waited for until ready;
2. ``--streams`` streaming chat requests (official openai client) go through another member's API
   (forwarded to the owner), long enough to be mid-generation;
3. once every stream has produced a token, one of these is killed with SIGKILL:
   - a **worker**: one of the instance's rank processes (pids from the agents' signed ``GET /instances``);
     the owner restarts (re-places) or fails the instance itself;
   - an **agent**: the node agent of one of the instance's hosts (the child of its ``exo-lab up``),
     restarted with the same command line;
   - a **coordinator**: the owner's whole ``exo-lab up`` process group (its agent with it), restarted;
4. every request is classified: **ok** (finished), **errored** cleanly (an error status or an error event
   arrived), **hung** (no chunk within ``--deadline`` seconds), **lost** (the connection dropped, or the
   stream ended with no finish reason and no error);
5. the instance is stopped through its owner (after a coordinator kill it is left to its lease), then
   **leaked processes** are the worker pids seen during the round still alive ``--leak-s`` (20) seconds later,
   and **leaked reservations** are instances still held by any agent (reserved bytes) by then (leases are 10 s).

Prints a table per round and totals; exits 1 when anything hung or leaked (target: 0 hung, 0 leaked).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from exo_lab.cluster.http import RequestError, SignedClient
from exo_lab.sim.cluster import SimCluster
from exo_lab.sim.spec import SimSpec

API_PORT = 52415
API_KEY = "chaos-api-key"
HOSTS = ["a", "b", "c"]
UP = (
    "{python}", "-m", "exo_lab.cli", "up", "--no-model", "--no-dashboard", "--host", "0.0.0.0",
    "--port", str(API_PORT), "--api-key", API_KEY, "--agent-port", "{port}", "--node-name", "{name}",
    "--state-dir", "{state_dir}", "{peers}",
)  # fmt: skip


def wait_for(check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """The first truthy ``check()`` within ``timeout`` seconds, else None (exceptions count as falsy)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            got = None
        if got:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(every)


@dataclass
class Outcome:
    kind: str = "pending"  # ok | errored | hung | lost
    tokens: int = 0
    detail: str = ""


@dataclass
class Round:
    n: int
    owner: str = ""
    via: str = ""
    nodes: list[str] = field(default_factory=list)
    victim: str = ""
    outcomes: list[Outcome] = field(default_factory=list)
    leaked_pids: list[int] = field(default_factory=list)
    leaked_reservations: list[str] = field(default_factory=list)
    state_after: str = ""
    note: str = ""

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)


class Chaos:
    def __init__(self, sim: SimCluster, args: argparse.Namespace) -> None:
        self.sim = sim
        self.args = args
        self.rng = random.Random(args.seed)
        self.ids: dict[str, str] = {}
        self.restarted_agents: dict[str, subprocess.Popen] = {}

    # -- access
    def api(self, host: str) -> str:
        return f"http://{self.sim.hosts[host].lan_addr}:{API_PORT}"

    def call(self, host: str, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, Any]:
        r = httpx.request(
            method, self.api(host) + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout
        )
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"text": r.text[:300]}

    def agent(self, host: str) -> dict | None:
        """The agent's ``GET /instances`` (signed, as from any machine), or None when it does not answer."""
        h = self.sim.hosts[host]
        try:
            return SignedClient(f"{h.lan_addr}:{h.port}", self.sim.cluster_key, timeout=5).json("GET", "/instances")
        except RequestError:
            return None

    def worker_pids(self) -> dict[int, str]:
        """Every rank pid any agent reports now, with its host."""
        pids = {}
        for host in HOSTS:
            data = self.agent(host) or {}
            for inst in data.get("instances", []):
                for r in inst.get("ranks", []):
                    if r.get("pid"):
                        pids[r["pid"]] = host
        return pids

    def healthy(self) -> bool:
        """Every member's API answers and sees all three nodes alive."""
        for host in HOSTS:
            status, state = self.call(host, "GET", "/state", timeout=10)
            alive = {n["name"] for n in state.get("nodes", []) if n["state"] == "alive"} if status == 200 else set()
            if alive != set(HOSTS):
                return False
            self.ids.update({n["name"]: n["id"] for n in state["nodes"]})
        return True

    # -- processes
    def member_tree(self, host: str) -> list[psutil.Process]:
        root = psutil.Process(self.sim._nodes[host].pid)
        return [root, *root.children(recursive=True)]

    def agent_proc(self, host: str) -> psutil.Process | None:
        if host in self.restarted_agents and self.restarted_agents[host].poll() is None:
            return psutil.Process(self.restarted_agents[host].pid)
        for p in self.member_tree(host):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "exo_lab.cli" in cmd and "node" in cmd:
                return p
        return None

    def kill_agent(self, host: str) -> str:
        p = self.agent_proc(host)
        if p is None:
            return f"agent of {host}: not found"
        cmd = p.cmdline()
        p.kill()
        try:
            p.wait(10)
        except psutil.TimeoutExpired:  # a zombie until exo-lab up reaps it: gone all the same
            pass
        log = open(Path(self.sim.hosts[host].state_dir).parent / "node.log", "ab")  # noqa: SIM115
        # the same command line in the host's namespace (the key comes in the environment, as from exo-lab up)
        self.restarted_agents[host] = self.sim.popen(
            host, cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return f"agent of {host} (pid {p.pid})"

    def kill_coordinator(self, host: str) -> str:
        proc = self.sim._nodes[host]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        extra = self.restarted_agents.pop(host, None)  # an agent restarted earlier runs in its own session
        if extra is not None and extra.poll() is None:
            extra.kill()
            extra.wait()
        self.sim._start_node(host)
        return f"coordinator of {host} (exo-lab up, pid {proc.pid})"

    # -- requests
    def stream(self, host: str, model: str, out: Outcome, first: threading.Event) -> None:
        client = openai.OpenAI(base_url=self.api(host) + "/v1", api_key=API_KEY, max_retries=0,
                               timeout=self.args.deadline)  # fmt: skip
        t0 = time.monotonic()
        finish = None
        try:
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
                max_tokens=self.args.tokens,
                temperature=0.7,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices:
                    if chunk.choices[0].delta.content:
                        out.tokens += 1
                        first.set()
                    finish = chunk.choices[0].finish_reason or finish
                if time.monotonic() - t0 > self.args.deadline + self.args.tokens:  # trickling forever
                    out.kind, out.detail = "hung", "still streaming long after any reasonable end"
                    stream.close()
                    return
            out.kind = "ok" if finish else "lost"
            out.detail = f"finish_reason {finish}" if finish else "stream ended with no finish reason and no error"
        except openai.APITimeoutError as exc:
            out.kind, out.detail = "hung", f"no chunk within {self.args.deadline:.0f} s ({exc})"
        except openai.APIConnectionError as exc:
            out.kind, out.detail = "lost", f"connection: {exc}"
        except openai.APIError as exc:
            out.kind, out.detail = "errored", f"{type(exc).__name__}: {str(exc)[:160]}"
        except httpx.TimeoutException as exc:
            out.kind, out.detail = "hung", f"no chunk within {self.args.deadline:.0f} s ({exc!r})"
        except httpx.HTTPError as exc:
            out.kind, out.detail = "lost", f"{type(exc).__name__}: {exc}"
        finally:
            first.set()
            client.close()

    # -- one round
    def round(self, n: int) -> Round:
        rd = Round(n)
        rng = self.rng
        rd.owner = rng.choice(HOSTS)
        rd.via = rng.choice([h for h in HOSTS if h != rd.owner])
        rd.nodes = sorted(rng.sample(HOSTS, 2))
        name = f"chaos{n}"
        body = {
            "model_id": "demo",
            "name": name,
            "sharding": "pipeline",
            "node_ids": [self.ids[h] for h in rd.nodes],
            "min_nodes": 2,
        }
        status, launched = self.call(rd.owner, "POST", "/instance", body, timeout=120)
        if status != 201:
            rd.note = f"launch failed: HTTP {status} {json.dumps(launched)[:200]}"
            return rd
        iid = launched["id"]
        ready = wait_for(lambda: self.call(rd.owner, "GET", f"/instance/{iid}")[1].get("state") == "ready", 240, 1)
        if not ready:
            rd.note = f"not ready: {self.call(rd.owner, 'GET', f'/instance/{iid}')[1].get('state')}"
        routed = wait_for(
            lambda: name in [m["id"] for m in self.call(rd.via, "GET", "/v1/models")[1].get("data", [])], 30
        )
        if not routed:
            rd.note += f" {rd.via} does not list {name};"

        seen: dict[int, str] = {}
        watching = threading.Event()

        def watch() -> None:  # every worker pid of the round, re-placements included
            while not watching.is_set():
                seen.update(self.worker_pids())
                watching.wait(1.0)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        outs = [Outcome() for _ in range(self.args.streams)]
        firsts = [threading.Event() for _ in outs]
        threads = [
            threading.Thread(target=self.stream, args=(rd.via, name, o, f), daemon=True)
            for o, f in zip(outs, firsts, strict=True)
        ]
        for t in threads:
            t.start()
        for f in firsts:
            f.wait(self.args.deadline)
        time.sleep(rng.uniform(0.0, 0.5))
        pids = {p: h for p, h in self.worker_pids().items()}
        ours = [p for p, h in pids.items() if h in rd.nodes]
        kind = self.args.kinds[n % len(self.args.kinds)] if self.args.cycle else rng.choice(self.args.kinds)
        if kind == "worker" and ours:
            pid = rng.choice(ours)
            os.kill(pid, signal.SIGKILL)
            rd.victim = f"worker on {pids[pid]} (pid {pid})"
        elif kind == "agent":
            rd.victim = self.kill_agent(rng.choice(rd.nodes))
        else:
            if kind == "worker":
                rd.note += " no worker pid found;"
            kind = "coordinator"
            rd.victim = self.kill_coordinator(rd.owner)
        for t in threads:
            t.join(self.args.deadline + self.args.tokens + 30)
        rd.outcomes = outs
        if kind != "coordinator":
            # a re-placed instance keeps its id (the agents know the new placement by a launch id of its own)
            def current() -> dict:
                listed = self.call(rd.owner, "GET", "/instances")[1].get("instances", [])
                return next((i for i in listed if i.get("id") == iid), {})

            def settled() -> bool:  # ready again, stopped, or failed for good (not while it is being re-placed)
                now = current()
                return now.get("state") in ("ready", "stopped") or "re-placing failed" in str(now.get("error"))

            wait_for(settled, 60, 1)
            now = current()
            rd.state_after = str(now.get("state", "gone"))
            launches = sorted({i for ids in (now.get("launch_ids") or {}).values() for i in ids})
            if launches and launches != [iid]:
                rd.note += f" re-placed as launch {', '.join(launches)};"
            if now.get("id"):
                status, _ = self.call(rd.owner, "DELETE", f"/instance/{now['id']}", timeout=60)
                rd.note += f" stopped via owner: HTTP {status};"
        else:
            rd.state_after = "owner gone"
        stop_at = time.monotonic()
        watching.set()
        watcher.join()

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        wait_for(lambda: not any(alive(p) for p in seen), self.args.leak_s, 1)
        rd.leaked_pids = sorted(p for p in seen if alive(p))

        def held() -> list[str]:
            out = []
            for host in HOSTS:
                data = self.agent(host) or {}
                out += [f"{host}:{i['id']}:{i['reserved_bytes']}B" for i in data.get("instances", [])]
                if data.get("reserved_bytes") and not data.get("instances"):
                    out.append(f"{host}:?:{data['reserved_bytes']}B")
            return out

        wait_for(lambda: not held(), max(0.0, self.args.leak_s - (time.monotonic() - stop_at)), 1)
        rd.leaked_reservations = held()
        return rd

    def run(self) -> list[Round]:
        if not wait_for(self.healthy, 180, 2):
            sys.exit("the simulated cluster did not form: not every member sees a, b and c alive")
        rounds = []
        hdr = (f"{'rnd':>3s} {'owner':5s} {'via':3s} {'nodes':5s} {'killed':38s} {'ok':>3s} {'err':>3s} "
               f"{'hung':>4s} {'lost':>4s} {'leak pid':>8s} {'leak res':>8s}  after / notes")  # fmt: skip
        print(hdr, flush=True)
        for n in range(1, self.args.rounds + 1):
            t0 = time.monotonic()
            rd = self.round(n)
            rounds.append(rd)
            print(
                f"{rd.n:3d} {rd.owner:5s} {rd.via:3s} {''.join(rd.nodes):5s} {rd.victim[:38]:38s} "
                f"{rd.count('ok'):3d} {rd.count('errored'):3d} {rd.count('hung'):4d} {rd.count('lost'):4d} "
                f"{len(rd.leaked_pids):8d} {len(rd.leaked_reservations):8d}  {rd.state_after};{rd.note} "
                f"({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            for o in rd.outcomes:
                if o.kind != "ok":
                    print(f"      {o.kind:8s} after {o.tokens} tokens: {o.detail[:150]}", flush=True)
            if rd.leaked_pids or rd.leaked_reservations:
                print(f"      leaked pids {rd.leaked_pids} reservations {rd.leaked_reservations}", flush=True)
            if not wait_for(self.healthy, 120, 2):
                print("      the cluster did not re-form within 120 s (every member seeing a, b and c)", flush=True)
        return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--streams", type=int, default=3, help="requests in flight when the kill comes")
    ap.add_argument("--tokens", type=int, default=400, help="max_tokens of each request (EOS ignored)")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds without a chunk that count as hung")
    ap.add_argument("--leak-s", type=float, default=20.0, help="seconds after the stop before counting leaks")
    ap.add_argument("--kinds", default="worker,agent,coordinator", help="what may be killed (comma-separated)")
    ap.add_argument("--cycle", action="store_true", help="kill the kinds in turn instead of at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="chaos3", help="the sim's name")
    args = ap.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    if os.geteuid() != 0:
        sys.exit("chaos.py builds network namespaces: run it as root")

    sim = SimCluster(SimSpec.from_json({"name": args.name, "hosts": HOSTS, "lan": {}}), node_command=UP)
    print(f"building sim {args.name} (3 hosts running exo-lab up) ...", flush=True)
    sim.up(wait=300)
    chaos = Chaos(sim, args)
    try:
        rounds = chaos.run()
    finally:
        for p in chaos.restarted_agents.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        sim.down()
    tot = {k: sum(r.count(k) for r in rounds) for k in ("ok", "errored", "hung", "lost")}
    leaked_p = sum(len(r.leaked_pids) for r in rounds)
    leaked_r = sum(len(r.leaked_reservations) for r in rounds)
    kinds = {k: sum(r.victim.startswith(k) for r in rounds) for k in ("worker", "agent", "coordinator")}
    print(
        f"\ntotals over {len(rounds)} rounds (killed: {kinds['worker']} workers, {kinds['agent']} agents, "
        f"{kinds['coordinator']} coordinators): requests ok {tot['ok']}, errored cleanly {tot['errored']}, "
        f"hung {tot['hung']}, lost {tot['lost']}; leaked processes {leaked_p}, leaked reservations {leaked_r}"
    )
    good = tot["hung"] == 0 and leaked_p == 0 and leaked_r == 0
    print(f"verdict: {'ok' if good else 'FAILED'} (target: 0 hung, 0 leaked)")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
