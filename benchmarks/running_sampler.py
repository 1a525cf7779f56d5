"""A server's running batch while a benchmark runs: ``vllm:num_requests_running`` sampled
from its /metrics (vLLM's server and the gateway publish it under the same name)."""

from __future__ import annotations

import statistics
import threading

import httpx

SAMPLE_S = 0.5


class RunningSampler:
    """``vllm:num_requests_running`` (summed over its series) from a server's /metrics every
    ``SAMPLE_S`` seconds, in a thread, while the benchmark runs; ``stop`` gives the mean of
    the samples taken while any request ran (the warm-up before the first and the drain
    after the last left out)."""

    def __init__(self, url: str, headers: dict[str, str] | None) -> None:
        self._url, self._headers = url, headers or {}
        self._samples: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="running-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._done.wait(SAMPLE_S):
                try:
                    text = client.get(self._url, headers=self._headers).text
                except httpx.HTTPError:
                    continue
                values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("vllm:num_requests_running")]
                if values:
                    self._samples.append(sum(values))

    def stop(self) -> float | None:
        self._done.set()
        self._thread.join()
        busy = [v for v in self._samples if v > 0]
        return round(statistics.mean(busy), 2) if busy else None
