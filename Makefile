# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv if it is missing and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU wheel of this exact version is provisioned here; other specs pull CUDA builds.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench bench-full-size clean lab-prior lab-matrix lab-matrix-paper lab-matrix-fast lab-matrix-optim lab-matrix-long lab-matrix-exemplar \
	lab-stop lab-stop-paper lab-stop-fast \
	lab-sfa-ablation

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
	for b in benchmarks/*.py; do [ "$$b" = benchmarks/full_size.py ] && continue; echo "== $$b"; \
		OMP_NUM_THREADS=1 $(PY) $$b || exit 1; done

# One stylize iteration at real size (full-size SD 1.5 + the released PanoHead, random weights built locally):
# several GB of memory and minutes an iteration on CPU. On a GPU: bash benchmarks/gpu_check.sh (under 5 minutes).
bench-full-size: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/full_size.py --precision fp32,bf16

# The shipped learned lab prior from scratch (seed 0, config full-long; about 3 h of one thread), then its card
# (and a copy of the model) in runs/lab-prior/card; copy that folder to src/headstyle/lab/learned_prior to ship it.
lab-prior: $(STAMP)
	$(VENV)/bin/headstyle lab train-prior --out runs/lab-prior --config full-long --threads 1 --resume
	$(VENV)/bin/headstyle lab prior-card --run runs/lab-prior --out runs/lab-prior/card

# The lab's full re-measurement (issue 18): 4 styles x every objective/ablation x seeds 0,1,2 at the paper's lr 1e-4
# and the lab's 2e-3 (Adam), LD and SDS with SGD and the stopping rule, and an exemplar-prior row. Each part is one
# process on one thread: `make -j2 lab-matrix` runs two at once. LAB_PRIOR: '' = the shipped learned prior, or a folder.
LAB_PRIOR ?=
LAB_BENCH = OMP_NUM_THREADS=1 $(VENV)/bin/headstyle lab bench --prior "$(LAB_PRIOR)" --styles all --seeds 0,1,2 \
	--iterations 100 --curve-every 10 --no-progress --resume
lab-matrix: lab-matrix-paper lab-matrix-fast lab-matrix-optim lab-matrix-long lab-matrix-exemplar
lab-matrix-paper: $(STAMP)
	$(LAB_BENCH) --objectives all --lr 0.0001 --out runs/lab-matrix/adam-lr1e-4
lab-matrix-fast: $(STAMP)
	$(LAB_BENCH) --objectives all --lr 0.002 --out runs/lab-matrix/adam-lr2e-3
lab-matrix-optim: $(STAMP)
	$(LAB_BENCH) --objectives ld,sds --optimizer sgd,adam-stop --lr 0.0001 --out runs/lab-matrix/optim-lr1e-4
	$(LAB_BENCH) --objectives ld,sds --optimizer sgd,adam-stop --lr 0.002 --out runs/lab-matrix/optim-lr2e-3
# LD and SDS at the paper's lr for 1000 iterations (seed 0): does LD reach the style, and does it stay there?
lab-matrix-long: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/headstyle lab bench --prior "$(LAB_PRIOR)" --styles all --seeds 0 --objectives ld,sds \
		--lr 0.0001 --iterations 1000 --curve-every 50 --no-progress --resume --out runs/lab-matrix/long-lr1e-4
lab-matrix-exemplar: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/headstyle lab bench --prior exemplar --styles all --seeds 0,1,2 --objectives ld,sds \
		--lr 0.002 --curve-every 10 --no-progress --resume --out runs/lab-matrix/exemplar-lr2e-3

# Where does the recipe stop (issue 37)? Whole curves at the paper's lr 1e-4 and 10,000 iterations (every 250, the
# script's checkpoint interval) and at lr 2e-3 for 1,000 (every 100): 4 styles x 2 seeds, LD, SDS, IDS, DDS and LD
# without its regulariser, run to the budget (adam) and under the stopping rule (adam-stop; at lr 2e-3 also
# adam-decay). About 60 CPU-hours at lr 1e-4 and 15 at lr 2e-3: `make -j2 lab-stop` runs the two parts at once; both
# continue where they stopped.
LAB_STOP = OMP_NUM_THREADS=1 $(VENV)/bin/headstyle lab bench --prior "$(LAB_PRIOR)" --styles all --seeds 0,1 \
	--objectives ld,sds,ids,dds,ld-no-reg --no-progress --resume
lab-stop: lab-stop-paper lab-stop-fast
lab-stop-paper: $(STAMP)
	$(LAB_STOP) --optimizer adam,adam-stop --lr 0.0001 --iterations 10000 --curve-every 250 \
		--out runs/lab-matrix/stop-lr1e-4-10k
lab-stop-fast: $(STAMP)
	$(LAB_STOP) --optimizer adam,adam-stop,adam-decay --lr 0.002 --iterations 1000 --curve-every 100 \
		--out runs/lab-matrix/stop-lr2e-3-1k

# DiffStyle360's Table 2 in the lab (issue 16) on the paper's data pipeline: LD-stylise lab generators of the seen
# styles with the trainer, write the paired multi-view data from them, train the modules and score them on the
# unseen gold. Every step continues where it stopped.
SFA_LAB := runs/lab-sfa
SFA_RUNS := $(SFA_LAB)/stylize/runs
lab-sfa-ablation: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/headstyle lab bench --styles statue,zombie,toon --objectives ld --seeds 0 \
		--curve-every 0 --no-progress --resume --out $(SFA_LAB)/stylize
	OMP_NUM_THREADS=1 $(VENV)/bin/headstyle sfa dataset --base lab --samples 48 --views 16 --no-progress \
		--stylized statue=$(SFA_RUNS)/statue-ld-adam-seed0,zombie=$(SFA_RUNS)/zombie-ld-adam-seed0,toon=$(SFA_RUNS)/toon-ld-adam-seed0 \
		--out $(SFA_LAB)/data
	$(VENV)/bin/headstyle lab sfa-ablation --data $(SFA_LAB)/data --iterations 400 --train-views 16 --lr 1e-4 \
		--seeds 0,1 --threads 1 --no-progress --out $(SFA_LAB)/ablation

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
