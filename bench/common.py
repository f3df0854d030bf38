"""Helpers shared by the benchmark scripts: the machine's description, timing and tables.

Not a library: each benchmark imports this file as ``common`` (they run as
``python bench/NAME.py``, which puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's intra-op threads (default: torch's own choice)."""
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: torch's default, one per core)")


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def machine_lines() -> list[str]:
    """What the numbers were measured on, and how busy the machine was when they started."""
    return [
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}",
        f"load average at start: {load_average()}",
    ]


def print_machine() -> None:
    for line in machine_lines():
        print(line)


def print_load_at_end() -> None:
    print(f"load average at end: {load_average()}")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns (a Markdown table when pasted)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def run_child(script: str, args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python script args`` in a fresh process; its last stdout line is a JSON object.

    A fresh process per measurement makes ``ru_maxrss`` the peak of that measurement alone.
    """
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    """The child's answer to ``run_child``."""
    print(json.dumps(result), flush=True)


def reward_evaluation(source: str, name: str, repeats: int) -> dict:
    """Compile and lower ``source``, then time one evaluation of its reward with the backward
    pass (``r_x`` and ``J_r^T v``, as a solver iteration needs them): states, nnz of P, compile
    seconds, median ms, peak resident memory, and the reward's values (for comparing two ways
    of writing it; None above 200,000 numbers)."""
    import bilevel_dsl as brl

    start = time.perf_counter()
    problem = brl.lower(brl.compile_source(source, name), device="cpu")
    compile_s = time.perf_counter() - start
    x = problem.x0.detach().clone().requires_grad_(True)
    weights = torch.randn(problem.n_states, problem.n_actions, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))

    def evaluate_and_pull() -> None:
        torch.autograd.grad((problem.reward(x) * weights).sum(), x)

    times = time_call(evaluate_and_pull, repeats)
    r = problem.reward(x).detach()
    return {"states": problem.n_states, "nnz": problem.transitions.nnz,
            "compile_s": compile_s, "ms": 1e3 * median(times), "peak_mib": peak_rss_mib(),
            "values": r.reshape(-1).tolist() if r.numel() <= 200_000 else None}


def largest_difference(one: dict, other: dict | None) -> str:
    """The largest difference of two ``reward_evaluation`` results' values, for a table, or
    "-" where one was not run or kept no values."""
    if other is None or one["values"] is None:
        return "-"
    return f"{max(abs(a - b) for a, b in zip(one['values'], other['values'])):.1e}"

