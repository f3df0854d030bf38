"""The `brl` command's entry point.

It imports the compiler (and with it torch, about a second) with Ctrl-C held: an interrupt
raised inside torch's start-up, where native code calls back into Python, was seen to abort
the process (`terminate called after throwing ... KeyboardInterrupt`, exit 134, twice in
40 tries). A Ctrl-C that arrives meanwhile ends the command once the import is done, quietly,
with exit status 130.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    received: list[int] = []
    previous = None
    try:
        current = signal.getsignal(signal.SIGINT)
        # ignored, it stays so; a handler installed from C (None) could not be put back
        if current is not None and current is not signal.SIG_IGN:
            previous = signal.signal(signal.SIGINT, lambda signum, _: received.append(signum))
    except ValueError:  # not the main thread: signals are not ours to hold
        pass
    try:
        from bilevel_dsl.cli import main as run
    except KeyboardInterrupt:  # a handler of the caller's own, say
        received.append(signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if received:
        print("interrupted", file=sys.stderr)
        return 130
    return run()
