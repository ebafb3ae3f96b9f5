# IDAP++ Compress service image: the API (`idap serve --no-worker`) and the worker (`idap worker`).
# CPU wheels of torch keep it slim; for GPU workers build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    IDAP_DATA_DIR=/data IDAP_HOST=0.0.0.0 IDAP_PORT=8000 OMP_NUM_THREADS=4

RUN useradd --create-home --uid 10001 idap && mkdir -p /data && chown idap /data
WORKDIR /app

COPY constraints.txt pyproject.toml README.md ./
RUN pip install -c constraints.txt --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1
COPY core core
COPY domain domain
COPY api api
COPY worker worker
COPY migrations migrations
COPY alembic.ini ./
# editable, so migrations/ beside the packages is found as it is in a checkout
RUN pip install -c constraints.txt -e .

USER idap
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["idap", "serve", "--no-worker"]
