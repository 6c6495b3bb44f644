"""Router._submit registers a request's stream only once its message is on its way: a message
that cannot be encoded (or a worker that is gone) leaves nothing in flight."""
from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import msgspec
import pytest

from prism.cluster.worker_link import LocalLauncher
from prism.server.backend import GenerationRequest, WorkerFailed
from prism.server.metrics import ServerMetrics
from prism.server.router import Router
from prism.server.supervisor import Supervisor
from prism.types import SamplingParams
from prism.worker import messages as msg


def bare_router(alive: bool = True):
    """A Router without workers: one model "m" on one device "cpu" whose link encodes what it
    is sent as the real worker process does (msgpack)."""
    router = Router.__new__(Router)
    router._closed = False
    router.specs = {"m": None}
    router.tokenizers = {"m": None}
    router._streams = {}
    arrivals, sent = [], []
    router.control = SimpleNamespace(max_model_len=lambda model: 100, route=lambda model, now: "cpu",
                                     record_arrival=lambda *a: arrivals.append(a), mark_down=lambda d: None)
    router.links = {"cpu": SimpleNamespace(alive=alive, send=lambda m: sent.append(msgspec.msgpack.encode(m)))}
    # Not started (no event loop): a worker that fails is not restarted.
    router.supervisor = Supervisor(None, LocalLauncher(()), router.links, router.control, ServerMetrics(dict, dict))
    return router, arrivals, sent


def request(req_id: str, **params) -> GenerationRequest:
    return GenerationRequest(req_id, "m", [1, 2, 3], SamplingParams(max_tokens=4, **params))


def test_unencodable_request_leaves_nothing_in_flight():
    router, arrivals, sent = bare_router()
    with pytest.raises(OverflowError):
        router._submit(request("r1", seed=2**70))
    assert router._streams == {} and arrivals == [] and sent == []
    assert router._queue_depth() == {"m": 0}
    stream = router._submit(request("r2", seed=7))  # the next one goes through
    assert list(router._streams) == ["r2"] and stream.device == "cpu" and len(sent) == len(arrivals) == 1


def test_dead_worker_is_busy_not_a_hang():
    router, arrivals, sent = bare_router(alive=False)
    with pytest.raises(WorkerFailed):
        router._submit(request("r1"))
    assert router._streams == {} and arrivals == [] and sent == []


def test_a_dying_worker_fails_its_requests():
    router, _, _ = bare_router()
    stream = router._submit(request("r1"))
    router._on_message("cpu", msg.Failed("out of memory"))
    error = stream.queue.get_nowait()
    assert isinstance(error, WorkerFailed) and "out of memory" in str(error) and stream.done


def test_the_message_carries_the_requests_age_since_the_http_request_came_in():
    router, _, sent = bare_router()
    decoder = msgspec.msgpack.Decoder(msg.ToWorker)
    received = time.monotonic() - 0.3  # tokenizing and a wait for a device took 0.3 s
    stream = router._submit(dataclasses.replace(request("r1"), received_s=received))
    aged = decoder.decode(sent[-1])
    assert 0.3 <= aged.age_s < 10 and stream.arrival == received  # the server's own TTFT counts from then
    router._submit(request("r2"))  # no stamp (not from HTTP): it is as old as now
    assert 0 <= decoder.decode(sent[-1]).age_s < aged.age_s
