# gruserve container images: the runtime only (ONNX Runtime, grpcio; no torch).
#
#   docker build --target cpu  -t gruserve:0.1.0-cpu  .    # the default target
#   docker build --target cuda -t gruserve:0.1.0-cuda .
#   docker run -p 50051:50051 -p 9100:9100 -v "$PWD/bundles/nrt:/models/nrt:ro" \
#       gruserve:0.1.0-cpu serve /models/nrt --host 0.0.0.0 --metrics-host 0.0.0.0 --metrics-port 9100
#
# A bundle is mounted (above) or baked into a derived image (docs/deploy.md); without one,
# `serve` serves the demo model embedded in the package. Both images run as the
# unprivileged user gruserve (uid 10001) and need no writable root filesystem.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# onnxruntime-gpu 1.31.1 is built for CUDA 13 and cuDNN 9: its wheel's `cuda` extra asks for
# nvidia-cuda-runtime~=13.0 and its `cudnn` extra for nvidia-cudnn-cu13~=9.0.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# --- the package, built once as a wheel ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY export/ export/
COPY runtime/ runtime/
COPY protos/ protos/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- CUDA: the runtime on NVIDIA's CUDA + cuDNN runtime base ---------------------------------
FROM ${CUDA_IMAGE} AS cuda-base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home gruserve

FROM cuda-base AS cuda-venv
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/gruserve \
    && /opt/gruserve/bin/pip install --no-cache-dir /wheels/gruserve-*.whl

FROM cuda-base AS cuda
COPY --from=cuda-venv /opt/gruserve /opt/gruserve
ENV PATH=/opt/gruserve/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/gruserve
EXPOSE 50051 9100
ENTRYPOINT ["gruserve"]
CMD ["serve", "--device", "cuda", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--metrics-port", "9100"]

# --- CPU: the runtime on a slim Python base --------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-venv
COPY --from=wheel /wheels /wheels
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# On linux/x86_64 the package depends on onnxruntime-gpu (its CPU provider serves CPU too);
# a CPU image need not carry its ~270 MB of CUDA kernels, so the CPU build of the same
# version replaces it (uninstalled first: the two share one module and must never mix).
RUN python -m venv /opt/gruserve \
    && /opt/gruserve/bin/pip install --no-cache-dir /wheels/gruserve-*.whl \
    && if /opt/gruserve/bin/pip show --quiet onnxruntime-gpu 2>/dev/null; then \
        version="$(/opt/gruserve/bin/pip show onnxruntime-gpu | sed -n 's/^Version: //p')"; \
        /opt/gruserve/bin/pip uninstall --yes onnxruntime-gpu; \
        /opt/gruserve/bin/pip install --no-cache-dir "onnxruntime==${version}"; \
    fi

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --user-group --create-home gruserve
COPY --from=cpu-venv /opt/gruserve /opt/gruserve
ENV PATH=/opt/gruserve/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/gruserve
EXPOSE 50051 9100
ENTRYPOINT ["gruserve"]
CMD ["serve", "--device", "cpu", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--metrics-port", "9100"]
