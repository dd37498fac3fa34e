"""Runtime configuration: one place that maps environment variables to settings.

The embedded stack (`walletmig dev up`) and production differ only in these values.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_STATE_DIR = Path(".walletmig")

# Environment variable -> (field name, default). The README's configuration table mirrors this.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "TEMPORAL_ADDRESS": ("temporal_address", "127.0.0.1:7233"),
    "TEMPORAL_NAMESPACE": ("temporal_namespace", "default"),
    "WALLET_TASK_QUEUE": ("wallet_task_queue", "wallet"),
    "MIGRATION_TASK_QUEUE": ("migration_task_queue", "migration"),
    "MONGODB_URI": (
        "mongodb_uri",
        "mongodb://127.0.0.1:27018/?retryWrites=false&journal=true&directConnection=true",
    ),
    "MONGODB_DATABASE": ("mongodb_database", "wallets"),
    "REDIS_URL": ("redis_url", "redis://127.0.0.1:6380/0"),
    # `tbemu://HOST:PORT` reaches the project's emulator; anything else (`3000`,
    # `127.0.0.1:3000,127.0.0.1:3001`, `tigerbeetle://...`) is a real cluster.
    "TB_ADDRESSES": ("tb_addresses", "tbemu://127.0.0.1:3033"),
    "TB_CLUSTER_ID": ("tb_cluster_id", "0"),
    "TB_REQUEST_TIMEOUT_S": ("tb_request_timeout_s", "10"),
    # The cluster's request limit in bytes (`tigerbeetle start --limit-request`): every batch
    # is sized by it (walletcore.tb_limits). 1048576 (1 MiB) is TigerBeetle's default; a
    # cluster started with `--development` has 32768 (32 KiB). 4096..1048576.
    "TB_REQUEST_LIMIT_BYTES": ("tb_request_limit_bytes", "1048576"),
    "REGISTRY_CACHE_TTL_S": ("registry_cache_ttl_s", "1800"),
    # Written to every customer account's user_data_64: deployments sharing one TigerBeetle
    # cluster tell their accounts apart (reconciliation checks only its own). 0 = untagged.
    "DEPLOYMENT_TAG": ("deployment_tag", "0"),
    "WALLETMIG_STATE_DIR": ("state_dir", str(DEFAULT_STATE_DIR)),
    # The worker's Prometheus scrape port (/metrics; 0 = not served) and the Temporal SDK's
    # own metrics port (schedule-to-start, slots, failures; 0 = not exported).
    "WALLETMIG_METRICS_PORT": ("metrics_port", "0"),
    "WALLETMIG_TEMPORAL_METRICS_PORT": ("temporal_metrics_port", "0"),
    # TLS towards Temporal ("" = unset). TEMPORAL_TLS=true alone trusts the system's CAs;
    # a CA file adds a private CA; a certificate + key make it mTLS.
    "TEMPORAL_TLS": ("temporal_tls", "false"),
    "TEMPORAL_TLS_CA": ("temporal_tls_ca", ""),
    "TEMPORAL_TLS_CERT": ("temporal_tls_cert", ""),
    "TEMPORAL_TLS_KEY": ("temporal_tls_key", ""),
    "TEMPORAL_TLS_SERVER_NAME": ("temporal_tls_server_name", ""),
    # Payload encryption keys (walletclient.payload_codec): a file and/or the keys themselves,
    # `id:base64key` lines or JSON, newest last. Neither set = payloads are not encrypted.
    "WALLETMIG_CODEC_KEYS_FILE": ("codec_keys_file", ""),
    "WALLETMIG_CODEC_KEYS": ("codec_keys", ""),
    # `walletmig codec-server`: the bearer token it requires and the Web UI origins it allows.
    "WALLETMIG_CODEC_SERVER_TOKEN": ("codec_server_token", ""),
    "WALLETMIG_CODEC_SERVER_CORS_ORIGINS": (
        "codec_server_cors_origins", "http://127.0.0.1:8233,http://localhost:8233",
    ),
    # The wallet id key (walletcore.wallet_ids): wallet workflow ids are a keyed hash of the
    # wallet key, so Temporal never shows a client id. A file holding the key as hex (the file
    # wins), or the hex itself; >= 32 bytes. Every process of one deployment needs the same key;
    # `walletmig dev up` creates one in the state dir. Neither set = processes that address
    # wallet workflows (gateway, CLI, demo, benchmarks) refuse to start.
    "WALLETMIG_ID_HASH_KEY_FILE": ("id_hash_key_file", ""),
    "WALLETMIG_ID_HASH_KEY": ("id_hash_key", ""),
}

# Settings that may come from a file instead: `NAME_FILE=/path` (docker's `*_FILE` convention,
# e.g. a compose secret under /run/secrets) wins over `NAME`. For values that carry a credential
# (URIs with a password, tokens) or must be identical across a deployment (the cluster id), so
# that docker-compose.yml never interpolates them. WALLETMIG_CODEC_KEYS_FILE and
# WALLETMIG_ID_HASH_KEY_FILE are read where they are used (their own parsers and errors).
FILE_SUFFIX = "_FILE"
FILE_VARIANTS = ("MONGODB_URI", "REDIS_URL", "TB_CLUSTER_ID", "WALLETMIG_CODEC_SERVER_TOKEN")
SETTING_FILE_BYTES_MAX = 64 * 1024  # a URI or a token, not a document
assert all(name in ENVIRONMENT for name in FILE_VARIANTS)


class SettingFileError(OSError):
    """A `*_FILE` setting names a file that is missing, unreadable, empty or too large: one
    line naming the variable and the path (an OSError: the CLI prints those as one line)."""


def read_setting_file(name: str, path_text: str) -> str:
    """The stripped text of `name`'s file, or SettingFileError. The value is never echoed."""
    text = read_small_file(name, Path(path_text), SETTING_FILE_BYTES_MAX)
    if not text:
        raise SettingFileError(f"{name} {path_text}: the file is empty")
    return text


