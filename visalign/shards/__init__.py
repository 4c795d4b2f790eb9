"""The on-disk contract between ``pipeline`` and ``trainer`` (docs/shards.md): schema, one writer, one reader.

    from visalign import shards as S
    m = S.read_manifest(out)                   # out: a folder or a URL (https://, s3://, ...: remote.py);
                                               # refuses unfinished roots and other schema versions
    for path in m.shard_paths(out):
        for sample in S.iter_tar(path):        # {"__key__", "feat", "labels", "scores", "meta", ...}
            ...
    S.check_shard(path, m.shards[i], S.sample_layout(m), full=True)  # [] = as the manifest records it

Writing goes through ``S.ShardWriter`` (one shard: ``write`` an image sample, ``write_text_only`` a sample
without an image; ``S.shard_info`` turns its sidecar into the manifest's entry), ``S.write_wordlist``,
``S.write_rejects`` and, last, ``S.write_manifest``.
"""

from visalign.hashing import sha256_file
from visalign.shards.reader import (
    SampleError,
    check_shard,
    damaged,
    decode_checked,
    decode_npy,
    decode_sample,
    has_image,
    iter_raw,
    iter_tar,
    read_manifest,
    read_wordlist,
    sample_layout,
    stored_image,
)
from visalign.shards.remote import ShardAccessError, is_url
from visalign.shards.schema import (
    CONFIG,
    EXPERT_PREFIX,
    FEAT,
    IMAGE_PREFIX,
    LABELS,
    MANIFEST,
    META,
    REJECTS,
    SCHEMA_VERSION,
    SCORES,
    SETTINGS,
    SHARD_PATTERN,
    WORDLIST,
    EncoderInfo,
    ExpertInfo,
    Manifest,
    ShardFormatError,
    ShardInfo,
    WordlistInfo,
    shard_name,
    sidecar_name,
)
from visalign.shards.writer import (
    SampleEncodeError,
    ShardWriter,
    encode_json,
    encode_npy,
    encode_sample,
    encode_text_only,
    sample_key,
    shard_info,
    shard_is_complete,
    wordlist_sha256,
    wordlist_text,
    write_json_atomic,
    write_manifest,
    write_rejects,
    write_wordlist,
)

__all__ = [
    "CONFIG",
    "EXPERT_PREFIX",
    "FEAT",
    "IMAGE_PREFIX",
    "LABELS",
    "MANIFEST",
    "META",
    "REJECTS",
    "SCHEMA_VERSION",
    "SCORES",
    "SETTINGS",
    "SHARD_PATTERN",
    "WORDLIST",
    "EncoderInfo",
    "ExpertInfo",
    "Manifest",
    "SampleEncodeError",
    "SampleError",
    "ShardAccessError",
    "ShardFormatError",
    "ShardInfo",
    "ShardWriter",
    "WordlistInfo",
    "check_shard",
    "damaged",
    "decode_checked",
    "decode_npy",
    "decode_sample",
    "encode_json",
    "encode_npy",
    "encode_sample",
    "encode_text_only",
    "has_image",
    "iter_raw",
    "is_url",
    "iter_tar",
    "read_manifest",
    "read_wordlist",
    "sample_key",
    "sample_layout",
    "sha256_file",
    "shard_info",
    "shard_is_complete",
    "shard_name",
    "sidecar_name",
    "stored_image",
    "wordlist_sha256",
    "wordlist_text",
    "write_json_atomic",
    "write_manifest",
    "write_rejects",
    "write_wordlist",
]
