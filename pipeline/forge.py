"""Draft pull requests through a forge's REST API: GitHub and Gitea (also Forgejo, which keeps Gitea's API v1).

The fix stage (:mod:`pipeline.stages.fix`) pushes its branch with git and then talks to the forge through
:class:`Forge`: look the pull request up by its head branch (so a restarted or redelivered fix reuses it), create a
**draft** pull request, read it back (head commit, draft state, changed files) and read the head commit's check
status. :func:`detect_forge` tells the forge from the push remote, :func:`make_forge` builds the client and
:func:`push_error` turns a refused ``git push`` into the same :class:`ForgeError` kinds.

Endpoints used (``repo`` is ``"owner/name"``; every call sends the token in the ``Authorization`` header, which is
never logged nor put into an error message):

GitHub REST API (``X-GitHub-Api-Version: 2022-11-28``; base ``https://api.github.com`` or GitHub Enterprise's
``https://HOST/api/v3``), token as ``Authorization: Bearer <token>``:

* ``GET /repos/{repo}`` — ``default_branch``;
* ``GET /repos/{repo}/pulls?head=<owner>:<branch>&state=all`` — pull requests by head branch, newest first;
* ``POST /repos/{repo}/pulls`` with ``{"title", "head", "base", "body", "draft": true}`` — 201; 422 "A pull
  request already exists for owner:branch." when one is open;
* ``GET /repos/{repo}/pulls/{number}``, ``GET /repos/{repo}/pulls/{number}/files`` (paginated, at most 3000 files);
* ``GET /repos/{repo}/commits/{sha}/check-runs`` and ``GET /repos/{repo}/commits/{sha}/status`` (the combined
  status, whose ``state`` is ``pending`` also when there are no statuses at all — ``total_count`` tells).

Gitea / Forgejo API v1 (base ``https://HOST/api/v1``), token as ``Authorization: token <token>``:

* ``GET /repos/{repo}`` — ``default_branch``;
* ``GET /repos/{repo}/pulls?state=all`` — the list has no head filter, so every page is read and the head branch
  (in the repository itself, not a fork) matched here;
* ``POST /repos/{repo}/pulls`` with ``{"title", "head", "base", "body"}`` — 201; 409 "pull request already exists
  for these targets". Gitea has no draft flag on create: a pull request is a draft ("work in progress") when its
  title starts with one of the instance's ``[repository.pull-request] WORK_IN_PROGRESS_PREFIXES`` (default
  ``WIP:`` and ``[WIP]``, matched case-insensitively), so the title gets the ``WIP:`` prefix. The API reports the
  result as ``draft`` (Gitea 1.22+); for servers without that field it is read from the title prefix;
* ``GET /repos/{repo}/pulls/{number}``, ``GET /repos/{repo}/pulls/{number}/files`` (paginated);
* ``GET /repos/{repo}/commits/{sha}/status`` — the combined commit status (Gitea Actions report through it too).

Errors: every failure is a :class:`ForgeError` whose ``kind`` says what went wrong — ``auth`` (401: the token is
missing, wrong or expired), ``permission`` (403), ``protected`` (branch protection refused it), ``not_found`` (404;
on GitHub also a private repository the token cannot see), ``conflict`` (the pull request already exists: look it
up with :meth:`Forge.find_pull`), ``unavailable`` (5xx, 429, rate limit, timeout, connection refused: try later),
``other`` — and whose message says what to do.
"""

from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import aiohttp

ForgeKind = Literal["github", "gitea"]
ErrorKind = Literal["auth", "permission", "not_found", "protected", "conflict", "unavailable", "other"]

GITHUB_API_URL = "https://api.github.com"
GITHUB_API_VERSION = "2022-11-28"
#: Gitea's default ``WORK_IN_PROGRESS_PREFIXES``; the first is put in front of a draft's title.
GITEA_WIP_PREFIXES = ("WIP:", "[WIP]")
#: Seconds for one HTTP request (connect + answer).
REQUEST_TIMEOUT_S = 30.0
#: Upper bound on pages read from one list (GitHub lists at most 3000 files of a pull request: 30 pages of 100).
MAX_PAGES = 200

