# dual_emc2: `make train` runs the default job (Fashion-MNIST, EMC², CPU), `make test` the test suite.
# Both install everything first (apt data packages + .venv with pinned wheels), once.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fmnist_quickstart.yaml
ARGS ?=
OUT ?= gpu_check_out
# what test-determinism reruns: the tests marked determinism but those that start several processes (7 min a pass);
# DETERMINISM="determinism" reruns all of them
DETERMINISM ?= determinism and not dist

.PHONY: setup train test test-fast test-determinism lint bench gpu-check clean

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

test-determinism: setup  # the determinism tests again under other CPU kernels (tests/run_determinism.sh); CI runs it
	bash tests/run_determinism.sh $(PY) -m "$(DETERMINISM)"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) experiments/bench_sampler.py

gpu-check:  # one CUDA GPU: set-up if needed, pytest -m gpu, sampler and step benchmarks, goals → $(OUT)/summary.json
	VENV=$(VENV) bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf runs outputs .pytest_cache
