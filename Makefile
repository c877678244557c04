# Two entry points (see README): `make serve` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JS_DIR := tests/interop/js

.PHONY: serve test postgres-server bench bench-assembler bench-grade bench-producer bench-soak otelcol phoenix clean-venv

# Virtualenv with the package (editable) and its test extras; re-installed when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# OpenTelemetry JS SDK for the JSON-exporter interop test (npm registry, pinned by package-lock.json).
$(JS_DIR)/node_modules/.installed: $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	cd $(JS_DIR) && npm ci --no-audit --no-fund --silent
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/trace-source serve --port 4319

# Fetches Kafka 3.9.2 jars from Maven Central into ~/.cache/trace-source (outside git) and runs every test,
# including those against a real broker and a real Postgres server started by the test harnesses.
# helm for the chart tests, built from the Go module proxy into the same cache (the first build takes minutes).
HELM := $(HOME)/.cache/trace-source/bin/helm
$(HELM):
	GOBIN=$(dir $(HELM)) go install helm.sh/helm/v3/cmd/helm@v3.21.4

# Postgres server binaries for the tests' harness (tests/postgres_harness.py starts its own server from them):
# Debian's postgresql package, installed when none are found and TRACE_SOURCE_TEST_DATABASE_URL names no server
# (CI runs as root; elsewhere through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres-server: $(VENV)/.installed
	@if [ -z "$$TRACE_SOURCE_TEST_DATABASE_URL" ] && ! $(PY) tests/postgres_harness.py --find >/dev/null 2>&1; then \
	  echo "no Postgres server binaries: installing Debian's postgresql package"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql && \
	  $(PY) tests/postgres_harness.py --find; \
	fi

# Gitea for the forge tests (tests/forge_harness.py): its module from the Go module proxy, built with its options/
# beside it into the same cache (the first build takes about 9 minutes on 2 cores, a rebuild with Go's cache warm 20 s).
GITEA := $(HOME)/.cache/trace-source/gitea-1.27.3/gitea
$(GITEA):
	$(PYTHON) tests/forge_harness.py --build

# aider (aider-chat from PyPI), the real coding-agent CLI of the fix stage's tests (tests/coding_agent.py), in its own
# virtualenv in the same cache: its exact pins clash with the test extras' (about 1.5 minutes the first time).
AIDER := $(HOME)/.cache/trace-source/aider-0.86.2/bin/aider
$(AIDER):
	$(PYTHON) tests/coding_agent.py install

test: $(VENV)/.installed $(JS_DIR)/node_modules/.installed $(HELM) $(GITEA) $(AIDER) postgres-server
	$(PY) tests/kafka_harness.py --fetch
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench.receiver_bench $(BENCH_ARGS)

# Peers for `make bench` (optional; the bench skips a peer that is missing and says why). The OpenTelemetry
# Collector (otlpreceiver + kafkaexporter, bench/collector) is built from the Go module proxy into the cache; Arize
# Phoenix is installed from PyPI into its own virtualenv there.
OTELCOL := $(HOME)/.cache/trace-source/bin/otelcol-bench
$(OTELCOL): bench/collector/main.go bench/collector/go.mod bench/collector/go.sum
	cd bench/collector && go build -trimpath -o $(OTELCOL) .
otelcol: $(OTELCOL)

PHOENIX_VENV := $(HOME)/.cache/trace-source/phoenix-venv
$(PHOENIX_VENV)/.installed:
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install --quiet arize-phoenix
	touch $@
phoenix: $(PHOENIX_VENV)/.installed

bench-assembler: $(VENV)/.installed
	$(PY) -m bench.assembler_bench $(BENCH_ARGS)

# The Kafka produce path with aiokafka (the receiver's sink) against librdkafka (confluent-kafka, installed here
# for the bench only; not a dependency of the product).
bench-producer: $(VENV)/.installed
	$(PY) tests/kafka_harness.py --fetch
	$(PY) -m pip install --quiet "confluent-kafka>=2.6"
	$(PY) -m bench.producer_bench $(BENCH_ARGS)

bench-grade: $(VENV)/.installed
	$(PY) -m bench.grade_bench $(BENCH_ARGS)

# The loop (Kafka, Postgres, serve, worker assemble, worker grade) at half its measured capacity for 22 minutes.
bench-soak: $(VENV)/.installed
	$(PY) tests/kafka_harness.py --fetch
	$(PY) -m bench.soak $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)

# Container image with buildah (no Docker daemon): a Debian bookworm base made by debootstrap, then the Dockerfile.
# Needs root; installs buildah and debootstrap from Debian's packages when missing. IMAGE / TAG name the result
# (default localhost/trace-source:<version>); push with `buildah push IMAGE:TAG docker://REGISTRY/IMAGE:TAG`.
image:
	scripts/build_image.sh

# Runs the built image as the chart does (user 10001, read-only root) and sends it spans (tests/test_image.py).
image-test: $(VENV)/.installed
	$(PY) -m pytest -m image tests/test_image.py $(PYTEST_ARGS)

image-clean:
	rm -rf $(HOME)/.cache/trace-source/image
	-buildah rmi localhost/trace-source-base:bookworm
