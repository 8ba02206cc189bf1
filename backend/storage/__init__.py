"""What the service keeps: the Redis connection and every key name, the result cache, the example
store (sqlite), the model registry (files), its Redis mirror, and the training-event log.
"""
