"""MDP generators: grid worlds from ASCII maps, and the paper's random MDPs."""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch

from .instance import GridLayout
from .ir import Span
from .softmdp import Transitions
from .values import DTYPE, EvalError, MdpValue, SetValue, Val

GRID_ACTIONS = ("up", "down", "left", "right")
GRID_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))
_NOT_A_CELL = re.compile(r"[^.#SG]")


def _map_rows(text: str, span: Span, triple: bool) -> list[tuple[str, int, int]]:
    """Non-blank map lines with the (line, column) of their first cell in the source file."""
    rows = []
    for i, raw in enumerate(text.split("\n")):
        stripped = raw.strip()
        if not stripped:
            continue
        lead = len(raw) - len(raw.lstrip())
        if i == 0:
            line, column = span.line, span.column + (3 if triple else 1) + lead
        else:
            line, column = span.line + i, lead + 1
        rows.append((stripped, line, column))
    return rows


def gridworld(
    name: str,
    text: str,
    span: Span,
    triple_quoted: bool,
    slip: float,
    discount: float,
    goal_reward: float,
    step_reward: float,
    terminal_goal: bool,
) -> MdpValue:
    rows = _map_rows(text, span, triple_quoted)
    if not rows:
        raise EvalError("E405", "the map is empty", span,
                        'draw it with `.` free cells, `#` walls, `S` start and `G` goal')
    width = len(rows[0][0])
    # A one-line string with `\n` escapes has no source position per cell: point at all of it.
    escaped = not triple_quoted and "\n" in text

    def at(line: int, column: int, length: int) -> Span:
        return span if escaped else Span(line, column, line, column + length)

    for r, (row, line, column) in enumerate(rows):
        if len(row) != width:
            raise EvalError("E405", f"map row {r + 1} has {len(row)} cells but row 1 has {width}",
                            at(line, column, len(row)),
                            "every row of the map must have the same width")
        if (bad := _NOT_A_CELL.search(row)) is not None:
            raise EvalError("E405", f"unknown map cell `{bad.group()}`",
                            at(line, column + bad.start(), 1),
                            "cells are `.` free, `#` wall, `S` start, `G` goal")
    # one byte per cell (every cell is one of `.#SG` now), states in reading order
    grid = np.frombuffer("".join(row for row, _, _ in rows).encode("ascii"),
                         dtype=np.uint8).reshape(len(rows), width)
    for mark, what in ((b"S", "start `S`"), (b"G", "goal `G`")):
        found = np.argwhere(grid == mark[0])
        if len(found) != 1:
            where = span
            if len(found) > 1:
                r, c = found[1]
                where = at(rows[r][1], rows[r][2] + c, 1)
            raise EvalError("E405", f"the map needs exactly one {what}, found {len(found)}",
                            where)
    free = grid != ord("#")
    cells = np.argwhere(free)
    S, A = len(cells), len(GRID_ACTIONS)
    index = np.full(grid.shape, -1, dtype=np.int64)
    index[free] = np.arange(S)
    start = int(index[grid == ord("S")][0])
    goal_index = int(index[grid == ord("G")][0])
    # next_state[s, d]: where moving in direction d from s lands (off the map or into a wall
    # stays put)
    padded = np.full((grid.shape[0] + 2, width + 2), -1, dtype=np.int64)
    padded[1:-1, 1:-1] = index
    next_state = np.empty((S, A), dtype=np.int64)
    for d, (dr, dc) in enumerate(GRID_MOVES):
        target = padded[cells[:, 0] + 1 + dr, cells[:, 1] + 1 + dc]
        next_state[:, d] = np.where(target >= 0, target, np.arange(S))
    moves = scipy.sparse.csr_matrix((np.ones(S * A), (np.repeat(np.arange(S), A),
                                                      next_state.reshape(-1))), shape=(S, S))
    reached = scipy.sparse.csgraph.breadth_first_order(moves, start, return_predecessors=False)
    if not (reached == goal_index).any():
        r, c = cells[goal_index]
        raise EvalError("E405", "the goal cannot be reached from the start",
                        at(rows[r][1], rows[r][2] + c, 1), "open a path through the walls")
    # Intended move with probability 1 - slip, each other direction with slip / 3.
    probs = np.full((A, A), slip / (A - 1))
    np.fill_diagonal(probs, 1.0 - slip)
    rows_idx = np.repeat(np.arange(S * A), A)
    cols_idx = next_state[:, None, :].repeat(A, axis=1).reshape(-1)
    values = np.tile(probs.reshape(-1), S)
    P = Transitions.auto((torch.from_numpy(rows_idx), torch.from_numpy(cols_idx),
                          torch.from_numpy(values).to(DTYPE)), S, A)
    at_goal = torch.zeros(S, dtype=DTYPE)
    at_goal[goal_index] = 1.0
    reward = goal_reward * P.expect(at_goal) + step_reward
    terminal = torch.zeros(S, dtype=torch.bool)
    if terminal_goal:
        terminal[goal_index] = True
        reward[goal_index] = 0.0
    initial = torch.zeros(S, dtype=DTYPE)
    initial[start] = 1.0
    states = SetValue(f"{name}.S", S)
    actions = SetValue(f"{name}.A", A, GRID_ACTIONS)
    coords = SetValue("coordinates", 2, ("row", "col"))
    pos = torch.from_numpy(cells.astype(np.float64))
    extras = {
        "pos": Val(pos, (), (states, coords)),
        "goal": Val(torch.tensor(float(goal_index), dtype=DTYPE), kind="int"),
        "start": Val(torch.tensor(float(start), dtype=DTYPE), kind="int"),
        "goal_pos": Val(pos[goal_index].clone(), (), (coords,)),
        "start_pos": Val(pos[start].clone(), (), (coords,)),
    }
    walls = np.argwhere(~free)
    layout = GridLayout(len(rows), width, tuple(map(tuple, cells.tolist())),
                        tuple(map(tuple, walls.tolist())), start, goal_index, GRID_ACTIONS,
                        GRID_MOVES)
    return MdpValue(name, states, actions, P, reward, initial, discount, terminal, extras, layout)


