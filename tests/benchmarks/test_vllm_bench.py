"""benchmarks.vllm_bench's pure parts: the matrix, the benchmark's command line, the summary."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

import benchmarks.running_sampler as bench
from benchmarks.vllm_bench import (
    bench_command,
    connections_opened,
    markdown,
    matrix,
    run_record,
    summarize,
)


def test_matrix_expands_c1_to_both_connection_modes_and_the_others_per_adapter_count() -> None:
    cells = matrix(["c1", "c8", "c32"], [1, 16, 64])
    assert [c.name for c in cells] == ["c1-keepalive", "c1-newconn", "c8-1a", "c8-16a", "c8-64a",
                                       "c32-1a", "c32-16a", "c32-64a"]
    c1, newconn, c32 = cells[0], cells[1], cells[-1]
    assert (c1.concurrency, c1.input_len, c1.output_len, c1.adapters) == (1, 128, 16, 1)
    assert newconn.new_connection and not c1.new_connection
    assert (c32.concurrency, c32.output_len, c32.adapters) == (32, 64, 64)
    assert c1.num_prompts(8) == 48 and c1.num_prompts(1) == 16  # one at a time: 6x, at least 16
    assert c32.num_prompts(4) == 128
    assert [c.name for c in matrix(["c1-newconn", "c1"], [8])] == ["c1-newconn", "c1-keepalive"]
    with pytest.raises(ValueError):
        matrix(["c4"], [1])


def test_bench_command_passes_adapters_key_and_connection_mode() -> None:
    cmd = bench_command("http://h:1", "a0000", Path("/tok"), Path("/r/x.json"), endpoint="chat",
                        api_key="k", lora_modules=["a0000", "a0001"], new_connection=True, seed=7)
    assert cmd[3] == "--lgw-new-connection"  # read by the launcher, before the benchmark's own flags
    assert cmd[cmd.index("--backend") + 1] == "openai-chat"
    assert cmd[cmd.index("--endpoint") + 1] == "/v1/chat/completions"
    lora = cmd.index("--lora-modules")
    assert cmd[lora + 1:lora + 3] == ["a0000", "a0001"]
    assert cmd[cmd.index("--header") + 1] == "Authorization=Bearer k"
    assert cmd[cmd.index("--seed") + 1] == "7" and "--ignore-eos" in cmd
    plain = bench_command("http://h:1", "m", Path("/tok"), Path("/r/x.json"))
    assert "--lgw-new-connection" not in plain and "--lora-modules" not in plain and "--header" not in plain


def test_connections_opened_reads_the_launchers_last_line() -> None:
    assert connections_opened("x\nLGW_CONNECTIONS_OPENED=21\n") == 21
    assert connections_opened("nothing") is None


def _run(server: str, r: int, tok_s: float, ttft: float, failed: int = 0) -> dict:
    out = {"output_throughput": tok_s, "median_ttft_ms": ttft, "p99_ttft_ms": ttft * 2,
           "median_tpot_ms": 5.0, "completed": 16 - failed, "failed": failed, "duration": 1.0,
           "errors": ["" for _ in range(16 - failed)] + ["boom"] * failed}
    return run_record(out, variant="plain", round=r, cell="c8-1a", server=server)


def test_summary_gives_spreads_ratios_of_medians_and_per_round_ratios() -> None:
    runs = [_run("gateway", 0, 90, 22), _run("vllm", 0, 100, 20),
            _run("gateway", 1, 50, 30, failed=2), _run("vllm", 1, 40, 30),
            _run("gateway", 2, 100, 20), _run("vllm", 2, 100, 25)]
    assert runs[2]["errors"] == ["boom"]
    e = summarize(runs)["plain/c8-1a"]
    assert e["rounds"] == 3
    assert e["gateway"]["output_tok_s"] == {"median": 90, "min": 50, "max": 100}
    assert e["vllm"]["failed"] == 0 and e["gateway"]["failed"] == 2 and e["gateway"]["requests"] == 48
    assert e["ratios"]["output_tok_s"]["of_medians"] == 0.9
    assert e["ratios"]["output_tok_s"]["per_round"] == {"median": 1.0, "min": 0.9, "max": 1.25}
    assert e["ratios"]["tpot_p50_ms"]["of_medians"] == 1.0
    table = markdown(summarize(runs), matrix(["c8"], [1]), 4)
    assert "## plain · c8-1a" in table and "| failed requests | 2 of 48 | 0 of 48 | | |" in table
    assert "| output_tok_s (higher is better) | 90.0 (50.0–100.0) | 100.0 (40.0–100.0) | 0.900 | " \
           "0.900–1.250 |" in table
    assert "running_mean" not in table  # not sampled in these runs: no row of n/a


def test_the_running_batch_is_sampled_from_metrics_while_requests_run(monkeypatch) -> None:
    """Summed over the gauge's series; samples of an idle engine left out; a failed scrape
    skipped; the admin key sent."""
    monkeypatch.setattr(bench, "SAMPLE_S", 0.01)
    bodies = iter(["vllm:num_requests_running 0.0\n"] + [
        'vllm:num_requests_running{engine="0"} 5.0\nvllm:num_requests_running{engine="1"} 3.0\n'
        "vllm:num_requests_waiting 9.0\n"] * 5)
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = next(bodies, "").encode()
            self.send_response(200 if body else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sampler = bench.RunningSampler(f"http://127.0.0.1:{server.server_port}/metrics",
                                       {"Authorization": "Bearer k"})
        while len(seen) < 8:
            time.sleep(0.01)
        assert sampler.stop() == 8.0
    finally:
        server.shutdown()
    assert set(seen) == {"Bearer k"}
