"""Sibling quantized products of one input as one product: a layer's q/k/v projections, its MLP's gate and up.

A llama-1b decode step in q4 makes 113 products; 48 of them are small siblings reading the same input (k and v
are 0.6 MB each). On two cores each call pays its own start (waking the second thread, the prefetch's first
misses) and end (the threads' uneven finish): the 112 layer products took 23.9 ms on this project's 2-core
host, the same bytes as 64 products (q|k|v and gate|up concatenated) 20.9 ms; on one core 39.0 -> 38.6.

:func:`share_rows` concatenates each group's weights row-wise (codes, scales and biases, one layer at a time so
the copy never holds more than a layer twice) and leaves each member a view of its rows, so every member still
computes alone where it must. The first member called with an input computes the whole group's product and
keeps its siblings' columns for them; a sibling called with the same input (the same array object) takes them,
any other call computes its own rows. exo_lab's kernel computes each output element with the same operations
whatever rows surround it, so the tokens are those of the separate products (``tests/unit/test_shared_rows.py``).
Only members computing with that kernel (:func:`exo_lab.models.qmatmul.matmul` on fp32, 4 or 8 bits, fp32 scales
and biases) are grouped: a BLAS's result may depend on the rows around it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from exo_lab.models import qmatmul

#: attribute names of the members of a group, in the order their rows are laid out
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: the arrays a member's rows are made of
PARTS = ("weight", "scales", "biases")


class RowGroup:
    """The concatenated weights of a group of sibling products and the columns of its last product."""

    def __init__(self, members: list[Any]) -> None:
        first = members[0]
        self.group_size: int = first.group_size
        self.bits: int = first.bits
        self.lanes: bool = getattr(first, "lanes", False)  # the rows in lane order (qmatmul.use_lanes)
        self.weight, self.scales, self.biases = (mx.concatenate([m[k] for m in members]) for k in PARTS)
        ends = [0]
        for m in members:
            ends.append(ends[-1] + m["weight"].shape[0])
        self.ends = ends
        self._input: mx.array | None = None
        self._columns: list[mx.array | None] = []

    def rows(self, index: int) -> dict[str, mx.array]:
        """Member ``index``'s weights: views of its rows of the concatenated ones."""
        a, b = self.ends[index], self.ends[index + 1]
        return {"weight": self.weight[a:b], "scales": self.scales[a:b], "biases": self.biases[a:b]}

    def take(self, index: int, x: mx.array) -> mx.array | None:
        """Member ``index``'s product with ``x`` from the group's product (computed now unless a sibling's call
        with this ``x`` left it), or None where the kernel does not compute it (the member computes alone)."""
        if self._input is not x or self._columns[index] is None:
            if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
                return None
            y = qmatmul.matmul(x, self.weight, self.scales, self.biases, self.group_size, self.bits, lanes=self.lanes)
            self._input = x
            self._columns = list(mx.split(y, self.ends[1:-1], axis=-1))
        out, self._columns[index] = self._columns[index], None
        if all(c is None for c in self._columns):
            self._input = None  # every member took its columns: hold nothing past the step
        return out


class _SharesRows:
    """A quantized linear whose rows are part of a :class:`RowGroup`."""

    _group: RowGroup
    _index: int

    def __call__(self, x: mx.array) -> mx.array:
        y = self._group.take(self._index, x)
        if y is None:
            return super().__call__(x)  # type: ignore[misc]
        return y + self["bias"] if "bias" in self else y  # type: ignore[index, operator]


class SharedRowsLinear(_SharesRows, qmatmul.CoreQuantizedLinear):
    """A :class:`~exo_lab.models.qmatmul.CoreQuantizedLinear` computing with its siblings (:class:`RowGroup`)."""


class SharedRowsAllToShardedLinear(_SharesRows, qmatmul.CoreQuantizedAllToShardedLinear):
    """A tensor rank's column slice computing with its siblings (:class:`RowGroup`)."""


#: the class each groupable class becomes
SHARING: dict[type, type] = {
    qmatmul.CoreQuantizedLinear: SharedRowsLinear,
    qmatmul.CoreQuantizedAllToShardedLinear: SharedRowsAllToShardedLinear,
}


def _groupable(members: list[Any]) -> bool:
    first = members[0]
    return all(
        type(m) in SHARING
        and getattr(m, "mode", "affine") == "affine"
        and (m.group_size, m.bits) == (first.group_size, first.bits)
        and getattr(m, "lanes", False) == getattr(first, "lanes", False)
        and m["weight"].shape[1:] == first["weight"].shape[1:]
        and "biases" in m
        and qmatmul._native(m["scales"], m["biases"], m.group_size, m.bits)
        for m in members
    )


def share_rows(model: nn.Module) -> int:
    """Group the sibling products of ``model``'s modules (:data:`GROUPS`) that exo_lab's kernel computes, in
    place; how many groups were made."""
    made = 0
    for _, parent in model.named_modules():
        for names in GROUPS:
            found = [parent.get(n) if isinstance(parent, dict) else None for n in names]
            members: list[Any] = [m for m in found if m is not None]
            if len(members) < len(names) or not _groupable(members):
                continue
            group = RowGroup(members)
            for index, m in enumerate(members):
                m.update(group.rows(index))
                m.__class__ = SHARING[type(m)]
                m._group, m._index = group, index
            mx.eval([m.parameters() for m in members])  # the separate copies go now, one group at a time
            made += 1
    return made