_PROTECTED = re.compile(r"protected branch|branch is protected|branch protection|protected ref", re.I)
_ALREADY_EXISTS = re.compile(r"already exists", re.I)


@dataclass(frozen=True)
class PullRequest:
    """A pull request as the forge reports it.

    ``url`` is the web page (``html_url``), ``head_ref`` / ``base_ref`` branch names, ``head_sha`` the 40-hex head
    commit, ``draft`` whether the forge treats it as a draft (work in progress), ``state`` ``"open"``,
    ``"closed"`` or ``"merged"``."""

    number: int
    url: str
    head_ref: str
    head_sha: str
    base_ref: str
    draft: bool
    state: str
    title: str = ""


class ForgeError(Exception):
    """A forge call failed. ``kind`` is one of ``auth``, ``permission``, ``not_found``, ``protected``,
    ``conflict``, ``unavailable``, ``other``; ``status`` the HTTP status (None when no answer came); the message
    says what happened and what to do."""

    def __init__(self, kind: ErrorKind, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.status = status


class Forge(Protocol):
    """A forge's pull-request API. ``repo`` is ``"owner/name"``. Every method raises :class:`ForgeError`."""

    kind: str

    async def default_branch(self, repo: str) -> str:
        """The repository's default branch."""
        ...

    async def find_pull(self, repo: str, head_branch: str) -> PullRequest | None:
        """The newest pull request (any state) whose head is ``head_branch`` of ``repo`` itself, or None."""
        ...

    async def create_draft_pull(self, repo: str, *, head: str, base: str, title: str, body: str) -> PullRequest:
        """Open a draft pull request from ``head`` into ``base``. ``conflict`` when one exists already."""
        ...

    async def get_pull(self, repo: str, number: int) -> PullRequest:
        ...

    async def pull_files(self, repo: str, number: int) -> list[str]:
        """Paths the pull request changes (the new path of a renamed file), in the forge's order."""
        ...

    async def check_status(self, repo: str, sha: str) -> str | None:
        """``"success"``, ``"failure"`` or ``"pending"`` for commit ``sha``; None when it has no checks."""
        ...

    async def close(self) -> None:
        ...


# --------------------------------------------------------------------------------------------------- detection


def _remote_host(remote_url: str) -> str | None:
    """Host of a git remote URL (``https://host/o/n``, ``ssh://git@host:22/o/n``, ``git@host:o/n.git``), or None
    for a local path."""
    url = remote_url.strip()
    if "://" in url:
        return (urlsplit(url).hostname or "").lower() or None
    if m := re.match(r"^(?:[^@/\s]+@)?([^:/\s]+):(?!/)", url):  # scp-like syntax
        return m.group(1).lower()
    return None


def detect_forge(remote_url: str, api_url: str | None, kind: str = "auto") -> tuple[str, str]:
    """``(kind, api_url)`` for a push remote.

    ``kind`` ``"auto"``: a ``github.com`` remote is GitHub at ``https://api.github.com``; otherwise ``api_url`` is
    required and tells the kind — ending in ``/api/v1`` → ``"gitea"`` (Gitea, Forgejo), ``/api/v3`` or the host
    ``api.github.com`` → ``"github"`` (GitHub Enterprise). ``kind`` ``"github"`` / ``"gitea"`` forces the kind
    (``api_url`` still required unless the remote is on github.com). Raises :class:`ValueError` saying what to set.
    """
    if kind not in ("auto", "github", "gitea"):
        raise ValueError(f"unknown forge kind {kind!r}: use auto, github or gitea")
    host = _remote_host(remote_url)
    api = api_url.rstrip("/") if api_url else None
    if api and not api.startswith(("http://", "https://")):
        raise ValueError(f"the forge API URL {api_url!r} is not an http(s) URL")
    if kind != "gitea" and host == "github.com":
        return "github", api or GITHUB_API_URL
    if api is None:
        where = f"the remote {remote_url!r}" + ("" if host else " (a local path, not a forge)")
        raise ValueError(f"cannot tell the forge's API from {where}: set --forge-api-url "
                         "(https://HOST/api/v1 for Gitea or Forgejo, https://HOST/api/v3 for GitHub Enterprise)")
    if kind != "auto":
        return kind, api
    if api.endswith("/api/v1"):
        return "gitea", api
    if api.endswith("/api/v3") or urlsplit(api).hostname == "api.github.com":
        return "github", api
    raise ValueError(f"cannot tell the forge kind from the API URL {api!r}: set --forge github or --forge gitea")


def make_forge(kind: str, api_url: str, token: str | None) -> Forge:
    """A client for the forge ``kind`` (``"github"`` or ``"gitea"``) at ``api_url`` using ``token``. The HTTP
    session is opened on first use; call :meth:`Forge.close`."""
    if kind == "github":
        return GitHubForge(api_url, token)
    if kind == "gitea":
        return GiteaForge(api_url, token)
    raise ValueError(f"unknown forge kind {kind!r}: use github or gitea")


# --------------------------------------------------------------------------------------------------- git push


def git_auth_env(url: str, token: str | None) -> dict[str, str]:
    """Environment that makes git send ``token`` to an HTTP(S) ``url``: an ``http.extraHeader`` given through
    ``GIT_CONFIG_COUNT`` / ``GIT_CONFIG_KEY_0`` / ``GIT_CONFIG_VALUE_0``, so the token is on no command line that
    ``ps`` shows. Basic authentication with the token as password is what GitHub (``x-access-token``) and Gitea /
    Forgejo (any user name) accept for git over HTTP. Empty for other URLs or without a token."""
    if not token or not url.startswith(("http://", "https://")):
        return {}
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"}


def push_error(remote_url: str, stderr: str) -> ForgeError:
    """A :class:`ForgeError` for a refused ``git push`` to ``remote_url``, from git's stderr: ``protected``
    (GitHub "protected branch hook declined", Gitea / Forgejo "Not allowed to push to protected branch"),
    ``auth`` (401, "Authentication failed"), ``permission`` (403, "denied"), ``not_found`` ("Repository not
    found", "not found"), ``unavailable`` (cannot connect, 5xx), else ``other``. The message keeps git's last
    lines."""
    err = stderr.strip()
    tail = err[-800:]
    checks: tuple[tuple[ErrorKind, str, str], ...] = (
        ("protected", r"protected branch|protected ref|branch protection|GH006",
         "branch protection refused the push: push to a branch no protection rule matches"),
        ("auth", r"authentication failed|could not read username|invalid username or password|\b401\b",
         "the forge rejected the credentials: check the token"),
        ("permission", r"permission|denied|\b403\b|forbidden|not allowed",
         "the token may not push to this repository: give it write access (contents)"),
        ("not_found", r"repository not found|not found|\b404\b|does not appear to be a git repository",
         "no such repository, or the token cannot see it: check the remote URL and the token's access"),
        ("unavailable", r"could not resolve host|connection refused|timed out|\b50[234]\b|unable to access",
         "the forge did not answer: try again later"),
    )
    for kind, pattern, advice in checks:
        if re.search(pattern, err, re.I):
            return ForgeError(kind, f"git push to {_redact_url(remote_url)} refused ({kind}): {advice}. git said: "
                                    f"{tail}")
    return ForgeError("other", f"git push to {_redact_url(remote_url)} failed: {tail}")


def _redact_url(url: str) -> str:
    """``url`` without user info (a token may sit there)."""
    return re.sub(r"(://)[^@/]+@", r"\1", url)


# --------------------------------------------------------------------------------------------------- clients


def _split_repo(repo: str) -> tuple[str, str]:
    owner, sep, name = repo.partition("/")
    if not sep or not owner or not name or "/" in name:
        raise ForgeError("other", f"repository {repo!r} is not of the form owner/name")
    return owner, name


class _RestForge:
    """HTTP plumbing shared by the clients: one aiohttp session, JSON in and out, errors mapped to
    :class:`ForgeError`."""

    kind: str = ""
    _auth_scheme = "Bearer"
    _extra_headers: dict[str, str] = {}

    def __init__(self, api_url: str, token: str | None, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}({self.api_url!r})"

    def _repo_path(self, repo: str, suffix: str = "") -> str:
        owner, name = _split_repo(repo)
        return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}{suffix}"

    async def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                    json: dict[str, Any] | None = None, what: str = "") -> tuple[Any, aiohttp.ClientResponse]:
        """``method path`` → (decoded JSON, response). Raises :class:`ForgeError` for any non-2xx answer, a
        failed connection, a timeout or a body that is not JSON."""
        if self._session is None:
            headers = {"Accept": "application/json", "User-Agent": "trace-source", **self._extra_headers}
            if self._token:
                headers["Authorization"] = f"{self._auth_scheme} {self._token}"
            self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        url = self.api_url + path
        what = what or f"{method} {path}"
        try:
            async with self._session.request(method, url, params=params, json=json) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise self._error(resp.status, _message(text), resp.headers, what)
                try:
                    data = await resp.json(content_type=None) if text.strip() else None
                except ValueError:
                    raise ForgeError("other", f"{what}: the forge at {self.api_url} answered HTTP {resp.status} "
                                              f"with something that is not JSON ({text[:120]!r}): is the API URL "
                                              "right?", resp.status) from None
                return data, resp
        except ForgeError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ForgeError("unavailable", f"{what}: cannot reach the forge at {self.api_url} "
                                            f"({type(exc).__name__}: {exc or 'timed out'}); try again later") from None

    def _error(self, status: int, message: str, headers: Any, what: str) -> ForgeError:
        said = f" — the forge said: {message}" if message else ""
        prefix = f"{what}: HTTP {status}{said}"
        if status == 401:
            return ForgeError("auth", f"{prefix}. The token is missing, wrong or expired: give a valid token with "
                                      "pull-request write access.", status)
        if status == 429 or (status == 403 and (headers.get("X-RateLimit-Remaining") == "0"
                                                 or "rate limit" in message.lower())):
            return ForgeError("unavailable", f"{prefix}. Rate limited: try again after "
                                             f"{headers.get('Retry-After') or headers.get('X-RateLimit-Reset') or 'a while'}.",
                              status)
        if _PROTECTED.search(message):
            return ForgeError("protected", f"{prefix}. Branch protection refused it: use a branch that no "
                                           "protection rule matches.", status)
        if status == 403:
            return ForgeError("permission", f"{prefix}. The token may not do this: it needs write access to pull "
                                            "requests (and contents) of the repository.", status)
        if status == 404:
            return ForgeError("not_found", f"{prefix}. {self._not_found_hint}", status)
        if status in (409, 422) and _ALREADY_EXISTS.search(message):
            return ForgeError("conflict", f"{prefix}. A pull request for this branch exists already: look it up "
                                          "by its head branch.", status)
        if status >= 500:
            return ForgeError("unavailable", f"{prefix}. The forge failed: try again later.", status)
        return ForgeError("other", prefix + ".", status)

    _not_found_hint = "No such repository, branch or pull request: check the names."

    async def _pages(self, path: str, params: dict[str, Any], what: str, key: str | None = None) -> list[Any]:
        """Every item of a paginated list (the answer itself, or its member ``key``): pages 1, 2, … while the
        answer's ``Link`` header has a ``rel="next"`` and the page was not empty. The next page is asked for by
        number (not by the Link URL, which a Gitea behind a proxy may build from another host)."""
        size_param, size = self._page
        items: list[Any] = []
        for page in range(1, MAX_PAGES + 1):
            data, resp = await self._call("GET", path, params={**params, size_param: size, "page": page}, what=what)
            batch = (data or {}).get(key) if key and isinstance(data, dict) else data
            if not isinstance(batch, list):
                raise ForgeError("other", f"{what}: expected a JSON list, got {type(batch).__name__}")
            items.extend(batch)
            if not batch or "next" not in resp.links:
                break
        return items

    #: (page size parameter, page size) of this API's lists.
    _page: tuple[str, int] = ("per_page", 100)

    def _pull(self, data: dict[str, Any]) -> PullRequest:
        raise NotImplementedError

    def _draft_request(self, *, head: str, base: str, title: str, body: str) -> dict[str, Any]:
        """The JSON body that opens ``head`` → ``base`` as a draft."""
        raise NotImplementedError

    async def create_draft_pull(self, repo: str, *, head: str, base: str, title: str, body: str) -> PullRequest:
        data, _ = await self._call("POST", self._repo_path(repo, "/pulls"),
                                   json=self._draft_request(head=head, base=base, title=title, body=body),
                                   what=f"create a draft pull request from {head} into {base} in {repo}")
        return self._pull(data)

    async def get_pull(self, repo: str, number: int) -> PullRequest:
        data, _ = await self._call("GET", self._repo_path(repo, f"/pulls/{int(number)}"),
                                   what=f"read pull request #{number} of {repo}")
        return self._pull(data)

    async def pull_files(self, repo: str, number: int) -> list[str]:
        files = await self._pages(self._repo_path(repo, f"/pulls/{int(number)}/files"), {},
                                  f"list the files of pull request #{number} of {repo}")
        return [f["filename"] for f in files]

    async def _combined_status(self, repo: str, sha: str) -> str | None:
        """The combined commit status of ``sha``: ``failure`` (``failure``, ``error``), ``pending``, ``success``
        (also Gitea's ``warning`` and ``skipped``); None when the commit has no status — both forges answer
        ``pending`` then, and ``total_count`` 0 tells."""
        data, _ = await self._call("GET", self._repo_path(repo, f"/commits/{quote(sha, safe='')}/status"),
                                   params=dict([self._page]), what=f"read the commit status of {sha[:12]}")
        if not data or not data.get("total_count"):
            return None
        state = data.get("state") or "pending"
        return {"error": "failure", "warning": "success", "skipped": "success"}.get(state, state)

    async def default_branch(self, repo: str) -> str:
        data, _ = await self._call("GET", self._repo_path(repo), what=f"read repository {repo}")
        branch = (data or {}).get("default_branch")
        if not branch:
            raise ForgeError("other", f"read repository {repo}: it has no default branch (an empty repository?)")
        return branch

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _message(text: str) -> str:
    """The human part of a forge's error body: ``message`` plus each ``errors[].message`` (GitHub puts the
    reason for a 422 there), else the start of the text."""
    import json as _json

    try:
        body = _json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if not isinstance(body, dict):
        return str(body)[:300]
    parts = [str(body.get("message") or "").strip()]
    for err in body.get("errors") or []:
        if isinstance(err, dict) and err.get("message"):
            parts.append(str(err["message"]))
        elif isinstance(err, str):
            parts.append(err)
    return "; ".join(p for p in parts if p)[:600]


