"""notebooks/quickstart.ipynb runs top to bottom in a real kernel, and its server
keeps answering other processes while the kernel lives."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from pathlib import Path

import nbformat
import openai
import psutil
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from tests.helpers.net import free_port
from tests.helpers.notebooks import cell_errors, cell_text, venv_kernel_manager, widget_views
from tests.helpers.paths import ARTIFACTS, REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 60


def query_from_outside(base_url: str, model: str = "demo") -> str:
    """The kernel's server answers a client in another process, plain and streaming; returns the reply."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "Hello from the test process."}]

    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert reply.choices[0].message.content

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = [], None, None
    for event in stream:
        for choice in event.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = event.usage or usage
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 8
    assert "".join(text) == reply.choices[0].message.content  # greedy: same text either way
    return reply.choices[0].message.content


def port_closes(port: int, deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except OSError:
            return True
        time.sleep(0.05)  # poll interval, not a wait for an event
    return False


AFTER_QUERIES = """
import time
from ipywidgets.widgets.widget import _instances
from exo_lab.ui import InstanceMonitor

monitor = next(w for w in list(_instances.values()) if isinstance(w, InstanceMonitor))
deadline = time.monotonic() + 10
while monitor.stats.get("requests") != len(inst.usage_history) and time.monotonic() < deadline:
    time.sleep(0.05)  # the monitor samples twice a second
print(f"requests {len(inst.usage_history)} | monitor {monitor.summary['state']} {monitor.stats['requests']} "
      f"{monitor.progress['done']}/{monitor.progress['total']} live={monitor.live}")
"""
CLEANUP = """
agent_pids = [p.pid for p in cluster._processes] if "cluster" in globals() else []
if "cluster_server" in globals():
    cluster_server.stop()
if "cluster" in globals():
    cluster.close()  # the node agents are the kernel's children: stop them before it goes
print("agents:", agent_pids)
"""


async def run_notebook(
    nb: nbformat.NotebookNode, km: AsyncKernelManager, env: dict[str, str], port: int, cluster_port: int
) -> dict[str, str]:
    """Run every cell, query both servers from this process, then clean up in the kernel; what that printed."""
    client = NotebookClient(
        nb,
        km=km,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        startup_timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    try:
        # We own ``km``, so leaving this block keeps the kernel (and its server) alive.
        async with client.async_setup_kernel(env=env):

            async def run(source: str) -> str:
                cell = nbformat.v4.new_code_cell(source)
                nb.cells.append(cell)  # nbclient writes a cell back to its place in the notebook
                try:
                    await client.async_execute_cell(cell, len(nb.cells) - 1)
                finally:
                    nb.cells.pop()
                assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
                return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

            out = {}
            try:
                for index, cell in enumerate(nb.cells):
                    await client.async_execute_cell(cell, index)
                assert not cell_errors(nb), cell_errors(nb)
                engine_reply = await asyncio.to_thread(query_from_outside, f"http://127.0.0.1:{port}/v1")
                instance_reply = await asyncio.to_thread(
                    query_from_outside, f"http://127.0.0.1:{cluster_port}/v1", "demo-pipeline"
                )
                assert instance_reply == engine_reply  # a pipeline gives the one-process tokens
                out["after"] = await run(AFTER_QUERIES)
            finally:
                out["cleanup"] = await run(CLEANUP)
            return out
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
        if await km.is_alive():
            await km.shutdown_kernel()


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.source.splitlines()[0].startswith("import exo_lab"), "exo_lab must be the first import"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quickstart_runs_and_keeps_serving(tmp_path: Path) -> None:
    port, cluster_port = free_port(), free_port()
    env = {
        **os.environ,
        "EXO_LAB_PORT": str(port),
        "EXO_LAB_CLUSTER_PORT": str(cluster_port),
        "EXO_LAB_MODELS_DIR": str(tmp_path / "models"),  # empty cache: the demo model is made fresh
        "EXO_LAB_CACHE_DIR": str(tmp_path / "cache"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "HF_HUB_OFFLINE": "1",
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    km = venv_kernel_manager(tmp_path)
    try:
        printed = asyncio.run(run_notebook(nb, km, env, port, cluster_port))
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        nbformat.write(nb, ARTIFACTS / NOTEBOOK.name)

    assert "BLAS: " in cell_text(nb, "import")
    assert (tmp_path / "models" / "demo" / "config.json").is_file()
    assert "finish_reason: length" in cell_text(nb, "usage")
    assert f"127.0.0.1:{port}" in cell_text(nb, "serve")
    assert "usage: CompletionUsage(completion_tokens=32" in cell_text(nb, "stream")
    engine_text = cell_text(nb, "generate")
    assert engine_text and engine_text in cell_text(nb, "client") and engine_text in cell_text(nb, "stream")
    assert port_closes(port), f"port {port} still open after the kernel shut down"

    # the cluster half: nodes, graph, plans, the instance and its monitor, chat, serving
    assert "local-0" in cell_text(nb, "cluster") and "local-1" in cell_text(nb, "cluster")
    for cell_id, views in (("topology", 1), ("preview", 1), ("launch", 2)):  # launch: progress bar + monitor
        assert widget_views(nb, cell_id) == views, f"cell {cell_id} shows {widget_views(nb, cell_id)} widgets"
    assert "pipeline: local-" in cell_text(nb, "pick")
    assert "ready" in cell_text(nb, "launch") and "demo-pipeline" in cell_text(nb, "launch")
    assert "the same reply as the one-process engine: True" in cell_text(nb, "chat")
    assert f"127.0.0.1:{cluster_port}" in cell_text(nb, "serve-cluster")
    assert engine_text in cell_text(nb, "client-cluster")
    assert re.search(r"requests (\d+) \| monitor ready \1 4/4 live=True", printed["after"]), printed["after"]
    assert int(re.search(r"requests (\d+)", printed["after"]).group(1)) >= 4  # chat, client, 2 from outside
    assert port_closes(cluster_port)
    pids = [int(p) for p in re.findall(r"\d+", printed["cleanup"])]
    assert len(pids) == 2 and not [p for p in pids if psutil.pid_exists(p)], printed["cleanup"]
