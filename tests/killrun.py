"""Run train.py and SIGKILL it at an exact point: a real kill (no cleanup, no exception handlers), injected from
outside the production code by wrapping the functions that mark the point.

    python tests/killrun.py KIND:PATTERN:N -- <train.py arguments>

KIND  log     kill right after the N-th log line matching the regex PATTERN has been printed and written
      before  kill just before the N-th atomic write (json, safetensors or predictions) to a path ending in PATTERN
      after   kill just after that write has completed
"""
import os
import re
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cmoe  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402


def main():
    sep = sys.argv.index("--")
    kind, rest = sys.argv[1].split(":", 1)
    pattern, n = rest.rsplit(":", 1)
    n, seen = int(n), [0]

    def hit():
        seen[0] += 1
        if seen[0] == n:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "log":
        log_call = train.Log.__call__

        def log(self, msg):
            log_call(self, msg)
            if re.search(pattern, msg):
                hit()
        train.Log.__call__ = log
    elif kind in ("before", "after"):
        def wrap(fn, path_arg):
            def writer(*a, **kw):
                match = os.fspath(a[path_arg]).endswith(pattern)
                if match and kind == "before":
                    hit()
                out = fn(*a, **kw)
                if match and kind == "after":
                    hit()
                return out
            return writer
        cmoe.save_json, cmoe.save_safetensors = wrap(cmoe.save_json, 1), wrap(cmoe.save_safetensors, 1)
        ev.write_predictions = wrap(ev.write_predictions, 0)
    else:
        raise SystemExit(f"unknown kill kind {kind!r}: log, before or after")
    train.main(sys.argv[sep + 1:])


if __name__ == "__main__":
    main()
