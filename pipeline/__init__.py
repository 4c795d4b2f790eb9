"""pipeline: the offline half.

word list -> text embeddings -> exact top-k search; images -> vision encoder -> (a) LLaVA input features and
(b) per-patch top-k word labels -> WebDataset shards + manifest (the contract in ``visalign.shards``).

``config`` (LabelConfig), ``sources`` (inputs), ``wordlist`` and ``search`` (words), ``encoders/`` (towers),
``task`` (one output shard, a pure function), ``driver`` (the whole stage on Dask), ``inspect`` and ``cli``.
Importing this package is cheap and pulls neither Dask nor FAISS.
"""

from visalign import __version__

__all__ = ["__version__"]
