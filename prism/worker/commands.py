"""Carry out one message from the frontend on a device: the same code whether the device is
a worker process (prism.worker.process) or a simulated device (prism.sim)."""
from __future__ import annotations

import math
from typing import Callable

from prism.errors import UserError, one_line
from prism.sched.view import SLO
from prism.worker import messages as msg
from prism.worker.device_core import DeviceCore


def frontend_arrival(received_at: float, age_s: float) -> float:
    """When the frontend received a request, on the device's clock: when its message reached
    the device, less the age it was sent with (an age below 0, or not a number, counts as 0)."""
    return received_at - (age_s if math.isfinite(age_s) and age_s > 0 else 0.0)


def carry_out(worker: DeviceCore, m, send: Callable[[object], None], received_at: float | None = None) -> None:
    """Apply `m` (any ToWorker message but Shutdown); answers go through `send`. Bad input
    raises a UserError for the caller to answer. `received_at`: when the message reached the
    device, on its clock (None: now); a request that waited while a step ran is dated from
    then, not from when the loop got to it."""
    if isinstance(m, msg.AddRequest):
        spec = worker.specs.get(m.model)
        slo = None
        if spec is not None and (m.ttft_slo_s or m.tpot_slo_s):
            slo = SLO(m.ttft_slo_s or spec.ttft_slo_s, m.tpot_slo_s or spec.tpot_slo_s)
        received_at = worker.clock.now() if received_at is None else received_at
        worker.add_request(m.model, m.prompt_token_ids, m.params, req_id=m.req_id, slo=slo,
                           priority=m.priority, arrival=frontend_arrival(received_at, m.age_s))
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


def handle(worker: DeviceCore, m, send: Callable[[object], None], received_at: float | None = None) -> bool:
    """Carry out one message; False means shut down. A user's error is answered (Rejected) and
    the worker goes on; anything else is a bug and propagates (the worker says Failed)."""
    if isinstance(m, msg.Shutdown):
        return False
    try:
        carry_out(worker, m, send, received_at)
    except UserError as e:
        send(msg.Rejected(getattr(m, "req_id", ""), one_line(e)))
    return True


