"""A real coding-agent CLI for the fix stage's tests: aider (``aider-chat`` on PyPI), driven by a local fake model.

Why aider, and why its own virtualenv: the fix stage runs any coding-agent CLI as ``--fix-command``; aider is one
people use, it installs from PyPI, runs offline against any OpenAI-compatible endpoint and applies edits given in a
plain-text format (:mod:`fake_coder` writes them). ``aider-chat`` pins its dependencies exactly (openai 2.x,
litellm, numpy, tree-sitter …), which clash with the project's pinned test extras (``openai==3.54.0`` …), so it
lives in ``~/.cache/trace-source/aider-<version>`` (``python tests/coding_agent.py install``; ``make test``
does it once: about 1.5 minutes and 690 MB).

:func:`fix_command` is the exact ``--fix-command`` the fix stage runs. Aider works in the fix stage's working copy
(a git repository, so it sends the model a map of the repository) with the failure context of
``$TRACE_SOURCE_FIX_PROMPT`` as its one message, and leaves its edits uncommitted (the stage commits them):

* ``--yes-always`` — no questions (add the files the answer names to the chat, apply the edits);
* ``--no-auto-commits --no-dirty-commits --no-gitignore`` — no commits and no ``.gitignore`` change of its own;
* ``--no-check-update --no-show-release-notes --no-analytics --no-show-model-warnings`` — nothing from the
  network; ``--model-metadata-file`` gives the model's context window and prices, else aider fetches litellm's
  price list from the internet at start;
* ``--edit-format diff`` — SEARCH/REPLACE blocks (see :mod:`fake_coder`);
* ``--analytics-log`` — aider's event log, kept local (``--no-analytics`` sends nothing), from which
  ``python tests/coding_agent.py usage`` writes ``$TRACE_SOURCE_FIX_USAGE``: model, tokens and cost in USD.

The model's API key comes from ``OPENAI_API_KEY`` if the stage passes one (``--pass-env``); the local fake model
needs none, so a placeholder is used otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from forge_harness import CACHE_DIR

AIDER_VERSION = "0.86.2"
AIDER_VENV = CACHE_DIR / f"aider-{AIDER_VERSION}"
AIDER = AIDER_VENV / "bin" / "aider"
#: The model name aider is given: litellm's ``openai/`` provider, i.e. any OpenAI-compatible endpoint.
MODEL = "openai/fake-coder"
#: Where aider's event log goes, next to the usage file the stage gives.
EVENTS_SUFFIX = ".aider-events.jsonl"
HERE = Path(__file__).resolve()


def install_aider(version: str = AIDER_VERSION, venv: Path | None = None) -> Path:
    """``aider-chat==version`` into its own virtualenv unless it is there; returns the ``aider`` executable."""
    venv = venv or CACHE_DIR / f"aider-{version}"
    aider = venv / "bin" / "aider"
    if aider.exists():
        return aider
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                    f"aider-chat=={version}"], check=True)
    return aider


def write_model_metadata(path: Path, model: str = MODEL) -> Path:
    """litellm model metadata for ``model`` (context window, price per token in USD) at ``path``."""
    path.write_text(json.dumps({model: {"max_input_tokens": 128000, "max_output_tokens": 4096,
                                        "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                                        "litellm_provider": "openai", "mode": "chat"}}, indent=2))
    return path


def fix_command(api_base: str, metadata_file: Path, *, model: str = MODEL, aider: Path = AIDER,
                python: str = sys.executable) -> str:
    """The ``--fix-command`` (a ``/bin/sh -c`` string): aider on ``$TRACE_SOURCE_FIX_PROMPT`` against the
    OpenAI-compatible ``api_base`` (e.g. ``http://127.0.0.1:PORT/v1``), then its usage into
    ``$TRACE_SOURCE_FIX_USAGE``; exits with aider's status."""
    q = shlex.quote
    events = f'"$TRACE_SOURCE_FIX_USAGE{EVENTS_SUFFIX}"'
    run_aider = " ".join([
        'OPENAI_API_KEY="${OPENAI_API_KEY:-local-model-needs-no-key}"', q(str(aider)),
        "--yes-always", "--no-auto-commits", "--no-dirty-commits", "--no-gitignore",
        "--no-check-update", "--no-show-release-notes", "--no-analytics", "--no-show-model-warnings",
        "--model-metadata-file", q(str(metadata_file)), "--edit-format", "diff",
        "--model", q(model), "--openai-api-base", q(api_base),
        "--analytics-log", events, "--message-file", '"$TRACE_SOURCE_FIX_PROMPT"'])
    usage = f'{q(python)} {q(str(HERE))} usage {events} "$TRACE_SOURCE_FIX_USAGE"'
    return f"{run_aider}; rc=$?; {usage}; exit $rc"


def usage_from_events(events: Path) -> dict[str, Any]:
    """Model, tokens and cost from aider's event log (its ``message_send`` events): ``{"agent", "model",
    "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"}``."""
    usage: dict[str, Any] = {"agent": f"aider {AIDER_VERSION}", "model": None, "requests": 0, "prompt_tokens": 0,
                             "completion_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}
    if not events.exists():
        return usage
    for line in events.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") != "message_send":
            continue
        props = event.get("properties") or {}
        usage["model"] = props.get("main_model") or usage["model"]
        usage["requests"] += 1
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            usage[key] += int(props.get(key) or 0)
        usage["cost_usd"] = round(usage["cost_usd"] + float(props.get("cost") or 0.0), 6)
    return usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="aider for the fix stage's tests")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install aider into its virtualenv unless it is there")
    usage = sub.add_parser("usage", help="write the usage JSON from aider's event log")
    usage.add_argument("events", type=Path)
    usage.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install_aider())
    else:
        args.out.write_text(json.dumps(usage_from_events(args.events), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
