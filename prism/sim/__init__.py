"""Cluster simulator: the server's own schedulers over simulated devices and a simulated clock.

See docs/simulator.md. Torch-free: it imports the local and global schedulers, the per-model
batch scheduler, the block manager, the page pool and the device step flow from the server's
own packages; only the forward pass is replaced, by a cost model fitted to measured profiles.
"""
