"""Deep SoBiRL (the paper's Algorithm 5); the algorithm is in solvers/deep/sobirl_sac.py."""

from .deep.spec import spec_for

SPEC = spec_for("sobirl_sac")
