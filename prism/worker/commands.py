"""Carry out one message from the frontend on a device: the same code whether the device is
a worker process (prism.worker.process) or a simulated device (prism.sim)."""
from __future__ import annotations

from typing import Callable

from prism.errors import UserError, one_line
from prism.sched.view import SLO
from prism.worker import messages as msg
from prism.worker.device_core import DeviceCore


def carry_out(worker: DeviceCore, m, send: Callable[[object], None]) -> None:
    """Apply `m` (any ToWorker message but Shutdown); answers go through `send`. Bad input
    raises a UserError for the caller to answer."""
    if isinstance(m, msg.AddRequest):
        spec = worker.specs.get(m.model)
        slo = None
        if spec is not None and (m.ttft_slo_s or m.tpot_slo_s):
            slo = SLO(m.ttft_slo_s or spec.ttft_slo_s, m.tpot_slo_s or spec.tpot_slo_s)
        worker.add_request(m.model, m.prompt_token_ids, m.params, req_id=m.req_id, slo=slo,
                           priority=m.priority)
    elif isinstance(m, msg.Abort):
        worker.abort(m.req_id)
    elif isinstance(m, msg.Evict):
        worker.evict(m.model, m.mode)
    elif isinstance(m, msg.Activate):
        worker.activate(m.model)
    elif isinstance(m, msg.DropHostCopy):
        worker.drop_host_copy(m.model)
    elif isinstance(m, msg.SetKVCap):
        worker.set_kv_cap(m.model, m.max_pages)
    elif isinstance(m, msg.ReportMemory):
        send(msg.MemoryReport(worker.memory_report()))


def handle(worker: DeviceCore, m, send: Callable[[object], None]) -> bool:
    """Carry out one message; False means shut down. A user's error is answered (Rejected) and
    the worker goes on; anything else is a bug and propagates (the worker says Failed)."""
    if isinstance(m, msg.Shutdown):
        return False
    try:
        carry_out(worker, m, send)
    except UserError as e:
        send(msg.Rejected(getattr(m, "req_id", ""), one_line(e)))
    return True


