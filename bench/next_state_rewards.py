"""A reward in ``(s, a, t)`` whose terms use ``t`` together with ``s``: on P's nonzeros or on
the whole ``S x A x S`` table.

    python bench/next_state_rewards.py [--mazes 40x40,70x70,100x110,300x300] [--repeats 5]
                                       [--table-max-gib 4] [--threads N]

The problem: bench/maze.py's maze (slip 0.1, 4 successors per pair, P stored sparse) with the
goal relocation reward and a term in ``t`` and ``s`` together, either constant in ``x``
(``move``: a price on the distance each move covers, whose values the interpreter computes
once) or not (``scaled``: the distance to the relocated goal weighted by the move's length,
recomputed at every evaluation):

    move:    reward[s, a, t] = - norm(maze.pos[t] - g) - 0.1 * norm(maze.pos[t] - maze.pos[s])
    scaled:  reward[s, a, t] = - norm(maze.pos[t] - g) * (1 + 0.1 * norm(maze.pos[t] - maze.pos[s]))

For each maze and reward, in a fresh process per mode
(so that the peak memory is that mode's): compile and lower time, the median time of one
reward evaluation with its backward pass (``r_x`` and ``J_r^T v``, as a solver iteration
needs them), and the peak resident memory, for

* ``nonzeros``: what brl does now (the term evaluated where ``P[s, a, t] > 0``);
* ``table``: the whole ``S x A x S`` table, as before the thirteenth session (patched in),
  skipped where that table alone would exceed ``--table-max-gib``.

Both give the same numbers (the largest difference is printed). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import importlib

import common
import maze
import torch

MODES = ("nonzeros", "table")
REWARDS = {
    "move": "- norm(maze.pos[t] - g) - 0.1 * norm(maze.pos[t] - maze.pos[s])",
    "scaled": "- norm(maze.pos[t] - g) * (1 + 0.1 * norm(maze.pos[t] - maze.pos[s]))",
}


def source(rows: int, cols: int, reward: str) -> str:
    return f'''brl 1
problem move_price "goal relocation with a price per distance moved, {rows} x {cols} maze"
mdp maze = gridworld(map = """
{maze.maze_map(rows, cols)}
""", slip = 0.1, discount = 0.99)
var g[2] = [{round(0.8 * rows)}, {round(0.8 * cols)}]
lower maze {{
    temperature = 0.05
    reward[s, a, t] = {REWARDS[reward]}
}}
upper minimize 0.005 * norm2(g - maze.goal_pos)
'''


def whole_table() -> None:
    """Make lower_reward build the S x A x S table of each term in t and s or a."""
    elaborate = importlib.import_module("bilevel_dsl.elaborate")

    def on_table(info, term, scope, P, sets):
        v = elaborate._reward_value(info, term, scope, sets)
        sizes = {name: s.size for name, s in zip(info.indices, sets)}
        table = elaborate.expand_axes(v, info.indices, sizes).to(torch.float64)
        return elaborate.expected_over_next(P, table)

    elaborate._on_transitions = on_table


def child(rows: int, cols: int, reward: str, mode: str, repeats: int) -> None:
    if mode == "table":
        whole_table()
    common.emit(common.reward_evaluation(source(rows, cols, reward), f"{reward}.brl", repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mazes", default="40x40,70x70,100x110,300x300")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table-max-gib", type=float, default=4.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    common.add_machine_options(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.child:
        rows, cols, reward, mode = args.child.split(",")
        child(int(rows), int(cols), reward, mode, args.repeats)
        return
    common.print_machine()
    out = []
    for size, reward in ((size, reward) for size in args.mazes.split(",") for reward in REWARDS):
        rows, cols = map(int, size.lower().split("x"))
        results = {}
        for mode in MODES:
            child_args = ["--child", f"{rows},{cols},{reward},{mode}", "--repeats",
                          str(args.repeats), "--threads", str(args.threads)]
            if mode == "table":
                states = results["nonzeros"]["states"]
                if states * 4 * states * 8 > args.table_max_gib * 2**30:
                    results[mode] = None
                    continue
            results[mode] = common.run_child(__file__, child_args)
        fast, slow = results["nonzeros"], results["table"]
        differs = common.largest_difference(fast, slow)
        out.append([
            f"{rows} x {cols}", reward, f"{fast['states']:,}", f"{fast['nnz']:,}",
            f"{fast['compile_s']:.2f}", f"{fast['ms']:.2f}", f"{fast['peak_mib']:,.0f}",
            "-" if slow is None else f"{slow['compile_s']:.2f}",
            "-" if slow is None else f"{slow['ms']:.1f}",
            "-" if slow is None else f"{slow['peak_mib']:,.0f}",
            "-" if slow is None else f"{slow['ms'] / fast['ms']:.1f}x", differs,
        ])
    print(common.table(
        ["maze", "reward", "states", "nnz(P)", "compile s", "ms/eval", "peak MiB",
         "table: compile s", "table: ms/eval", "table: peak MiB", "speed-up", "max |diff|"],
        out))
    common.print_load_at_end()


if __name__ == "__main__":
    main()
