# Every target creates .venv and installs what it needs from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: test test-slow test-integrations demo bench predict budget-sweep solver-sweep gradcache-bench compress-bench offload-bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra --hypothesis-show-statistics

test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=slow $(PY) -m pytest -q -ra -m "slow or not slow" --hypothesis-show-statistics

# Hugging Face's Trainer and Lightning are optional (the "integrations" extra): `make test`
# skips their tests, naming the missing package; this installs them into .venv and runs
# issue 9's tests (the frameworks, @remat.optimize, options from the environment, DDP/FSDP2;
# the README's torchrun line is marked slow: `make test-slow`).
INTEGRATIONS_STAMP := $(VENV)/.integrations-installed

$(INTEGRATIONS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,integrations]" "$(TORCH_PIN)"
	touch $(INTEGRATIONS_STAMP)

test-integrations: $(INTEGRATIONS_STAMP)
	$(PY) -m pytest -q -ra tests/test_integrations.py tests/test_optimize.py tests/test_env_options.py tests/test_distributed.py

demo: $(STAMP)
	$(PY) -m benchmarks.demo

# Predicted against measured peaks, step-time order and simulator speed;
# writes benchmarks/results/predict.md and predict.json.
predict: $(STAMP)
	$(PY) -m benchmarks.predict

# Every baseline side by side on the demo's GPT (13.5 minutes on the shared 2-core machine);
# writes benchmarks/results/bench.md and bench.json.
bench: $(STAMP)
	$(PY) -m benchmarks.bench

# remat's memory_budget against activation_memory_budget, measured on the GPT-style
# model and the U-Net (about 17 minutes each); writes benchmarks/results/budget_sweep_*.md.
budget-sweep: $(STAMP)
	$(PY) -m benchmarks.budget_sweep --model gpt
	$(PY) -m benchmarks.budget_sweep --model unet

# The solver in simulation: budgets, policies and solve times (benchmarks/results/solver_sweep.md).
solver-sweep: $(STAMP)
	$(PY) -m benchmarks.solver_sweep

# GradCache on a small transformer encoder: peak at batch 64 and 1024 (chunk 32) and the
# step-time overhead (a few minutes); writes benchmarks/results/gradcache.md and gradcache.json.
gradcache-bench: $(STAMP)
	$(PY) -m benchmarks.gradcache

# Gradient compression: GPT convergence (300 AdamW steps, top-k ratio 100 with and without
# error feedback) and the peak of a wide MLP's step (about 2 minutes); writes
# benchmarks/results/compress.md and compress.json.
compress-bench: $(STAMP)
	$(PY) -m benchmarks.compress

# Offload against recompute on a GPT-style model (needs CUDA; about 4 minutes on an H100);
# writes benchmarks/results/offload_cuda.md and offload_cuda.json.
offload-bench: $(STAMP)
	$(PY) -m benchmarks.offload

clean:
	rm -rf $(VENV) build *.egg-info
