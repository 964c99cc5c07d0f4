"""A real Scorer on the tiny random Llama, shared by the integration tests."""

from __future__ import annotations

import httpx
import pytest

from stepcredit.api import create_app
from stepcredit.backends.hf import HFBackend
from stepcredit.config import Settings
from stepcredit.engine import Scorer
from stepcredit.verify import VerifierPool


@pytest.fixture(scope="session")
def verifier():
    pool = VerifierPool(workers=2, timeout_s=5.0)
    pool.start()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def settings(tmp_path_factory) -> Settings:
    return Settings(cache_dir=tmp_path_factory.mktemp("cache"), api_key=None)


@pytest.fixture(scope="session")
async def tiny_scorer(tiny_model_path, settings, verifier):
    backend = HFBackend(tiny_model_path, device="cpu", strategy="packed")
    scorer = Scorer(backend, settings, verifier=verifier)
    await scorer.start()
    yield scorer
    scorer.ready = False
    backend.shutdown()


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


@pytest.fixture
async def client(tiny_scorer, settings):
    async with asgi_client(create_app(settings, scorer=tiny_scorer)) as c:
        yield c
