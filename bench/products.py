"""The C++ kernel's small matrix products alone: MKL's GEMM (the `sgemm_` libtorch_cpu exports)
against the kernel's own loops (A B and A^T B in register blocks; A B^T through the tiled
transposed copy), and the kernel's `mm`, which routes each shape to one of them. One JSON line
per shape: best microseconds a call over 7 runs of `--reps` calls, same operands each call
(warm caches, as inside a chunk), 1 thread, float32, C += A B.

    python bench/products.py                                 # the study and layer sizes' shapes
    python bench/products.py --shapes NT:16x32x128,NN:16x128x32

The driver includes `components/ops/memory/cpu_kernel.cpp` and is built with the kernel's own
flags (`cpu_loop.FLAGS`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (op, m, n, k): the MLP memory's products at the study size (chunk 16, 32 -> 128 -> 32), the
# quickstart's (chunk 8, 16 -> 64 -> 64 -> 16) and the layer benchmark's (chunk 64, 64 -> 256 -> 64)
SHAPES = [
    ("NN", 16, 128, 32), ("NN", 16, 32, 128), ("NN", 8, 64, 64), ("NN", 64, 256, 64), ("NN", 64, 64, 256),
    ("TN", 32, 128, 16), ("TN", 128, 32, 16), ("TN", 64, 64, 8), ("TN", 64, 256, 64),
    ("NT", 16, 16, 128), ("NT", 16, 32, 128), ("NT", 16, 128, 32), ("NT", 16, 16, 32), ("NT", 8, 64, 64),
    ("NT", 8, 16, 64), ("NT", 16, 64, 64), ("NT", 16, 64, 256), ("NT", 32, 32, 128), ("NT", 64, 32, 128),
    ("NT", 32, 64, 256), ("NT", 64, 64, 64), ("NT", 64, 64, 256), ("NT", 64, 256, 64), ("NT", 16, 128, 64),
]  # fmt: skip

DRIVER = r"""
#include "@SOURCE@"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

template <typename F>
double best_us(F&& f, int reps) {
    for (int i = 0; i < reps / 10 + 1; ++i) f();
    double best = 1e30;
    for (int r = 0; r < 7; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; ++i) f();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
    }
    return best * 1e6;
}

// argv: reps, then op m n k per shape; prints op m n k mkl_us own_us mm_us per line
int main(int argc, char** argv) {
    const int reps = std::atoi(argv[1]);
    std::mt19937 g(0);
    std::uniform_real_distribution<float> u(-1, 1);
    for (int a = 2; a + 3 < argc; a += 4) {
        const bool ta = argv[a][0] == 'T', tb = argv[a][1] == 'T';
        const int m = std::atoi(argv[a + 1]), n = std::atoi(argv[a + 2]), k = std::atoi(argv[a + 3]);
        std::vector<float> A((long)m * k), B((long)k * n), C((long)m * n), bt((long)k * n);
        for (auto& x : A) x = u(g);
        for (auto& x : B) x = u(g);
        const int lda = ta ? m : k, ldb = tb ? k : n;
        const double mkl = best_us([&] {
            gemm(tb ? "T" : "N", ta ? "T" : "N", n, m, k, 1.0f, B.data(), ldb, A.data(), lda, 1.0f, C.data(), n);
        }, reps);
        const double own = best_us([&] {
            if (tb) transpose<float>(n, k, B.data(), bt.data());
            small_mm<float>(ta, m, n, k, A.data(), tb ? bt.data() : B.data(), C.data(), 1.0f, 1.0f);
        }, reps);
        const double routed = best_us([&] {
            mm<float>(ta, tb, m, n, k, A.data(), B.data(), C.data(), 1.0f, 1.0f);
        }, reps);
        std::printf("%s %d %d %d %.4f %.4f %.4f\n", argv[a], m, n, k, mkl, own, routed);
    }
}
"""


def build(out: Path) -> None:
    import torch

    from components.ops.memory import cpu_loop

    src = out.with_suffix(".cpp")
    src.write_text(DRIVER.replace("@SOURCE@", str(cpu_loop.SOURCE)))
    flags = [f for f in cpu_loop.FLAGS if f not in ("-shared", "-fPIC")]  # an executable, not a library
    link = cpu_loop.link_flags(Path(torch.__file__).parent / "lib")
    subprocess.run([cpu_loop.compiler() or "c++", *flags, str(src), "-o", str(out), *link], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="op:MxNxK,... (op NN, TN or NT: which of A, B is transposed)")
    p.add_argument("--reps", type=int, default=20000)
    args = p.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [(s.split(":")[0], *map(int, s.split(":")[1].split("x"))) for s in args.shapes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "products"
        build(exe)
        argv = [str(exe), str(args.reps)] + [str(x) for s in shapes for x in s]
        one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
        lines = subprocess.run(argv, check=True, capture_output=True, text=True, env=one_thread).stdout
    for line in lines.splitlines():
        op, m, n, k, mkl, own, routed = line.split()
        m, n, k, mkl, own, routed = int(m), int(n), int(k), float(mkl), float(own), float(routed)
        flops = 2 * m * n * k
        print(json.dumps({
            "op": op, "m": m, "n": n, "k": k, "mkl_us": mkl, "own_us": own, "mm_us": routed,
            "mkl_gflop_per_s": flops / mkl / 1e3, "own_gflop_per_s": flops / own / 1e3
        }))  # fmt: skip


if __name__ == "__main__":
    main()
