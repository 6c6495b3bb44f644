"""One model's engine: weights and KV in elastic memory, batching, forward, sampling, text.

Several engines share one device by sharing its PagePool (the device worker arranges that);
an engine only ever takes pages through the pool. An engine can be evicted (weights and KV
unmapped, a host copy of the weights kept) and activated again at the same addresses.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

import torch
from tqdm import tqdm

from prism.config import DeviceConfig, EngineConfig
from prism.engine.block_manager import BlockManager
from prism.engine.catalog import ModelSource, resolve_model
from prism.engine.kv_cache import KVLayout, PagedKVCache
from prism.engine.llama import LlamaModel
from prism.engine.memory_plan import check_prompt_fits, max_kv_blocks
from prism.engine.model_runner import ModelRunner
from prism.engine.model_weights import ModelWeights
from prism.engine.ops import make_ops
from prism.engine.output_processor import OutputProcessor, TokenEvent
from prism.engine.parallel import TPGroup, TPPageMapper
from prism.engine.scheduler import Scheduler, VictimChooser
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.engine.tokenizer import Tokenizer, load_tokenizer
from prism.engine.tp_shard import TPShard
from prism.engine.weights import iter_source_weights
from prism.memory import PagePool, make_backend
from prism.sched.view import SLO
from prism.types import CompletionOutput, FinishReason, RequestError, SamplingParams


class OutOfDeviceMemory(RuntimeError):
    """The device's page budget cannot hold what was asked (e.g. a model's weights)."""


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
        clock: Callable[[], float] = time.monotonic,
        choose_victim: VictimChooser | None = None,
        keep_host_copy: bool = False,
        detokenize: bool = True,
        tp: TPGroup | None = None,
    ):
        """`tp`: this process's rank of a tensor-parallel group (parallel.py). The engine then
        holds its shard only: `config` is the sharded view (heads / tp, ...) and `full_config`
        the model's. Every rank must be driven identically (same requests, aborts, evictions
        and steps, same settings): see parallel.py for what the ranks agree on."""
        self.source = resolve_model(model) if isinstance(model, str) else model
        self.model_id = model_id or self.source.name
        self.full_config = self.source.config
        self.tp = tp
        self.shard = TPShard(self.full_config, tp.size, tp.rank, self.model_id) if tp else None
        self.config = self.shard.config if self.shard else self.full_config
        self.device = torch.device(device_config.device)
        self.dtype = dtype or default_dtype(self.device)
        self.clock = clock
        self._owns_pool = pool is None
        self.pool = pool or PagePool(
            make_backend(device_config.device, device_config.page_size),
            device_config.num_pages,
            device_config.num_spare_pages,
        )
        vocab_shards = self.shard.vocab_shards if self.shard else 1
        self.weights = ModelWeights(self.model_id, self.config, self.dtype, self.pool, vocab_shards)
        self.kv: PagedKVCache | None = None
        self.blocks: BlockManager | None = None
        self.outputs = OutputProcessor(None, (), 0)
        try:
            self._budget_pages = self._agreed_budget()
            self._load_weights(show_progress)
            if keep_host_copy:  # now, so that a later eviction is only an unmap
                self.weights.save_host_copy()
            self._build(engine_config, choose_victim)
            self.tokenizer: Tokenizer | None = (
                load_tokenizer(self.source.tokenizer_path) if self.source.tokenizer_path else None
            )
        except BaseException:
            self.close()
            raise
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_ids
        # detokenize=False: token ids only (a server's frontend turns them into text and
        # applies stop strings there).
        self.outputs = OutputProcessor(self.tokenizer if detokenize else None, eos, self.max_model_len)
        self._events: list[TokenEvent] = []
        self.last_step_num_tokens = 0  # tokens the last step computed (for cost accounting)
        self.last_plan: StepPlan | None = None
        self._req_counter = itertools.count()

    # ---- construction ----------------------------------------------------------------------
    def _agreed_budget(self) -> int:
        """The page budget that sizes KV and request limits: the pool's, or on a
        tensor-parallel rank the smallest among the ranks (their GPUs may differ), so every
        rank accepts and lays out the same."""
        if self.tp is None:
            return self.pool.budget_pages
        page = self.pool.page_size
        if self.tp.min_int(page) != -self.tp.min_int(-page):
            raise ValueError(f"{self.model_id}: the ranks of a tensor-parallel group must use one page size")
        return self.tp.min_int(self.pool.budget_pages)

    def _load_weights(self, show_progress: bool) -> None:
        self._map_weights()
        select = self.shard.select if self.shard else None  # each rank copies only its slices
        tensors = iter_source_weights(self.source, self.dtype, self.device, select)
        num = len(self.weights.layout.hf_names)
        with tqdm(total=num, desc=f"loading {self.source.name}", unit="tensor",
                  disable=not show_progress, leave=False) as bar:
            self.weights.load(_counted(tensors, bar), self.source.name)

    def _map_weights(self) -> None:
        ok = self.weights.map()
        if self.tp is not None and not self.tp.all_true(ok):  # all ranks or none
            if ok:
                self.weights.unmap()
            ok = False
        if not ok:
            raise OutOfDeviceMemory(
                f"{self.model_id}: weights need {self.weights.num_pages} pages "
                f"({self.weights.num_bytes / 2**30:.2f} GiB) but the device has "
                f"{self.pool.free_pages} free of {self.pool.budget_pages}"
            )

    def _build(self, engine_config: EngineConfig, choose_victim: VictimChooser | None) -> None:
        layout = KVLayout.plan(self.config, self.dtype, engine_config.block_size, self.pool,
                               self._budget_pages)
        self.kv = PagedKVCache(self.model_id, self.config, layout, self.pool)
        mapper = TPPageMapper(self.kv, self.tp) if self.tp is not None else self.kv
        self.blocks = BlockManager(
            layout.num_virtual_pages, layout.blocks_per_page, layout.block_size, mapper
        )
        self.scheduler = Scheduler(engine_config, self.blocks, choose_victim)
        limit = engine_config.max_model_len or self.config.max_position_embeddings
        self.max_model_len = min(limit, self.config.max_position_embeddings)
        ops = make_ops(self.device, engine_config.kernels)
        model = LlamaModel(self.config, self.weights, self.max_model_len, ops, self.tp)
        self.runner = ModelRunner(model, self.kv, self.device)
        graph_batch = min(engine_config.cuda_graph_max_batch, engine_config.max_num_seqs)
        if self.device.type == "cuda" and ops.name == "triton":
            if graph_batch > 0:
                self.runner.capture_decode_graphs(graph_batch, self.max_model_len)
            self._warm_up_eager_kernels()

    def _warm_up_eager_kernels(self) -> None:
        """Compile the kernels of steps that run outside CUDA graphs (prefill, mixed) now: a
        Triton compile is a pause of about a second, and serving must not meet it mid-trace.
        One step with a long and a one-token sequence covers both tile shapes of the prefill
        kernel. Skipped when the pool has no room (the kernels then compile on first use)."""
        long_len = min(self.max_model_len - 1, 4 * self.blocks.block_size + 1)
        greedy = SamplingParams(temperature=0, max_tokens=1)
        seqs = [Sequence(f"warm-up-{n}", [0] * n, greedy) for n in (long_len, 1)]
        try:
            if all(self.blocks.allocate(seq, seq.num_tokens) for seq in seqs):
                self.runner.execute(StepPlan(tuple(ScheduledChunk(s, 0, s.num_tokens) for s in seqs)))
                torch.cuda.synchronize(self.device)
        finally:
            for seq in seqs:
                self.blocks.free(seq)
                self.runner.forget(seq)
            self.blocks.release_all_free_pages()

    # ---- requests --------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
        req_id: str | None = None, arrival_time: float | None = None,
        slo: SLO | None = None, priority: int = 0,
    ) -> str:
        seq = self.make_sequence(prompt, params, req_id, arrival_time, slo, priority)
        self.outputs.add(seq)
        self.scheduler.add(seq)
        return seq.req_id

    def make_sequence(self, prompt, params, req_id=None, arrival_time=None, slo=None, priority=0) -> Sequence:
        """Validate a request and build its sequence, without queueing it."""
        token_ids = self._prompt_ids(prompt)
        self._check_fits(len(token_ids))
        req_id = req_id or f"{self.model_id}-{next(self._req_counter)}"
        if req_id in self.outputs:
            raise RequestError(f"request id {req_id!r} is already in use")
        arrival = self.clock() if arrival_time is None else arrival_time
        return Sequence(req_id, token_ids, params, arrival, slo=slo, priority=priority)

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
        max_blocks = max_kv_blocks(self.blocks, self.kv.pages_per_kv_page, self._budget_pages,
                                   self.weights.num_pages)
        check_prompt_fits(self.model_id, num_prompt_tokens, self.max_model_len, self.blocks, max_blocks)

    def abort(self, req_id: str) -> CompletionOutput | None:
        seq = self.sequence(req_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORT, self.clock())

    def sequence(self, req_id: str) -> Sequence | None:
        return next((s for s in self.sequences() if s.req_id == req_id), None)

    def sequences(self) -> list[Sequence]:
        """Every unfinished request: running ones first, then waiting in queue order."""
        return self.scheduler.unfinished()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[CompletionOutput]:
        """Run one batch; return the requests that finished in it (token events: drain_events)."""
        plan = self.scheduler.schedule()
        self.last_plan = plan
        self.last_step_num_tokens = plan.num_tokens
        if plan.is_empty:
            return []
        if not self.resident:  # the model's views point at unmapped memory
            raise RuntimeError(f"{self.model_id} is evicted: activate it before stepping")
        now = self.clock()
        for chunk in plan.chunks:
            if chunk.seq.admitted_time is None:
                chunk.seq.admitted_time = now
        sampled = self.runner.execute(plan, lambda: self.blocks.map_ahead(self._blocks_for_next_step(plan)))
        self.scheduler.commit(plan)
        now = self.clock()
        finished = []
        for seq, token in sampled:
            event = self.outputs.on_token(seq, token, now)
            self._events.append(event)
            if event.finish_reason is not None:
                finished.append(self._finish(seq, event.finish_reason, now))
        if not self.scheduler.has_work:
            self.blocks.map_ahead(0)  # idle: keep no pages for a next step that may not come
        self.blocks.trim()
        return finished

    def _blocks_for_next_step(self, plan: StepPlan) -> int:
        """KV blocks the step after `plan` will likely take: one per sequence whose next token
        starts a block, plus those of the prefill tokens the token budget lets in."""
        bs = self.blocks.block_size
        decodes = prefill = 0
        for chunk in plan.chunks:
            if chunk.samples:  # next step writes position num_tokens (this step's token)
                decodes += chunk.seq.num_tokens % bs == 0
            else:  # a chunked prefill goes on
                prefill += chunk.seq.num_tokens - chunk.start - chunk.num_tokens
        budget = self.scheduler.config.max_num_batched_tokens
        for seq in itertools.islice(self.scheduler.waiting, 64):
            if prefill >= budget:
                break
            prefill += seq.num_uncomputed_tokens
        return decodes + -(-min(prefill, budget) // bs)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> CompletionOutput:
        tail, out = self.outputs.finish(seq, reason, now)
        if tail or reason == FinishReason.ABORT:
            self._events.append(TokenEvent(seq.req_id, -1, tail, now, reason))
        self.scheduler.finish(seq, reason)
        self.runner.forget(seq)
        return out

    def drain_events(self) -> list[TokenEvent]:
        """Token events since the last call, in order (what a streaming client receives).
        An event with token_id -1 carries text flushed at the end, or an abort."""
        events, self._events = self._events, []
        return events

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
        self.drain_events()
        return [done[i] for i in ids]

    # ---- residency -------------------------------------------------------------------------
    @property
    def resident(self) -> bool:
        return bool(self.weights.tensors)

    def evict(self) -> list[Sequence]:
        """Unmap weights and all KV; every unfinished request is preempted (recomputed after
        activation). Returns the preempted sequences. The host copy makes activation cheap."""
        self.weights.save_host_copy()
        preempted = self.scheduler.preempt_all()
        self.blocks.release_all_free_pages()
        self.weights.unmap()
        return preempted

    def activate(self) -> None:
        """Map the weights again (same addresses) and copy them in from the host copy."""
        if self.resident:
            return
        self._map_weights()
        self.weights.restore_host_copy()

    @property
    def num_kv_pages(self) -> int:
        return self.kv.num_mapped_pages * self.kv.pages_per_kv_page if self.kv else 0

    # ---- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Give every page back to the pool (and the pool's to the device if we own it)."""
        if self.blocks is not None:
            for seq in self.sequences():
                self._finish(seq, FinishReason.ABORT, self.clock())
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
