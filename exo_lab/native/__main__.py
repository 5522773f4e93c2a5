"""``python -m exo_lab.native``: build exo_lab's native code now (the Makefile's setup does)."""

from exo_lab import native

print(native.library("small_gemm") or "small_gemm: not built (no C compiler, or not Linux x86-64)")
print(native.extension_path("weight_matmul") or "weight_matmul: not built (no C++ compiler, MLX headers or nanobind)")
print(native.extension_path("cpu_fallbacks") or "cpu_fallbacks: not built (no C++ compiler, MLX headers or nanobind)")
print(native.extension_path("peer_sum") or "peer_sum: not built (no C++ compiler, MLX headers or nanobind)")
