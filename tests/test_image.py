"""The container image (``make image``) runs as the chart runs it, and receives spans: ``make image-test``.

Marked ``image`` and left out of ``make test`` (``addopts`` in pyproject.toml): it needs the image built by
``make image`` (root, buildah; a few minutes the first time) in buildah's local storage. It fails — never skips — when
the image or the tools are missing.

The image's root filesystem is mounted (``buildah mount``) and ``trace-source serve`` is started from it the way the
chart's pod spec asks: as user 10001, on a **read-only** root (a private mount namespace remounts it read-only), with
only ``/tmp`` (tmpfs) and the working directory (a host directory) writable, with the image's own environment,
working directory and entry point. The real OpenTelemetry exporters (HTTP and gRPC) send an agent run; the embedded
assembler inside the image writes its envelope, which the test reads back.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from interop_support import make_agent_traces, wait_for
from normalizers.envelope import Envelope

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[1]
VERSION = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
               if line.startswith("version = "))
IMAGE = os.environ.get("TRACE_SOURCE_IMAGE", f"localhost/trace-source:{VERSION}")
UID = 10001


def buildah(*args: str) -> str:
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.fail("the image test needs root and buildah (apt-get install buildah); build the image with "
                    "`make image` first", pytrace=False)
    proc = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"buildah {' '.join(args)} failed: {proc.stderr.strip()}\n(build the image with `make image`; "
                    f"another image: TRACE_SOURCE_IMAGE=name:tag)", pytrace=False)
    return proc.stdout.strip()


@pytest.fixture
def rootfs():
    """The image's configuration and its root filesystem mounted on the host (read-write here; the server gets a
    read-only view of it)."""
    config = json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]
    container = buildah("from", "--pull-never", IMAGE)
    try:
        yield Path(buildah("mount", container)), config
    finally:
        subprocess.run(["buildah", "umount", container], capture_output=True)
        subprocess.run(["buildah", "rm", container], capture_output=True)


def start_in_image(mnt: Path, config: dict, workdir_on_host: Path, log: Path, *args: str) -> subprocess.Popen:
    """Run the image's entry point with ``args`` like a pod with readOnlyRootFilesystem, runAsUser 10001, an
    emptyDir on /tmp and a volume on the working directory."""
    workdir = config.get("WorkingDir") or "/"
    env = " ".join(shlex.quote(e) for e in [*config.get("Env", []), "TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S=1"])
    command = " ".join(shlex.quote(a) for a in [*config["Entrypoint"], *args])
    m = shlex.quote(str(mnt))
    script = f"""set -e
mount --make-rprivate /
mount --bind {m} {m}
mount -t tmpfs -o size=64m,mode=1777 tmpfs {m}/tmp
mount --bind {shlex.quote(str(workdir_on_host))} {m}{workdir}
mount --rbind /dev {m}/dev
mount -t proc proc {m}/proc
mount -o remount,bind,ro {m}
exec chroot --userspec={config['User']} {m} /bin/sh -c {shlex.quote(f'cd {workdir} && exec env -i {env} {command}')}
"""
    with open(log, "wb") as out:
        return subprocess.Popen(["unshare", "--mount", "--fork", "sh", "-c", script], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def serving_event(proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve in the image exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "serving":
                return json.loads(line)
        time.sleep(0.2)
    pytest.fail(f"serve in the image did not start:\n{log.read_text()[-4000:]}")


def test_image_serves_otlp_on_a_read_only_root_as_user_10001(rootfs, tmp_path):
    mnt, config = rootfs
    assert config["User"] == f"{UID}:{UID}" and config["Entrypoint"] == ["trace-source"]
    assert not (mnt / "usr/bin/gcc").exists() and not list((mnt / "usr/bin").glob("cc*"))  # no build tools
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    os.chown(workdir, UID, UID)
    log = tmp_path / "serve.log"
    proc = start_in_image(mnt, config, workdir, log, "serve", "--host", "127.0.0.1", "--port", "0",
                          "--grpc-port", "0")
    try:
        event = serving_event(proc, log)
        server_pid = int(subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "trace-source serve"],
                                        capture_output=True, text=True).stdout.split()[-1])
        status = Path(f"/proc/{server_pid}/status").read_text()
        assert f"Uid:\t{UID}\t{UID}" in status
        sent: dict[str, str] = {}
        for exporter in (HttpSpanExporter(endpoint=f"http://127.0.0.1:{event['http_port']}/v1/traces"),
                         GrpcSpanExporter(endpoint=f"127.0.0.1:{event['grpc_port']}", insecure=True)):
            provider = TracerProvider(resource=Resource.create({"service.name": "image-test"}))
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            sent.update(make_agent_traces(provider, ("image.test", "1"), 1))
            provider.shutdown()
        traces = workdir / ".trace-source" / "traces"  # the default state dir, relative to the working directory
        wait_for(lambda: {p.stem for p in traces.glob("*.json")} >= set(sent.values()), "the envelopes")
        for trace_id in set(sent.values()):
            env = Envelope.from_json_bytes((traces / f"{trace_id}.json").read_bytes())
            assert {s.span_id for s in env.spans} == {s for s, t in sent.items() if t == trace_id}
            assert env.agent_run.agent_name == "planner"
        assert "Read-only file system" not in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert '"stopped"' in log.read_text(), log.read_text()[-3000:]
