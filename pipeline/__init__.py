"""visalign.pipeline: the offline half.

word list -> text embeddings -> exact top-k search; images -> vision encoder -> (a) LLaVA input features and
(b) per-patch top-k word labels -> WebDataset shards + manifest (the contract in ``pipeline.shards``).

Importing this package is cheap and pulls neither Dask nor FAISS: the trainer reads ``pipeline.shards``,
``pipeline.config`` and ``pipeline.encoders`` on GPU nodes that have neither installed.
"""

__version__ = "0.1.0"
