"""Label Studio's side of the service: its labeling config and controls, the result items we answer
with, its tasks and annotations, its exports, photo fetching from its URLs, and its API client.
Knows nothing of Redis, RQ or torch.
"""
