"""RewardClient against real services on loopback: combination, cache, retries across a killed and
restarted server, giving up with a clear error, hedging, health-aware routing, concurrency limits, TLS."""

from __future__ import annotations

import asyncio
import datetime
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from rewards.base import ScoreBatch, ScorerInfo, make_scorer
from rewards.client import (
    RewardClient,
    RewardClientClosed,
    RewardClientConfig,
    RewardClientSync,
    RewardRequestError,
    RewardServiceDown,
    RewardSpec,
)
from rewards.server import ServerConfig, start_server
from rewards.servicer import SERVICE_NAME
from tests.integration.test_reward_service import serving
from tests.unit.test_reward_core import MeanModel

ROOT = Path(__file__).resolve().parents[2]


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _spec(name: str, scorer: str, address: str, **kw: object) -> RewardSpec:
    return RewardSpec(name=name, scorer=scorer, address=address, **kw)  # type: ignore[arg-type]


def test_two_rewards_combined_normalised_cached_and_failures_marked() -> None:
    images = _images(6)
    prompts = ["a", "b", "nan", "d", "e", "f"]

    async def main() -> None:
        async with (
            serving(make_scorer("jpeg_incompressibility")) as (jpeg, _),
            serving(MeanModel()) as (mean, _),
        ):
            cfg = RewardClientConfig(
                rewards=[
                    _spec("detail", "jpeg_incompressibility", jpeg.address, weight=2.0),
                    _spec("bright", "mean", mean.address, weight=-1.0, normalize=False),
                ]
            )
            async with RewardClient(cfg) as client:
                s = await client.score(images, prompts)
                kb = (
                    make_scorer("jpeg_incompressibility")
                    .score(images, prompts)
                    .scores["jpeg_incompressibility"]
                )
                np.testing.assert_allclose(s.raw["detail"], kb, rtol=1e-6)
                kb64 = kb.astype(np.float64)
                z = (kb64 - kb64.mean()) / (kb64.std() + cfg.norm_eps)  # first batch: moments of this batch
                expected = 2.0 * z - images.reshape(6, -1).mean(1) / 255
                assert s.ok.tolist() == [True, True, False, True, True, True]
                np.testing.assert_allclose(s.total[s.ok], expected[s.ok], rtol=1e-4, atol=1e-5)
                assert np.isnan(s.total[2]) and s.errors[2] == "bright: non-finite score"  # never a silent 0
                calls = mean.core.stats.batches
                again = await client.score(images, prompts)
                # ok items come from the cache; the failed one is asked again
                assert client.cache_stats("detail") == (6, 6) and client.cache_stats("bright") == (5, 7)
                assert mean.core.stats.batches == calls + 1 and jpeg.core.stats.items == 6
                np.testing.assert_allclose(again.raw["detail"], s.raw["detail"])
                state = client.state()
                assert state["detail"]["count"] == 12.0 and "bright" in state
                # evaluation scores with the running moments but leaves them alone
                held = await client.score(images[:3] // 2, prompts[:3], update=False)
                assert client.state() == state
                mean_, std_ = state["detail"]["mean"], (state["detail"]["m2"] / 12.0) ** 0.5
                want = (held.raw["detail"].astype(np.float64) - mean_) / (std_ + cfg.norm_eps)
                np.testing.assert_allclose(held.normalized["detail"], want, rtol=1e-5)
                record = s.to_record()
                assert record.total.shape == (6,) and not bool(record.ok[2])

    asyncio.run(main())


class _LatentNorm(MeanModel):
    """Score = the L2 norm of each item's latent (a scorer that reads latents, not pixels)."""

    def __init__(self) -> None:
        super().__init__(max_batch=3)  # a 7-item call goes out in chunks: their latents must follow them

    def info(self) -> ScorerInfo:
        return ScorerInfo(name="latent_norm", version="1", heads=["latent_norm"], max_batch=self.max_batch)

    def score(self, images: np.ndarray, prompts: list[str], latents: np.ndarray | None = None) -> ScoreBatch:
        assert latents is not None, "the client sent no latents"
        self.sizes.append(len(images))
        norms = np.linalg.norm(latents.reshape(len(latents), -1), axis=1).astype(np.float32)
        return ScoreBatch(scores={"latent_norm": norms}, ok=np.ones(len(images), bool))


def test_latents_go_to_the_scorers_that_read_them_only() -> None:
    images, prompts = _images(7), [f"p{i}" for i in range(7)]
    latents = np.random.default_rng(1).standard_normal((7, 4, 2, 2)).astype(np.float32)

    async def main() -> None:
        reader = _LatentNorm()
        async with serving(reader) as (lat, _), serving(MeanModel()) as (mean, _):
            cfg = RewardClientConfig(
                rewards=[
                    _spec("lat", "latent_norm", lat.address, normalize=False),
                    _spec("bright", "mean", mean.address, normalize=False),
                ]
            )
            async with RewardClient(cfg) as client:
                assert client.info("lat").reads_latents and not client.info("bright").reads_latents
                with pytest.raises(ValueError, match=r"latents: expected \[7, \.\.\.\]"):
                    await client.score(images, prompts, latents=latents[:6])
                s = await client.score(images, prompts, latents=latents)
                want = np.linalg.norm(latents.reshape(7, -1), axis=1)
                np.testing.assert_allclose(s.raw["lat"], want, rtol=1e-6)
                np.testing.assert_allclose(s.raw["bright"], images.reshape(7, -1).mean(1) / 255, rtol=1e-6)
                assert reader.sizes == [3, 3, 1]
                # the latent scorer's cache keys on what it reads: other latents of the same images are
                # scored again, while the pixel scorer answers them from its cache
                again = await client.score(images, prompts, latents=latents * 2)
                np.testing.assert_allclose(again.raw["lat"], 2 * want, rtol=1e-6)
                assert client.cache_stats("lat") == (0, 14) and client.cache_stats("bright") == (7, 7)
                # a run without latents: the scorer that needs them fails every item, named, never a 0
                none = await client.score(images[:2], prompts[:2])
                assert not none.ok.any() and "no latents" in none.errors[0]

    asyncio.run(main())


def _spawn(port: int = 0) -> tuple[subprocess.Popen[str], str]:
    """A reward server in its own process (so it can really be SIGKILLed); returns it and its address."""
    code = (
        "import asyncio; from rewards.server import serve; "
        f"asyncio.run(serve('jpeg_compressibility', port={port}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert " listening on " in line, f"server did not start: {line!r}"
    return proc, line.split(" listening on ")[1].split()[0]


def test_killed_server_is_retried_until_restarted_then_down_is_an_error() -> None:
    proc, address = _spawn()
    port = int(address.rsplit(":", 1)[1])
    patient = RewardClientSync(
        RewardClientConfig(
            rewards=[_spec("jpeg", "jpeg_compressibility", address, max_attempts=50, retry_budget_s=30.0)],
            backoff_max_s=0.5,
        )
    )
    impatient = RewardClientSync(
        RewardClientConfig(
            rewards=[_spec("jpeg", "jpeg_compressibility", address, max_attempts=4, retry_budget_s=2.0)],
            backoff_max_s=0.5,
            cache_size=0,
        )
    )
    restarted: list[subprocess.Popen[str]] = []
    try:
        images = _images(4)
        before = patient.score_sync(images, ["p"] * 4)
        assert before.ok.all()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        timer = threading.Timer(1.0, lambda: restarted.append(_spawn(port)[0]))
        timer.start()
        t0 = time.perf_counter()
        after = patient.score_sync(_images(4, seed=1), ["p"] * 4)  # new images: no cache hit
        assert time.perf_counter() - t0 >= 1.0 and after.ok.all() and restarted  # it waited for the restart
        expected = make_scorer("jpeg_compressibility").score(_images(4, seed=1), ["p"] * 4)
        np.testing.assert_allclose(after.raw["jpeg"], expected.scores["jpeg_compressibility"], rtol=1e-6)
        restarted[0].send_signal(signal.SIGKILL)
        restarted[0].wait()
        t0 = time.perf_counter()
        with pytest.raises(
            RewardServiceDown, match=r"reward service 'jpeg' \(jpeg_compressibility at 127\.0\.0\.1"
        ):
            impatient.score_sync(images, ["p"] * 4)
        assert time.perf_counter() - t0 < 4.0  # bounded by the retry budget
    finally:
        patient.close()
        impatient.close()
        for p in [proc, *restarted]:
            p.kill()
            p.wait()


def test_hedged_requests_beat_a_slow_replica() -> None:
    async def main() -> None:
        async with serving(MeanModel(delay=1.0)) as (slow, _), serving(MeanModel()) as (fast, _):
            spec = _spec("m", "mean", slow.address, replicas=[fast.address])
            cfg = RewardClientConfig(rewards=[spec], hedge_after_s=0.15, cache_size=0)
            async with RewardClient(cfg) as client:
                for i in range(4):
                    t0 = time.perf_counter()
                    s = await client.score(_images(2, seed=i), ["p", "p"])
                    assert s.ok.all() and time.perf_counter() - t0 < 0.7
            assert (
                slow.core.stats.batches >= 1 and fast.core.stats.batches == 4
            )  # half went to the slow one first

    asyncio.run(main())


def test_routing_follows_health_and_concurrency_is_limited() -> None:
    async def main() -> None:
        async with serving(MeanModel()) as (a, _), serving(MeanModel()) as (b, _):
            cfg = RewardClientConfig(
                rewards=[_spec("m", "mean", a.address, replicas=[b.address])],
                health_interval_s=0.05,
                cache_size=0,
            )
            async with RewardClient(cfg) as client:
                await b.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
                await asyncio.sleep(0.25)
                for i in range(5):
                    await client.score(_images(1, seed=i), ["p"])
                assert (a.core.stats.batches, b.core.stats.batches) == (5, 0)
                await b.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
                await a.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
                await asyncio.sleep(0.25)
                for i in range(5):
                    await client.score(_images(1, seed=i), ["p"])
                assert (a.core.stats.batches, b.core.stats.batches) == (5, 5)

        # one call in flight at a time fits a queue of 1; eight do not, and RESOURCE_EXHAUSTED is not
        # retried here (max_attempts 1), so the limit is what keeps the first client working
        async with serving(MeanModel(delay=0.03, max_batch=1), queue_size=1, max_wait_ms=0) as (server, _):
            for limit, works in ((1, True), (8, False)):
                spec = _spec("m", "mean", server.address, max_attempts=1)
                async with RewardClient(
                    RewardClientConfig(rewards=[spec], max_concurrency=limit, cache_size=0)
                ) as client:
                    if works:
                        assert (await client.score(_images(8), ["p"] * 8)).ok.all()
                    else:
                        with pytest.raises(RewardServiceDown, match="RESOURCE_EXHAUSTED"):
                            await client.score(_images(8), ["p"] * 8)

    asyncio.run(main())


def test_wrong_scorer_or_token_is_not_retried(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("right")
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong")

    async def main() -> None:
        async with serving(make_scorer("jpeg_compressibility"), token_file=str(token)) as (server, _):
            bad_scorer = RewardClientConfig(
                rewards=[_spec("x", "composition", server.address, token_file=str(token))]
            )
            with pytest.raises(
                RewardRequestError, match=r"expected scorer 'composition'.* serves 'jpeg_compressibility'"
            ):
                await RewardClient(bad_scorer).start()
            bad_token = RewardClientConfig(
                rewards=[_spec("x", "jpeg_compressibility", server.address, token_file=str(wrong))]
            )
            t0 = time.perf_counter()
            with pytest.raises(RewardRequestError, match="UNAUTHENTICATED: invalid bearer token"):
                await RewardClient(bad_token).start()
            assert time.perf_counter() - t0 < 1.0
            good = RewardClientConfig(
                rewards=[_spec("x", "jpeg_compressibility", server.address, token_file=str(token))]
            )
            async with RewardClient(good) as client:
                assert (await client.score(_images(2), ["a", "b"])).ok.all()

    asyncio.run(main())


def _pki(tmp: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sana-rl test CA")])

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, *, ca: bool = False, ip: bool = False
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]) if not ca else ca_name
            )
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ip:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return b.sign(ca_key, hashes.SHA256())

    out = {}
    for name, key, c in [
        ("ca", ca_key, cert("ca", ca_key, ca=True)),
        ("server", srv := ec.generate_private_key(ec.SECP256R1()), cert("127.0.0.1", srv, ip=True)),
        ("client", cli := ec.generate_private_key(ec.SECP256R1()), cert("trainer", cli)),
    ]:
        (tmp / f"{name}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (tmp / f"{name}.key").write_bytes(pem)
        (tmp / f"{name}.key").chmod(0o600)
        out[name], out[f"{name}_key"] = str(tmp / f"{name}.pem"), str(tmp / f"{name}.key")
    return out


def test_mutual_tls_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    pki = _pki(tmp_path)

    async def main() -> None:
        cfg = ServerConfig(port=0, tls_cert=pki["server"], tls_key=pki["server_key"], tls_ca=pki["ca"])
        server = await start_server(make_scorer("jpeg_compressibility"), cfg)
        try:
            spec = _spec(
                "j",
                "jpeg_compressibility",
                server.address,
                tls_ca=pki["ca"],
                tls_cert=pki["client"],
                tls_key=pki["client_key"],
            )
            async with RewardClient(RewardClientConfig(rewards=[spec])) as client:
                s = await client.score(_images(2), ["a", "b"])
                assert s.ok.all() and (s.raw["j"] < 0).all()
            # without a client certificate the handshake fails: retried, then reported down
            anon = _spec(
                "j",
                "jpeg_compressibility",
                server.address,
                tls_ca=pki["ca"],
                max_attempts=2,
                retry_budget_s=1.0,
            )
            with pytest.raises(RewardServiceDown, match="UNAVAILABLE"):
                await RewardClient(RewardClientConfig(rewards=[anon])).start()
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_close_interrupts_retries_and_sigterm_stops_a_server_cleanly() -> None:
    proc, address = _spawn()

    async def main() -> None:
        spec = _spec("jpeg", "jpeg_compressibility", address, max_attempts=100, retry_budget_s=60.0)
        client = await RewardClient(RewardClientConfig(rewards=[spec], backoff_initial_s=0.5)).start()
        proc.send_signal(signal.SIGTERM)  # graceful: drains, stops, exits 0
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10) == 0
        pending = asyncio.ensure_future(client.score(_images(2), ["a", "b"]))
        await asyncio.sleep(0.3)  # it is retrying now
        t0 = time.perf_counter()
        await client.close()
        with pytest.raises(RewardClientClosed, match="client closed while retrying Score"):
            await pending
        assert time.perf_counter() - t0 < 1.0

    try:
        asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()
