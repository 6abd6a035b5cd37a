# Flake scanner: every target runs `setup` first, which is idempotent and fast
# when nothing changed. Targets source env.sh so the pip-only ROS 2 works.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
STAMPS := $(VENV)/.stamps
PYTHON ?= python3
ENV := source env.sh &&
PACKAGES := flake_core flake_scanner flake_detector flake_registry
MSG_FILES := $(shell find src/flake_msgs -type f -not -name '*~')
PY_PKG_FILES := $(foreach p,$(PACKAGES),src/$(p)/setup.py src/$(p)/setup.cfg src/$(p)/package.xml)

.PHONY: help setup browser postgresql postgres-server ros2-tools test test-fast lint demo web bench clean train-defects train-cascade maskrcnn-data train-maskrcnn train-maskrcnn-ablation

help:
	@echo "make setup  - create .venv, install pinned dependencies, build flake_msgs, install the packages"
	@echo "make demo   - scan a simulated chip with the whole graph; report in reports/demo"
	@echo "make test   - lint (ruff, mypy) and the whole pytest suite (what CI runs)"
	@echo "make test-fast - lint and the suite without the slow system and browser tests (the inner loop)"
	@echo "make bench  - run every bench/*.py and print their tables"
	@echo "make ros2-tools - ros2 launch and the ros2 CLI (and tf2_msgs) from ../shared/ros2-tools, when it is there"
	@echo "make postgres-server - a throwaway PostgreSQL server for the registry (database_url printed; Ctrl-C removes it)"
	@echo "make train-cascade - retrain the shipped cascade weights (graphene 1-10 layers, hBN 10-90 nm)"
	@echo "make train-maskrcnn - retrain the shipped CPU Mask R-CNN checkpoint (simulator data)"
	@echo "make train-defects - retrain the STEM defect-analyzer checkpoints (CNN-1 hexagonal cells, CNN-2 self-calibrated)"
	@echo "make clean  - remove .venv and build products"

setup: $(STAMPS)/packages

$(STAMPS)/requirements: requirements.txt tools/fix_wheel_cmake_paths.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@mkdir -p $(STAMPS) && touch $(VENV)/COLCON_IGNORE
	@echo "[setup] installing pinned dependencies (first run downloads several GB)"
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.txt
	$(VENV)/bin/python tools/fix_wheel_cmake_paths.py $(VENV)
	@touch $@

# flake_msgs is installed into the venv prefix itself, so its typesupport
# libraries are found without sourcing a colcon workspace.
$(STAMPS)/flake_msgs: $(STAMPS)/requirements $(MSG_FILES)
	@echo "[setup] building flake_msgs"
	@mkdir -p .build && touch .build/COLCON_IGNORE
	$(ENV) cmake -S src/flake_msgs -B .build/flake_msgs -DCMAKE_INSTALL_PREFIX=$(CURDIR)/$(VENV) \
	  -DCMAKE_PREFIX_PATH=$(CURDIR)/$(VENV) -DBUILD_TESTING=OFF \
	  -DPython3_EXECUTABLE=$(CURDIR)/$(VENV)/bin/python -DCMAKE_BUILD_TYPE=Release > .build/flake_msgs.log
	$(ENV) cmake --build .build/flake_msgs -j2 >> .build/flake_msgs.log
	$(ENV) cmake --install .build/flake_msgs >> .build/flake_msgs.log
	@touch $@

