# Live captions for Nextcloud Talk, as an AppAPI ExApp.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    APP_HOST=0.0.0.0 APP_PORT=23000

# libopus0: Opus decoded straight to 24 kHz; curl: the healthcheck
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopus0 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /app app

USER app
EXPOSE 23000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${APP_PORT}/heartbeat" || exit 1
ENTRYPOINT ["live-transcription", "serve"]
