"""One model's engine: weights and KV in elastic memory, batching, forward, sampling, text.

Several engines can share one device by sharing its PagePool (the device worker of a later
issue arranges that); each engine only ever takes pages through the pool.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from prism.config import DeviceConfig, EngineConfig
from prism.engine.block_manager import BlockManager
from prism.engine.catalog import ModelSource, resolve_model
from prism.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from prism.engine.kv_cache import KVLayout, PagedKVCache
from prism.engine.llama import LlamaModel
from prism.engine.model_runner import ModelRunner
from prism.engine.model_weights import ModelWeights
from prism.engine.scheduler import Scheduler
from prism.engine.sequence import Sequence
from prism.engine.tokenizer import Tokenizer, load_tokenizer
from prism.memory import PagePool, make_backend
from prism.types import CompletionOutput, FinishReason, RequestError, SamplingParams


class OutOfDeviceMemory(RuntimeError):
    """The device's page budget cannot hold what was asked (e.g. a model's weights)."""


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class _RequestState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    stops: StopStringMatcher | None
    text: str = ""
    hit_stop_string: bool = False
    first_token_time: float | None = None


class LLMEngine:
    def __init__(
        self,
        model: str | ModelSource,
        engine_config: EngineConfig = EngineConfig(),
        device_config: DeviceConfig = DeviceConfig(),
        pool: PagePool | None = None,
        dtype: torch.dtype | None = None,
        model_id: str | None = None,
        show_progress: bool = False,
    ):
        self.source = resolve_model(model) if isinstance(model, str) else model
        self.model_id = model_id or self.source.name
        self.config = self.source.config
        self.device = torch.device(device_config.device)
        self.dtype = dtype or default_dtype(self.device)
        self._owns_pool = pool is None
        self.pool = pool or PagePool(
            make_backend(device_config.device, device_config.page_size),
            device_config.num_pages,
            device_config.num_spare_pages,
        )
        self.weights = ModelWeights(self.model_id, self.config, self.dtype, self.pool)
        self.kv: PagedKVCache | None = None
        try:
            self._load_weights(show_progress)
            self._build(engine_config)
        except BaseException:
            self.close()
            raise
        self.tokenizer: Tokenizer | None = (
            load_tokenizer(self.source.tokenizer_path) if self.source.tokenizer_path else None
        )
        self._requests: dict[str, _RequestState] = {}
        self._req_counter = itertools.count()

    # ---- construction ----------------------------------------------------------------------
    def _load_weights(self, show_progress: bool) -> None:
        if not self.weights.map():
            raise OutOfDeviceMemory(
                f"{self.model_id}: weights need {self.weights.num_pages} pages "
                f"({self.weights.num_bytes / 2**30:.2f} GiB) but the device has "
                f"{self.pool.free_pages} free of {self.pool.budget_pages}"
            )
        tensors = self.source.iter_weights(self.dtype, self.device)
        num = len(self.weights.layout.hf_names)
        with tqdm(total=num, desc=f"loading {self.source.name}", unit="tensor",
                  disable=not show_progress, leave=False) as bar:
            self.weights.load(_counted(tensors, bar), self.source.name)

    def _build(self, engine_config: EngineConfig) -> None:
        layout = KVLayout.plan(self.config, self.dtype, engine_config.block_size, self.pool)
        self.kv = PagedKVCache(self.model_id, self.config, layout, self.pool)
        self.blocks = BlockManager(
            layout.num_virtual_pages, layout.blocks_per_page, layout.block_size, self.kv
        )
        self.scheduler = Scheduler(engine_config, self.blocks)
        limit = engine_config.max_model_len or self.config.max_position_embeddings
        self.max_model_len = min(limit, self.config.max_position_embeddings)
        model = LlamaModel(self.config, self.weights, self.max_model_len)
        self.runner = ModelRunner(model, self.kv, self.device)

    # ---- requests --------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
        req_id: str | None = None, arrival_time: float | None = None,
    ) -> str:
        token_ids = self._prompt_ids(prompt)
        self._check_fits(len(token_ids))
        req_id = req_id or f"{self.model_id}-{next(self._req_counter)}"
        if req_id in self._requests:
            raise RequestError(f"request id {req_id!r} is already in use")
        seq = Sequence(req_id, token_ids, params, arrival_time or time.monotonic())
        detok = stops = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            stops = StopStringMatcher(params.stop) if params.stop else None
        self._requests[req_id] = _RequestState(seq, detok, stops)
        self.scheduler.add(seq)
        return req_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"model {self.model_id} has no tokenizer: send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(
                f"token id {bad[0]!r} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )
        return ids

    def _check_fits(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens >= self.max_model_len:
            raise RequestError(
                f"the prompt has {num_prompt_tokens} tokens but {self.model_id}'s context limit "
                f"is {self.max_model_len} (prompt plus at least one generated token)"
            )
        if self.blocks.num_blocks_for(num_prompt_tokens + 1) > self._max_kv_blocks():
            raise RequestError(
                f"the prompt has {num_prompt_tokens} tokens, more than the KV memory this "
                f"device can ever give {self.model_id}"
            )

    def _max_kv_blocks(self) -> int:
        """KV blocks this model would have if it had every page its weights leave free."""
        kv_pages = (self.pool.budget_pages - self.weights.num_pages) // self.kv.pages_per_kv_page
        return min(self.blocks.max_blocks(), kv_pages * self.blocks.blocks_per_page)

    def abort(self, req_id: str) -> None:
        state = self._requests.pop(req_id, None)
        if state is not None:
            self.scheduler.finish(state.seq, FinishReason.ABORT)
            self.runner.forget(state.seq)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[CompletionOutput]:
        """Run one batch; return the requests that finished in it."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        sampled = self.runner.execute(plan)
        self.scheduler.commit(plan)
        now = time.monotonic()
        finished = []
        for seq, token in sampled:
            state = self._requests[seq.req_id]
            state.first_token_time = state.first_token_time or now
            reason = self._append_token(state, token)
            if reason is not None:
                finished.append(self._finish(state, reason, now))
        return finished

    def _append_token(self, state: _RequestState, token: int) -> FinishReason | None:
        seq, params = state.seq, state.seq.params
        seq.output_token_ids.append(token)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_ids
        if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
            return FinishReason.STOP
        if state.detokenizer is not None:
            new_text = state.detokenizer.step(token)
            if state.stops is not None:
                new_text, hit = state.stops.feed(new_text)
                state.text += new_text
                if hit:
                    state.hit_stop_string = True
                    return FinishReason.STOP
            else:
                state.text += new_text
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, state: _RequestState, reason: FinishReason, now: float) -> CompletionOutput:
        seq = state.seq
        if state.detokenizer is not None and not state.hit_stop_string:
            tail = state.detokenizer.flush()
            if state.stops is not None:
                tail, _ = state.stops.feed(tail)
                tail += state.stops.flush()
            state.text += tail
        self.scheduler.finish(seq, reason)
        self.runner.forget(seq)
        del self._requests[seq.req_id]
        return CompletionOutput(
            req_id=seq.req_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=state.text,
            finish_reason=reason,
            num_preemptions=seq.num_preemptions,
            metrics={
                "arrival_time": seq.arrival_time,
                "first_token_time": state.first_token_time,
                "finish_time": now,
            },
        )

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams(),
    ) -> list[CompletionOutput]:
        """Run prompts to completion together (continuous batching); outputs in prompt order."""
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, param_list)]
        done: dict[str, CompletionOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                done[out.req_id] = out
        return [done[i] for i in ids]

    # ---- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Give every page back to the pool (and the pool's to the device if we own it)."""
        for req_id in list(getattr(self, "_requests", {})):
            self.abort(req_id)
        if getattr(self, "blocks", None) is not None:
            self.blocks.release_all_free_pages()
        if self.kv is not None:
            self.kv.close()
            self.kv = None
        self.weights.close()
        if self._owns_pool:
            self.pool.close()


def _counted(tensors, bar):
    for item in tensors:
        yield item
        bar.update(1)
