"""`sum {...} f1 * ... * fn` contracted without building the product, against term by term.

    python bench/sums_of_products.py [--mazes 20x20,40x40,55x55,100x110,300x300] [--repeats 5]
                                     [--threads N]

Rewards of the README's form, on bench/maze.py's maze (slip 0.1, P stored sparse from a few
thousand entries up):

    readme:  reward[s, a] = - sum {t in maze.S} maze.P[s, a, t] * norm(maze.pos[t] - g)
    kernel:  reward[s, a] = - sum {t in maze.S} near[s, t] * norm(maze.pos[t] - g) * (a + 1)

(``near[s, t] = exp(-||pos[s] - pos[t]||)``, a constant S x S table). Each is measured as
written (``contracted``: `readme` is one product with P as stored, ``P.expect``; `kernel` one
einsum) and written ``sum {t in maze.S} (0 + ...)``, whose body is no product, so that the
interpreter builds the whole ``S x A x S`` product and then sums it (``term by term``: what brl
did with both before the sixteenth session). In a fresh process per measurement: compile and
lower time, the median time of one reward evaluation with its backward pass (``r_x`` and
``J_r^T v``, as a solver iteration needs them) and the peak resident memory. Term by term is
skipped where brl refuses it (``maze.P`` indexed entry by entry beyond 50 M entries) or where
its table would pass 4 GiB; `kernel` where ``near`` would pass 20 M entries. Both forms give the
same numbers (the largest difference is printed). Not a test: it measures.
"""

from __future__ import annotations

import argparse

import common
import maze

REWARDS = {
    "readme": "maze.P[s, a, t] * norm(maze.pos[t] - g)",
    "kernel": "near[s, t] * norm(maze.pos[t] - g) * (a + 1)",
}
MODES = ("contracted", "term by term")
TABLE_LIMIT = 50_000_000  # entries: brl's DENSE_INDEXING_LIMIT, and 400 MB of doubles
KERNEL_LIMIT = 20_000_000


def source(rows: int, cols: int, reward: str, mode: str) -> str:
    body = REWARDS[reward] if mode == "contracted" else f"(0 + {REWARDS[reward]})"
    near = ("let near[s in maze.S, t in maze.S] = exp(-norm(maze.pos[s] - maze.pos[t]))"
            if reward == "kernel" else "")
    return f'''brl 1
problem sums "goal relocation, {rows} x {cols} maze"
mdp maze = gridworld(map = """
{maze.maze_map(rows, cols)}
""", slip = 0.1, discount = 0.99)
{near}
var g[2] = [{round(0.8 * rows)}, {round(0.8 * cols)}]
lower maze {{
    temperature = 0.05
    reward[s, a] = - sum {{t in maze.S}} {body}
}}
upper minimize 0.005 * norm2(g - maze.goal_pos)
'''


def child(rows: int, cols: int, reward: str, mode: str, repeats: int) -> None:
    common.emit(common.reward_evaluation(source(rows, cols, reward, mode), f"{reward}.brl",
                                         repeats))


def states_of(rows: int, cols: int) -> int:
    return sum(c != "#" for c in maze.maze_map(rows, cols) if c != "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mazes", default="20x20,40x40,55x55,100x110,300x300")
    parser.add_argument("--repeats", type=int, default=5)
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
    for size in args.mazes.split(","):
        rows, cols = map(int, size.lower().split("x"))
        states = states_of(rows, cols)
        for reward in REWARDS:
            if reward == "kernel" and states * states > KERNEL_LIMIT:
                continue
            results = {}
            for mode in MODES:
                if mode == "term by term" and states * 4 * states > TABLE_LIMIT:
                    results[mode] = None
                    continue
                results[mode] = common.run_child(__file__, [
                    "--child", f"{rows},{cols},{reward},{mode}", "--repeats",
                    str(args.repeats), "--threads", str(args.threads)])
            fast, slow = results["contracted"], results["term by term"]
            differs = common.largest_difference(fast, slow)
            out.append([
                f"{rows} x {cols}", reward, f"{states:,}", f"{fast['compile_s']:.2f}",
                f"{fast['ms']:.2f}", f"{fast['peak_mib']:,.0f}",
                "-" if slow is None else f"{slow['compile_s']:.2f}",
                "-" if slow is None else f"{slow['ms']:.1f}",
                "-" if slow is None else f"{slow['peak_mib']:,.0f}",
                "-" if slow is None else f"{slow['ms'] / fast['ms']:.1f}x", differs,
            ])
    print(common.table(
        ["maze", "reward", "states", "compile s", "ms/eval", "peak MiB",
         "term by term: compile s", "ms/eval", "peak MiB", "speed-up", "max |diff|"], out))
    common.print_load_at_end()


if __name__ == "__main__":
    main()
