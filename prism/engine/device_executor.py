"""The device executor: one model's weights and KV in a device's elastic memory, and its
forward pass (model runner, CUDA graphs, Triton warm-up, tensor parallelism).

The engine core (core.py) decides what runs; this class holds the memory and runs it. Several
models share one device by sharing its PagePool (the device worker arranges that); an
executor only ever takes pages through the pool. Its weights can be unmapped (a host copy
kept) and mapped again at the same addresses, so CUDA graphs captured against them stay valid.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from prism.config import DeviceConfig, EngineConfig
from prism.engine.block_manager import BlockManager, PageMapper
from prism.engine.catalog import ModelSource
from prism.engine.executor import ModelSizes, context_limit
from prism.engine.host_store import SharedHostCopies
from prism.engine.kv_cache import KVLayout, PagedKVCache
from prism.engine.llama import LlamaModel
from prism.engine.memory_plan import KVGeometry
from prism.engine.model_runner import InFlightStep, ModelRunner
from prism.engine.model_weights import ModelWeights
from prism.engine.ops import make_ops
from prism.engine.parallel import TPGroup, TPPageMapper
from prism.engine.sequence import SampledToken, ScheduledChunk, Sequence, StepPlan
from prism.engine.tp_shard import TPShard
from prism.engine.weights import iter_source_weights
from prism.errors import UserError
from prism.memory import PagePool, make_backend
from prism.types import SamplingParams


class OutOfDeviceMemory(UserError, RuntimeError):
    """The device's page budget cannot hold what was asked (e.g. a model's weights): the
    memory given is too small for the models configured."""


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class DeviceExecutor:
    """The Executor (executor.py) of a real device."""

    def __init__(
        self,
        source: ModelSource,
        engine_config: EngineConfig,
        device_config: DeviceConfig,
        pool: PagePool | None = None,
        dtype: torch.dtype | None = None,
        model_id: str | None = None,
        show_progress: bool = False,
        keep_host_copy: bool = False,
        tp: TPGroup | None = None,
        host_store: SharedHostCopies | None = None,
    ):
        """`tp`: this process's rank of a tensor-parallel group (parallel.py). The executor
        then holds its shard only: `config` is the sharded view (heads / tp, ...) and
        `full_config` the model's. `host_store`: the node's shared host copies (host_store.py);
        None: a copy private to this process."""
        self.source = source
        self.model_id = model_id or source.name
        self.full_config = source.config
        self.tp = tp
        self.shard = TPShard(self.full_config, tp.size, tp.rank, self.model_id) if tp else None
        self.config = self.shard.config if self.shard else self.full_config
        self.device = torch.device(device_config.device)
        self.dtype = dtype or default_dtype(self.device)
        self._owns_pool = pool is None
        self.pool = pool or PagePool(
            make_backend(device_config.device, device_config.page_size),
            device_config.num_pages,
            device_config.num_spare_pages,
        )
        vocab_shards = self.shard.vocab_shards if self.shard else 1
        self.weights = ModelWeights(self.model_id, self.config, self.dtype, self.pool, vocab_shards,
                                    host_store, self._store_key())
        self.kv: PagedKVCache | None = None
        self.show_progress = show_progress
        self.keep_host_copy = keep_host_copy
        self.num_source_reads = 0  # times the weights were read from the model's source
        try:
            self.budget_pages = self._agreed_budget()
            self._load_weights()
            if keep_host_copy:  # now, so that a later eviction is only an unmap
                self.weights.save_host_copy()
            self._build(engine_config)
        except BaseException:
            self.close()
            raise
        self.sizes = ModelSizes(self.weights.num_bytes, self.weights.num_pages,
                                self.config.kv_bytes_per_token(self.dtype.itemsize), self.config.vocab_size)

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

    def _store_key(self) -> str:
        """What names these weight bytes among a node's shared copies: the model, its dtype and
        (tensor parallel) which shard."""
        shard = f"-tp{self.tp.rank}of{self.tp.size}" if self.tp is not None else ""
        return f"{self.model_id}-{str(self.dtype).removeprefix('torch.')}{shard}"

    def _load_weights(self) -> None:
        """Map the weights and read them from the model's source."""
        self._map_weights()
        self._read_source()

    def _read_source(self) -> None:
        self.num_source_reads += 1
        show_progress = self.show_progress
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

    def _build(self, engine_config: EngineConfig) -> None:
        layout = KVLayout.plan(self.config, self.dtype, engine_config.block_size, self.pool,
                               self.budget_pages)
        own_stream = engine_config.own_stream and self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if own_stream else None
        self.kv = PagedKVCache(self.model_id, self.config, layout, self.pool, stream)
        self.kv_geometry = KVGeometry(layout.block_size, layout.blocks_per_page,
                                      layout.num_virtual_pages, self.kv.pages_per_kv_page)
        # A tensor-parallel rank keeps a page only if every rank could map it.
        self.kv_mapper: PageMapper = TPPageMapper(self.kv, self.tp) if self.tp is not None else self.kv
        self.max_model_len = context_limit(engine_config, self.config)
        ops = make_ops(self.device, engine_config.kernels)
        model = LlamaModel(self.config, self.weights, self.max_model_len, ops, self.tp)
        self.runner = ModelRunner(model, self.kv, self.device, stream)
        graph_batch = min(engine_config.cuda_graph_max_batch, engine_config.max_num_seqs)
        graph_tokens = min(engine_config.mixed_graph_max_tokens, engine_config.max_num_batched_tokens)
        if self.device.type == "cuda" and ops.name == "triton":
            self.runner.capture_graphs(graph_batch, graph_tokens, self.max_model_len, private_pool=own_stream)
            self.runner.launch_every_gemm(engine_config.max_num_seqs, engine_config.max_num_batched_tokens)
            self._warm_up_eager_kernels(engine_config.max_num_batched_tokens)

    def _warm_up_eager_kernels(self, max_step_tokens: int) -> None:
        """Launch now what steps outside CUDA graphs launch, as the overlapped engine does: a
        Triton compile is a pause of about a second, and a kernel's first launch in the
        process waits for all work queued on the device (lazy module loading), which here is
        none. Three steps: a prefill of a long and a one-token sequence (both tile shapes of
        the prefill kernel), their decode with the tokens still pending on the device, and a
        prefill beyond the piecewise graphs' largest bucket (run eagerly) when steps can be
        that large. Skipped when the pool has no room (first uses then come mid-serving).
        Their blocks come from a block manager of their own over the same KV pages, all given
        back afterwards, so the engine core's starts from the same (empty) state."""
        g = self.kv_geometry
        blocks = BlockManager(g.num_virtual_pages, g.blocks_per_page, g.block_size, self.kv_mapper)
        room = self.max_model_len - 2  # each sequence decodes one token after its prompt
        if room < 1:
            return
        small = _warm_up_seqs("small", [min(room, 4 * g.block_size + 1), 1])
        graphs_up_to = self.runner.largest_graph_tokens  # the small prefill is eager when 0
        big = _warm_up_seqs("eager", _lengths_summing_to(graphs_up_to + 1, room)) \
            if 0 < graphs_up_to < max_step_tokens else []
        seqs = small + big
        try:
            if all(blocks.allocate(seq, seq.num_tokens + 1) for seq in seqs):
                prefill = self.runner.launch(_prefill_plan(small), None)
                for seq in small:
                    seq.add_pending()
                decode = self.runner.launch(StepPlan(tuple(ScheduledChunk(s, s.num_tokens - 1, 1) for s in small)), prefill)
                launched = [prefill, decode] + ([self.runner.launch(_prefill_plan(big), decode)] if big else [])
                for step in launched:  # each waits for its step: all of them done before the blocks go
                    self.runner.collect(step)
        finally:
            for seq in seqs:
                blocks.free(seq)
                self.runner.forget(seq)
            blocks.release_all_free_pages()

    # ---- Executor --------------------------------------------------------------------------
    @property
    def weights_mapped(self) -> bool:
        return bool(self.weights.tensors)

    @property
    def num_kv_pages(self) -> int:
        return self.kv.num_mapped_pages * self.kv.pages_per_kv_page if self.kv else 0

    supports_overlap = True

    def execute(self, plan: StepPlan, while_running: Callable[[], None]) -> list[SampledToken]:
        return self.runner.execute(plan, while_running)

    def launch(self, plan: StepPlan, after: InFlightStep | None) -> InFlightStep:
        return self.runner.launch(plan, after)

    def collect(self, step: InFlightStep) -> list[SampledToken]:
        sampled = self.runner.collect(step)
        self.kv.reclaim()  # pages freed while this step was queued may go now
        return sampled

    def is_done(self, step: InFlightStep) -> bool:
        return self.runner.is_done(step)

    def forget(self, seq: Sequence) -> None:
        self.runner.forget(seq)

    def unmap_weights(self) -> None:
        self.kv.reclaim(wait=True)  # evicted: its KV pages go back to the pool now
        if not self.weights.copy_dropped:
            self.weights.save_host_copy()  # once: weights never change after loading
        self.weights.unmap()

    def activate(self) -> None:
        """From the host copy (this process's, or the node's shared one); without one, from the
        model's source, keeping a host copy again (the node's first use since it was dropped)."""
        self._map_weights()
        if self.weights.has_host_copy:
            self.weights.restore_host_copy()
            return
        try:
            self._read_source()
        except BaseException:
            self.weights.unmap()
            raise
        if self.keep_host_copy:
            self.weights.save_host_copy()

    @property
    def has_host_copy(self) -> bool:
        return self.weights.has_host_copy

    def drop_host_copy(self) -> None:
        self.weights.drop_host_copy()

    def close(self) -> None:
        """Give every page back to the pool (and the pool's to the device if we own it)."""
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


def _warm_up_seqs(tag: str, lengths: list[int]) -> list[Sequence]:
    greedy = SamplingParams(temperature=0, max_tokens=2)
    return [Sequence(f"warm-up-{tag}-{i}", [0] * n, greedy) for i, n in enumerate(lengths)]


def _lengths_summing_to(total: int, longest: int) -> list[int]:
    """Prompt lengths of at most `longest` tokens that add up to `total`."""
    full, rest = divmod(total, longest)
    return [longest] * full + [rest] * (rest > 0)


def _prefill_plan(seqs: list[Sequence]) -> StepPlan:
    return StepPlan(tuple(ScheduledChunk(s, 0, s.num_tokens) for s in seqs))
