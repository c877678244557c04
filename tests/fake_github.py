"""A local stand-in for the hosted GitHub REST API, which the tests cannot reach (no network but the package
registries). It is a **fake of a remote service**, used only to test :class:`pipeline.forge.GitHubForge`; the
Gitea client is tested against a real Gitea server (``tests/forge_harness.py``).

It implements the documented subset the fix stage uses, with GitHub's status codes and error bodies
(``{"message", "errors", "documentation_url"}``):

* ``GET /repos/{owner}/{repo}`` — ``default_branch``, ``private``, ``full_name``;
* ``GET /repos/{owner}/{repo}/pulls`` — ``state`` (``open`` default, ``closed``, ``all``), ``head``
  (``owner:branch``), ``base``, ``sort=created``, ``direction`` (``desc`` default), ``per_page`` (default 30, at
  most 100), ``page``, with a ``Link`` header (``rel="next"``, ``rel="last"``) when there are more pages;
* ``POST /repos/{owner}/{repo}/pulls`` — ``title``, ``head`` (``branch`` or ``owner:branch``), ``base``, ``body``,
  ``draft``; 201; 422 "Validation Failed" with ``errors[].message`` "A pull request already exists for
  owner:branch." when an open one has the same head and base, "No commits between …" when the head adds nothing,
  ``errors[].field`` ``head`` / ``base`` ``invalid`` for a missing branch;
* ``GET /repos/{owner}/{repo}/pulls/{number}`` and ``…/pulls/{number}/files`` (paginated like the list);
  ``PATCH /repos/{owner}/{repo}/pulls/{number}`` (``state``, ``title``, ``body``);
* ``POST /repos/{owner}/{repo}/statuses/{sha}``, ``GET /repos/{owner}/{repo}/commits/{ref}/status`` (combined:
  the latest status per ``context``; ``failure`` if any is ``error``/``failure``, ``pending`` if any is pending
  *or there are none*, else ``success``);
* ``POST /repos/{owner}/{repo}/check-runs``, ``GET /repos/{owner}/{repo}/commits/{ref}/check-runs`` (GitHub
  lets only GitHub Apps create check runs; the fake lets any token with write access).

Authentication: ``Authorization: Bearer <token>`` (or ``token <token>``). An unknown token → 401 "Bad
credentials"; no token → reads of public repositories only (a write is 401 "Requires authentication"); a
repository the token cannot see → 404 "Not Found" (GitHub hides private repositories that way); a read-only token
writing → 403 "Resource not accessible by personal access token".

Each repository is backed by a real git repository on disk (bare or not): branches, head commits and a pull
request's changed files (``git diff`` from the merge base, as GitHub shows them) come from git, so a test pushes
branches with plain ``git push`` to that path. :meth:`FakeGitHub.fail_next` makes the next requests answer a given
status (to test 5xx and rate limiting). Runs in a thread on ``127.0.0.1`` at a free port; every request is kept
in :attr:`FakeGitHub.requests`.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from local_http import LocalHTTPServer, QuietHandler

DOCS = "https://docs.github.com/rest"


@dataclass
class Access:
    """What a token may do: ``repos`` None = every repository, else these ``owner/name``; ``write`` pushes
    pull requests and statuses."""

    login: str
    repos: set[str] | None = None
    write: bool = True


@dataclass
class _Repo:
    full_name: str
    git_dir: Path
    default_branch: str
    private: bool
    id: int
    pulls: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sha -> statuses, oldest first
    check_runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class SeenRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    status: int
    authorization: bool  # whether an Authorization header came (its value is not kept)


class _Fail(Exception):
    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors, self.headers = status, message, errors, headers or {}


def _git(git_dir: Path, *args: str) -> str:
    proc = subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LookupError(proc.stderr.strip())
    return proc.stdout.strip()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeGitHub(LocalHTTPServer):
    """The fake API server; see the module docstring. Use as a context manager or :meth:`start` / :meth:`stop`."""

    thread_name = "fake-github"

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self._repos: dict[str, _Repo] = {}
        self._tokens: dict[str, Access] = {}
        self._fail: list[_Fail] = []
        self._lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------------------------------------

    def add_repo(self, full_name: str, git_dir: Path, *, default_branch: str = "main",
                 private: bool = False) -> None:
        """Serve ``owner/name`` from the git repository at ``git_dir`` (its ``.git`` or a bare repository)."""
        git_dir = Path(git_dir)
        if (git_dir / ".git").is_dir():
            git_dir = git_dir / ".git"
        with self._lock:
            self._repos[full_name.lower()] = _Repo(full_name, git_dir, default_branch, private,
                                                   id=len(self._repos) + 1)

    def add_token(self, token: str, login: str = "trace-bot", *, repos: set[str] | None = None,
                  write: bool = True) -> None:
        self._tokens[token] = Access(login, {r.lower() for r in repos} if repos is not None else None, write)

    def fail_next(self, status: int, message: str, *, count: int = 1, headers: dict[str, str] | None = None) -> None:
        """The next ``count`` requests answer ``status`` with ``message`` (and ``headers``)."""
        with self._lock:
            self._fail.extend(_Fail(status, message, headers=headers) for _ in range(count))

    def pulls(self, full_name: str) -> list[dict[str, Any]]:
        """The pull requests of a repository as stored (a copy), oldest first."""
        with self._lock:
            return [dict(p) for p in self._repos[full_name.lower()].pulls]

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def _handler_class(self) -> type[_Handler]:
        return _Handler

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the API -----------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               authorization: str | None) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            if self._fail:
                fail = self._fail.pop(0)
                return fail.status, {"message": fail.message, "documentation_url": DOCS}, fail.headers
            try:
                return self._route(method, path, query, body, authorization)
            except _Fail as fail:
                payload: dict[str, Any] = {"message": fail.message, "documentation_url": DOCS}
                if fail.errors:
                    payload["errors"] = fail.errors
                return fail.status, payload, fail.headers

    def _access(self, authorization: str | None) -> Access | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() not in ("bearer", "token") or token.strip() not in self._tokens:
            raise _Fail(401, "Bad credentials")
        return self._tokens[token.strip()]

    def _repo(self, owner: str, name: str, access: Access | None, *, write: bool = False) -> _Repo:
        repo = self._repos.get(f"{owner}/{name}".lower())
        granted = access is not None and (access.repos is None or (repo is not None
                                                                    and repo.full_name.lower() in access.repos))
        if repo is None or (repo.private and not granted):
            raise _Fail(404, "Not Found")
        if write and access is None:
            raise _Fail(401, "Requires authentication")
        if write and not (granted and access is not None and access.write):
            raise _Fail(403, "Resource not accessible by personal access token")
        return repo

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               authorization: str | None) -> tuple[int, Any, dict[str, str]]:
        access = self._access(authorization)
        m = re.fullmatch(r"/repos/([^/]+)/([^/]+)(/.*)?", path)
        if not m:
            raise _Fail(404, "Not Found")
        owner, name, rest = m.group(1), m.group(2), m.group(3) or ""
        writes = method in ("POST", "PATCH")
        repo = self._repo(owner, name, access, write=writes)
        q = {k: v[-1] for k, v in query.items()}
        if rest == "" and method == "GET":
            return 200, self._repo_json(repo), {}
        if rest == "/pulls" and method == "GET":
            return self._paged(path, q, self._list_pulls(repo, q))
        if rest == "/pulls" and method == "POST":
            return 201, self._create_pull(repo, body or {}, access), {}
        if m2 := re.fullmatch(r"/pulls/(\d+)(/files)?", rest):
            pull = next((p for p in repo.pulls if p["number"] == int(m2.group(1))), None)
            if pull is None or method not in ("GET", "PATCH") or (m2.group(2) and method != "GET"):
                raise _Fail(404, "Not Found")
            if method == "PATCH":
                return 200, self._update_pull(repo, pull, body or {}), {}
            if m2.group(2):
                return self._paged(path, q, self._files(repo, pull))
            return 200, self._pull_json(repo, pull), {}
        if (m2 := re.fullmatch(r"/statuses/([0-9a-fA-F]{40})", rest)) and method == "POST":
            return 201, self._add_status(repo, m2.group(1).lower(), body or {}, access), {}
        if rest == "/check-runs" and method == "POST":
            return 201, self._add_check_run(repo, body or {}), {}
        if (m2 := re.fullmatch(r"/commits/([^/]+)/(status|check-runs)", rest)) and method == "GET":
            sha = self._resolve(repo, m2.group(1))
            if m2.group(2) == "status":
                return 200, self._combined(repo, sha), {}
            runs = repo.check_runs.get(sha, [])
            return 200, {"total_count": len(runs), "check_runs": runs}, {}
        raise _Fail(404, "Not Found")

    # -- pieces ------------------------------------------------------------------------------------------------

    def _repo_json(self, repo: _Repo) -> dict[str, Any]:
        owner = repo.full_name.split("/")[0]
        return {"id": repo.id, "name": repo.full_name.split("/")[1], "full_name": repo.full_name,
                "private": repo.private, "default_branch": repo.default_branch, "owner": {"login": owner},
                "html_url": f"{self.api_url}/{repo.full_name}"}

    def _resolve(self, repo: _Repo, ref: str) -> str:
        try:
            return _git(repo.git_dir, "rev-parse", "--verify", f"{ref}^{{commit}}")
        except LookupError:
            raise _Fail(422, f"No commit found for SHA: {ref}") from None

    def _branch_sha(self, repo: _Repo, branch: str) -> str | None:
        try:
            return _git(repo.git_dir, "rev-parse", "--verify", f"refs/heads/{branch}^{{commit}}")
        except LookupError:
            return None

    def _pull_json(self, repo: _Repo, pull: dict[str, Any]) -> dict[str, Any]:
        head_sha = self._branch_sha(repo, pull["head"]) if pull["state"] == "open" else None
        head_sha = head_sha or pull["head_sha"]
        pull["head_sha"] = head_sha
        owner = repo.full_name.split("/")[0]
        return {
            "number": pull["number"], "state": pull["state"], "title": pull["title"], "body": pull["body"],
            "draft": pull["draft"], "merged": False, "merged_at": None, "created_at": pull["created_at"],
            "html_url": f"{self.api_url}/{repo.full_name}/pull/{pull['number']}",
            "url": f"{self.api_url}/repos/{repo.full_name}/pulls/{pull['number']}",
            "user": {"login": pull["user"]},
            "head": {"ref": pull["head"], "sha": head_sha, "label": f"{owner}:{pull['head']}",
                     "repo": self._repo_json(repo)},
            "base": {"ref": pull["base"], "sha": self._branch_sha(repo, pull["base"]) or "",
                     "label": f"{owner}:{pull['base']}", "repo": self._repo_json(repo)},
        }

    def _list_pulls(self, repo: _Repo, q: dict[str, str]) -> list[dict[str, Any]]:
        state = q.get("state", "open")
        if state not in ("open", "closed", "all"):
            raise _Fail(422, "Validation Failed", [{"resource": "Issue", "field": "state", "code": "invalid"}])
        pulls = [p for p in repo.pulls if state == "all" or p["state"] == state]
        if head := q.get("head"):
            owner, _, branch = head.rpartition(":")
            if owner.lower() == repo.full_name.split("/")[0].lower():
                pulls = [p for p in pulls if p["head"] == branch]
            else:  # another owner's branch: no fork of this repository exists here
                pulls = []
        if base := q.get("base"):
            pulls = [p for p in pulls if p["base"] == base]
        pulls.sort(key=lambda p: p["number"], reverse=q.get("direction", "desc") == "desc")
        return [self._pull_json(repo, p) for p in pulls]

    def _create_pull(self, repo: _Repo, body: dict[str, Any], access: Access | None) -> dict[str, Any]:
        missing = [k for k in ("title", "head", "base") if not body.get(k)]
        if missing:
            raise _Fail(422, "Invalid request.\n\n" + ", ".join(f'"{k}"' for k in missing)
                        + " wasn't supplied.")
        owner = repo.full_name.split("/")[0]
        head_owner, _, head = str(body["head"]).rpartition(":")
        base = str(body["base"])
        head_sha = self._branch_sha(repo, head) if head_owner in ("", owner) else None
        base_sha = self._branch_sha(repo, base)
        if head_sha is None:
            raise _Fail(422, "Validation Failed", [{"resource": "PullRequest", "field": "head", "code": "invalid"}])
        if base_sha is None:
            raise _Fail(422, "Validation Failed", [{"resource": "PullRequest", "field": "base", "code": "invalid"}])
        if any(p["state"] == "open" and p["head"] == head and p["base"] == base for p in repo.pulls):
            raise _Fail(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom",
                                                    "message": f"A pull request already exists for {owner}:{head}."}])
        if not _git(repo.git_dir, "rev-list", f"{base_sha}..{head_sha}"):
            raise _Fail(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom",
                                                    "message": f"No commits between {base} and {head}"}])
        pull = {"number": len(repo.pulls) + 1, "state": "open", "title": body["title"], "body": body.get("body"),
                "draft": bool(body.get("draft", False)), "head": head, "base": base, "head_sha": head_sha,
                "user": access.login if access else "", "created_at": _now()}
        repo.pulls.append(pull)
        return self._pull_json(repo, pull)

    def _update_pull(self, repo: _Repo, pull: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        if "state" in body:
            if body["state"] not in ("open", "closed"):
                raise _Fail(422, "Validation Failed", [{"resource": "PullRequest", "field": "state",
                                                        "code": "invalid"}])
            if body["state"] == "closed":
                pull["head_sha"] = self._pull_json(repo, pull)["head"]["sha"]  # a closed one keeps its last head
            pull["state"] = body["state"]
        for key in ("title", "body"):
            if key in body:
                pull[key] = body[key]
        return self._pull_json(repo, pull)

    def _files(self, repo: _Repo, pull: dict[str, Any]) -> list[dict[str, Any]]:
        head_sha = self._pull_json(repo, pull)["head"]["sha"]
        base_sha = self._branch_sha(repo, pull["base"]) or head_sha
        merge_base = _git(repo.git_dir, "merge-base", base_sha, head_sha)
        out = _git(repo.git_dir, "diff", "--name-status", "--no-renames", merge_base, head_sha)
        status = {"A": "added", "M": "modified", "D": "removed"}
        files = []
        for line in out.splitlines():
            code, _, filename = line.partition("\t")
            files.append({"sha": head_sha, "filename": filename, "status": status.get(code[:1], "changed")})
        return files

    def _add_status(self, repo: _Repo, sha: str, body: dict[str, Any], access: Access | None) -> dict[str, Any]:
        state = body.get("state")
        if state not in ("error", "failure", "pending", "success"):
            raise _Fail(422, "Validation Failed", [{"resource": "Status", "field": "state", "code": "custom",
                                                    "message": "state is not included in the list"}])
        sha = self._resolve(repo, sha)
        entries = repo.statuses.setdefault(sha, [])
        status = {"id": sum(len(v) for v in repo.statuses.values()) + 1, "state": state,
                  "context": body.get("context") or "default", "description": body.get("description"),
                  "target_url": body.get("target_url"), "created_at": _now(),
                  "creator": {"login": access.login if access else ""}}
        entries.append(status)
        return status

    def _add_check_run(self, repo: _Repo, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("name") or not body.get("head_sha"):
            raise _Fail(422, "Invalid request.\n\n\"name\", \"head_sha\" weren't supplied.")
        sha = self._resolve(repo, body["head_sha"])
        status = body.get("status", "queued")
        if status == "completed" and not body.get("conclusion"):
            raise _Fail(422, "Validation Failed", [{"resource": "CheckRun", "field": "conclusion",
                                                    "code": "missing_field"}])
        runs = repo.check_runs.setdefault(sha, [])
        run = {"id": len(runs) + 1, "name": body["name"], "head_sha": sha, "status": status,
               "conclusion": body.get("conclusion") if status == "completed" else None}
        runs.append(run)
        return run

    def _combined(self, repo: _Repo, sha: str) -> dict[str, Any]:
        latest: dict[str, dict[str, Any]] = {}
        for status in repo.statuses.get(sha, []):
            latest[status["context"]] = status
        states = [s["state"] for s in latest.values()]
        if any(s in ("error", "failure") for s in states):
            state = "failure"
        elif not states or "pending" in states:
            state = "pending"
        else:
            state = "success"
        return {"state": state, "sha": sha, "total_count": len(latest), "statuses": list(latest.values()),
                "repository": self._repo_json(repo)}

    def _paged(self, path: str, q: dict[str, str], items: list[Any]) -> tuple[int, Any, dict[str, str]]:
        per_page = min(max(int(q.get("per_page", 30)), 1), 100)
        page = max(int(q.get("page", 1)), 1)
        last = max((len(items) + per_page - 1) // per_page, 1)
        links = []
        if page < last:
            links.append(f'<{self.api_url}{path}?{urlencode({**q, "page": page + 1})}>; rel="next"')
            links.append(f'<{self.api_url}{path}?{urlencode({**q, "page": last})}>; rel="last"')
        headers = {"Link": ", ".join(links)} if links else {}
        return 200, items[(page - 1) * per_page: page * per_page], headers


class _Handler(QuietHandler):
    fake: FakeGitHub
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            status, payload, headers = 400, {"message": "Problems parsing JSON", "documentation_url": DOCS}, {}
            body = raw.decode("utf-8", "replace")
        else:
            status, payload, headers = self.fake.handle(
                self.command, split.path.rstrip("/") or "/", parse_qs(split.query), body,
                self.headers.get("Authorization"))
        self.fake.requests.append(SeenRequest(self.command, split.path, parse_qs(split.query), body, status,
                                                     bool(self.headers.get("Authorization"))))
        self.send_json(status, payload, {"X-GitHub-Api-Version-Selected": "2022-11-28", **headers},
                       "application/json; charset=utf-8")

    do_GET = _serve  # noqa: N815
    do_POST = _serve  # noqa: N815
    do_PATCH = _serve  # noqa: N815
