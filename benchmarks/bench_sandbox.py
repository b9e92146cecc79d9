"""The code sandbox's cost per program: the earlier mechanism against the isolated one, side by side.

    python benchmarks/bench_sandbox.py              # 20 runs of each, interleaved (~20 s on 2 cores)
    python benchmarks/bench_sandbox.py --runs 5

`earlier` runs with the protections of the earlier sandbox only (sandbox.FALLBACK_CAPS: own uid,
rlimits, network and mount namespaces; leftovers killed by a helper process of the sandbox's uid);
`isolated` with everything this machine gives (capabilities(): PID and IPC namespaces, a fresh /proc,
a cgroup per run, leftovers killed from outside). Rows: a program that prints one line (run_python);
code_tests' unit of work, a solution against three simple asserts that the trainer judges itself
(run_tests, one process); the same with asserts that need the judge process (two processes, run
side by side). Both columns run the same judging: it measures the jail, not the judging.
`getattr(sandbox, "jail", sandbox)` lets it run on the earlier single-module sandbox too.
Medians of wall time per call, and their ratio. It prints numbers and never asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import time

from grpo.rewards import sandbox

SOLUTION = "def add(a, b):\n    return a + b\n"
WORKLOADS = {
    "print one line (run_python)": lambda: sandbox.run_python({"main.py": "print('ok')"}),
    "3 asserts, checked here (run_tests)": lambda: sandbox.run_tests(
        SOLUTION, ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]),
    "3 asserts, judge process (run_tests)": lambda: sandbox.run_tests(
        SOLUTION, ["assert abs(add(1, 2) - 3) < 1e-9", "assert str(add(2, 2)) == '4'", "assert add(0, 0) + 1 == 1"]),
}


def timed(fn, caps: frozenset[str]) -> float:
    owner = getattr(sandbox, "jail", sandbox)  # where run_python and run_tests look it up at call time
    saved = owner.capabilities
    owner.capabilities = lambda: caps
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        owner.capabilities = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    full = sandbox.capabilities()
    modes = {"earlier": full & sandbox.FALLBACK_CAPS, "isolated": full}
    print("isolated protections:", ", ".join(sorted(full)))
    print(f"{'workload':40s} {'earlier ms':>11s} {'isolated ms':>12s} {'ratio':>6s}")
    for name, fn in WORKLOADS.items():
        times: dict[str, list[float]] = {m: [] for m in modes}
        for m, caps in modes.items():  # warm-up
            timed(fn, caps)
        for _ in range(args.runs):
            for m, caps in modes.items():  # interleaved, so a busy moment hits both
                times[m].append(timed(fn, caps))
        med = {m: statistics.median(t) * 1000 for m, t in times.items()}
        print(f"{name:40s} {med['earlier']:11.1f} {med['isolated']:12.1f} {med['isolated'] / med['earlier']:6.2f}")


if __name__ == "__main__":
    main()
