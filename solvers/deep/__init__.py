"""Deep bilevel RL on gymnasium environments: SAC followers and reward networks (issue 5)."""
