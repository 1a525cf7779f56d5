"""benchmarks.packing_bound: the model of batch fullness by admission order."""

from __future__ import annotations

from benchmarks.packing_bound import simulate


def test_a_door_that_holds_what_cannot_join_fills_batches_as_vllms_own_queue_does() -> None:
    rows = {p: simulate(p, steps=4000)["requests_per_step"]
            for p in ("vllm", "door-fifo", "door-lookahead-8", "door", "most-waiting")}
    assert rows["door-fifo"] < rows["door-lookahead-8"] < rows["door"]
    assert abs(rows["door"] - rows["vllm"]) / rows["vllm"] < 0.02
    assert rows["vllm"] < rows["most-waiting"] < 1.1 * rows["vllm"]


def test_with_as_many_adapter_slots_as_requests_order_does_not_matter() -> None:
    full = {p: simulate(p, steps=2000, max_loras=16)["requests_per_step"] for p in ("vllm", "door")}
    assert full["vllm"] == full["door"] == 16
