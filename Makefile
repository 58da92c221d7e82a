# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv if it is missing and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU wheel of this exact version is provisioned here; other specs pull CUDA builds.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	# torch-fidelity: the reference FID Inception for tests; its torchvision requirement cannot be installed here.
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/headstyle demo --out runs/demo

# The web app's browser test drives Debian's Chromium (Playwright's own browser download cannot run here).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; OMP_NUM_THREADS=1 $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
