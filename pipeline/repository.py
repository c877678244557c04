"""The agent's repository as the loop uses it: a local path or a git URL (cloned under the state dir), its
``owner/name`` identity, and fresh isolated working copies at a revision (with the ``git`` command line).

A working copy of a git repository is ``git clone --shared --no-checkout`` + ``git checkout --detach <rev>``:
cheap (objects are shared read-only), isolated (the copy's changes never touch the source), and at exactly the
revision asked for. A directory that is not a git repository is copied whole (then there is no revision).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from normalizers.envelope import repository_from

_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|[^/@\s]+@[^:\s]+:)")


class RepositoryError(Exception):
    """The repository cannot be used (not found, clone failed, unknown revision); the message says what to do."""


def is_url(repo: str) -> bool:
    return bool(_URL.match(repo))


def git(*args: str, cwd: str | Path | None = None, timeout: float = 120.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``git args`` (no prompts: ``GIT_TERMINAL_PROMPT=0``). Raises :class:`RepositoryError` with git's stderr
    when ``check`` and it fails."""
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=full_env, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise RepositoryError("git is not installed (needed to work with the agent's repository)") from exc
    except subprocess.TimeoutExpired as exc:
        raise RepositoryError(f"git {' '.join(args[:2])} timed out after {timeout:g} s") from exc
    if check and proc.returncode != 0:
        raise RepositoryError(f"git {' '.join(args)} failed: {proc.stderr.strip()[:2000]}")
    return proc


class Repository:
    """``repo``: a local path, or a git URL cloned into ``<state_dir>/repos/<hash>`` (and fetched on
    :meth:`prepare`). ``ref``: the revision used when a trace carries none (``HEAD`` by default)."""

    def __init__(self, repo: str | Path, state_dir: str | Path, *, ref: str = "HEAD") -> None:
        self.spec = str(repo)
        self.ref = ref
        self.state_dir = Path(state_dir)
        if is_url(self.spec):
            digest = hashlib.sha256(self.spec.encode()).hexdigest()[:16]
            self.path = Path(state_dir) / "repos" / digest
        else:
            self.path = Path(self.spec).resolve()

    def describe(self) -> str:
        return self.spec

    def prepare(self) -> Path:
        """The local path, cloning or fetching a URL first. Raises :class:`RepositoryError`."""
        if is_url(self.spec):
            if (self.path / ".git").exists() or (self.path / "HEAD").exists():
                git("fetch", "--quiet", "--all", "--tags", cwd=self.path, timeout=600)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                git("clone", "--quiet", self.spec, str(self.path), timeout=1800)
        elif not self.path.is_dir():
            raise RepositoryError(f"--repo {self.spec}: no such directory")
        return self.path

    @property
    def is_git(self) -> bool:
        """A git repository rooted at :attr:`path` (a folder *inside* another repository's checkout, such as an
        example agent in a monorepo, is treated as a plain directory: copied whole, without revisions)."""
        proc = git("rev-parse", "--show-toplevel", cwd=self.path, check=False)
        if proc.returncode != 0:
            return git("rev-parse", "--is-bare-repository", cwd=self.path, check=False).stdout.strip() == "true"
        return Path(proc.stdout.strip()).resolve() == self.path.resolve()

    def identity(self) -> str | None:
        """``owner/name`` from the ``origin`` remote's URL (as the envelope's ``repository`` is derived), if any."""
        if not self.is_git:
            return None
        proc = git("remote", "get-url", "origin", cwd=self.path, check=False)
        if proc.returncode != 0:
            return None
        return repository_from(None, {"vcs.repository.url.full": proc.stdout.strip()})

    def resolve(self, revision: str | None) -> str | None:
        """The full commit id of ``revision`` (else of :attr:`ref`); ``None`` for a plain directory. Raises
        :class:`RepositoryError` for a revision the repository does not have."""
        if not self.is_git:
            return None
        rev = revision or self.ref
        proc = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=self.path, check=False)
        if proc.returncode != 0:
            raise RepositoryError(f"the repository {self.spec} has no revision {rev!r}"
                                  + (" (the trace's vcs.ref.head.revision): fetch it or push it" if revision else ""))
        return proc.stdout.strip()

    def working_copy(self, dest: Path, commit: str | None) -> Path:
        """A fresh, isolated copy of the repository at ``commit`` in ``dest`` (replaced if it exists)."""
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if commit is None:
            shutil.copytree(self.path, dest, symlinks=True, ignore=self._not_copied)
            return dest
        git("clone", "--quiet", "--shared", "--no-checkout", str(self.path), str(dest))
        git("checkout", "--quiet", "--detach", commit, cwd=dest)
        return dest

    def _not_copied(self, directory: str, names: list[str]) -> set[str]:
        """``.git``, and the state dir when it lies inside the repository (``autoloop``'s default
        ``<repo>/.trace-source``): a working copy is made inside it, so copying it would copy the copy."""
        state = self.state_dir.resolve()
        return {n for n in names if n == ".git" or (Path(directory) / n).resolve() == state}

    async def aworking_copy(self, dest: Path, commit: str | None) -> Path:
        return await asyncio.to_thread(self.working_copy, dest, commit)
