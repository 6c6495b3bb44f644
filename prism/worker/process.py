"""A device worker in its own process, driven through typed messages over ZeroMQ.

The parent binds two IPC sockets (requests out, results in) and spawns the child, which
builds a DeviceWorker, says Ready (or Failed, with a one-line reason) and then loops:
drain the inbox, run one step, send token events and finished requests. A thread reads the
inbox meanwhile and dates each message as it comes (prism.worker.inbox). When idle it still
steps every `idle_tick_s` so idle models get evicted on time.
"""
from __future__ import annotations

import gc
import importlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback

import msgspec
import zmq

from prism import env
from prism.errors import one_line
from prism.worker import messages as msg
from prism.worker.channel import ENCODER, WorkerChannel, WorkerStartError
from prism.worker.commands import handle
from prism.worker.device_core import WorkerConfig
from prism.worker.inbox import StampedInbox

SLOW_STEP_S = 0.5  # longer steps are logged: no healthy step takes this long
# Models stepping at their own pace, every one's step still running: the loop looks again
# after this long (or at once when a message comes), neither spinning a core nor leaving a
# finished step unread for long (a small model's decode step takes a few milliseconds).
PACE_POLL_S = 50e-6


class WorkerProcess:
    """The parent's handle on one worker process: a WorkerChannel over IPC sockets it binds."""

    def __init__(self, config: WorkerConfig, start_timeout_s: float = 600.0, idle_tick_s: float = 0.05):
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="prism-worker-")
        addr_in, addr_out = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self.channel = WorkerChannel(addr_in, addr_out, bind=True, peer_gone=self._exited)
        # spawn, not fork: a forked child cannot use CUDA that the parent touched.
        ctx = mp.get_context("spawn")
        self.process = ctx.Process(
            target=worker_main, args=(config, addr_in, addr_out, idle_tick_s), daemon=True,
            name=f"prism-worker-{config.device.device_id}",
        )
        self.process.start()
        try:
            self.ready = self.channel.wait_ready(config.device.device_id, start_timeout_s)
        except WorkerStartError:
            self.close()
            raise
        self.send, self.recv, self.recv_async = self.channel.send, self.channel.recv, self.channel.recv_async

    def _exited(self) -> str | None:
        if self.process.is_alive():
            return None
        return f"worker process exited with code {self.process.exitcode}"

    def close(self, timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process.is_alive():
            try:
                self.channel.send(msg.Shutdown())
            except zmq.ZMQError:
                pass
            self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout_s)
        self.channel.close()
        shutil.rmtree(self._dir, ignore_errors=True)


# ---- the child process ---------------------------------------------------------------------
def worker_main(config: WorkerConfig, addr_in: str, addr_out: str, idle_tick_s: float) -> None:
    """A spawned worker process: connect to the parent's sockets, then run the worker."""
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(addr_in)
    outbox.connect(addr_out)
    try:
        run_worker(config, inbox, outbox, idle_tick_s)
    finally:
        inbox.close(linger=0)
        outbox.close(linger=2000)
        ctx.term()


def run_worker(config: WorkerConfig, inbox: zmq.Socket, outbox: zmq.Socket, idle_tick_s: float) -> None:
    """Build the device's worker, say Ready (or Failed, in one line) and serve until Shutdown:
    the same loop whatever carries the sockets (a spawned process, a Ray actor)."""
    send = lambda m: outbox.send(ENCODER.encode(m))  # noqa: E731
    try:
        # The engine (torch, CUDA) is imported here, in the worker, by name: the frontend that
        # starts workers never imports torch (tests/server/test_frontend_imports.py).
        worker = importlib.import_module("prism.worker.device_worker").DeviceWorker(config)
    except Exception as e:  # a bad model or no memory: say why in one line, then exit
        traceback.print_exc()  # the whole story goes to the worker's stderr (the server log)
        send(msg.Failed(one_line(e)))
        return
    freeze_startup_heap()
    try:
        send(msg.Ready(config.device.device_id, [worker.model_info(m) for m in worker.engines]))
        _serve(worker, inbox, send, idle_tick_s)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        worker.close()


def freeze_startup_heap() -> None:
    """Keep every object alive now (torch's and the libraries' modules, the models) out of
    Python's full garbage collections for good, as vLLM and SGLang do once started: a full
    collection walks every tracked object, and walking the startup heap stopped the host long
    enough for the GPU to run dry between steps (benchmarks/results/engine-notes.md, session 12).
    Garbage made since start-up is collected first, so none of it is kept."""
    gc.collect()
    gc.freeze()


