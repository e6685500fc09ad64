# glomscan: two commands on a fresh Debian/Ubuntu machine
#   make demo   # installs everything, analyses the bundled real PAS sample (glomscan/sample) into ./demo-out
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
	$(BIN)/glomscan analyze glomscan/sample --out demo-out
	$(BIN)/glomscan evaluate --results demo-out --truth glomscan/sample --out demo-out/evaluation
	@echo "Results: demo-out/index.html, demo-out/summary.csv, demo-out/aidpath_<id>/{mask.tif,glomeruli.csv,glomeruli.geojson,overview.png,report.json}; against the outlines: demo-out/evaluation.md"

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
