# tune_gpt in a container: the entry point is `python -m tune_gpt.search`.
#
#   CUDA (default base):  docker build -t gpt-train .
#   ROCm (AMD GPUs):      docker build --build-arg BASE_IMAGE=rocm/pytorch:latest --build-arg EXTRAS= -t gpt-train-rocm .
#
# The base image brings Python and a torch built for its CUDA or ROCm; the project is installed
# on top of it without replacing that torch. No W&B credentials are baked in: pass
# WANDB_API_KEY at run time (`docker run -e WANDB_API_KEY …`) or mount ~/.netrc or
# ~/.config/wandb read-only; see the README (Scaling out, Docker) for the run commands.

ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# Optional dependency groups from pyproject.toml ("gpu": NVML utilisation metrics, NVIDIA only;
# empty: none, as for ROCm: --build-arg EXTRAS=).
ARG EXTRAS=gpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUNE_GPT_CACHE=/workspace/.cache/tune_gpt

# --compile builds Triton's GPU kernels with a C compiler, which the CUDA *runtime* images lack.
RUN if ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/tune_gpt
COPY pyproject.toml README.md ./
COPY tune_gpt ./tune_gpt
COPY search_spaces ./search_spaces

# pyproject.toml asks for torch>=2.4. Pinning the base image's own torch as a constraint keeps
# it: pip never swaps it for a PyPI build (wrong CUDA, or CUDA on a ROCm image), and a base
# whose torch is too old stops the build here instead. Editable, so the bundled
# search_spaces/ next to the package are found as in a checkout.
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/keep-torch.txt \
 && pip install --constraint /tmp/keep-torch.txt --editable ".${EXTRAS:+[${EXTRAS}]}" \
 && python -c "import torch, tune_gpt; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'ROCm', torch.version.hip)"

# Run from /workspace: mount a host folder there to keep ./tune_results and the corpus cache.
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "tune_gpt.search"]
