# Docker-ViT: an image-captioning model behind HTTP, as a container.
#
# CPU (default base python:3.11-slim, CPU-only torch from the PyTorch CPU index):
#   docker build -t docker-vit .
#   docker run -p 8000:8000 docker-vit
#
# NVIDIA GPU: PyPI's torch wheels bundle CUDA, so either keep the slim base and take torch from PyPI,
#   docker build -t docker-vit:cuda --build-arg TORCH_INDEX= .
# or start from a CUDA runtime image (python3 and python3-venv get installed when the base lacks them):
#   docker build -t docker-vit:cuda \
#     --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all -p 8000:8000 docker-vit:cuda
#
# A model baked into the image (the container then never touches the Hub):
#   docker build -t docker-vit:vit-gpt2 --build-arg MODEL=nlpconnect/vit-gpt2-image-captioning .
# or mounted read-only at run time:
#   docker run -p 8000:8000 -v /path/to/model:/model:ro -e DOCKER_VIT_MODEL=/model docker-vit
#
# Every `docker-vit serve` option reads DOCKER_VIT_<NAME>: `-e DOCKER_VIT_PORT=9000`,
# `-e DOCKER_VIT_DEVICE=cuda`, `-e DOCKER_VIT_NUM_BEAMS=1`, ...

ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/app/.cache/huggingface \
    DOCKER_VIT_HOST=0.0.0.0

# Bases without a usable python3 + venv (CUDA runtime images) get them from the distribution. A login
# shell (`bash -l`, as KubeRay before 1.4 starts `ray start`) resets PATH: profile.d puts the venv back.
# The Hub cache exists and is the app user's: Docker gives a new named volume mounted there
# (`-v hf-cache:/home/app/.cache/huggingface`) the owner of the image's folder, root where it is missing.
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && printf 'export PATH=/opt/venv/bin:$PATH\n' > /etc/profile.d/docker-vit-venv.sh \
    && (getent group app >/dev/null || groupadd --system --gid 10001 app) \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && install -d -o app -g app /home/app/.cache "$HF_HOME"

# Metadata first: it never changes, and every step after the big layers costs a commit.
WORKDIR /home/app
EXPOSE 8000
# Healthy once the model is loaded and warm (GET /readyz answers 503 until then). Plain Python, so
# it works on slim images without curl; it follows DOCKER_VIT_PORT, and DOCKER_VIT_HOST when that is
# one address rather than all of them, each trimmed of blanks and line ends as the server trims them;
# it asks the server directly, never through an http_proxy set for the Hub.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h = (os.environ.get('DOCKER_VIT_HOST') or '').strip() or '0.0.0.0'; h = {'0.0.0.0': '127.0.0.1', '::': '[::1]'}.get(h) or ('[%s]' % h if ':' in h else h); u.build_opener(u.ProxyHandler({})).open('http://%s:%s/readyz' % (h, (os.environ.get('DOCKER_VIT_PORT') or '').strip() or '8000'), timeout=4)"]
# Exec form: the server is PID 1 and receives SIGTERM itself (graceful drain, exit 0). No --host or
# --port here, so DOCKER_VIT_* variables keep their say. No entrypoint (and none inherited from a CUDA
# base image): a start command, such as Runpod's `python -m docker_vit.runpod`, replaces all of it.
ENTRYPOINT []
CMD ["docker-vit", "serve"]

# Layers from the least to the most often changing: torch, then the other dependencies (read from
# pyproject.toml alone), then the source. Editing code rebuilds only the source layer (and, with MODEL
# set, the model download after it). Each build argument is declared just before the first step that
# uses it: Docker reruns every RUN after an argument whose value changed, so another EXTRAS keeps the
# torch layer.
# Which torch, from where. TORCH_INDEX empty: PyPI (CUDA-enabled wheels on Linux x86_64); with a
# private mirror, point TORCH_INDEX at it too (it replaces pip's index for this step).
ARG TORCH_SPEC=torch
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Extra pip settings for private mirrors or wheel folders; build arguments reach RUN as environment
# variables, so pip reads them directly. Their values show in `docker history`: credentials go in a
# build secret instead, a pip.conf (`--secret id=pip.conf,src=...`), mounted at /etc/pip.conf for the
# pip steps alone.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_EXTRA_ARGS=
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    pip install $PIP_EXTRA_ARGS \
        ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} \
        "$TORCH_SPEC" \
    && python -c 'import torch; print("torch==" + torch.__version__)' > /opt/venv/torch-constraint.txt

COPY pyproject.toml scripts/requirements.py /src/
# Optional extras of the package, comma-separated (e.g. "runpod" for the serverless worker).
ARG EXTRAS=
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python /src/requirements.py /src/pyproject.toml "$EXTRAS" > /tmp/requirements.txt \
    && pip install $PIP_EXTRA_ARGS -c /opt/venv/torch-constraint.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package alone: with `COPY .` whatever the checkout holds (photos, captions files, a Runpod
# test_input.json) would ride in this layer of the pushed image, though the next step deletes /src.
COPY pyproject.toml README.md /src/
COPY docker_vit /src/docker_vit
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    pip install $PIP_EXTRA_ARGS --no-deps -c /opt/venv/torch-constraint.txt /src \
    && pip check \
    && rm -rf /src

# Optional: a model baked into the image, so a pod or serverless worker starts without the Hub. The
# download runs as root: what it leaves in the Hub cache (HF_HOME) goes to the app user, whose later
# downloads of other models would otherwise find a cache it cannot write. A gated or private model
# takes a Hub token as a build secret (`--secret id=hf_token,src=...`), never a build argument.
ARG MODEL=
RUN --mount=type=secret,id=hf_token \
    if [ -n "$MODEL" ]; then \
        HF_TOKEN_PATH=/run/secrets/hf_token docker-vit download "$MODEL" --dir /opt/model \
        && chmod -R a+rX /opt/model \
        && chown -R app:app /home/app; \
    fi
ENV DOCKER_VIT_MODEL=${MODEL:+/opt/model}
USER app
