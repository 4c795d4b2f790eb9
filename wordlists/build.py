"""Build the shipped default word list ``wordlists/english-41k.txt`` reproducibly from wordfreq's data.

Input: a ``wordfreq`` wheel, downloaded, never installed:
``pip download --no-deps -d /tmp/wf wordfreq==3.1.1``.
Output: the top ``--count`` English words by frequency that are alphabetic (apostrophes and hyphens allowed
between letters), lowercased, deduplicated, one per line, most frequent first.

Only the standard library and ``msgpack`` are needed; wordfreq itself is not imported, we read its
``large_en.msgpack.gz`` straight out of the wheel so the build does not depend on wordfreq's own deps.
The data file is wordfreq's "cBpack" format: ``[header, bucket_0, bucket_1, ...]`` where bucket ``i`` holds
the words whose frequency is ``10 ** (-i / 100)``, so iterating buckets in order is iterating by frequency.

    python wordlists/build.py --wheel /tmp/wf/wordfreq-3.1.1-py3-none-any.whl --out wordlists/english-41k.txt
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import zipfile
from pathlib import Path

# Letters only, with single apostrophes/hyphens *between* letters ("don't", "t-shirt"), so fragments such
# as "'s" or "-" that the frequency tokenizer emits on their own are not words of the list.
WORD_RE = re.compile(r"^[a-z]+(?:['-][a-z]+)*$")


def build(wheel: Path, count: int) -> list[str]:
    import msgpack

    with zipfile.ZipFile(wheel) as zf:
        data = msgpack.unpackb(gzip.decompress(zf.read("wordfreq/data/large_en.msgpack.gz")), raw=False)
    header, buckets = data[0], data[1:]
    if not (isinstance(header, dict) and header.get("format") == "cB"):
        raise SystemExit(f"{wheel}: unexpected wordfreq data header {header!r}; this script reads format cB")
    words: list[str] = []
    seen: set[str] = set()
    for bucket in buckets:
        for word in sorted(bucket):  # sorted: wordfreq does not promise an order inside a bucket
            word = word.replace("\u2019", "'").lower()
            if WORD_RE.match(word) and word not in seen:
                seen.add(word)
                words.append(word)
                if len(words) == count:
                    return words
    return words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, required=True, help="path to a downloaded wordfreq wheel")
    ap.add_argument("--count", type=int, default=41_000, help="number of words to keep")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("english-41k.txt"))
    args = ap.parse_args()
    words = build(args.wheel, args.count)
    text = "".join(w + "\n" for w in words)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(words)} words, sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
