# walletmig workers and CLI (production image; see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY walletcore ./walletcore
COPY tb_emulator ./tb_emulator
COPY stores ./stores
COPY registries ./registries
COPY workflows ./workflows
COPY activities ./activities
COPY workers ./workers
COPY walletmig ./walletmig
RUN pip install . && useradd --system --uid 10001 walletmig

USER walletmig
ENTRYPOINT ["walletmig"]
CMD ["worker"]
