"""DRLHF (Christiano et al. 2017) in the deep pipeline: Algorithm 5 without the implicit term."""

from .deep.spec import spec_for

SPEC = spec_for("drlhf_sac")
