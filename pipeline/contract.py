"""The repository contract (``docs/contract.md``): a folder at the agent repository's root, ``trace-source/``
(configurable), or the seed system's ``archal/`` with the same files, so repositories already prepared for it work
unchanged::

    harness.json       how to run the agent headlessly: {"command": ..., "env": {...}, "timeout_s": ...}
    scenario.md        the standing contract: setup, prompt, expected behaviour, success criteria
    seeds/*.json       optional seed templates

:func:`load_contract` reads and validates the folder and returns every problem it finds, each naming the file, the
field and what to do (``trace-source contract check --repo .`` prints them). Reads files; runs nothing.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normalizers.redact import Redactor, is_secret_key

#: The seed system's folder name, read when the configured one is absent.
FALLBACK_DIR = "archal"
DEFAULT_TIMEOUT_S = 300.0

#: The sections scenario.md should have (matched case-insensitively on ``##`` headings, by their first words).
SCENARIO_SECTIONS = ("setup", "prompt", "expected behaviour", "success criteria")

_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    """One contract problem: ``where`` (file[:field]), ``what`` is wrong and how to fix it. ``fatal`` problems
    stop seeding and reproduction; others are warnings."""

    where: str
    what: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: {self.where}: {self.what}"


@dataclass(frozen=True)
class Harness:
    """A validated ``harness.json``: ``command`` and ``setup`` as argument lists, ``env`` non-secret defaults."""

    command: tuple[str, ...]
    env: dict[str, str]
    timeout_s: float
    workdir: str = "."
    setup: tuple[str, ...] | None = None


@dataclass
class Contract:
    """The contract folder as read. ``harness``/``scenario`` are ``None`` when missing or invalid (see
    ``problems``); ``seeds``: template file name -> parsed JSON."""

    repo: Path
    folder: Path | None
    harness: Harness | None = None
    scenario: str | None = None
    seeds: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.folder is not None and not any(p.fatal for p in self.problems)

    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def find_contract_dir(repo: str | Path, name: str = "trace-source") -> Path | None:
    """``<repo>/<name>`` if it is a directory, else ``<repo>/archal``, else ``None``."""
    for candidate in (Path(repo) / name, Path(repo) / FALLBACK_DIR):
        if candidate.is_dir():
            return candidate
    return None


def read_scenario(repo: str | Path, name: str = "trace-source") -> str | None:
    """The text of the contract's ``scenario.md``, or ``None`` when there is no contract or no scenario.
    Raises ``OSError`` when the file exists but cannot be read."""
    folder = find_contract_dir(repo, name)
    if folder is None or not (folder / "scenario.md").is_file():
        return None
    return (folder / "scenario.md").read_text(encoding="utf-8")


def _argv(value: Any, where: str, problems: list[Problem]) -> tuple[str, ...] | None:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            problems.append(Problem(where, f"cannot split the command line: {exc}"))
            return None
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        problems.append(Problem(where, "must be a list of strings or a command-line string"))
        return None
    if not argv or not argv[0]:
        problems.append(Problem(where, "is empty: give the command that runs the agent once, e.g. "
                                       '["python", "-m", "my_agent.harness"]'))
        return None
    return tuple(argv)


def looks_secret(name: str, value: str) -> str | None:
    """Why ``name=value`` looks like a credential (``None`` if it does not): a secret-named variable with a value,
    or a value a redaction rule would mask."""
    if value and is_secret_key(name):
        return f"the name {name} says it holds a secret"
    masked, counts = Redactor().mask_text(value)
    if counts:
        return f"the value looks like a credential ({', '.join(sorted(counts))})"
    return None


def parse_harness(data: Any, where: str = "harness.json") -> tuple[Harness | None, list[Problem]]:
    """Validate a parsed ``harness.json`` (see the module docstring and docs/contract.md)."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        return None, [Problem(where, "must be a JSON object with at least \"command\"")]
    known = {"command", "env", "timeout_s", "workdir", "setup", "description"}
    for key in sorted(set(data) - known):
        problems.append(Problem(f"{where}:{key}", f"unknown field (known: {', '.join(sorted(known))})", fatal=False))
    command = _argv(data.get("command"), f"{where}:command", problems) if "command" in data else None
    if "command" not in data:
        problems.append(Problem(f"{where}:command", "missing: the command that runs the agent headlessly once"))
    env: dict[str, str] = {}
    raw_env = data.get("env", {})
    if not isinstance(raw_env, dict):
        problems.append(Problem(f"{where}:env", "must be an object of NAME: \"value\""))
    else:
        for name, value in raw_env.items():
            if not isinstance(value, str):
                problems.append(Problem(f"{where}:env.{name}", "must be a string"))
                continue
            if reason := looks_secret(name, value):
                problems.append(Problem(f"{where}:env.{name}", f"refused: {reason}. Secrets never go in the "
                                        "contract: keep them in the worker's environment and pass them with "
                                        f"--pass-env {name}"))
                continue
            env[name] = value
    timeout = data.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        problems.append(Problem(f"{where}:timeout_s", "must be a number of seconds > 0"))
        timeout = DEFAULT_TIMEOUT_S
    workdir = data.get("workdir", ".")
    if not isinstance(workdir, str) or Path(workdir).is_absolute() or ".." in Path(workdir).parts:
        problems.append(Problem(f"{where}:workdir", "must be a relative path inside the repository"))
        workdir = "."
    setup = _argv(data["setup"], f"{where}:setup", problems) if data.get("setup") is not None else None
    if any(p.fatal for p in problems) or command is None:
        return None, problems
    return Harness(command=command, env=env, timeout_s=float(timeout), workdir=workdir, setup=setup), problems


