"""The simulator runs the server's own policy code: imported, not copied, and torch-free."""
import subprocess
import sys

from prism.engine.block_manager import BlockManager
from prism.engine.output_processor import OutputProcessor
from prism.engine.scheduler import Scheduler
from prism.memory.page_pool import PagePool
from prism.sched.local import LocalScheduler
from prism.sched.placement import GlobalScheduler
from prism.cluster.config import parse_config
from prism.cluster.control import ClusterControl
from prism.sim.cluster import SimCluster
from prism.sim.costs import ProfileSet
from prism.sim.device import SimDevice
from prism.worker.device_core import DeviceCore

CONFIG = {
    "devices": [{"device": "cuda:0", "memory": "40GiB"}, {"device": "cuda:1", "memory": "40GiB"}],
    "models": [{"name": "a", "source": "llama-3.2-1b:random"}, {"name": "b", "source": "llama-3.2-3b:random"}],
}


def test_devices_cluster_and_engines_are_the_servers_own_classes():
    from prism.worker.device_worker import DeviceWorker

    cluster = SimCluster(parse_config(CONFIG), ProfileSet({}, {}))
    assert type(cluster.control) is ClusterControl
    assert type(cluster.control.global_sched) is GlobalScheduler
    device = cluster.devices["cuda:0"].device
    assert isinstance(device, SimDevice) and isinstance(device, DeviceCore)
    assert issubclass(DeviceWorker, DeviceCore)
    # The step flow is DeviceCore's, not a copy: neither device class defines one.
    for cls in (SimDevice, DeviceWorker):
        for name in ("step", "snapshot", "evict", "activate", "_step_model", "add_request"):
            assert name not in vars(cls), f"{cls.__name__} overrides {name}"
    assert type(device.local) is LocalScheduler
    assert type(device.pool) is PagePool
    engine = device.engines["a"]
    assert type(engine.scheduler) is Scheduler and type(engine.blocks) is BlockManager
    assert type(engine.outputs) is OutputProcessor


def test_the_simulator_imports_no_torch():
    code = ("import sys; import prism.sim.cluster, prism.sim.plan, prism.sim.run; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
