# glomscan: the README's two commands are `bash scripts/demo.sh` and `bash scripts/test.sh`
# (they need nothing but bash on a stock Debian/Ubuntu); these targets are shorthands for them.
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: setup system-deps demo test bench bench-quick default-model clean

setup:
	bash scripts/setup.sh

system-deps:
	bash scripts/install-system-deps.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

bench: setup
	$(BIN)/pip install -q $(TORCH) monai pyinstrument
	$(BIN)/python benchmarks/backends.py
	$(BIN)/python benchmarks/pipeline_efficiency.py --backend openvino
	$(BIN)/python benchmarks/pipeline_efficiency.py --backend onnxruntime
	$(BIN)/python benchmarks/cpu_side.py
	$(BIN)/python benchmarks/jpeg_robustness.py
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
