"""The job queue: RQ queues by priority, the retry policy, the web process's side of queued
predictions, and the worker.
"""