def _pull_state(data: dict[str, Any]) -> str:
    if data.get("merged") or data.get("merged_at"):
        return "merged"
    return str(data.get("state") or "")


class GitHubForge(_RestForge):
    """GitHub's REST API (github.com or GitHub Enterprise Server's ``/api/v3``)."""

    kind = "github"
    _auth_scheme = "Bearer"
    _extra_headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": GITHUB_API_VERSION}
    _not_found_hint = ("No such repository, branch or pull request — or a private repository the token cannot "
                       "see: GitHub answers 404, not 403, then. Check the name and that the token has access to it.")

    @staticmethod
    def _pull(data: dict[str, Any]) -> PullRequest:
        return PullRequest(number=int(data["number"]), url=data.get("html_url") or "", title=data.get("title") or "",
                           head_ref=data["head"]["ref"], head_sha=data["head"]["sha"], base_ref=data["base"]["ref"],
                           draft=bool(data.get("draft")), state=_pull_state(data))

    async def find_pull(self, repo: str, head_branch: str) -> PullRequest | None:
        owner, _ = _split_repo(repo)
        data, _ = await self._call(
            "GET", self._repo_path(repo, "/pulls"),
            params={"head": f"{owner}:{head_branch}", "state": "all", "sort": "created", "direction": "desc",
                    "per_page": 100}, what=f"look up the pull request from {head_branch} in {repo}")
        # The head filter is GitHub's; the check below keeps a server that ignored it from handing back another
        # branch's pull request.
        pulls = [self._pull(p) for p in data or [] if p.get("head", {}).get("ref") == head_branch]
        return max(pulls, key=lambda p: p.number, default=None)

    def _draft_request(self, *, head: str, base: str, title: str, body: str) -> dict[str, Any]:
        return {"title": title, "head": head, "base": base, "body": body, "draft": True}

    async def check_status(self, repo: str, sha: str) -> str | None:
        """Check runs (GitHub Actions and other apps) and commit statuses together: ``failure`` when any failed
        (conclusion ``failure``, ``timed_out``, ``cancelled``, ``action_required``, ``startup_failure``,
        ``stale``; status state ``error`` / ``failure``), else ``pending`` when any has not finished, else
        ``success`` (``neutral`` and ``skipped`` count as passed), None when there are none. A token that may not
        read check runs (403) leaves only the statuses."""
        states: list[str] = []
        try:
            runs = await self._pages(self._repo_path(repo, f"/commits/{quote(sha, safe='')}/check-runs"), {},
                                     f"list the check runs of {sha[:12]}", key="check_runs")
        except ForgeError as exc:
            if exc.kind != "permission":
                raise
            runs = []
        for run in runs:
            if run.get("status") != "completed":
                states.append("pending")
            elif run.get("conclusion") in ("failure", "timed_out", "cancelled", "action_required",
                                           "startup_failure", "stale"):
                states.append("failure")
            else:
                states.append("success")
        if (combined := await self._combined_status(repo, sha)) is not None:
            states.append(combined)
        return _combine(states)


