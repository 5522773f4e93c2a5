"""``python -m exo_lab.native``: build exo_lab's native code now (the Makefile's setup does), each source in a
compiler of its own at once (on two cores ~43 s one after another, the longest alone ~25 s)."""

from concurrent.futures import ThreadPoolExecutor

from exo_lab import native

EXTENSIONS = ("weight_matmul", "cpu_fallbacks", "peer_sum")

with ThreadPoolExecutor(len(EXTENSIONS) + 1) as pool:
    gemm = pool.submit(native.library, "small_gemm")
    built = {name: pool.submit(native.extension_path, name) for name in EXTENSIONS}
    print(gemm.result() or "small_gemm: not built (no C compiler, or not Linux x86-64)")
    for name, path in built.items():
        print(path.result() or f"{name}: not built (no C++ compiler, MLX headers or nanobind)")
