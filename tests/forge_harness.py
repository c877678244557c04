"""A real Gitea server for the forge tests, built from Gitea's module on the Go module proxy.

Why this exists: the fix stage opens draft pull requests through a forge's REST API (:mod:`pipeline.forge`), and
the tests talk to a real forge where one can run here. Gitea is a Go module (``code.gitea.io/gitea``), so the Go
toolchain builds it like any module; no Docker, no download site. Forgejo speaks the same API v1.

Pieces:

* :func:`build_gitea` (``python tests/forge_harness.py --build``; ``make test`` runs it once) downloads the module
  with ``go mod download`` and builds it with ``go build`` inside the module's directory (``go install module@v``
  refuses Gitea: its go.mod has ``replace`` directives), into ``~/.cache/trace-source/gitea-<version>/gitea``,
  with Gitea's ``options/`` (locales, licence and .gitignore templates) beside it: Gitea does not start without its
  locales, while the web UI's templates and frontend assets are not needed for the API and are left out. The
  first build takes about 9 minutes on 2 busy cores (module downloads included); a rebuild with Go's build cache
  warm is much quicker.
* :class:`GiteaServer` runs one Gitea on a free loopback port from a temporary directory: SQLite, no SSH, no
  registration, no mailer, no Actions, offline mode. Before the web server starts it creates the admin user and an
  API token with Gitea's own CLI (``gitea admin user create --admin``, ``gitea admin user generate-access-token``).
  Helpers create users, repositories, branch protections and commit statuses through the API and push with git
  over HTTP, the token in ``http.extraHeader`` given through ``GIT_CONFIG_*`` variables (never on a command
  line).

Run as root (as CI here does), Gitea refuses to start unless ``I_AM_BEING_UNSAFE_RUNNING_AS_ROOT`` is set in its
``app.ini``; the harness sets it then — the server is a throwaway on 127.0.0.1 with its data in a temporary
directory.

The classes do not depend on pytest; ``tests/conftest.py`` wraps :class:`GiteaServer` in the session fixture
``gitea``. All methods are synchronous; from an async test call the slow ones through ``asyncio.to_thread``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kafka_harness import _free_ports

GITEA_MODULE = "code.gitea.io/gitea"
GITEA_VERSION = "1.27.3"
CACHE_DIR = Path.home() / ".cache" / "trace-source"
GITEA_HOME = CACHE_DIR / f"gitea-{GITEA_VERSION}"
GITEA_BINARY = GITEA_HOME / "gitea"
#: A Gitea (or Forgejo) binary to use instead, with its ``options/`` directory beside it.
GITEA_BINARY_ENV = "TRACE_SOURCE_TEST_GITEA"
HOST = "127.0.0.1"
ADMIN = "trace-admin"
START_TIMEOUT_S = 90.0


class GiteaError(Exception):
    """Gitea could not be built or started, or an API call failed; the message says why."""


# --------------------------------------------------------------------------------------------------- building


def gitea_binary() -> Path:
    return Path(os.environ.get(GITEA_BINARY_ENV) or GITEA_BINARY)


def build_gitea(version: str = GITEA_VERSION, home: Path | None = None) -> Path:
    """Build Gitea ``version`` into ``home`` (default ``~/.cache/trace-source/gitea-<version>``) unless it is
    there; returns the binary. Needs ``go`` (1.26+) and the Go module proxy."""
    home = home or CACHE_DIR / f"gitea-{version}"
    binary = home / "gitea"
    if binary.exists() and (home / "options" / "locale").is_dir():
        return binary
    if shutil.which("go") is None:
        raise GiteaError("`go` is not on PATH: install Go 1.26+ to build Gitea for the forge tests")
    started = time.monotonic()
    dl = _run(["go", "mod", "download", "-json", f"{GITEA_MODULE}@v{version}"], timeout=1800)
    source = Path(json.loads(dl.stdout)["Dir"])
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=home))
    try:
        # Gitea's default build: pure-Go SQLite (modernc), no bindata (options/ is read from STATIC_ROOT_PATH).
        _run(["go", "build", "-trimpath", "-ldflags", f"-s -w -X main.Version={version}", "-o", str(tmp / "gitea"),
              "."], cwd=source, timeout=3600)
        shutil.copytree(source / "options", tmp / "options")
        for path in [tmp / "options", *(tmp / "options").rglob("*")]:  # copied read-only from the module cache
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(home / "options", ignore_errors=True)
        (tmp / "options").rename(home / "options")
        (tmp / "gitea").rename(binary)  # last: its presence means the build is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built Gitea {version} into {home} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return binary


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 120.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise GiteaError(f"{' '.join(cmd[:4])} … exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


# --------------------------------------------------------------------------------------------------- the server


class GiteaServer:
    """One Gitea on ``127.0.0.1`` with its data in ``workdir`` (a fresh temporary directory by default).

    After :meth:`start`: :attr:`api_url` (``http://127.0.0.1:PORT/api/v1``), :attr:`base_url`, :attr:`token` (the
    admin's API token, all scopes) and :attr:`admin` (its user name)."""

    def __init__(self, binary: Path | None = None, workdir: Path | None = None) -> None:
        self.binary = Path(binary or gitea_binary())
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gitea-"))
        self.port = 0
        self.token = ""
        self.admin = ADMIN
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._secrets = (secrets.token_hex(32), secrets.token_hex(32))  # SECRET_KEY, INTERNAL_TOKEN

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v1"

    @property
    def config(self) -> Path:
        return self.workdir / "custom" / "conf" / "app.ini"

    def _cli(self, *args: str) -> str:
        env = {**os.environ, "GITEA_WORK_DIR": str(self.workdir)}
        return _run([str(self.binary), "--config", str(self.config), "--work-path", str(self.workdir), *args],
                    cwd=self.workdir, env=env, timeout=120).stdout

    def _write_config(self) -> None:
        w = self.workdir
        as_root = "I_AM_BEING_UNSAFE_RUNNING_AS_ROOT = true\n" if os.geteuid() == 0 else ""
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"""\
APP_NAME = trace-source test forge
RUN_USER = {getpass.getuser()}
RUN_MODE = prod
WORK_PATH = {w}
{as_root}
[server]
PROTOCOL = http
HTTP_ADDR = {HOST}
HTTP_PORT = {self.port}
ROOT_URL = {self.base_url}/
DISABLE_SSH = true
START_SSH_SERVER = false
OFFLINE_MODE = true
LFS_START_SERVER = false
STATIC_ROOT_PATH = {self.binary.parent}
APP_DATA_PATH = {w}/data

[database]
DB_TYPE = sqlite3
PATH = {w}/data/gitea.db

[repository]
ROOT = {w}/repositories

[repository.pull-request]
WORK_IN_PROGRESS_PREFIXES = WIP:,[WIP]

[security]
INSTALL_LOCK = true
SECRET_KEY = {self._secrets[0]}
INTERNAL_TOKEN = {self._secrets[1]}

[service]
DISABLE_REGISTRATION = true
REQUIRE_SIGNIN_VIEW = false

[mailer]
ENABLED = false

[oauth2]
ENABLED = false

[actions]
ENABLED = false

[cron]
ENABLED = false

[session]
PROVIDER = memory

[cache]
ADAPTER = memory

[log]
MODE = file
LEVEL = Info
ROOT_PATH = {w}/log
""")

    def start(self) -> "GiteaServer":
        if not self.binary.exists():
            raise GiteaError(f"no Gitea binary at {self.binary}: run `make test` or "
                             f"`python tests/forge_harness.py --build` (or set {GITEA_BINARY_ENV})")
        self.port = _free_ports(1)[0]
        self._write_config()
        self._cli("migrate")
        self._cli("admin", "user", "create", "--username", self.admin, "--email", f"{self.admin}@example.invalid",
                  "--admin", "--random-password", "--must-change-password=false")
        self.token = self._cli("admin", "user", "generate-access-token", "--username", self.admin,
                               "--token-name", "tests", "--scopes", "all", "--raw").strip().splitlines()[-1]
        for _ in range(3):  # another process may take the free port before Gitea binds it: then take another
            if self._serve():
                return self
            self.port = _free_ports(1)[0]
            self._write_config()
        raise GiteaError(f"Gitea could not bind a free port: {self.log_tail()}")

    def _serve(self) -> bool:
        """Start ``gitea web`` and wait until its API answers; False when the port was taken meanwhile."""
        self._log = open(self.workdir / "web.out", "wb")
        self._proc = subprocess.Popen([str(self.binary), "--config", str(self.config), "--work-path",
                                       str(self.workdir), "web"], cwd=self.workdir, stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, "GITEA_WORK_DIR": str(self.workdir)},
                                      start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                self._log.close()
                if "address already in use" in tail:
                    return False
                raise GiteaError(f"Gitea exited {self._proc.returncode} while starting: {tail}")
            try:
                if self.api("GET", "/version")[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise GiteaError(f"Gitea did not answer on {self.api_url} within {START_TIMEOUT_S:.0f} s: {tail}")

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.workdir / "web.out", self.workdir / "log" / "gitea.log"):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=20)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "GiteaServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API helpers ---------------------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> tuple[int, Any]:
        """``method /api/v1<path>`` with the admin token (or ``token``) → (status, decoded JSON or None)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api_url + path, data=data, method=method)
        req.add_header("Authorization", f"token {token or self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw.strip() else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw.strip() else None
            except ValueError:
                return exc.code, raw.decode("utf-8", "replace")

    def _ok(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        status, data = self.api(method, path, body, token=token)
        if status >= 300:
            raise GiteaError(f"{method} {path}: HTTP {status}: {data}")
        return data

    def create_user(self, name: str, *, scopes: str = "all") -> str:
        """A non-admin user ``name``; returns an API token of it with ``scopes`` (e.g. ``read:repository``)."""
        self._ok("POST", "/admin/users", {"username": name, "email": f"{name}@example.invalid",
                                          "password": secrets.token_urlsafe(16), "must_change_password": False})
        return self._cli("admin", "user", "generate-access-token", "--username", name, "--token-name", "tests",
                         "--scopes", scopes, "--raw").strip().splitlines()[-1]

    def create_repo(self, name: str, *, private: bool = False, default_branch: str = "main") -> str:
        """An empty repository of the admin; returns ``owner/name``."""
        data = self._ok("POST", "/user/repos", {"name": name, "private": private, "auto_init": False,
                                                "default_branch": default_branch})
        return data["full_name"]

    def clone_url(self, repo: str) -> str:
        return f"{self.base_url}/{repo}.git"

    def push(self, checkout: Path, repo: str, *refspecs: str, token: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        """``git push`` from ``checkout`` to ``repo`` over HTTP, authenticated by the token (admin's by default)
        through ``GIT_CONFIG_*`` variables (:func:`pipeline.forge.git_auth_env`)."""
        from pipeline.forge import git_auth_env

        url = self.clone_url(repo)
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **git_auth_env(url, token or self.token)}
        proc = subprocess.run(["git", "push", url, *refspecs], cwd=checkout, env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise GiteaError(f"git push {' '.join(refspecs)} to {repo} failed: {proc.stderr.strip()}")
        if proc.returncode == 0:
            for refspec in refspecs:
                src, _, dst = refspec.lstrip("+").partition(":")
                if dst.startswith("refs/heads/"):
                    sha = subprocess.run(["git", "rev-parse", src], cwd=checkout, capture_output=True, text=True,
                                         check=True).stdout.strip()
                    self.wait_until_pushed(repo, dst.removeprefix("refs/heads/"), sha)
        return proc

    def wait_until_pushed(self, repo: str, branch: str, sha: str, timeout_s: float = 30.0) -> None:
        """Wait until Gitea has taken in a push of ``sha`` to ``branch``: it processes pushes in a queue after
        ``git push`` returns (a first push leaves the repository "empty" — no pull requests — until then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status, branch_info = self.api("GET", f"/repos/{repo}/branches/{branch}")
            _, info = self.api("GET", f"/repos/{repo}")
            if status == 200 and branch_info["commit"]["id"] == sha and not (info or {}).get("empty", True):
                return
            if time.monotonic() > deadline:
                raise GiteaError(f"Gitea did not take in the push of {sha[:12]} to {repo} {branch} within "
                                 f"{timeout_s:.0f} s: {branch_info}")
            time.sleep(0.1)

    def protect_branch(self, repo: str, branch: str) -> None:
        """A branch protection rule for ``branch`` that lets nobody push."""
        self._ok("POST", f"/repos/{repo}/branch_protections", {"rule_name": branch, "enable_push": False})

    def set_status(self, repo: str, sha: str, state: str, context: str = "ci/tests") -> None:
        """A commit status (``pending``, ``success``, ``error``, ``failure``, ``warning``) on ``sha``."""
        self._ok("POST", f"/repos/{repo}/statuses/{sha}", {"state": state, "context": context,
                                                            "description": f"{context}: {state}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--build", action="store_true", help="build Gitea into the cache unless it is there")
    group.add_argument("--binary-path", action="store_true", help="print where the Gitea binary is (or goes)")
    group.add_argument("--run", action="store_true", help="start a server and keep it until Ctrl-C")
    args = parser.parse_args(argv)
    if args.binary_path:
        print(gitea_binary())
    elif args.build:
        print(build_gitea())
    else:
        with GiteaServer() as server:
            token_file = server.workdir / "admin-token"
            token_file.write_text(server.token)
            token_file.chmod(0o600)
            print(f"Gitea {GITEA_VERSION} at {server.base_url} (API {server.api_url}); admin {server.admin}, "
                  f"its API token in {token_file}; Ctrl-C stops it", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
