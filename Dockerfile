# IDAP++ Compress service image: the API (`idap serve --no-worker`) and the worker (`idap worker`).
# Two targets:  --target cpu  (torch's CPU wheels: the API, and workers without a GPU)
#               --target gpu  (torch's CUDA 12.6 wheels: workers on NVIDIA GPUs)
# Layers go from what changes least to what changes most: torch (constraints.txt), then the other
# dependencies (pyproject.toml), then the source, so an edit of the code or README reuses the rest.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app

# The dependencies, in a venv that the runtime stages copy (pip and its build leftovers stay behind).
FROM base AS torch-cpu
COPY constraints.txt ./
RUN python -m venv /opt/venv && pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1

FROM base AS torch-gpu
COPY constraints.txt ./
RUN python -m venv /opt/venv && pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cu126 \
        torch==2.14.1 torchvision==0.29.1

# The project's own dependencies, read from pyproject.toml without the source (torch is already there).
FROM torch-cpu AS deps-cpu
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt && pip install -c constraints.txt -r requirements.txt

FROM torch-gpu AS deps-gpu
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt && pip install -c constraints.txt -r requirements.txt

# The source, the same for both targets.
FROM base AS source
COPY pyproject.toml README.md alembic.ini constraints.txt ./
COPY migrations migrations
COPY core core
COPY domain domain
COPY api api
COPY worker worker

FROM base AS runtime
ENV IDAP_DATA_DIR=/data IDAP_HOST=0.0.0.0 IDAP_PORT=8000 OMP_NUM_THREADS=4
RUN useradd --create-home --uid 10001 idap && mkdir -p /data && chown idap /data
EXPOSE 8000
# The API's health; the worker's container replaces it with a Celery ping (docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["idap", "serve", "--no-worker"]

FROM runtime AS gpu
COPY --from=deps-gpu /opt/venv /opt/venv
COPY --from=source /app /app
RUN pip install --no-deps -e .
USER idap

# last, so that a build without --target is the CPU image
FROM runtime AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
COPY --from=source /app /app
# editable and without dependencies (all installed above): migrations/ beside the packages is found
# as in a checkout, and no layer below is rebuilt
RUN pip install --no-deps -e .
USER idap
