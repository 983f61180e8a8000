"""The load: requests sent at Poisson or gamma arrival times (or all at once), at most `concurrency` in flight."""
from __future__ import annotations

import asyncio
import math
import time

import httpx
import numpy as np

from lowbit.bench.client import OpenAIClient, RequestRecord
from lowbit.bench.datasets import BenchRequest


def arrival_intervals(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each of n requests: gamma-distributed with mean 1 / request_rate and shape
    `burstiness` (1: a Poisson process; below 1 burstier, above 1 more even); all zero for an infinite rate."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n).tolist()


async def run_load(client: OpenAIClient, requests: list[BenchRequest], request_rate: float = math.inf,
                   burstiness: float = 1.0, concurrency: int | None = None, seed: int = 0,
                   progress: bool = True, timeout_s: float | None = None) -> tuple[list[RequestRecord], float]:
    """Run every request; returns (records in request order, seconds from the first send to the last answer)."""
    if concurrency is not None and concurrency <= 0:
        raise ValueError(f"--concurrency must be > 0, got {concurrency}")
    from tqdm import tqdm
    intervals = arrival_intervals(len(requests), request_rate, burstiness, seed)
    limit = concurrency or len(requests)
    gate = asyncio.Semaphore(limit)
    bar = tqdm(total=len(requests), disable=not progress, unit="req", leave=False)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s or 30.0, 30.0))
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()

        async def one(i: int, req: BenchRequest) -> RequestRecord:
            async with gate:
                rec = await client.send(http, req, i, t0)
            bar.update(1)
            if not rec.success:
                bar.set_postfix_str("failed requests", refresh=False)
            return rec

        tasks = []
        for i, (req, wait) in enumerate(zip(requests, intervals)):
            if wait:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i, req)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return list(records), duration
