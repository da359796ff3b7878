"""Load on `ovdense serve` over loopback: the server starts on 127.0.0.1 (the shipped tiny model unless model flags
are given after --), N clients (one asyncio loop, a kept-alive connection each) post segmentation requests for S
seconds, and the table gives requests/s, latency percentiles and errors, beside the single-request latency (target:
no errors; p95 under 4x the single request).

  python benchmarks/bench_serve_load.py [--clients 16] [--seconds 60] [--image IMG] [--classes "sky, grass"] [-- ...]
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def load(url: str, data: bytes, classes: str, clients: int, seconds: float):
    """(single-request latency, [(latency, status)] of `clients` clients posting for `seconds`, elapsed seconds)."""
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        async def post() -> tuple[float, int]:
            start = time.perf_counter()
            try:
                status = (await client.post("/v1/segment", files={"image": ("i.png", data)},
                                            data={"classes": classes})).status_code
            except httpx.HTTPError:
                status = -1
            return time.perf_counter() - start, status

        for _ in range(3):
            await post()
        single = float(np.median([(await post())[0] for _ in range(20)]))
        results: list[tuple[float, int]] = []
        deadline = time.perf_counter() + seconds

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                results.append(await post())
        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return single, results, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--image", default="data/synthetic-96/images/val_000000.png")
    parser.add_argument("--classes", default="sky, grass, water, sand, hourglass, bar, star")
    parser.add_argument("server_args", nargs="*", help="model flags for `ovdense serve` (after --)")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ovdense.cli", "--quiet", "serve", "--port", str(port),
                               "--detector", "none", *args.server_args])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with open(args.image, "rb") as file:
            data = file.read()
        single, results, elapsed = asyncio.run(load(url, data, args.classes, args.clients, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([t for t, s in results if s == 200])
    errors = sum(s != 200 for _, s in results)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    print(f"{args.clients} clients for {args.seconds:g} s on {url}, image {args.image}, server flags "
          f"{' '.join(args.server_args) or '(defaults)'}")
    print(f"{'requests':>8} {'req/s':>7} {'single s':>9} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'errors':>6} "
          f"{'p95 / single':>12}")
    print(f"{len(results):>8} {len(results) / elapsed:>7.2f} {single:>9.3f} {p50:>7.3f} {p95:>7.3f} {p99:>7.3f} "
          f"{errors:>6} {p95 / single:>12.1f}")


if __name__ == "__main__":
    main()
