"""SAC on the environment's true reward: the ceiling the RLHF solvers are measured against."""

from .deep.spec import spec_for

SPEC = spec_for("sac_true")
