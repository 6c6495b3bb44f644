"""Scheduling policies: pure logic over plain snapshots (no torch, no sockets, no wall clock).

The device worker and the cluster simulator both run this very code.
"""
