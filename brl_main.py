"""The `brl` command's entry point.

It imports the compiler (and with it torch, about a second) inside a guard, so that Ctrl-C
while it loads ends quietly with exit status 130 instead of a Python traceback.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from bilevel_dsl.cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return run()
