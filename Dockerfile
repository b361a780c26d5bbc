# CPU image: builds packager and runs the main job on the embedded SmolLM2.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# The CPU build of torch first, so nothing pulls a CUDA build.
RUN python -m venv .venv \
 && .venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && make install PY=python
ENV PACKAGER_HOME=/app/.cache
CMD ["make", "run"]
