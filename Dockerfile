# One image for both roles: `framelabel serve` (the Annotate service) and `framelabel run` (the pipeline).
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY services services
COPY configs configs
COPY models models
RUN pip install --no-cache-dir -e .
ENTRYPOINT ["framelabel"]
