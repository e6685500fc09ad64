# glomscan: two commands on a fresh Debian/Ubuntu machine
#   make demo   # installs everything, analyses the bundled synthetic demo slide into ./demo-out
#   make test   # installs everything, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch is pinned in the same pip command as segmentation-models-pytorch, so pip never pulls a
# second (multi-GB) torch build.
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: setup system-deps demo test bench bench-quick default-model clean

setup: system-deps $(VENV)/.installed

system-deps:
	bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) -e ".[onnx,test]"
	$(BIN)/python -c "import pyvips; assert pyvips.type_find('VipsForeignLoad', 'openslideload') != 0, 'libvips without OpenSlide'"
	touch $@

demo: setup
	$(BIN)/glomscan demo-slide demo/slides/demo.tif
	@if $(BIN)/python -c "import sys; from glomscan.shipped import default_model_path as d; sys.exit(d() is None)"; then \
	  $(BIN)/glomscan analyze demo/slides --out demo-out; \
	else \
	  echo "No trained model ships yet: using RANDOM weights, so the masks are meaningless (pipeline demo only)."; \
	  $(BIN)/glomscan init-model --out demo/random-init.pt; \
	  $(BIN)/glomscan analyze demo/slides --out demo-out --model demo/random-init.pt; \
	fi
	@echo "Results: demo-out/summary.csv, demo-out/demo/{mask.tif,glomeruli.csv,glomeruli.geojson,overview.png,report.json}"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/pip install -q $(TORCH) monai pyinstrument
	$(BIN)/python benchmarks/backends.py
	$(BIN)/python benchmarks/pipeline_efficiency.py --backend onnxruntime
	$(BIN)/python benchmarks/vs_monai.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/cluster.py

bench-quick: setup
	$(BIN)/python benchmarks/pipeline_efficiency.py --quick --backend onnxruntime
	$(BIN)/python benchmarks/memory.py --quick

default-model: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/train_default_model.sh

clean:
	rm -rf demo demo-out .pytest_cache
