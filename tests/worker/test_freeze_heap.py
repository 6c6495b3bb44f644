"""freeze_startup_heap (worker/process.py): a started worker keeps its startup objects out of
Python's full garbage collections, after collecting the garbage made so far. Run in a fresh
interpreter: freezing pytest's own heap would keep later tests' garbage alive."""
import subprocess
import sys

PROGRAM = """
import gc, weakref
from prism.worker.process import freeze_startup_heap

class Node:
    pass

cycle = Node()
cycle.me = cycle  # garbage only a collection frees
gone = weakref.ref(cycle)
del cycle
kept = Node()
freeze_startup_heap()
frozen = gc.get_freeze_count()
print(gone() is None, frozen > 1000, gc.get_count()[2] == 0, gc.is_tracked(kept))
"""


def test_the_startup_heap_is_frozen_after_its_garbage_is_collected():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "True", "True", "True"], out.stderr