def _open_step_log(worker):
    """$PRISM_STEP_LOG (a folder): one JSON line per step of this worker, with the step's
    wall time and cost terms, so a simulator's cost model can be checked step by step
    against a real run (benchmarks/step_log.py fits the host time it leaves out)."""
    folder = env.step_log_dir()
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    name = worker.config.device.device_id.replace(":", "").replace("/", "-")
    path = os.path.join(folder, f"steps-{name}-{os.getpid()}.jsonl")
    return open(path, "w", buffering=1)  # line by line: what was logged survives a killed worker


def _log_step(log, worker, out, launches: list, started: float, took: float) -> None:
    """A line per step; at its own pace a line per launch, whose wall time is its call alone
    (a worker call there launches several models' steps, none waited for)."""
    running = sum(e.num_running for e in worker.engines.values())
    waiting = sum(e.num_waiting for e in worker.engines.values())
    # so far: a step that activated a model holds its weight copy
    activations = sum(worker.counters.activations.values())
    if worker.own_pace:
        lines = [(launch.started, launch.took_s, launch.model_id, list(launch.terms), launch.seqs)
                 for launch in launches]
    else:
        plan = worker.engines[out.ran_model].last_plan
        lines = [(started, took, out.ran_model, list(plan.cost_terms()) if plan else None,
                  len(plan.chunks) if plan else 0)]
    for t, wall_s, model, terms, seqs in lines:
        log.write(json.dumps({"t": round(t, 6), "wall_s": round(wall_s, 6), "model": model, "terms": terms,
                              "seqs": seqs, "running": running, "waiting": waiting,
                              "activations": activations}) + "\n")


def _decode(decoder, raw: bytes, send):
    """The message in `raw`, or None when it does not decode: SamplingParams validate as they
    decode, so a bad value is bad input, answered (Rejected) like any other, not a crash."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        fields = msgspec.msgpack.decode(raw)
        req_id = fields.get("req_id", "") if isinstance(fields, dict) else ""
        send(msg.Rejected(req_id if isinstance(req_id, str) else "", one_line(e)))
        return None


def _serve(worker, socket, send, idle_tick_s: float) -> None:
    inbox = StampedInbox(socket, worker.clock.now)
    try:
        _loop(worker, inbox, send, idle_tick_s)
    finally:
        inbox.close()


def _loop(worker, inbox: StampedInbox, send, idle_tick_s: float) -> None:
    decoder = msgspec.msgpack.Decoder(msg.ToWorker)
    step_log = _open_step_log(worker)
    worker.record_launches = step_log is not None
    parent = os.getppid()
    waiting_on_steps = False  # the last step found every model's step still running
    while True:
        if os.getppid() != parent:  # the frontend died without saying goodbye: do not linger
            return
        busy = worker.has_unfinished or bool(worker.draining)
        timeout_s = (PACE_POLL_S if waiting_on_steps else 0.0) if busy else idle_tick_s
        while (received := inbox.get(timeout_s)) is not None:
            received_at, raw = received
            m = _decode(decoder, raw, send)
            if m is not None and not handle(worker, m, send, received_at):
                return
            timeout_s = 0.0
        started = time.perf_counter()
        out = worker.step()
        took = time.perf_counter() - started
        waiting_on_steps = worker.own_pace and not (out.num_tokens or out.events or out.finished)
        for notice in worker.take_notices():  # activations and evictions, ordered or local
            send(notice)
        if step_log is not None and out.ran_model is not None:
            _log_step(step_log, worker, out, worker.take_launches(), started, took)
        if took > SLOW_STEP_S:  # a whole-device pause: say what the step did (server log)
            print(f"prism worker {worker.config.device.device_id}: slow step {took:.2f} s "
                  f"(ran {out.ran_model or '-'}, {out.num_tokens} tokens; "
                  f"activations so far {sum(worker.counters.activations.values())}, "
                  f"evictions {sum(worker.counters.evictions.values())})", file=sys.stderr, flush=True)
        # Events without a token (a text flush, an abort) say nothing the frontend needs.
        tokens = [msg.Token(e.req_id, e.token_id, e.logprobs) for e in out.events if e.token_id >= 0]
        if tokens:
            send(msg.Tokens(tokens))
        for _, done in out.finished:
            send(msg.Finished(done.req_id, done.finish_reason.value))
