"""CPU threads side by side: ``vlprompt demo --quick`` with ``--threads 1``, ``2`` and torch's default (``0``),
on the machine as it is and beside busy-loop processes that stand for other jobs sharing the cores.

    python benchmarks/bench_threads.py                       # threads 1,2,0; 0 and 1 busy processes; 1 round
    python benchmarks/bench_threads.py --threads 1,2 --busy 0,1,2 --rounds 2

Each run is a fresh ``vlprompt demo --quick`` (zero-shot CLIP and CoOp, base-to-new on the toy world) in its own
folder, the generated images copied in from a warm-up run so that only training and evaluation are timed. The
candidates take turns within a round, so a change in the machine's load hits all of them alike. Prints the wall
times, the ratio of each to one thread, and the load averages (``os.getloadavg``) before each run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def demo_command(output: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "vlprompt.cli", "demo", "--quick", "--device", "cpu", "--threads", str(threads),
            "--output", output]


def clean_env() -> dict[str, str]:
    """The environment without thread settings, so that ``--threads`` alone decides (0: torch's default)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def start_busy(count: int) -> list[subprocess.Popen]:
    """``count`` processes spinning one core each: other jobs on a shared machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def timed_run(workdir: str, warm: str, threads: int, tag: str) -> float:
    output = os.path.join(workdir, tag)
    for part in ("data", "cache"):  # the generated images and few-shot subsets of the warm-up run
        shutil.copytree(os.path.join(warm, part), os.path.join(output, part))
    started = time.perf_counter()
    subprocess.run(demo_command(output, threads), env=clean_env(), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    shutil.rmtree(output)
    return seconds


def load_text() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2,0", help="candidates, comma-separated; 0 = torch's default "
                        "(default 1,2,0)")
    parser.add_argument("--busy", default="0,1", help="busy-loop processes beside the run, comma-separated "
                        "(default 0,1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the median is reported (default 1)")
    args = parser.parse_args(argv)
    candidates = [int(t) for t in args.threads.split(",")]
    busy_counts = [int(b) for b in args.busy.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_threads-") as workdir:
        warm = os.path.join(workdir, "warm")
        print(f"warm-up run (generates the data), load {load_text()}", flush=True)
        subprocess.run(demo_command(warm, 1), env=clean_env(), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times: dict[tuple[int, int], list[float]] = {}
        loads: dict[tuple[int, int], list[str]] = {}
        for round_index in range(args.rounds):
            for busy in busy_counts:
                processes = start_busy(busy)
                try:
                    for threads in candidates:
                        key = (busy, threads)
                        loads.setdefault(key, []).append(load_text())
                        seconds = timed_run(workdir, warm, threads, f"r{round_index}-b{busy}-t{threads}")
                        times.setdefault(key, []).append(seconds)
                        print(f"round {round_index + 1}, {busy} busy, threads {threads or 'torch default'}: "
                              f"{seconds:.1f} s (load before {loads[key][-1]})", flush=True)
                finally:
                    for process in processes:
                        process.kill()
                        process.wait()

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    print()
    print(f"`vlprompt demo --quick`, {os.cpu_count()} CPUs, median of {args.rounds} round(s); ratio = time / time "
          "with 1 thread at the same load")
    print()
    print("| busy processes beside it | threads | time | ratio to 1 thread | load average before (1/5/15 min) |")
    print("|---|---|---|---|---|")
    for busy in busy_counts:
        base = median(times[(busy, 1)]) if (busy, 1) in times else None
        for threads in candidates:
            seconds = median(times[(busy, threads)])
            ratio = f"{seconds / base:.2f}x" if base else "-"
            label = f"{threads}" if threads else f"torch default ({os.cpu_count()})"
            print(f"| {busy} | {label} | {seconds:.1f} s | {ratio} | {'; '.join(loads[(busy, threads)])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
