# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing, installs the pinned set, and runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORK ?= $(CURDIR)/work
DEMO_PATIENTS ?= 60
# The demo sees 112-px images (8 x 8 patches; the paper: 518 px, 37 x 37). Its set is the
# localisation set of experiments/sla_localisation.py (the same patients, seed and scale):
# in every study one breast carries a mass of at least about 2 x 2 patches, the other none,
# so the sentence maps have something to find at this grid.
DEMO_LESION_SCALE ?= 2

# Keep every cache out of the home folder.
CACHE := $(or $(TMPDIR),/tmp)/mama_jax_cache
export PIP_CACHE_DIR ?= $(CACHE)/pip
export HF_HOME ?= $(CACHE)/hf
export MPLCONFIGDIR ?= $(CACHE)/mpl
export XDG_CACHE_HOME ?= $(CACHE)/xdg
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install install-test browser clean-demo

$(VENV)/.core: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements.lock -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import mama_jax, data_prep"
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -c requirements.lock -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, pytest, playwright.sync_api; from pydicom.data import get_testdata_file as f; assert f('RG1_J2KR.dcm', download=False), 'pydicom-data missing'"
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

# The viewer's browser test drives Debian's Chromium (never a downloaded browser build):
# installed here when missing and we are root with apt; otherwise one line says what to run.
BROWSER_HINT := browser test will skip: install Chromium with 'sudo apt-get install -y chromium' (or set MAMA_CHROMIUM=/path/to/chromium)
browser:
	@if [ -n "$$MAMA_CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	    || echo "$(BROWSER_HINT)"; \
	else echo "$(BROWSER_HINT)"; fi

DATASET := $(WORK)/dataset/tfds/mammography/embed/1.0.0

demo: $(VENV)/.core
	$(PY) -m data_prep synthetic --out $(WORK)/synthetic --patients $(DEMO_PATIENTS) --seed 0 --lesion-scale $(DEMO_LESION_SCALE) --localisation
	$(PY) -m data_prep build --dataset embed --tables $(WORK)/synthetic --images $(WORK)/synthetic --out $(WORK)/dataset
	$(PY) -m mama_jax.main --config=configs/demo.py --workdir=$(WORK)/demo --config.data.dataset_dir=$(DATASET)
	$(PY) -m mama_jax.report_losses $(WORK)/demo
	$(PY) -m mama_jax.main --config=configs/zeroshot.py --workdir=$(WORK)/demo --config.pretrain_workdir=$(WORK)/demo
	$(PY) -m mama_jax.main --config=configs/extract.py --workdir=$(WORK)/demo --config.pretrain_workdir=$(WORK)/demo
	$(PY) -m mama_jax.main --config=configs/linear_probe.py --workdir=$(WORK)/demo --config.pretrain_workdir=$(WORK)/demo
	$(PY) -m mama_jax.main --config=configs/finetune.py:demo --workdir=$(WORK)/demo --config.pretrain_workdir=$(WORK)/demo
	$(PY) -m mama_jax.main --config=configs/finetune.py:demo --workdir=$(WORK)/demo --config.pretrain_workdir=$(WORK)/demo --config.protocol=linear
	$(PY) -m mama_jax.main --config=configs/maps.py --workdir=$(WORK)/demo --config.pretrain_workdir=$(WORK)/demo --config.sentence="The mass"
	$(PY) -m mama_jax.main --config=configs/report.py --workdir=$(WORK)/demo
	$(PY) -m mama_jax.main --config=configs/export.py --workdir=$(WORK)/demo --config.pretrain_workdir=$(WORK)/demo --config.probe_workdir=$(WORK)/demo --config.finetune_workdir=$(WORK)/demo
	@echo "Report: $(WORK)/demo/report.md   Exported model: $(WORK)/demo/export"
	@echo "Predict on DICOMs: $(PY) -m mama_jax.predict --model $(WORK)/demo/export --task density $(WORK)/synthetic/images --out $(WORK)/predictions.csv"
	@echo "Viewer:            $(PY) -m mama_jax.viewer --model $(WORK)/demo/export --port 8000   (then open http://127.0.0.1:8000/)"

test: $(VENV)/.test browser
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(WORK)
