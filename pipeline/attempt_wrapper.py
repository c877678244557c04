"""``python -m pipeline.attempt_wrapper RESULT_FILE [--setup ARG...] -- COMMAND ARG...``: run one harness attempt
and write its outcome to ``RESULT_FILE``, whatever happens to the worker that started it.

The worker starts this wrapper in a session of its own (so the whole process group can be killed at the deadline)
and with the attempt's environment. When the worker dies (``kill -9``, a crash), the wrapper and the harness keep
running and the result file still appears; the worker that takes the claim over *adopts* the attempt instead of
starting the harness a second time (:mod:`pipeline.harness`). That is what makes "each attempt runs once" hold
across worker crashes.

Result file (JSON, written atomically): ``{"setup_exit": int | null, "exit_code": int | null,
"error": str | null, "ended_at": unix s}``; ``exit_code`` is ``-N`` when the command died of signal ``N``, ``127``
when it could not be started (``error`` says why). stdin is whatever the worker gave (``/dev/null``); stdout and
stderr are inherited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _run(argv: list[str]) -> tuple[int, str | None]:
    try:
        return subprocess.run(argv).returncode, None
    except FileNotFoundError:
        return 127, f"command not found: {argv[0]}"
    except PermissionError:
        return 126, f"command not executable: {argv[0]}"
    except OSError as exc:
        return 127, f"cannot start {argv[0]}: {exc}"


def main(args: list[str]) -> int:
    result_file = args[0]
    rest = args[1:]
    setup: list[str] = []
    if rest and rest[0] == "--setup":
        cut = rest.index("--")
        setup, rest = rest[1:cut], rest[cut:]
    command = rest[1:] if rest and rest[0] == "--" else rest
    outcome: dict[str, object] = {"setup_exit": None, "exit_code": None, "error": None}
    if setup:
        code, error = _run(setup)
        outcome["setup_exit"] = code
        if code != 0:
            outcome["error"] = error or f"setup command exited {code}"
    if outcome["error"] is None:
        outcome["exit_code"], outcome["error"] = _run(command)
    outcome["ended_at"] = time.time()
    tmp = result_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(outcome, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
