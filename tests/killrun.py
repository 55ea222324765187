"""Run train.py and SIGKILL it at an exact point: a real kill (no cleanup, no exception handlers), injected from
outside the production code by wrapping the functions that mark the point.

    python tests/killrun.py KIND:PATTERN:N -- <train.py arguments>

KIND  log     kill right after the N-th log line matching the regex PATTERN has been printed and written
      before  kill just before the N-th atomic write (data.atomic_path: json, safetensors, predictions) to a path
              ending in PATTERN
      after   kill just after that write has completed (renamed into place)
Under torchrun, KILL_RANK=r in the environment kills rank r only (default: every rank that reaches the point).

From Python (the tests), `killed(point, argv, log)` runs the same in a process forked from a server that has
imported torch once: a fresh process each time, without paying torch's import for each kill. (multiprocessing
re-imports the caller's main module in each process: call it from pytest or from a script file, not from stdin.)
"""
import contextlib
import multiprocessing
import os
import re
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def arm(point):
    """Patch the functions that mark `point`; returns the train module (imported after the patch)."""
    kind, rest = point.split(":", 1)
    pattern, n = rest.rsplit(":", 1)
    n, seen = int(n), [0]

    def hit():
        seen[0] += 1
        if seen[0] == n and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", os.environ.get("RANK", "0")):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    import data
    if kind in ("before", "after"):  # patched before train and eval import it
        atomic_path = data.atomic_path

        @contextlib.contextmanager
        def writer(path):
            match = os.fspath(path).endswith(pattern)
            if match and kind == "before":
                hit()
            with atomic_path(path) as tmp:
                yield tmp
            if match and kind == "after":
                hit()
        data.atomic_path = writer
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
    return train


def _child(point, argv, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    arm(point).main(argv)


_server = None


def killed(point, argv, log):
    """Run `train.main(argv)` in a fresh process with `point` armed; its output goes to the file `log`. Returns the
    exit code (-9: killed at the point). The process forks from a server that has imported torch and torch._dynamo
    (AdamW imports it), but not this project's modules, so `arm` still patches before train imports them."""
    global _server
    if _server is None:
        _server = multiprocessing.get_context("forkserver")
        _server.set_forkserver_preload(["torch", "torch._dynamo", "torch.optim"])
    p = _server.Process(target=_child, args=(point, list(argv), os.fspath(log)))
    p.start()
    p.join(120)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise TimeoutError(f"kill point {point!r}: the run did not end in 120 s (log: {log})")
    return p.exitcode


def main():
    sep = sys.argv.index("--")
    arm(sys.argv[1]).main(sys.argv[sep + 1:])


if __name__ == "__main__":
    main()