def random_mdp(
    name: str,
    n_states: int,
    n_actions: int,
    discount: float,
    successors: int | None,
    rng: np.random.Generator,
) -> MdpValue:
    """The paper's synthetic generator (MATH.md): each (s, a) gets n successors drawn without
    replacement, with Uniform(0, 1) weights normalised; n ~ Uniform{1..S-1} unless `successors`
    fixes it."""
    S, A = n_states, n_actions
    rows_n = S * A
    if successors is None:
        counts = rng.integers(1, max(S - 1, 1) + 1, size=rows_n) if S > 1 else np.ones(rows_n,
                                                                                   dtype=np.int64)
    else:
        counts = np.full(rows_n, successors, dtype=np.int64)
    if S <= 512:
        # Without replacement: the first n entries of a random permutation of the states.
        order = np.argsort(rng.random((rows_n, S)), axis=1)
        keep = np.arange(S)[None, :] < counts[:, None]
        rows_idx = np.nonzero(keep)[0]
        cols_idx = order[keep]
    else:
        k = int(counts.max())
        cols = rng.integers(0, S, size=(rows_n, k))
        # Redraw the (rare) duplicates within a row until every row's successors are distinct.
        while True:
            sorted_cols = np.sort(cols, axis=1)
            dup_rows = np.nonzero((sorted_cols[:, 1:] == sorted_cols[:, :-1]).any(axis=1))[0]
            if dup_rows.size == 0:
                break
            cols[dup_rows] = rng.integers(0, S, size=(dup_rows.size, k))
        keep = np.arange(k)[None, :] < counts[:, None]
        rows_idx = np.nonzero(keep)[0]
        cols_idx = cols[keep]
    weights = rng.random(rows_idx.size)
    sums = np.bincount(rows_idx, weights=weights, minlength=rows_n)
    values = weights / sums[rows_idx]
    P = Transitions.auto((torch.from_numpy(rows_idx.astype(np.int64)),
                          torch.from_numpy(cols_idx.astype(np.int64)),
                          torch.from_numpy(values).to(DTYPE)), S, A)
    states = SetValue(f"{name}.S", S)
    actions = SetValue(f"{name}.A", A)
    return MdpValue(
        name, states, actions, P,
        reward=torch.zeros(S, A, dtype=DTYPE),
        initial=torch.full((S,), 1.0 / S, dtype=DTYPE),
        discount=discount,
        terminal=torch.zeros(S, dtype=torch.bool),
    )
