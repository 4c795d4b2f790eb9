"""trainer: the streaming half.

label shards -> projector + LLM -> objectives (``lm``, ``sea``, ``basic``, ``distill`` and sums of them) ->
checkpoints -> HF LLaVA export -> alignment evaluation. Imports ``visalign`` (the shared core), never
``pipeline``, Dask or FAISS.
"""

from visalign import __version__

__all__ = ["__version__"]
