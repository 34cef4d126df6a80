# syntax=docker/dockerfile:1
# One image for the four Nudge services and the `nudge` CLI; the compose `command` picks the
# role: `python -m services.ingest|rules|scheduler|dispatch`, `nudge migrate`,
# `nudge healthcheck HOST:PORT` (the healthcheck), `nudge keys create ...`.
#
#   docker build -t nudge .
#   docker run --rm nudge nudge --help

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: turn the source tree into a wheel (no sources or build tools in the final image)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY libs ./libs
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUDGE_LOG_FORMAT=json
RUN groupadd --system --gid 10001 nudge \
 && useradd --system --uid 10001 --gid nudge --home-dir /home/nudge --create-home \
      --shell /usr/sbin/nologin nudge
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
USER nudge:nudge
WORKDIR /home/nudge
# ingest, rules, scheduler, dispatch gRPC (NUDGE_<SERVICE>_ADDR=0.0.0.0:<port>), their /metrics
# (NUDGE_<SERVICE>_METRICS_ADDR=0.0.0.0:9101..9104) and dispatch's unsubscribe endpoint
EXPOSE 50051 50052 50053 50054 9101 9102 9103 9104 50055
# No ENTRYPOINT: compose passes whole commands (`python -m services.ingest`, `nudge migrate`).
CMD ["nudge", "--help"]
