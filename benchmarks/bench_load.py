"""The service under load: one client, then about twice what one client gets through.

    .venv/bin/python benchmarks/bench_load.py capacity [--duration 60] [--items 4]
    .venv/bin/python benchmarks/bench_load.py overload --factor 2 [--duration 120] [--clients 16]

Starts a real `stepcredit serve` on loopback (hf packed, the embedded SmolLM2-135M
unless `--model`), warms it with one request, then:

* `capacity`: one client sends `--items`-item requests back to back for `--duration`
  seconds. Its ok items/s is the single-client peak.
* `overload`: measures the single-client peak the same way first (unless `--capacity`
  gives it), then `--clients` clients together offer `--factor` times that many items/s
  for `--duration` seconds, open loop: each client sends on its own schedule whether or
  not its earlier requests are answered, as trainers sharing one service do, except that
  a client told 429 or 503 sends nothing before its Retry-After. A request waits at most
  `--timeout` seconds for its answer.

Every request is recorded: status, Retry-After, latency, items ok. None may be lost:
each one ends with 200, or with 429 or 503 carrying Retry-After; anything else (a
timeout, a dropped connection, another status, a 429/503 without Retry-After) is
counted by kind. Reported: requests, failures by kind, p50/p99 latency, goodput (ok
items/s that finished within the window), and the server's RSS (peak, final, and the
mean of the window's first and last thirds: flat memory means they agree).

Writes benchmarks/results/load_<mode>_<device>.json (or `--out`) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workload import workload  # noqa: E402

ANSWERED = ("ok", "429", "503")
"""The only ways a request may end: scored, or told when to come back."""


# ----------------------------------------------------------------------------- requests


@dataclass
class Record:
    sent_s: float
    """When it was sent, seconds from the start of its phase."""
    latency_s: float
    kind: str
    """ok | 429 | 503 | 429_no_retry_after | 503_no_retry_after | http_<status> | timeout | transport_<error>"""
    status: int | None
    retry_after_s: float | None
    items: int
    items_ok: int


def bodies(items_per_request: int, min_steps: int, max_steps: int, variants: int = 8) -> list[dict]:
    """`variants` different requests (GRPO-shaped, `benchmarks/workload.py`), sent in turn."""
    return [
        {"items": workload(n=items_per_request, min_steps=min_steps, max_steps=max_steps, seed=100 + v)}
        for v in range(variants)
    ]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


async def send(client: httpx.AsyncClient, body: dict, timeout_s: float, origin: float) -> Record:
    sent = time.monotonic()
    status = retry = None
    items_ok = 0
    try:
        response = await client.post("/v1/score", json=body, timeout=timeout_s)
    except httpx.TimeoutException:
        kind = "timeout"
    except httpx.TransportError as exc:
        kind = f"transport_{type(exc).__name__}"
    else:
        status, retry = response.status_code, _retry_after(response)
        if status == 200:
            kind, items_ok = "ok", response.json()["usage"]["items_ok"]
        elif status in (429, 503):
            kind = str(status) if retry is not None else f"{status}_no_retry_after"
        else:
            kind = f"http_{status}"
    return Record(sent - origin, time.monotonic() - sent, kind, status, retry, len(body["items"]), items_ok)


async def capacity_phase(base: str, requests: list[dict], duration_s: float, timeout_s: float) -> list[Record]:
    """One client, one request at a time, back to back."""
    records: list[Record] = []
    async with httpx.AsyncClient(base_url=base) as client:
        origin = time.monotonic()
        while time.monotonic() - origin < duration_s:
            records.append(await send(client, requests[len(records) % len(requests)], timeout_s, origin))
    return records


async def overload_phase(
    base: str, requests: list[dict], offered_items_s: float, clients: int, duration_s: float, timeout_s: float
) -> list[Record]:
    """`clients` open-loop clients offering `offered_items_s` together; a client that is
    told 429/503 waits its Retry-After before it sends again."""
    per_request = len(requests[0]["items"])
    interval = clients * per_request / offered_items_s  # between two sends of one client
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    origin = time.monotonic()

    async def one_client(index: int, http: httpx.AsyncClient) -> list[Record]:
        pending: set[asyncio.Task] = set()
        records: list[Record] = []
        next_send = index * interval / clients  # staggered starts
        sent = 0
        while next_send < duration_s:
            await asyncio.sleep(max(0.0, next_send - (time.monotonic() - origin)))
            task = asyncio.ensure_future(send(http, requests[(index + sent) % len(requests)], timeout_s, origin))
            pending.add(task)
            sent += 1
            next_send += interval
            for done in [t for t in pending if t.done()]:
                pending.discard(done)
                record = done.result()
                records.append(record)
                if record.retry_after_s is not None:  # back off as told
                    next_send = max(next_send, record.sent_s + record.latency_s + record.retry_after_s)
        records += await asyncio.gather(*pending)
        return records

    async with httpx.AsyncClient(base_url=base, limits=limits) as http:
        per_client = await asyncio.gather(*(one_client(i, http) for i in range(clients)))
    return sorted((r for rs in per_client for r in rs), key=lambda r: r.sent_s)


# ----------------------------------------------------------------------------- memory


class RssSampler:
    """The server's resident memory every `every_s` seconds, on a thread."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, float, float]] = []
        """(monotonic time, server MB, server and children MB)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                own = self.process.memory_info().rss
                children = 0
                for child in self.process.children(recursive=True):
                    try:
                        children += child.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.samples.append((time.monotonic(), own / 2**20, (own + children) / 2**20))
            self._stop.wait(self.every_s)

    def window(self, start: float, end: float) -> dict:
        """Peak, final and the first and last thirds' means of the server's own RSS in [start, end]."""
        inside = [(t, own, total) for t, own, total in self.samples if start <= t <= end]
        if len(inside) < 3:
            return {}
        third = len(inside) // 3
        first = statistics.fmean(own for _, own, _ in inside[:third])
        last = statistics.fmean(own for _, own, _ in inside[-third:])
        return {
            "samples": len(inside),
            "peak_mb": max(own for _, own, _ in inside),
            "final_mb": inside[-1][1],
            "first_third_mean_mb": first,
            "last_third_mean_mb": last,
            "growth_mb": last - first,
            "growth_ratio": last / first,
            "peak_with_children_mb": max(total for _, _, total in inside),
        }


# ----------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(records: list[Record], duration_s: float) -> dict:
    kinds = Counter(r.kind for r in records)
    ok = [r for r in records if r.kind == "ok"]
    # Goodput counts what the window produced; requests still running at its end are
    # awaited (none may be lost) but their items do not count.
    in_window = sum(r.items_ok for r in ok if r.sent_s + r.latency_s <= duration_s)
    retry = [r.retry_after_s for r in records if r.retry_after_s is not None and r.kind in ("429", "503")]
    return {
        "requests": len(records),
        "by_kind": dict(sorted(kinds.items())),
        "lost": sum(n for kind, n in kinds.items() if kind not in ANSWERED),
        "rejected": kinds["429"] + kinds["503"],
        "items_sent": sum(r.items for r in records),
        "items_ok": sum(r.items_ok for r in ok),
        "items_error_in_ok_requests": sum(r.items - r.items_ok for r in ok),
        "duration_s": duration_s,
        "goodput_items_s": in_window / duration_s,
        "latency_ok_s": {
            "p50": percentile([r.latency_s for r in ok], 0.5),
            "p99": percentile([r.latency_s for r in ok], 0.99),
        },
        "latency_all_s": {
            "p50": percentile([r.latency_s for r in records], 0.5),
            "p99": percentile([r.latency_s for r in records], 0.99),
        },
        "retry_after_s": {"min": min(retry), "median": statistics.median(retry), "max": max(retry)} if retry else None,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _commit() -> str | None:
    run = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() or None


def machine() -> dict:
    return {
        "cpu": _cpu_name(),
        "commit": _commit(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


# ----------------------------------------------------------------------------- a run


async def run(
    base: str,
    pid: int,
    mode: str,
    *,
    items: int,
    min_steps: int,
    max_steps: int,
    duration_s: float,
    capacity_duration_s: float,
    factor: float,
    clients: int,
    timeout_s: float,
    capacity_items_s: float | None = None,
) -> dict:
    """The phases of `mode` against a running server; the report as a dict."""
    requests = bodies(items, min_steps, max_steps)
    async with httpx.AsyncClient(base_url=base) as client:  # one request: caches, allocator, workers
        warm = await send(client, requests[0], timeout_s, time.monotonic())
    assert warm.kind == "ok", f"the warm-up request failed: {warm}"
    report: dict = {
        "mode": mode,
        "items_per_request": items,
        "steps_per_item": [min_steps, max_steps],
        "timeout_s": timeout_s,
    }
    with RssSampler(pid) as rss:
        if capacity_items_s is None:
            started = time.monotonic()
            seconds = capacity_duration_s if mode == "overload" else duration_s
            records = await capacity_phase(base, requests, seconds, timeout_s)
            window = time.monotonic() - started
            # Back to back, the window is where the last answer lands (it may overrun the duration).
            capacity = summarize(records, window)
            capacity["goodput_items_s"] = capacity["items_ok"] / window
            capacity["rss"] = rss.window(started, time.monotonic())
            report["capacity"] = capacity
            capacity_items_s = capacity["goodput_items_s"]
        report["single_client_peak_items_s"] = capacity_items_s
        if mode == "overload":
            offered = factor * capacity_items_s
            started = time.monotonic()
            records = await overload_phase(base, requests, offered, clients, duration_s, timeout_s)
            overload = summarize(records, duration_s)
            overload.update(clients=clients, factor=factor, offered_items_s=offered)
            overload["goodput_vs_single_client_peak"] = overload["goodput_items_s"] / capacity_items_s
            overload["rss"] = rss.window(started, started + duration_s)
            overload["records"] = [asdict(r) for r in records]
            report["overload"] = overload
    return report


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "stepcredit"), "serve", "--port", str(port), "--device", args.device]
    if args.model:
        cmd += ["--model", str(args.model)]
    env = {**os.environ, "STEPCREDIT_LOG_LEVEL": "warning"}
    # The service refuses (429) what it predicts it cannot answer in time; a third of the
    # clients' timeout leaves room for a request's own work and for misprediction.
    env.setdefault("STEPCREDIT_MAX_QUEUE_WAIT_S", f"{args.timeout / 3:g}")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stepcredit serve exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("stepcredit serve did not become ready in 600 s")


def print_report(report: dict) -> None:
    for phase in ("capacity", "overload"):
        if phase not in report:
            continue
        p = report[phase]
        rss = p.get("rss") or {}
        print(
            f"{phase}: {p['requests']} requests {p['by_kind']}, lost {p['lost']}, "
            f"goodput {p['goodput_items_s']:.2f} items/s"
            + (f" ({p['goodput_vs_single_client_peak']:.2f} x single-client peak)" if phase == "overload" else "")
            + f", latency ok p50 {p['latency_ok_s']['p50'] or 0:.2f} s p99 {p['latency_ok_s']['p99'] or 0:.2f} s"
            + (f", Retry-After {p['retry_after_s']}" if p["retry_after_s"] else "")
            + (
                f", RSS peak {rss['peak_mb']:.0f} MB final {rss['final_mb']:.0f} MB "
                f"(thirds {rss['first_third_mean_mb']:.0f} -> {rss['last_third_mean_mb']:.0f} MB)"
                if rss
                else ""
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["capacity", "overload"])
    parser.add_argument("--factor", type=float, default=2.0, help="overload: offered load over the single-client peak")
    parser.add_argument("--clients", type=int, default=16, help="overload: clients sharing the offered load")
    parser.add_argument("--capacity", type=float, help="overload: single-client peak (items/s) instead of measuring it")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of the measured phase")
    parser.add_argument("--capacity-duration", type=float, default=60.0, help="overload: seconds of its capacity phase")
    parser.add_argument("--items", type=int, default=4, help="items per request")
    parser.add_argument("--min-steps", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=60.0, help="client read timeout per request (s)")
    parser.add_argument("--model", type=Path, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/load_<mode>_<device>.json")
    args = parser.parse_args()

    out = args.out or ROOT / "benchmarks" / "results" / f"load_{args.mode}_{args.device}.json"
    log = Path(tempfile.mkdtemp(prefix="bench-load-")) / "serve.log"
    proc, base = start_server(args, log)
    try:
        model = httpx.get(f"{base}/ready", timeout=10).json().get("model")
        report = asyncio.run(
            run(
                base,
                proc.pid,
                args.mode,
                items=args.items,
                min_steps=args.min_steps,
                max_steps=args.max_steps,
                duration_s=args.duration,
                capacity_duration_s=args.capacity_duration,
                factor=args.factor,
                clients=args.clients,
                timeout_s=args.timeout,
                capacity_items_s=args.capacity,
            )
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    report.update(model=model, machine=machine(), command=" ".join(sys.argv))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} (server log: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