def scenario_sections(text: str) -> dict[str, str]:
    """Section title (lower case) -> its text, for every Markdown heading of ``text``."""
    out: dict[str, str] = {}
    matches = list(_HEADING.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out[m.group(1).strip().lower()] = text[m.end():end].strip()
    return out


def section(text: str, name: str) -> str | None:
    """The text of the first section whose title starts with ``name`` (case-insensitive; "behaviour" also
    matches "behavior")."""
    want = name.lower().replace("behaviour", "behavior")
    for title, body in scenario_sections(text).items():
        if title.replace("behaviour", "behavior").startswith(want):
            return body
    return None


def load_contract(repo: str | Path, name: str = "trace-source") -> Contract:
    """Read and validate the contract of the repository at ``repo``; never raises for a bad contract (the problems
    say what is wrong), only ``OSError`` for an unreadable repository."""
    repo = Path(repo)
    if not repo.is_dir():
        return Contract(repo, None, problems=[Problem(str(repo), "is not a directory (give --repo the agent "
                                                                 "repository's root)")])
    folder = find_contract_dir(repo, name)
    if folder is None:
        return Contract(repo, None, problems=[Problem(
            str(repo), f"no contract folder: create {name}/ (or {FALLBACK_DIR}/) with harness.json and scenario.md "
                       "(see docs/contract.md)")])
    contract = Contract(repo, folder)
    rel = folder.name
    harness_path = folder / "harness.json"
    if not harness_path.is_file():
        contract.problems.append(Problem(f"{rel}/harness.json", "missing: how to run the agent headlessly"))
    else:
        try:
            data = json.loads(harness_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            contract.problems.append(Problem(f"{rel}/harness.json", f"is not valid JSON: {exc}"))
        else:
            contract.harness, problems = parse_harness(data, f"{rel}/harness.json")
            contract.problems.extend(problems)
            if contract.harness is not None and not (repo / contract.harness.workdir).is_dir():
                contract.problems.append(Problem(f"{rel}/harness.json:workdir",
                                                 f"{contract.harness.workdir} does not exist in the repository"))
    scenario_path = folder / "scenario.md"
    if not scenario_path.is_file():
        contract.problems.append(Problem(f"{rel}/scenario.md", "missing: the standing scenario (setup, prompt, "
                                                               "expected behaviour, success criteria)"))
    else:
        contract.scenario = scenario_path.read_text(encoding="utf-8")
        for wanted in SCENARIO_SECTIONS:
            if section(contract.scenario, wanted) is None:
                contract.problems.append(Problem(f"{rel}/scenario.md", f"no '## {wanted.capitalize()}' section",
                                                 fatal=wanted == "success criteria"))
    seeds = folder / "seeds"
    if seeds.is_dir():
        for path in sorted(seeds.glob("*.json")):
            try:
                contract.seeds[path.name] = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                contract.problems.append(Problem(f"{rel}/seeds/{path.name}", f"is not valid JSON: {exc}"))
    return contract
