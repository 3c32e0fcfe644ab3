# gruserve: `make serve` and `make test` work on a fresh clone (Python 3.10+ and PyPI).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup serve test lint proto bench clean help

help:
	@echo "make serve   set up $(VENV) and serve the demo model on 127.0.0.1:50051"
	@echo "make test    set up $(VENV) and run the test suite"
	@echo "make lint    ruff"
	@echo "make proto   regenerate the protobuf code from protos/"
	@echo "make bench   run the CPU benchmarks (about 15 minutes; see BENCHMARKS.md)"

# torch is installed first, pinned, so pip takes the local CPU wheel and never a CUDA build
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[export,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

serve: setup
	$(BIN)/gruserve serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check export runtime tests bench

proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/gruserve/v1/gruserve.proto

bench: setup
	$(BIN)/python bench/graphs.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/train_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
