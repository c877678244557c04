"""The forge clients (:mod:`pipeline.forge`): draft pull requests, lookup by head branch, changed files, check
status and the error kinds.

The Gitea client runs against a **real Gitea** (``gitea`` fixture, ``tests/forge_harness.py``), with branches
pushed by git over HTTP. The GitHub client runs the same contract against ``tests/fake_github.py``, a local
**fake of the hosted GitHub REST API** (github.com cannot be reached from here), backed by a real bare git
repository on disk that the branches are pushed to.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_github import FakeGitHub
from forge_harness import GiteaServer
from pipeline.forge import (Forge, ForgeError, GiteaForge, detect_forge, git_auth_env, make_forge, push_error)

BRANCH = "trace-source/fix-0123456789ab"
GITHUB_TOKEN = "ghp_" + "f" * 36


def git(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(["git", "-c", "user.name=Test", "-c", "user.email=test@example.invalid", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {proc.stderr}")
    return proc.stdout.strip()


@dataclass
class Case:
    """One forge with one fresh repository (``main`` with a commit) and a local checkout that pushes to it."""

    kind: str
    forge: Forge
    repo: str
    checkout: Path
    remote: str  # what git pushes to
    push_env: dict[str, str]
    web_url: str
    after_push: Callable[[str, str], None] = lambda branch, sha: None

    def commit_branch(self, branch: str, files: dict[str, str], *, base: str = "main") -> str:
        """A commit on ``branch`` (from ``base``) writing ``files``, pushed (forced); returns its sha."""
        git(self.checkout, "checkout", "--quiet", "-B", branch, base)
        for path, text in files.items():
            (self.checkout / path).parent.mkdir(parents=True, exist_ok=True)
            (self.checkout / path).write_text(text)
        git(self.checkout, "add", "-A")
        git(self.checkout, "commit", "--quiet", "-m", f"change {', '.join(files)[:60]}")
        git(self.checkout, "push", "--quiet", "--force", self.remote, f"{branch}:refs/heads/{branch}",
            env=self.push_env)
        sha = git(self.checkout, "rev-parse", "HEAD")
        self.after_push(branch, sha)
        return sha


def _init_checkout(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "--quiet", "-b", "main")
    (path / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (path / "README.md").write_text("# demo\n")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "initial")
    return path


@pytest.fixture
async def gitea_case(gitea: GiteaServer, tmp_path: Path) -> AsyncIterator[Case]:
    name = f"demo-{uuid.uuid4().hex[:8]}"
    repo = await asyncio.to_thread(gitea.create_repo, name)
    checkout = _init_checkout(tmp_path / "checkout")
    await asyncio.to_thread(gitea.push, checkout, repo, "main:refs/heads/main")
    forge = make_forge("gitea", gitea.api_url, gitea.token)
    url = gitea.clone_url(repo)
    yield Case("gitea", forge, repo, checkout, url, git_auth_env(url, gitea.token), gitea.base_url,
               after_push=lambda branch, sha: gitea.wait_until_pushed(repo, branch, sha))
    await forge.close()


@pytest.fixture
async def github_case(fake_github: FakeGitHub, tmp_path: Path) -> AsyncIterator[Case]:
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(bare))
    checkout = _init_checkout(tmp_path / "checkout")
    git(checkout, "push", "--quiet", str(bare), "main:refs/heads/main")
    fake_github.add_repo("octo-org/demo", bare)
    fake_github.add_token(GITHUB_TOKEN)
    forge = make_forge("github", fake_github.api_url, GITHUB_TOKEN)
    yield Case("github", forge, "octo-org/demo", checkout, str(bare), {}, fake_github.api_url)
    await forge.close()


@pytest.fixture(params=["gitea", "github"])
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(f"{request.param}_case")


# ------------------------------------------------------------------------------------------- the contract


async def test_draft_pull_request_is_created_found_and_read_back(case: Case) -> None:
    sha = case.commit_branch(BRANCH, {"calc.py": "def add(a, b):\n    return a + b\n",
                                      "tests/test_calc.py": "from calc import add\n"})
    assert await case.forge.default_branch(case.repo) == "main"
    assert await case.forge.find_pull(case.repo, BRANCH) is None

    created = await case.forge.create_draft_pull(case.repo, head=BRANCH, base="main", title="Fix add()",
                                                 body="## Failure\nadd() subtracts")
    assert created.draft is True
    assert (created.head_ref, created.head_sha, created.base_ref, created.state) == (BRANCH, sha, "main", "open")
    assert created.url.startswith(case.web_url) and created.url.endswith(f"/{created.number}")
    assert "Fix add()" in created.title
    if case.kind == "gitea":  # Gitea expresses a draft by the work-in-progress title prefix
        assert created.title == "WIP: Fix add()"

    found = await case.forge.find_pull(case.repo, BRANCH)
    assert found == created

    # A repeated create is a conflict; the caller then finds the existing one: still one pull request.
    with pytest.raises(ForgeError) as err:
        await case.forge.create_draft_pull(case.repo, head=BRANCH, base="main", title="Fix add()", body="again")
    assert err.value.kind == "conflict", err.value
    assert (await case.forge.find_pull(case.repo, BRANCH)).number == created.number

    got = await case.forge.get_pull(case.repo, created.number)
    assert (got.head_sha, got.draft, got.state) == (sha, True, "open")
    assert sorted(await case.forge.pull_files(case.repo, created.number)) == ["calc.py", "tests/test_calc.py"]


async def test_pull_request_follows_a_forced_push_of_its_branch(case: Case) -> None:
    case.commit_branch(BRANCH, {"calc.py": "def add(a, b):\n    return b + a\n"})
    pull = await case.forge.create_draft_pull(case.repo, head=BRANCH, base="main", title="Fix", body="")
    # A reprocessed fix moves the branch to a new commit (force push from main again).
    second = case.commit_branch(BRANCH, {"calc.py": "def add(a, b):\n    return a + b\n", "NOTES.md": "n\n"})

    async def head() -> str:
        return (await case.forge.get_pull(case.repo, pull.number)).head_sha

    # Gitea updates a pull request's head from its post-receive hook, asynchronously.
    for _ in range(100):
        if await head() == second:
            break
        await asyncio.sleep(0.1)
    assert await head() == second
    assert sorted(await case.forge.pull_files(case.repo, pull.number)) == ["NOTES.md", "calc.py"]


async def test_find_pull_returns_the_newest_of_any_state(case: Case) -> None:
    case.commit_branch(BRANCH, {"calc.py": "x = 1\n"})
    first = await case.forge.create_draft_pull(case.repo, head=BRANCH, base="main", title="First", body="")
    await _close(case, first.number)
    closed = await case.forge.find_pull(case.repo, BRANCH)
    assert closed is not None and (closed.number, closed.state) == (first.number, "closed")

    case.commit_branch("other-branch", {"other.py": "y = 2\n"})
    other = await case.forge.create_draft_pull(case.repo, head="other-branch", base="main", title="Other", body="")
    second = await case.forge.create_draft_pull(case.repo, head=BRANCH, base="main", title="Second", body="")
    assert len({first.number, other.number, second.number}) == 3
    found = await case.forge.find_pull(case.repo, BRANCH)
    assert (found.number, found.state) == (second.number, "open")
    assert (await case.forge.find_pull(case.repo, "other-branch")).number == other.number


async def _close(case: Case, number: int) -> None:
    # Both APIs close a pull request with PATCH .../pulls/{number} {"state": "closed"}.
    await case.forge._call("PATCH", case.forge._repo_path(case.repo, f"/pulls/{number}"),  # type: ignore[attr-defined]
                           json={"state": "closed"})


async def test_check_status_none_pending_success_failure(case: Case) -> None:
    sha = case.commit_branch(BRANCH, {"calc.py": "z = 3\n"})
    assert await case.forge.check_status(case.repo, sha) is None

    async def status(state: str, context: str) -> None:
        await case.forge._call("POST", case.forge._repo_path(case.repo, f"/statuses/{sha}"),  # type: ignore[attr-defined]
                               json={"state": state, "context": context, "description": state})

    await status("pending", "ci/tests")
    assert await case.forge.check_status(case.repo, sha) == "pending"
    await status("success", "ci/tests")
    assert await case.forge.check_status(case.repo, sha) == "success"
    await status("failure", "ci/lint")
    assert await case.forge.check_status(case.repo, sha) == "failure"


async def test_bad_token_is_an_auth_error_and_is_never_shown(case: Case) -> None:
    bad = "not-a-real-token-" + uuid.uuid4().hex
    api_url = case.forge.api_url  # type: ignore[attr-defined]
    forge = make_forge(case.kind, api_url, bad)
    try:
        with pytest.raises(ForgeError) as err:
            await forge.create_draft_pull(case.repo, head=BRANCH, base="main", title="t", body="b")
        assert (err.value.kind, err.value.status) == ("auth", 401)
        assert bad not in str(err.value) and bad not in repr(forge)
    finally:
        await forge.close()


async def test_missing_repository_is_not_found(case: Case) -> None:
    with pytest.raises(ForgeError) as err:
        await case.forge.find_pull(f"{case.repo.split('/')[0]}/no-such-repo-{uuid.uuid4().hex[:6]}", BRANCH)
    assert (err.value.kind, err.value.status) == ("not_found", 404)
    with pytest.raises(ForgeError) as err:
        await case.forge.get_pull(case.repo, 999)
    assert err.value.kind == "not_found"


async def test_unreachable_forge_is_unavailable(case: Case) -> None:
    from kafka_harness import _free_ports

    forge = make_forge(case.kind, f"http://127.0.0.1:{_free_ports(1)[0]}/api/v1", "t")
    try:
        with pytest.raises(ForgeError) as err:
            await forge.default_branch(case.repo)
        assert (err.value.kind, err.value.status) == ("unavailable", None)
    finally:
        await forge.close()


# ------------------------------------------------------------------------------------------- Gitea only


async def test_gitea_read_only_token_may_not_open_a_pull_request(gitea: GiteaServer, gitea_case: Case) -> None:
    gitea_case.commit_branch(BRANCH, {"calc.py": "w = 4\n"})
    reader = await asyncio.to_thread(gitea.create_user, f"reader-{uuid.uuid4().hex[:6]}",
                                     scopes="read:repository")
    forge = make_forge("gitea", gitea.api_url, reader)
    try:
        assert await forge.find_pull(gitea_case.repo, BRANCH) is None  # reading is allowed
        with pytest.raises(ForgeError) as err:
            await forge.create_draft_pull(gitea_case.repo, head=BRANCH, base="main", title="t", body="b")
        assert (err.value.kind, err.value.status) == ("permission", 403)
    finally:
        await forge.close()


async def test_gitea_protected_branch_push_is_refused_as_protected(gitea: GiteaServer, gitea_case: Case) -> None:
    await asyncio.to_thread(gitea.protect_branch, gitea_case.repo, "main")
    git(gitea_case.checkout, "commit", "--quiet", "--allow-empty", "-m", "direct to main")
    proc = await asyncio.to_thread(gitea.push, gitea_case.checkout, gitea_case.repo, "HEAD:refs/heads/main",
                                   check=False)
    assert proc.returncode != 0
    err = push_error(gitea_case.remote, proc.stderr)
    assert err.kind == "protected", proc.stderr
    assert gitea.token not in str(err)


async def test_gitea_push_with_a_bad_token_is_auth(gitea: GiteaServer, gitea_case: Case) -> None:
    proc = await asyncio.to_thread(gitea.push, gitea_case.checkout, gitea_case.repo, "main:refs/heads/copy",
                                   token="0" * 40, check=False)
    assert proc.returncode != 0
    assert push_error(gitea_case.remote, proc.stderr).kind == "auth", proc.stderr


async def test_gitea_pages_through_files_and_pulls(gitea: GiteaServer, gitea_case: Case) -> None:
    files = {f"pkg/mod_{i:03}.py": f"v = {i}\n" for i in range(60)}  # more than one page of 50
    gitea_case.commit_branch(BRANCH, files)
    pull = await gitea_case.forge.create_draft_pull(gitea_case.repo, head=BRANCH, base="main", title="Many",
                                                    body="")
    assert sorted(await gitea_case.forge.pull_files(gitea_case.repo, pull.number)) == sorted(files)
    for i in range(2):
        gitea_case.commit_branch(f"other-{i}", {f"o{i}.py": "o\n"})
        await gitea_case.forge.create_draft_pull(gitea_case.repo, head=f"other-{i}", base="main", title="o", body="")
    one_per_page = GiteaForge(gitea.api_url, gitea.token)
    one_per_page._page = ("limit", 1)  # the list has no head filter: the lookup reads every page
    try:
        assert (await one_per_page.find_pull(gitea_case.repo, BRANCH)).number == pull.number
    finally:
        await one_per_page.close()


# ------------------------------------------------------------------------------------------- GitHub only


async def test_github_private_repository_without_access_reads_as_not_found(fake_github: FakeGitHub,
                                                                            github_case: Case,
                                                                            tmp_path: Path) -> None:
    fake_github.add_repo("octo-org/secret", github_case.checkout, private=True)
    fake_github.add_token("ghp_other", repos={"octo-org/demo"})
    forge = make_forge("github", fake_github.api_url, "ghp_other")
    try:
        with pytest.raises(ForgeError) as err:
            await forge.default_branch("octo-org/secret")
        assert err.value.kind == "not_found" and "private repository" in str(err.value)
    finally:
        await forge.close()


async def test_github_read_only_token_is_permission(fake_github: FakeGitHub, github_case: Case) -> None:
    github_case.commit_branch(BRANCH, {"calc.py": "r = 1\n"})
    fake_github.add_token("ghp_reader", write=False)
    forge = make_forge("github", fake_github.api_url, "ghp_reader")
    try:
        with pytest.raises(ForgeError) as err:
            await forge.create_draft_pull(github_case.repo, head=BRANCH, base="main", title="t", body="b")
        assert (err.value.kind, err.value.status) == ("permission", 403)
    finally:
        await forge.close()


@pytest.mark.parametrize(("status", "message", "headers"), [
    (502, "Server Error", {}),
    (403, "API rate limit exceeded for user ID 1.", {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}),
    (429, "Too Many Requests", {"Retry-After": "30"}),
])
async def test_github_outage_and_rate_limit_are_unavailable(fake_github: FakeGitHub, github_case: Case, status: int,
                                                            message: str, headers: dict[str, str]) -> None:
    fake_github.fail_next(status, message, headers=headers)
    with pytest.raises(ForgeError) as err:
        await github_case.forge.find_pull(github_case.repo, BRANCH)
    assert (err.value.kind, err.value.status) == ("unavailable", status)
    assert await github_case.forge.find_pull(github_case.repo, BRANCH) is None  # the next call goes through


async def test_github_check_runs_count_with_statuses(fake_github: FakeGitHub, github_case: Case) -> None:
    sha = github_case.commit_branch(BRANCH, {"calc.py": "c = 1\n"})

    async def check_run(**body: str) -> None:
        await github_case.forge._call("POST", github_case.forge._repo_path(github_case.repo, "/check-runs"),  # type: ignore[attr-defined]
                                      json={"name": "tests", "head_sha": sha, **body})

    await check_run(status="in_progress")
    assert await github_case.forge.check_status(github_case.repo, sha) == "pending"  # no statuses, one run
    await check_run(status="completed", conclusion="success", name="lint")
    assert await github_case.forge.check_status(github_case.repo, sha) == "pending"
    fake_github.fail_next(403, "Resource not accessible by personal access token")  # check runs unreadable
    assert await github_case.forge.check_status(github_case.repo, sha) is None  # ... and no statuses
    await check_run(status="completed", conclusion="timed_out", name="e2e")
    assert await github_case.forge.check_status(github_case.repo, sha) == "failure"


async def test_github_requests_follow_the_documented_api(fake_github: FakeGitHub, github_case: Case) -> None:
    github_case.commit_branch(BRANCH, {f"f{i:03}.txt": "x\n" for i in range(130)})  # two pages of 100
    pull = await github_case.forge.create_draft_pull(github_case.repo, head=BRANCH, base="main", title="T",
                                                     body="B")
    assert len(await github_case.forge.pull_files(github_case.repo, pull.number)) == 130
    await github_case.forge.find_pull(github_case.repo, BRANCH)
    create = next(r for r in fake_github.requests if r.method == "POST")
    assert create.body == {"title": "T", "head": BRANCH, "base": "main", "body": "B", "draft": True}
    lookup = [r for r in fake_github.requests if r.method == "GET" and r.path.endswith("/pulls")][-1]
    assert lookup.query["head"] == [f"octo-org:{BRANCH}"] and lookup.query["state"] == ["all"]
    files = [r for r in fake_github.requests if r.path.endswith("/files")]
    assert [r.query["page"] for r in files] == [["1"], ["2"]]
    assert all(r.authorization for r in fake_github.requests)


# ------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(("remote", "api_url", "kind", "expected"), [
    ("https://github.com/o/n.git", None, "auto", ("github", "https://api.github.com")),
    ("git@github.com:o/n.git", None, "auto", ("github", "https://api.github.com")),
    ("ssh://git@github.com/o/n", None, "auto", ("github", "https://api.github.com")),
    ("https://git.example.com/o/n.git", "https://git.example.com/api/v1/", "auto",
     ("gitea", "https://git.example.com/api/v1")),
    ("https://ghe.example.com/o/n.git", "https://ghe.example.com/api/v3", "auto",
     ("github", "https://ghe.example.com/api/v3")),
    ("https://code.example.com/o/n.git", "https://code.example.com/api", "gitea",
     ("gitea", "https://code.example.com/api")),
])
def test_detect_forge(remote: str, api_url: str | None, kind: str, expected: tuple[str, str]) -> None:
    assert detect_forge(remote, api_url, kind) == expected


@pytest.mark.parametrize(("remote", "api_url", "kind", "says"), [
    ("/srv/git/demo.git", None, "auto", "a local path"),
    ("https://git.example.com/o/n.git", None, "auto", "--forge-api-url"),
    ("https://git.example.com/o/n.git", None, "gitea", "--forge-api-url"),
    ("https://git.example.com/o/n.git", "https://git.example.com/rest", "auto", "--forge github or --forge gitea"),
    ("https://git.example.com/o/n.git", "git.example.com/api/v1", "auto", "not an http(s) URL"),
    ("https://github.com/o/n.git", None, "gitlab", "unknown forge kind"),
])
def test_detect_forge_says_what_to_set(remote: str, api_url: str | None, kind: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        detect_forge(remote, api_url, kind)


def test_git_auth_env_keeps_the_token_off_the_command_line() -> None:
    env = git_auth_env("https://git.example.com/o/n.git", "s3cret")
    assert env["GIT_CONFIG_COUNT"] == "1" and env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    assert env["GIT_CONFIG_VALUE_0"].startswith("Authorization: Basic ")
    assert git_auth_env("/srv/git/demo.git", "s3cret") == {} and git_auth_env("https://h/o/n", None) == {}
