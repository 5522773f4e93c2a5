"""Running notebooks in a kernel of this venv, and reading their outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from ipykernel.kernelspec import install as install_kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager


def venv_kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """A kernel manager for a ``python3`` kernel run by this interpreter (the venv's).

    The kernelspec is installed into a private prefix and looked up only there, so
    no kernel installed elsewhere on the machine (user, system, another env) is used.
    """
    spec_dir = Path(install_kernelspec(prefix=str(tmp_path / "jupyter"), kernel_name="python3"))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)], ensure_native_kernel=False)
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
    return km


def cell_errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"cell {i} ({cell.get('id')}): {out.ename}: {out.evalue}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]


def widget_views(nb: nbformat.NotebookNode, cell_id: str) -> int:
    """How many widget views a code cell displayed."""
    (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
    return sum("application/vnd.jupyter.widget-view+json" in out.get("data", {}) for out in cell.outputs)


def cell_text(nb: nbformat.NotebookNode, cell_id: str) -> str:
    """Everything a code cell printed or displayed, as text (HTML included)."""
    (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.extend(str(v) for k, v in out.data.items() if k.startswith("text/"))
    return "".join(parts)
