"""visalign.trainer: the streaming half.

label shards -> projector + LLM -> objectives (``lm``, ``sea``, ``basic``, ``distill`` and sums of them) ->
checkpoints -> HF LLaVA export -> alignment evaluation. Never imports Dask or FAISS.
"""

__version__ = "0.1.0"
