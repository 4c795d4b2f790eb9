"""visalign: the shared core of both applications (``pipeline`` offline, ``trainer`` streaming).

What lives here is what both halves need and neither owns: the config system (``config``), registries
(``registry``), the user-error base class and exit codes (``errors``, ``cli``), the model cache
(``cache``), content identities (``hashing``), image decoding and preprocessing geometry (``images``), the
word-grid pictures (``pictures``) and the shard contract with its one writer and one reader (``shards``).

This package imports neither ``pipeline`` nor ``trainer`` (a test enforces it), and nothing here pulls Dask,
FAISS, open_clip or transformers.
"""

__version__ = "0.1.0"
