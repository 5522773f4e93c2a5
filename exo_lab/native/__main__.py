"""``python -m exo_lab.native``: build exo_lab's C libraries now (the Makefile's setup does)."""

from exo_lab import native

print(native.library("small_gemm") or "small_gemm: not built (no C compiler, or not Linux x86-64)")
