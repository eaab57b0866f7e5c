"""Continual learning around the layers: data and task splits, self-pretraining, and (later) the task loop.

Layers know nothing of training loops; everything that knows about tasks lives here.
"""
