"""Retraining on corrections: the webhook's training events, when to train (the periodic check and
its leader loop), and the training job itself.
"""
