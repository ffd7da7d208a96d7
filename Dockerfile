# kvtriton serving image: NVIDIA's tritonserver plus this package.
#
# Base: tritonserver 24.10-py3 = Triton 2.51.0, the same server as the
# nvidia-pytriton 0.7.0 wheel that dev boxes and CI run, so behaviour seen in
# tests is what the GPU host serves. 24.10 is Ubuntu 22.04 with Python 3.10 and
# CUDA 12.6.2 (driver >= 560, or a data-center R535/R545 driver); Hopper is
# supported. A newer 24.xx/25.xx tag also works (Triton >= 2.51): pass
# --build-arg TRITON_TAG=25.01-py3.
ARG TRITON_TAG=24.10-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KVTRITON_CACHE=/cache

# Only what the wheel is built from (keeps .venv and caches out of the layer).
COPY pyproject.toml README.md /src/
COPY build /src/build
COPY backend /src/backend
COPY client /src/client
# The image's python3 is the one Triton's Python-backend stub runs, so kvtriton and
# its dependencies go into it. numpy must stay < 2: the stub returns wrong tensors with numpy 2.
# openai: FastAPI + uvicorn for the OpenAI-compatible frontend (compose serves it on 9000).
RUN python3 -m pip install "/src[onnx,openai]" "numpy<2" && rm -rf /src

COPY model_repository /models

EXPOSE 8000 8001 8002 9000
# kvtriton serve finds /opt/tritonserver/bin/tritonserver on PATH. It listens on 127.0.0.1 unless told
# otherwise; in a container the published ports must reach it. `kvtriton health` is the health check.
CMD ["kvtriton", "serve", "--model-repository", "/models", "--host", "0.0.0.0"]
