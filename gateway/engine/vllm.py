"""vLLM's async engine, in process (its core runs in vLLM's own worker process)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from vllm import AsyncEngineArgs, SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine import exceptions as vllm_exc
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import SchedulerStats

from gateway.config import Dtype, LoraRank
from gateway.engine.base import (
    Delta,
    EngineStats,
    LoraSpec,
    OpenAIServing,
    SamplingSpec,
    ServingOptions,
)
from gateway.engine.openai import VllmOpenAI, lora_request
from gateway.errors import AdapterRejectedError, EngineDeadError, EngineError, EngineRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmOptions:
    model_dir: Path
    dtype: Dtype = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 16
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: LoraRank = 16
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    otlp_traces_endpoint: str | None = None  # vLLM's own request spans (gateway.observability.tracing)


class _SchedulerStatsSink(StatLoggerBase):
    """vLLM's stat-logger hook, keeping only the scheduler's latest report.

    vLLM calls ``record`` on the event loop with every engine step's outputs; the
    gateway publishes the numbers itself (``gateway.observability.msp``), so nothing is logged here.
    """

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self._config = vllm_config
        self.latest = EngineStats()

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: Any,
               mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        s = scheduler_stats
        self.latest = EngineStats(
            running=s.num_running_reqs,
            waiting=s.num_waiting_reqs + s.num_skipped_waiting_reqs,  # as vLLM's own gauge
            kv_cache_usage=s.kv_cache_usage,
            # vLLM lists every adapter with requests in both maps; the count tells which.
            waiting_adapters=frozenset(n for n, k in s.waiting_lora_adapters.items() if k > 0),
            cache_config=self.latest.cache_config)

    def log_engine_initialized(self) -> None:
        # The KV cache is sized now: num_gpu_blocks is known from here on.
        info = {k: str(v) for k, v in self._config.cache_config.metrics_info().items()}
        self.latest = replace(self.latest, cache_config=info)


class VllmEngine:
    def __init__(self, engine: AsyncLLM, sink: _SchedulerStatsSink) -> None:
        self._engine = engine
        self._sink = sink

    @classmethod
    def start(cls, opts: VllmOptions) -> VllmEngine:
        """Blocking: builds the engine (tens of seconds on a CPU). Run it in a thread."""
        args = AsyncEngineArgs(
            model=str(opts.model_dir),
            tokenizer=str(opts.model_dir),
            dtype=opts.dtype,
            max_model_len=opts.max_model_len,
            max_num_seqs=opts.max_num_seqs,
            enable_lora=True,
            max_loras=opts.max_loras,
            max_cpu_loras=opts.max_cpu_loras,
            max_lora_rank=opts.max_lora_rank,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            enforce_eager=opts.enforce_eager,
            scheduling_policy=opts.scheduling_policy,
            otlp_traces_endpoint=opts.otlp_traces_endpoint,
            # No log lines; scheduler stats still flow to the sink below.
            disable_log_stats=True,
        )
        sinks: list[_SchedulerStatsSink] = []

        def sink(config: Any, index: int) -> _SchedulerStatsSink:
            sinks.append(_SchedulerStatsSink(config, index))
            return sinks[-1]

        engine = AsyncLLM.from_engine_args(args, stat_loggers=[sink])
        return cls(engine, sinks[0])

    def stats(self) -> EngineStats:
        return self._sink.latest

    @property
    def is_dead(self) -> bool:
        return bool(self._engine.errored)

    async def add_lora(self, lora: LoraSpec) -> None:
        try:
            await self._engine.add_lora(lora_request(lora))
        except vllm_exc.EngineDeadError as exc:
            raise EngineDeadError(str(exc)) from exc
        except Exception as exc:  # vLLM raises plain exceptions for bad adapters
            if self._engine.errored:
                raise EngineDeadError("engine died while loading an adapter") from exc
            raise AdapterRejectedError(f"{type(exc).__name__}: {exc}") from exc

    async def remove_lora(self, int_id: int) -> None:
        await self._engine.remove_lora(int_id)

    async def list_loras(self) -> set[int]:
        return set(await self._engine.list_loras())

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingSpec, request_id: str, lora: LoraSpec | None
    ) -> AsyncIterator[Delta]:
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        completion_tokens = 0
        try:
            params = SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                stop=list(sampling.stop) or None,
                output_kind=RequestOutputKind.DELTA,
            )
            async for out in self._engine.generate(
                prompt, params, request_id,
                lora_request=lora_request(lora) if lora else None,
            ):
                seq = out.outputs[0]
                completion_tokens += len(seq.token_ids)
                yield Delta(seq.text, completion_tokens, len(prompt_ids),
                            seq.finish_reason if out.finished else None)
        except vllm_exc.EngineDeadError as exc:
            raise EngineDeadError(str(exc)) from exc
        except VLLMClientError as exc:
            raise EngineRequestError(str(exc)) from exc
        except vllm_exc.EngineGenerateError as exc:
            raise EngineError(str(exc)) from exc

    def openai(self, options: ServingOptions) -> OpenAIServing:
        return VllmOpenAI(self._engine, options)

    def shutdown(self) -> None:
        self._engine.shutdown()

