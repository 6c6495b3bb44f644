"""Supervision's pieces without processes: the restart budget, the errors a client sees while
a device is down or a request runs out of time, and the deadline aborting on the worker."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from prism.cluster.control import DeviceDown
from prism.cluster.supervision import RestartBudget
from prism.cluster.worker_link import LocalLauncher, NodeGone
from prism.config import DeviceConfig
from prism.server.backend import GenerationRequest, RequestTimedOut, WorkerFailed
from prism.server.errors import to_api_error
from prism.server.metrics import ServerMetrics
from prism.server.router import Router
from prism.server.supervisor import Supervisor
from prism.types import SamplingParams
from prism.worker import messages as msg


def test_restart_budget_backs_off_then_gives_up_then_forgets():
    budget = RestartBudget(max_restarts=5, window_s=100, first_delay_s=0.5)
    assert [budget.next_delay("cpu", t) for t in range(6)] == [0.5, 1, 2, 4, 8, None]
    assert budget.next_delay("other", 5) == 0.5  # per device
    assert budget.next_delay("cpu", 150) == 0.5  # the window has passed


def test_down_and_timeout_errors_are_openai_shaped():
    err = to_api_error(WorkerFailed("restarting", retry_after_s=2.2))
    assert err.status == 503 and err.code == "worker_failed" and err.response().headers["Retry-After"] == "3"
    assert "Retry-After" not in to_api_error(WorkerFailed("gone")).response().headers
    err = to_api_error(RequestTimedOut("too slow"))
    assert err.status == 504 and err.code == "request_timeout" and err.body()["error"]["type"] == "server_error"
    assert err.outcome == ("failed", "request_timeout")


def bare_router(route, timeout_s: float = 600.0):
    """A Router without workers (no event loop: no restart): one model "m" on one device "cpu",
    whose supervisor is real."""
    router = Router.__new__(Router)
    router._closed = False
    router.specs, router.tokenizers, router._streams = {"m": None}, {"m": None}, {}
    router.config = SimpleNamespace(request_timeout_s=timeout_s)
    router.metrics = ServerMetrics(dict, dict)
    sent = []
    router.control = SimpleNamespace(max_model_len=lambda model: 100, route=route, record_arrival=lambda *a: None,
                                     hosting_up=lambda model: ["cpu"], hosting=lambda model: ["cpu"],
                                     mark_down=lambda device: None)
    router.links = {"cpu": SimpleNamespace(alive=True, send=sent.append)}
    router.supervisor = Supervisor(router.config, LocalLauncher((DeviceConfig("cpu"),)), router.links,
                                   router.control, router.metrics)
    router.supervisor._worker_configs = {"cpu": SimpleNamespace(device=DeviceConfig("cpu"))}
    return router, sent


def request(req_id: str = "r1") -> GenerationRequest:
    return GenerationRequest(req_id, "m", [1, 2, 3], SamplingParams(max_tokens=4))


def test_a_restarting_device_answers_503_with_retry_after():
    def route(model, now):
        raise DeviceDown(model, ["cpu"])
    router, _ = bare_router(route)
    router.supervisor._restarting["cpu"] = asyncio.Event()
    with pytest.raises(WorkerFailed) as e:
        router._submit(request())
    assert "restarting" in str(e.value) and 0 < e.value.retry_after_s <= 30
    del router.supervisor._restarting["cpu"]  # given up: no Retry-After
    with pytest.raises(WorkerFailed) as e:
        router._submit(request())
    assert "for good" in str(e.value) and e.value.retry_after_s is None


def test_the_deadline_aborts_the_request_on_its_worker():
    router, sent = bare_router(lambda model, now: "cpu", timeout_s=0.05)

    async def run():
        with pytest.raises(RequestTimedOut):
            async for _ in router.generate(request()):
                pass
    asyncio.run(run())
    assert isinstance(sent[0], msg.AddRequest) and sent[-1] == msg.Abort("r1") and router._streams == {}


class FakeLink:
    def __init__(self):
        self.alive, self.closed, self.attached = True, False, False

    def close(self):
        self.closed = True

    def attach(self, loop, on_message):
        self.attached = True

    def send(self, m):
        pass


def supervise(new_link, launcher=None) -> Supervisor:
    """Run the supervisor's restart of "cpu" (its worker just died) to the end."""
    router, _ = bare_router(lambda model, now: "cpu")
    supervisor = router.supervisor
    supervisor.launcher = launcher or supervisor.launcher
    supervisor.restarts = RestartBudget(max_restarts=3, window_s=100, first_delay_s=0.001)
    up = []
    router.control.mark_up = up.append
    router.control.up = up
    router.links["cpu"] = dead = FakeLink()
    supervisor._new_link = new_link

    async def run():
        supervisor._loop = asyncio.get_running_loop()
        supervisor.worker_failed("cpu", "killed")
        assert supervisor.worker_states()["cpu"] == "restarting"
        await asyncio.gather(*supervisor._tasks)
    asyncio.run(run())
    assert dead.closed and supervisor._restarting == {}
    return supervisor


def test_a_dead_worker_is_restarted_once_it_starts():
    tries = []

    def new_link(device):
        tries.append(device)
        if len(tries) < 3:
            raise RuntimeError("no memory yet")
        return FakeLink()
    supervisor = supervise(new_link)
    assert len(tries) == 3 and supervisor.links["cpu"].attached and supervisor.control.up == ["cpu"]
    assert supervisor.worker_states() == {"cpu": "up"} and supervisor.failed == set()
    assert supervisor.metrics.worker_deaths == {"cpu": 1}
    assert supervisor.metrics.worker_restarts == {("cpu", "failed"): 2, ("cpu", "ok"): 1}


def test_a_worker_that_never_starts_is_failed_for_good():
    def new_link(device):
        raise RuntimeError("broken")
    supervisor = supervise(new_link)
    assert supervisor.failed == {"cpu"} and supervisor.control.up == [] and supervisor.worker_states() == {"cpu": "failed"}
    assert supervisor.metrics.worker_restarts == {("cpu", "failed"): 3}
    assert b'prism_worker_restarts_total{device="cpu",result="failed"} 3.0' in supervisor.metrics.exposition()[0]


class NodeLeaves(LocalLauncher):
    """This host's launcher, but the device's node is gone from the cluster."""

    def nodes(self):
        return {"": False}


def test_a_worker_whose_node_left_waits_for_the_node():
    tries = []
    supervisor = supervise(tries.append, NodeLeaves((DeviceConfig("cpu"),)))
    assert tries == [] and supervisor.node_left == {"cpu"} and supervisor.restarts.attempts("cpu") == 0
    assert supervisor.worker_states() == {"cpu": "node_left"} and supervisor.failed == set()


def test_a_node_gone_while_restarting_stops_the_attempts():
    tries = []

    def new_link(device):
        tries.append(device)
        raise NodeGone("node '' is not in the cluster")
    supervisor = supervise(new_link)
    assert len(tries) == 1 and supervisor.node_left == {"cpu"} and supervisor.worker_states() == {"cpu": "node_left"}
