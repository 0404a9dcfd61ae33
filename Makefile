# Two commands for a newcomer: `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Keras's JAX and PyTorch backends and the PyTorch client: for the tests only, so `make demo`
# does not wait for them (about 24 s and 1.1 GB more in the venv, measured on the build machine)
FRAMEWORKS := $(VENV)/.installed-frameworks

.PHONY: demo test test-fast venv clean docker-up docker-down

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@echo ">> creating $(VENV) and installing npyloader with its keras, demo and test extras"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -e '.[keras,demo,test]'
	@touch $@

$(FRAMEWORKS): $(INSTALLED)
	@echo ">> installing the torch and jax extras for the tests (Keras backends, the PyTorch client)"
	$(PY) -m pip install --quiet --progress-bar off -e '.[keras,demo,test,torch,jax]'
	@touch $@

demo: $(INSTALLED)
	$(PY) -m loader_server.tools.demo

# `make test` first brings up the private Docker engine (tools/local-docker.sh up: root, apt) so
# that tests/deploy/test_docker.py runs; where it cannot, it prints why and runs everything else
# (those tests are then skipped with that reason). DOCKER_TESTS=off skips the engine on purpose.
DOCKER_TESTS ?= auto
DOCKER_HOST_SOCK := unix:///tmp/npyloader-docker/docker.sock

test: $(FRAMEWORKS)
	@if [ "$(DOCKER_TESTS)" = off ]; then rc=1; reason="DOCKER_TESTS=off"; else \
	    echo ">> make test: starting the Docker engine for the tests marked docker (tools/local-docker.sh up)"; \
	    { reason=$$(bash tools/local-docker.sh up 2>&1 >&3 3>&-); rc=$$?; } 3>&1; fi; \
	if [ $$rc -eq 0 ]; then \
	    echo ">> make test: Docker engine up; running the whole suite with DOCKER_HOST=$(DOCKER_HOST_SOCK)"; \
	    export DOCKER_HOST=$(DOCKER_HOST_SOCK); \
	else \
	    reason=$$(printf '%s\n' "$$reason" | grep -v '^[[:space:]]*$$' | tail -n 1); \
	    reason=$${reason#local-docker: error: }; \
	    echo ">> make test: NOT running the tests marked docker (no Docker engine): $${reason:-unknown reason}"; \
	    export NPYLOADER_DOCKER_UNAVAILABLE="$${reason:-tools/local-docker.sh up failed}"; \
	fi; \
	$(PY) -m pytest -ra

# `make test-fast`: tests/unit only, the tests that start no process (well under a minute).
test-fast: $(FRAMEWORKS)
	$(PY) -m pytest -ra tests/unit

# A private Docker engine (root): installs docker.io docker-compose debootstrap if missing, starts
# dockerd on /tmp/npyloader-docker/docker.sock, builds the base image npyloader-base:bookworm.
# Then: eval "$$(tools/local-docker.sh env)"; docker build --network host \
#   --build-arg BASE=npyloader-base:bookworm -f docker/Dockerfile -t npyloader:local .
docker-up:
	bash tools/local-docker.sh up

docker-down:
	bash tools/local-docker.sh down

clean:
	rm -rf $(VENV) demo-data .pytest_cache .hypothesis
