"""Run train.py and SIGKILL it at an exact point: a real kill (no cleanup, no exception handlers), injected from
outside the production code by wrapping the functions that mark the point.

    python tests/killrun.py KIND:PATTERN:N -- <train.py arguments>

KIND  log     kill right after the N-th log line matching the regex PATTERN has been printed and written
      before  kill just before the N-th atomic write (vision.atomic_path: json, safetensors, predictions) to a path
              ending in PATTERN
      after   kill just after that write has completed (renamed into place)
Under torchrun, KILL_RANK=r in the environment kills rank r only (default: every rank that reaches the point).
"""
import contextlib
import os
import re
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vision  # noqa: E402


def main():
    sep = sys.argv.index("--")
    kind, rest = sys.argv[1].split(":", 1)
    pattern, n = rest.rsplit(":", 1)
    n, seen = int(n), [0]

    def hit():
        seen[0] += 1
        if seen[0] == n and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", os.environ.get("RANK", "0")):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("before", "after"):  # patched before train and eval import it
        atomic_path = vision.atomic_path

        @contextlib.contextmanager
        def writer(path):
            match = os.fspath(path).endswith(pattern)
            if match and kind == "before":
                hit()
            with atomic_path(path) as tmp:
                yield tmp
            if match and kind == "after":
                hit()
        vision.atomic_path = writer
    elif kind != "log":
        raise SystemExit(f"unknown kill kind {kind!r}: log, before or after")
    import train
    if kind == "log":
        log_call = train.Log.__call__

        def log(self, msg):
            log_call(self, msg)
            if re.search(pattern, msg):
                hit()
        train.Log.__call__ = log
    train.main(sys.argv[sep + 1:])


if __name__ == "__main__":
    main()