def read_small_file(name: str, path: Path, bytes_max: int) -> str:
    """The stripped text of a configuration file of at most `bytes_max` bytes, or
    SettingFileError in one line naming `name` and the path (the value is never echoed)."""
    try:
        size = path.stat().st_size
        if size > bytes_max:
            raise SettingFileError(f"{name} {path}: {size} bytes, more than {bytes_max}")
        return path.read_text().strip()
    except SettingFileError:
        raise
    except OSError as err:
        raise SettingFileError(f"{name} {path}: {err.strerror or err}") from None


# walletcore.wallet_ids.ID_KEY_BYTES_MIN/_MAX (this layer imports nothing of the platform;
# tests/test_wallet_ids.py checks they agree).
ID_KEY_BYTES_MIN = 32
ID_KEY_BYTES_MAX = 1024
ID_KEY_FILE_BYTES_MAX = 2 * ID_KEY_BYTES_MAX + 64  # hex, a newline, a comment-free file
ID_KEY_MISSING = (
    "no wallet id key: set WALLETMIG_ID_HASH_KEY_FILE (a file holding >= 32 random bytes as hex, "
    "e.g. `openssl rand -hex 32`) or WALLETMIG_ID_HASH_KEY; `walletmig dev up` creates one "
    "(`eval \"$(walletmig dev env)\"` exports it)"
)


class IdKeyConfigError(ValueError):
    """The wallet id key is missing or malformed: one line saying which setting to fix."""


class Settings(BaseModel):
    """Every external address and tunable the platform reads at start-up."""

    # A refused value is never echoed in the error: some are secrets (keys, tokens).
    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    temporal_address: str
    temporal_namespace: str
    wallet_task_queue: str
    migration_task_queue: str
    mongodb_uri: str
    mongodb_database: str
    redis_url: str
    tb_addresses: str
    tb_cluster_id: int = Field(ge=0)
    tb_request_timeout_s: float = Field(gt=0, le=300)
    # Bounds: walletcore.tb_limits.REQUEST_LIMIT_BYTES_MIN/_MAX (this layer imports nothing
    # of the platform; tests/test_tb_limits.py checks they agree).
    tb_request_limit_bytes: int = Field(default=1_048_576, ge=4096, le=1_048_576)
    registry_cache_ttl_s: int = Field(gt=0, le=7 * 24 * 3600)
    deployment_tag: int = Field(default=0, ge=0, lt=2**64)
    state_dir: Path
    metrics_port: int = Field(default=0, ge=0, le=65_535)
    temporal_metrics_port: int = Field(default=0, ge=0, le=65_535)
    temporal_tls: bool = False
    # Paths as strings, "" = unset: the settings round-trip through environment variables.
    temporal_tls_ca: str = Field(default="", max_length=4096)
    temporal_tls_cert: str = Field(default="", max_length=4096)
    temporal_tls_key: str = Field(default="", max_length=4096)
    temporal_tls_server_name: str = Field(default="", max_length=253)
    codec_keys_file: str = Field(default="", max_length=4096)
    codec_keys: str = Field(default="", max_length=65536, repr=False)  # secret: never printed
    codec_server_token: str = Field(default="", max_length=4096, repr=False)
    codec_server_cors_origins: str = Field(default="", max_length=4096)
    id_hash_key_file: str = Field(default="", max_length=4096)
    id_hash_key: str = Field(  # secret: never printed
        default="", max_length=2 * ID_KEY_BYTES_MAX, pattern=r"^([0-9a-fA-F]{2})*$", repr=False
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {
            field: env.get(name, default) for name, (field, default) in ENVIRONMENT.items()
        }
        for name in FILE_VARIANTS:
            file_name = name + FILE_SUFFIX
            if env.get(file_name):
                values[ENVIRONMENT[name][0]] = read_setting_file(file_name, env[file_name])
        values.update(overrides)
        return cls.model_validate(values)

    def id_key(self) -> bytes:
        """The wallet id key (the file's when both are set), or IdKeyConfigError in one line.
        Read when a process builds its WalletClient, i.e. at its start."""
        if self.id_hash_key_file:
            path = Path(self.id_hash_key_file)
            try:
                text = read_small_file("WALLETMIG_ID_HASH_KEY_FILE", path, ID_KEY_FILE_BYTES_MAX)
            except SettingFileError as err:
                raise IdKeyConfigError(str(err)) from None
            source = f"WALLETMIG_ID_HASH_KEY_FILE {path}"
        elif self.id_hash_key:
            text, source = self.id_hash_key, "WALLETMIG_ID_HASH_KEY"
        else:
            raise IdKeyConfigError(ID_KEY_MISSING)
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise IdKeyConfigError(f"{source}: not a hex string") from None
        if not ID_KEY_BYTES_MIN <= len(key) <= ID_KEY_BYTES_MAX:
            raise IdKeyConfigError(f"{source}: {len(key)} bytes; a key of "
                                   f"{ID_KEY_BYTES_MIN}..{ID_KEY_BYTES_MAX} bytes is needed")
        return key
