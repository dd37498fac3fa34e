"""The HTTP API gateway (FastAPI on uvicorn): wallets, the credit terminal and read-only views,
behind API keys with scopes, rate limits and Idempotency-Key."""
