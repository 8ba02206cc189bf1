"""Serving predictions: one engine per process and device, a project's promoted heads, model versions,
and the one predict function the web process (inline) and the queue workers both call.
"""