class GiteaForge(_RestForge):
    """Gitea's (and Forgejo's) API v1."""

    kind = "gitea"
    _auth_scheme = "token"
    #: Page size asked for; Gitea caps it at ``[api] MAX_RESPONSE_ITEMS`` (default 50).
    _page = ("limit", 50)

    def __init__(self, api_url: str, token: str | None, *, wip_prefixes: tuple[str, ...] = GITEA_WIP_PREFIXES,
                 timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        super().__init__(api_url, token, timeout_s=timeout_s)
        self.wip_prefixes = wip_prefixes

    def is_wip(self, title: str) -> bool:
        return any(title[:len(p)].lower() == p.lower() for p in self.wip_prefixes)

    def _pull(self, data: dict[str, Any]) -> PullRequest:
        title = data.get("title") or ""
        draft = data["draft"] if "draft" in data else self.is_wip(title)
        return PullRequest(number=int(data["number"]), url=data.get("html_url") or "", title=title,
                           head_ref=data["head"]["ref"], head_sha=data["head"]["sha"], base_ref=data["base"]["ref"],
                           draft=bool(draft), state=_pull_state(data))

    async def find_pull(self, repo: str, head_branch: str) -> PullRequest | None:
        pulls = await self._pages(self._repo_path(repo, "/pulls"), {"state": "all"},
                                  f"look up the pull request from {head_branch} in {repo}")
        mine = [p for p in pulls if p.get("head", {}).get("ref") == head_branch
                # The branch of this repository, not a fork's branch of the same name.
                and p["head"].get("repo_id") == p.get("base", {}).get("repo_id")]
        return max((self._pull(p) for p in mine), key=lambda p: p.number, default=None)

    def _draft_request(self, *, head: str, base: str, title: str, body: str) -> dict[str, Any]:
        # No draft flag on create: the work-in-progress title prefix makes it one.
        return {"title": title if self.is_wip(title) else f"{self.wip_prefixes[0]} {title}", "head": head,
                "base": base, "body": body}

    async def check_status(self, repo: str, sha: str) -> str | None:
        """The combined commit status (Gitea Actions report through it too); see
        :meth:`_RestForge._combined_status`."""
        return await self._combined_status(repo, sha)


def _combine(states: list[str]) -> str | None:
    if not states:
        return None
    for worst in ("failure", "pending"):
        if worst in states:
            return worst
    return "success"
