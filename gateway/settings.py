"""The gateway's settings: the platform's (walletconfig.settings.Settings: Temporal, MongoDB,
Redis, TigerBeetle) plus the HTTP API's own, all from environment variables (default):

- `WALLETMIG_API_HOST` (127.0.0.1), `WALLETMIG_API_PORT` (8080): where it listens.
- `WALLETMIG_API_TLS_CERT`, `WALLETMIG_API_TLS_KEY` (unset): PEM certificate chain and key;
  both set = HTTPS only.
- `WALLETMIG_API_TLS_CLIENT_CA` (unset): PEM CA bundle; set = mutual TLS, every client must
  present a certificate it signed (needs the certificate and key above).
- `WALLETMIG_API_RATE_LIMIT_MONEY` (100/second), `WALLETMIG_API_RATE_LIMIT_READ`
  (2000/second): per API key and class, in `limits` notation (`N/second`, `N/minute`,
  `N per 10 seconds`).
- `WALLETMIG_API_RATE_LIMIT_STRATEGY` (fixed-window): or `moving-window` (exact, but one
  Redis list entry per hit where the fixed window keeps one counter).
- `WALLETMIG_API_RATE_LIMIT_FAIL_OPEN_MONEY` (false), `..._FAIL_OPEN_READ` (true): when Redis
  cannot be asked, refuse money-moving requests (503) and serve reads unlimited.
- `WALLETMIG_API_RATE_LIMIT_REDIS_URL` (REDIS_URL): the Redis holding the counters.
- `WALLETMIG_API_BODY_MAX_BYTES` (65536): larger request bodies get 413.
- `WALLETMIG_API_WRITE_TIMEOUT_S` (30): bound on one wallet write (then 503; retry with the
  same Idempotency-Key).
- `WALLETMIG_API_IDEMPOTENCY_TTL_S` (86400): Idempotency-Key records are kept this long
  (at least 24 h).
- `WALLETMIG_API_IDEMPOTENCY_LEASE_S` (45): a request still in progress after this (its
  process died) may be taken over by a retry (the key's Redis lease ends); at least the write
  timeout + 5 s.
- `WALLETMIG_API_KEY_CACHE_TTL_S` (5): verified API keys are cached this long, so a
  revocation takes effect within it (0 = no cache).
- `WALLETMIG_API_DEPENDENCY_TIMEOUT_S` (2): bound on each /readyz probe and on the migration
  status query.
- `WALLETMIG_API_WORKERS` (1): uvicorn worker processes sharing the port (`walletmig api
  --workers`); one process uses one core at most, and a balance read costs it ~0.35-0.5 ms of
  CPU when TigerBeetle answers, ~0.9-1.0 ms when MongoDB does (session 7).
- `WALLETMIG_API_RAW_READS` (true): the hot balance read answered as raw ASGI in front of
  FastAPI (gateway.fastpath); false = through FastAPI's routing and middleware layers like
  every other route (same answers: the switch exists to compare them, and as a way back).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from limits import parse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from walletconfig.settings import Settings

# Environment variable -> (field name, default); "" = unset. The table above mirrors this.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "WALLETMIG_API_HOST": ("host", "127.0.0.1"),
    "WALLETMIG_API_PORT": ("port", "8080"),
    "WALLETMIG_API_TLS_CERT": ("tls_cert", ""),
    "WALLETMIG_API_TLS_KEY": ("tls_key", ""),
    "WALLETMIG_API_TLS_CLIENT_CA": ("tls_client_ca", ""),
    "WALLETMIG_API_RATE_LIMIT_MONEY": ("rate_limit_money", "100/second"),
    "WALLETMIG_API_RATE_LIMIT_READ": ("rate_limit_read", "2000/second"),
    "WALLETMIG_API_RATE_LIMIT_STRATEGY": ("rate_limit_strategy", "fixed-window"),
    "WALLETMIG_API_RATE_LIMIT_FAIL_OPEN_MONEY": ("rate_limit_fail_open_money", "false"),
    "WALLETMIG_API_RATE_LIMIT_FAIL_OPEN_READ": ("rate_limit_fail_open_read", "true"),
    "WALLETMIG_API_RATE_LIMIT_REDIS_URL": ("rate_limit_redis_url", ""),
    "WALLETMIG_API_BODY_MAX_BYTES": ("body_max_bytes", "65536"),
    "WALLETMIG_API_WRITE_TIMEOUT_S": ("write_timeout_s", "30"),
    "WALLETMIG_API_IDEMPOTENCY_TTL_S": ("idempotency_ttl_s", "86400"),
    "WALLETMIG_API_IDEMPOTENCY_LEASE_S": ("idempotency_lease_s", "45"),
    "WALLETMIG_API_KEY_CACHE_TTL_S": ("key_cache_ttl_s", "5"),
    "WALLETMIG_API_DEPENDENCY_TIMEOUT_S": ("dependency_timeout_s", "2"),
    "WALLETMIG_API_WORKERS": ("workers", "1"),
    "WALLETMIG_API_RAW_READS": ("raw_reads", "true"),
}
WORKERS_MAX = 16
LEASE_MARGIN_S = 5.0  # a live request finishes (or times out) this long before its lease ends


class ApiSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    platform: Settings
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    rate_limit_money: str
    rate_limit_read: str
    rate_limit_strategy: Literal["fixed-window", "moving-window"]
    rate_limit_fail_open_money: bool
    rate_limit_fail_open_read: bool
    rate_limit_redis_url: str
    body_max_bytes: int = Field(ge=1024, le=16 * 1024 * 1024)
    write_timeout_s: float = Field(gt=0, le=600)
    idempotency_ttl_s: int = Field(ge=24 * 3600, le=30 * 24 * 3600)
    idempotency_lease_s: float = Field(ge=1, le=3600)
    key_cache_ttl_s: float = Field(ge=0, le=300)
    dependency_timeout_s: float = Field(gt=0, le=60)
    workers: int = Field(default=1, ge=1, le=WORKERS_MAX)
    raw_reads: bool = True

    @field_validator("rate_limit_money", "rate_limit_read")
    @classmethod
    def _limit_parses(cls, value: str) -> str:
        parse(value)  # ValueError names the bad notation
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ApiSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("WALLETMIG_API_TLS_CERT and WALLETMIG_API_TLS_KEY go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("WALLETMIG_API_TLS_CLIENT_CA (mTLS) needs WALLETMIG_API_TLS_CERT/_KEY")
        if self.idempotency_lease_s < self.write_timeout_s + LEASE_MARGIN_S:
            # A live request must never lose its Idempotency-Key to a retry's takeover.
            raise ValueError(
                f"idempotency_lease_s must be at least write_timeout_s + {LEASE_MARGIN_S:g}"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def ssl_options(self) -> dict[str, object]:
        """uvicorn.Config's TLS keyword arguments: none (HTTP), HTTPS, or HTTPS requiring a
        client certificate signed by tls_client_ca (mTLS)."""
        if self.tls_cert is None or self.tls_key is None:
            return {}
        options: dict[str, object] = {
            "ssl_certfile": str(self.tls_cert), "ssl_keyfile": str(self.tls_key),
        }  # fmt: skip
        if self.tls_client_ca is not None:
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            options["ssl_ca_certs"] = str(self.tls_client_ca)
        return options

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, platform: Settings | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> ApiSettings:  # fmt: skip
        env = os.environ if environ is None else environ
        base = platform or Settings.from_env(dict(env))
        values: dict[str, object] = {}
        for name, (field, default) in ENVIRONMENT.items():
            text = env.get(name, default)
            if text != "":
                values[field] = text
        values.setdefault("rate_limit_redis_url", base.redis_url)
        values.update(overrides or {})
        return cls.model_validate({"platform": base, **values})
