"""How fast this machine's cores read memory, with and without transparent huge pages.

Decode on a CPU streams every weight once per token, so the read bandwidth of the cores sets its floor
(7.7 GB of bfloat16 weights for the real model). This compiles a small C reader (AVX-512 loads when the
compiler targets them, OpenMP threads) and, in interleaved rounds, reads a buffer that the kernel was asked
to back with 2 MiB pages (``madvise(MADV_HUGEPAGE)``) and one it was asked not to. It prints the best
GB/s of each with the spread, and the ratio. Needs ``gcc``.

    python benchmarks/bench_memory_bandwidth.py                 # 4 GiB, 2 threads, 5 rounds
    python benchmarks/bench_memory_bandwidth.py --gib 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <omp.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

/* argv: bytes, huge (0/1), passes. Prints the huge-page bytes the kernel gave, then one GB/s per pass. */
int main(int argc, char** argv) {
  size_t bytes = strtoull(argv[1], NULL, 10); int huge = atoi(argv[2]), passes = atoi(argv[3]);
  char* p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) { perror("mmap"); return 1; }
  madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  memset(p, 1, bytes);
  long huge_kb = 0; char line[256]; FILE* f = fopen("/proc/self/smaps_rollup", "r");
  while (f && fgets(line, sizeof line, f)) if (!strncmp(line, "AnonHugePages:", 14)) huge_kb = atol(line + 14);
  printf("%ld\n", huge_kb * 1024);
  for (int r = 0; r < passes; r++) {
    double start = now(); float total = 0;
    #pragma omp parallel reduction(+:total)
    {
      float a[16] = {0};
      #pragma omp for schedule(static)
      for (size_t i = 0; i < bytes / 64; i++) {
        const float* q = (const float*)(p + i * 64);
        for (int j = 0; j < 16; j++) a[j] += q[j];
      }
      for (int j = 0; j < 16; j++) total += a[j];
    }
    printf("%.3f %g\n", bytes / (now() - start) / 1e9, total);
  }
  return 0;
}
"""


def build(folder: Path) -> Path:
    """The reader, compiled for this CPU."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("no C compiler: install gcc (scripts/setup.sh installs g++, which brings it)")
    source, binary = folder / "bandwidth.c", folder / "bandwidth"
    source.write_text(SOURCE)
    subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", str(source), "-o", str(binary)], check=True)
    return binary


def read_rates(binary: Path, size: int, huge: bool, passes: int, threads: int) -> tuple[list[float], int]:
    """GB/s of each pass over a fresh buffer, and how many of its bytes the kernel backed with huge pages."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([str(binary), str(size), str(int(huge)), str(passes)], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    return [float(line.split()[0]) for line in out[1:] if line.strip()], int(out[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="buffer size in GiB (default 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="reader threads (all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each (default 5)")
    args = parser.parse_args()
    size = int(args.gib * 2**30) // 64 * 64
    with tempfile.TemporaryDirectory() as folder:
        binary = build(Path(folder))
        rates: dict[bool, list[float]] = {False: [], True: []}
        backed: dict[bool, int] = {}
        for _ in range(args.rounds):
            for huge in (False, True):
                got, backed[huge] = read_rates(binary, size, huge, 3, args.threads)
                rates[huge].append(max(got))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"{args.gib:g} GiB read by {args.threads} thread(s), best of 3 passes per round, {args.rounds} rounds; "
          f"transparent huge pages: {thp.read_text().strip() if thp.exists() else 'unknown'}")
    for huge in (False, True):
        best = max(rates[huge])
        print(f"  {'huge pages' if huge else '4 KiB pages'}: {best:.1f} GB/s (spread {best / min(rates[huge]):.2f}x; "
              f"{backed[huge] / 2**30:.2f} GiB in huge pages)")
    print(f"  huge / 4 KiB: {max(rates[True]) / max(rates[False]):.2f}x")
    fastest = max(max(rates[True]), max(rates[False]))
    print(f"  at most {fastest / 7.7:.2f} tok/s for 7.7 GB of bfloat16 weights per token (the real model)")


if __name__ == "__main__":
    main()
