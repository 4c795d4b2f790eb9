"""Seeing alignment: how close a run's visual tokens are to the LLM's word embeddings, layer by layer.

* ``metrics``  pure measures (label hits, meaningful share, consistency score, reverse cosine)
* ``pictures`` words drawn on patch cells (SEA Figure 1 style), per-layer curves, tables
* ``runner``   ``trainer eval`` / ``trainer compare`` and ``evaluate_batches`` for the training loop

Definitions and choices: docs/eval.md. Nothing is imported here so ``trainer --help`` stays instant.
"""
