"""Load at about twice the measured single-client capacity, against a real `stepcredit
serve` on loopback (tiny random Llama, about a minute): every request ends with 200 or a
429/503 carrying Retry-After (none lost), memory stays flat, and goodput stays at
least 0.8 x what one client alone gets through. `benchmarks/bench_load.py` is the same
run at benchmark size."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks.bench_load import print_report, run
from tests.e2e.processes import serve

# CI-sized: 4-item requests of 4-12 steps, an 8 s capacity phase, then 25 s at 2x.
LOAD = dict(
    items=4, min_steps=4, max_steps=12, capacity_duration_s=8, duration_s=25, factor=2.0, clients=16, timeout_s=15
)


@pytest.fixture(scope="module")
def report(tiny_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    # Like the benchmark: the service refuses what it predicts it cannot answer within a
    # third of the clients' timeout.
    wait = str(LOAD["timeout_s"] / 3)
    with serve(
        ["--model", str(tiny_model_path), "--device", "cpu"], folder / "serve.log", STEPCREDIT_MAX_QUEUE_WAIT_S=wait
    ) as served:
        result = asyncio.run(run(served.base, served.proc.pid, "overload", **LOAD))
        assert served.proc.poll() is None
    (folder / "load.json").write_text(json.dumps(result, indent=1))
    print_report(result)  # the figures, for the CI log (-s or -rA)
    return result


def test_no_request_is_lost_at_twice_capacity(report):
    overload = report["overload"]
    assert overload["offered_items_s"] >= 1.9 * report["single_client_peak_items_s"]
    assert overload["lost"] == 0, overload["by_kind"]


def test_every_429_and_503_carries_retry_after(report):
    records = report["overload"]["records"]
    told = [r for r in records if r["status"] in (429, 503)]
    assert all(r["retry_after_s"] is not None and r["retry_after_s"] > 0 for r in told), told[:3]


def test_server_memory_stays_flat_under_load(report):
    rss = report["overload"]["rss"]
    # Transient batches move RSS by a few hundred MB; a leak grows it steadily.
    assert rss["growth_ratio"] < 1.25, rss


def test_goodput_under_overload_stays_near_the_single_client_peak(report):
    overload = report["overload"]
    assert overload["goodput_vs_single_client_peak"] >= 0.8, (
        f"goodput {overload['goodput_items_s']:.2f} items/s at 2x load, single-client peak "
        f"{report['single_client_peak_items_s']:.2f}: {overload['by_kind']}"
    )
