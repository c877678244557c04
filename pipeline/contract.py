"""The repository contract (seed-system.md "The repository contract"): a folder at the agent repository's root,
``trace-source/`` (configurable), or the seed system's ``archal/`` with the same files, so repositories already
prepared for it work unchanged::

    harness.json       how to run the agent headlessly: {"command": ..., "env": {...}, "timeout_s": ...}
    scenario.md        the standing contract: setup, prompt, expected behaviour, success criteria
    seeds/*.json       optional seed templates

This module finds the folder and reads its files; pure apart from reading them.
"""

from __future__ import annotations

from pathlib import Path

#: The seed system's folder name, read when the configured one is absent.
FALLBACK_DIR = "archal"


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
