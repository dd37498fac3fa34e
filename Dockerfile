# walletmig workers, CLI and one-shot jobs: the one image docker-compose.yml builds (see there).
# Exact base tag (a floating `3.11-slim` changes under a rebuild); pin its digest for releases.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 WALLETMIG_STATE_DIR=/var/lib/walletmig
WORKDIR /app

# The whole tree, filtered by .dockerignore (no .git, .venv, tests, dev state or caches): every
# package pyproject.toml lists is installed, and deploy/ carries the healthcheck and setup jobs.
COPY . .
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/walletmig walletmig \
    && mkdir -p /var/lib/walletmig \
    && chown walletmig /var/lib/walletmig

# Not root. The state directory (migration archives) is the only place it writes; a named volume
# mounted there starts with this ownership.
USER walletmig
ENTRYPOINT ["walletmig"]
CMD ["--help"]
