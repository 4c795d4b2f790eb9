"""Seeing alignment: how close a run's visual tokens are to the LLM's word embeddings, layer by layer.

* ``metrics``  pure measures (label hits, meaningful share, consistency score, reverse cosine)
* ``measure``  the measures over batches (``evaluate_batches``), for ``trainer eval`` and the training loop
* ``report``   ``trainer eval`` / ``trainer compare``: load a run, measure, write metrics.json and pictures
* ``pictures`` words drawn on patch cells (SEA Figure 1 style), per-layer curves, tables

Definitions and choices: docs/eval.md. Nothing is imported here so ``trainer --help`` stays instant.
"""