# install_ament_share.py puts what colcon would into the prefix: lib/<package>/<executable> for
# ros2 run and ros2 launch, and real copies of launch/ and config/ in share/flake_scanner.
$(STAMPS)/packages: $(STAMPS)/flake_msgs $(PY_PKG_FILES) tools/install_ament_share.py $(wildcard launch/*.py config/*)
	@echo "[setup] installing $(PACKAGES)"
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
	  $(foreach p,$(PACKAGES),-e src/$(p))
	$(VENV)/bin/python tools/install_ament_share.py $(VENV) $(PACKAGES)
	@touch $@

# mypy checks exactly what pyproject.toml declares strict (its [[tool.mypy.overrides]] with strict = true:
# flake_core and the registry's storage modules); a pattern "pkg.*" there is the package "-p pkg".
MYPY_STRICT_TARGETS := import tomllib; config = tomllib.load(open('pyproject.toml', 'rb'))['tool']['mypy']; \
  print(' '.join(f'-p {m[:-2]}' if m.endswith('.*') else f'-m {m}' \
                 for o in config['overrides'] if o.get('strict') for m in o['module']))

lint: setup
	$(ENV) ruff check src tests bench tools launch
	$(ENV) mypy $$(python -c "$(MYPY_STRICT_TARGETS)")

# Debian's chromium for the web app's browser tests; installed only when missing.
browser:
	@bash tools/install_chromium.sh

# Debian's PostgreSQL server for the registry's PostgreSQL backend and its tests; installed only when missing.
postgresql:
	@bash tools/install_postgresql.sh

# A throwaway PostgreSQL server for the registry: temporary data directory, unprivileged user, removed on Ctrl-C.
postgres-server: setup postgresql
	$(ENV) python -m flake_registry.pg_server

# The ROS 2 tools kit (ros2 launch, the ros2 CLI, tf2_msgs) into the venv where ../shared/ros2-tools exists.
ros2-tools: setup
	@bash tools/install_ros2_tools.sh $(VENV)

test: setup lint browser postgresql ros2-tools
	$(ENV) python -m pytest tests

# The inner loop: everything but the tests marked slow (whole node graphs, the browser).
test-fast: setup lint postgresql ros2-tools
	$(ENV) python -m pytest -m 'not slow' tests

bench: setup
	@for script in bench/*.py; do echo "== $$script"; $(ENV) python "$$script"; done

clean:
	rm -rf $(VENV) .build build install log

demo: setup
	$(ENV) python -m flake_scanner.demo.run --report reports/demo

# The lab web app over the demo's registry (after make demo): http://127.0.0.1:8080/
web: setup
	$(ENV) flake-web --db reports/demo/data/registry.sqlite --data-dir reports/demo/data

DEFECT_MODELS := src/flake_detector/flake_detector/defects/models

# Reproduces the shipped STEM checkpoints (CPU; a few minutes each on an idle machine).
train-defects: setup
	$(ENV) nice -n 10 flake-defects train-classifier --input-size 16 --steps 250 --images 32 \
	  --out $(DEFECT_MODELS)/cnn2_2ch.pt
	$(ENV) nice -n 10 flake-defects train-cells --target hex --steps 800 --images 32 --out $(DEFECT_MODELS)/cnn1_hex.pt

# Reproduces the shipped cascade weights from simulator seeds 1-3, thresholds on seeds 4-6 (evaluation uses other
# seeds), every 10 frames a new random camera and chip look (never one of the held-out cameras).
train-cascade: setup
	$(ENV) nice -n 10 flake-train-cascade --target graphene-1-10L,hbn-10-90nm --sim-seeds 1,2,3 --sim-frames 100 \
	  --natural-frames 60 --max-steps 300 --val-seeds 4,5,6 --val-frames 100 --val-natural-frames 60 \
	  --recall 0.95 --randomise-camera --frames-per-look 10 --threads 1 --out src/flake_detector/flake_detector/models

# Mask R-CNN (docs/maskrcnn.md). Simulated chips: training seeds 11 (the default camera) and 13
# (a random camera, oxide and shading every 8 frames), validation seed 12; the bench evaluates on
# seeds from 101 on, which no training sees.
MASKRCNN_THREADS ?= 1
MASKRCNN_RUNS := data/maskrcnn/runs
MASKRCNN_MODEL := --input-size 256 --pixel-scale 1 --class-agnostic --anchor-sizes 12/16/24,28/36/48,64/80/96,128/160/192 \
  --anchor-offsets 2 --rpn-iou 0.5,0.3 --embedding-dim 64 --proposals 600,300
MASKRCNN_SCHEDULE := --batch-size 2 --warmup-iterations 50 --epochs-per-stage 1 --iterations-per-epoch 100 \
  --stages all:5e-3:18,all:5e-4:3
# The soft-label ablation (Nguyen et al. 2022, Table 1 layout): 30 % of the annotations removed;
# per training seed one warm-up epoch, then baseline and soft labels each continue from it with
# the same schedule (soft labels start there, t falling from 1 to 0.8 over 100 iterations).
MASKRCNN_ABLATION := --batch-size 2 --warmup-iterations 50 --epochs-per-stage 1 --iterations-per-epoch 150 \
  --drop-annotations 0.3
MASKRCNN_ABLATION_STAGES := all:5e-3:1,all:5e-3:1,all:5e-4:1
MASKRCNN_SOFT := --soft-labels --soft-threshold 0.8 --soft-warmup 150 --soft-ramp 100

data/maskrcnn/sim_train/annotations.json: | setup
	$(ENV) flake-sim dataset --seed 11 --frames 400 --thin-fraction 0.5 --out data/maskrcnn/sim_train

data/maskrcnn/sim_train_random/annotations.json: | setup
	$(ENV) flake-sim dataset --seed 13 --frames 240 --thin-fraction 0.5 --randomise-camera \
	  --out data/maskrcnn/sim_train_random

data/maskrcnn/sim_val/annotations.json: | setup
	$(ENV) flake-sim dataset --seed 12 --frames 40 --thin-fraction 0.5 --out data/maskrcnn/sim_val

maskrcnn-data: setup data/maskrcnn/sim_train/annotations.json data/maskrcnn/sim_train_random/annotations.json \
  data/maskrcnn/sim_val/annotations.json

# The shipped checkpoint's recipe: 2100 iterations, the last 300 at a tenth of the learning rate (about
# 42 CPU-minutes on one thread on the build machine). Run again after a crash or Ctrl-C and it resumes at the last
# finished epoch; raise the epoch count of a stage and it trains on from the shipped state (docs/maskrcnn.md).
train-maskrcnn: maskrcnn-data
	$(ENV) nice -n 10 flake-train-maskrcnn --data data/maskrcnn/sim_train data/maskrcnn/sim_train_random \
	  --val data/maskrcnn/sim_val \
	  --out $(MASKRCNN_RUNS)/ship $(MASKRCNN_MODEL) --no-soft-labels $(MASKRCNN_SCHEDULE) --seed 0 \
	  --threads $(MASKRCNN_THREADS) --keep-epochs $(if $(wildcard $(MASKRCNN_RUNS)/ship/last.pt),--resume) \
	  --export src/flake_detector/flake_detector/models/maskrcnn_mobilenet_v2.pt

# Baseline vs soft-label RPN with 30 % of annotations removed (bench_maskrcnn.py --only ablation).
train-maskrcnn-ablation: maskrcnn-data
	for seed in 1 2; do \
	  warm=$(MASKRCNN_RUNS)/warm30-s$$seed; \
	  test -f $$warm/final.pt || { $(ENV) nice -n 10 flake-train-maskrcnn --data data/maskrcnn/sim_train \
	    --out $$warm $(MASKRCNN_MODEL) --no-soft-labels $(MASKRCNN_ABLATION) --stages all:5e-3:1 --seed $$seed \
	    --threads $(MASKRCNN_THREADS); }; \
	  for arm in base soft; do \
	    out=$(MASKRCNN_RUNS)/$${arm}30-s$$seed; \
	    test -f $$out/final.pt && continue; \
	    test -f $$out/last.pt || { mkdir -p $$out && cp $$warm/last.pt $$warm/last.json $$out/; }; \
	    $(ENV) nice -n 10 flake-train-maskrcnn --data data/maskrcnn/sim_train --out $$out $(MASKRCNN_MODEL) \
	      $$(test $$arm = soft && echo "$(MASKRCNN_SOFT)" || echo --no-soft-labels) $(MASKRCNN_ABLATION) \
	      --stages $(MASKRCNN_ABLATION_STAGES) --seed $$seed --threads $(MASKRCNN_THREADS) --resume; \
	  done; \
	done
