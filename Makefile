# dual_emc2: `make train` runs the default job (Fashion-MNIST, EMC², CPU), `make test` the test suite.
# Both install everything first (apt data packages + .venv with pinned wheels), once.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fmnist_quickstart.yaml
ARGS ?=
OUT ?= gpu_check_out

.PHONY: setup train test test-fast lint bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

train: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		scripts/train.py --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup  # everything but the tests marked slow (CLI training runs, several processes)
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) experiments/bench_sampler.py

gpu-check:  # one CUDA GPU: set-up if needed, pytest -m gpu, sampler and step benchmarks, goals → $(OUT)/summary.json
	VENV=$(VENV) bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf runs outputs .pytest_cache
