"""``trainer sample OUT KEY``: one shard sample exactly as the trainer feeds it to the LLM.

Input: a shard root, a sample id or tar key, an LLM (its tokenizer only) and the text settings of a run
(``--conv-template``, ``--image-position``, ``--system-prompt``, ``--stage``, ``--max-length``, or a preset /
``RUN/config.yaml`` through ``--config``). Output: ``explain`` builds a report (the JSON form)::

    {"id", "key", "has_image", "template", "image_position", "system_prompt", "text", "supervised": [[s, e]],
     "visual_at", "visual_tokens", "num_tokens", "num_supervised", "num_dropped", "tokens": [...],
     "problems": [...]}

``text`` holds ``<image>`` where the visual tokens go (``visual_at`` is its character index, ``visual_tokens``
the token range they fill); ``supervised`` are character spans of ``text``; ``tokens`` lists every text
token with its id, piece, characters and whether it is supervised. ``problems`` is empty unless something
would make the trained tokens differ from what the text says: the supervised tokens of a span do not decode
to exactly its characters (a token straddles a span border), a span lost to ``--max-length``, or no
supervised token at all. ``as_text`` prints the same for a terminal: the text with supervised spans in
``⟦…⟧`` and the visual block as ``⟨image × P⟩``, then the token table and the check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.data.conversations import IGNORE_INDEX, Encoded, Formatter
from visalign.errors import InputError
from visalign.samples import IMAGE_TOKEN
from visalign.shards import META, decode_sample, iter_raw, read_manifest, sample_key

OPEN, CLOSE = "⟦", "⟧"


def find_sample(root: str | Path, key: str) -> dict[str, Any]:
    """The decoded sample of ``root`` whose tar key or id is ``key`` (shards in manifest order)."""
    manifest = read_manifest(root)
    wanted = {key, sample_key(key)}
    for path in manifest.shard_paths(root):
        for raw in iter_raw(path):
            if raw["__key__"] in wanted:
                return decode_sample(raw)
            try:
                ident = json.loads(raw.get(META, b"{}")).get("id")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                continue
            if ident == key:
                return decode_sample(raw)
    raise InputError(
        f"{root} has no sample with id or key {key!r} ({manifest.num_samples} samples in "
        f"{len(manifest.shards)} shards); keys are the tar member names before the first dot"
    )


def load_tokenizer(llm: str, cache_dir: str | None = None) -> Any:
    """The tokenizer ``load_llm`` would return (pad token set, ``<image>`` registered), without the model."""
    from transformers import AutoTokenizer

    from trainer.models.llm import add_image_token, resolve_llm

    tokenizer = AutoTokenizer.from_pretrained(resolve_llm(llm, cache_dir), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_image_token(tokenizer)
    return tokenizer


def has_image_of(sample: dict[str, Any]) -> bool:
    """A sample has an image when it carries features and its json does not say otherwise (schema 2)."""
    meta = sample.get("meta") or {}
    return "feat" in sample and meta.get("has_image", True) is not False


def _chunks(enc: Encoded) -> list[tuple[int, int]]:
    """Token ranges ``[a, b)`` of text on either side of the visual block."""
    n = len(enc.input_ids)
    if enc.visual_start is None:
        return [(0, n)]
    return [(0, enc.visual_start), (enc.visual_start + enc.num_visual, n)]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _decoded_piece(tokenizer: Any, ids: list[int], first: int, a: int, b: int) -> str:
    """The text tokens ``a..b-1`` add when decoded after tokens ``first..a-1`` (incremental decoding, so
    tokenizers that drop a leading space at the start of a decode still give the exact characters)."""
    head, full = _decode(tokenizer, ids[first:a]), _decode(tokenizer, ids[first:b])
    return full[len(head) :] if full.startswith(head) else _decode(tokenizer, ids[a:b])


def check(tokenizer: Any, enc: Encoded) -> list[str]:
    """Why the supervised tokens would differ from the supervised characters (empty: they do not)."""
    text, problems = enc.rendered.text, []
    chunks = _chunks(enc)
    kept_chars = max((o[1] for o in enc.offsets if o is not None), default=0)
    for s, e in enc.rendered.supervised:
        tokens = [
            i for i, o in enumerate(enc.offsets)
            if o is not None and s <= o[0] < e and enc.labels[i] != IGNORE_INDEX
        ]  # fmt: skip
        if enc.num_dropped and e > kept_chars:
            problems.append(
                f"characters {s}..{e} {text[s:e]!r}: "
                + ("cut" if s >= kept_chars else "partly cut")
                + f" by --max-length ({enc.num_dropped} tokens dropped)"
            )
            continue
        if not tokens:
            problems.append(f"characters {s}..{e} {text[s:e]!r} are supervised but no token starts in them")
            continue
        a, b = tokens[0], tokens[-1] + 1
        first = next(c0 for c0, c1 in chunks if c0 <= a < c1)
        piece = _decoded_piece(tokenizer, enc.input_ids, first, a, b)
        if piece != text[s:e] or b - a != len(tokens):
            problems.append(
                f"characters {s}..{e} {text[s:e]!r} are supervised but their tokens {a}..{b - 1} decode "
                f"to {piece!r}"
            )
    if not any(label != IGNORE_INDEX for label in enc.labels):
        problems.append("no token is supervised: the sample adds nothing to the LM loss")
    return problems


def explain(formatter: Formatter, meta: dict[str, Any], has_image: bool, key: str | None = None) -> dict:
    """The report of one sample (module docstring)."""
    enc = formatter.encode(meta, has_image)
    tokenizer, text = formatter.tokenizer, enc.rendered.text
    pieces = tokenizer.convert_ids_to_tokens(enc.input_ids)
    tokens = []
    for i, (tok, label, o) in enumerate(zip(enc.input_ids, enc.labels, enc.offsets)):
        if enc.visual_start is not None and enc.visual_start <= i < enc.visual_start + enc.num_visual:
            continue
        tokens.append(
            {
                "index": i,
                "id": tok,
                "piece": pieces[i],
                "start": None if o is None else o[0],
                "end": None if o is None else o[1],
                "text": None if o is None else text[o[0] : o[1]],
                "supervised": label != IGNORE_INDEX,
            }
        )
    visual = None
    if enc.visual_start is not None:
        visual = [enc.visual_start, enc.visual_start + enc.num_visual]
    return {
        "id": meta.get("id"),
        "key": key,
        "has_image": has_image,
        "template": formatter.fmt.template,
        "image_position": formatter.fmt.image_position,
        "system_prompt": enc.rendered.system,
        "text": text,
        "supervised": [list(span) for span in enc.rendered.supervised],
        "visual_at": enc.rendered.image_at,
        "visual_tokens": visual,
        "num_tokens": len(enc.input_ids),
        "num_supervised": sum(label != IGNORE_INDEX for label in enc.labels),
        "num_dropped": enc.num_dropped,
        "tokens": tokens,
        "problems": check(tokenizer, enc),
    }


def marked_text(report: dict[str, Any]) -> str:
    """The text with supervised spans in ``⟦…⟧`` and ``<image>`` shown as the visual block."""
    text, cuts = report["text"], []
    for s, e in report["supervised"]:
        cuts += [(s, 1, OPEN), (e, 0, CLOSE)]
    if report["visual_at"] is not None:
        a, b = report["visual_tokens"]
        cuts.append((report["visual_at"], 2, f"⟨image × {b - a}⟩"))
    out, pos = [], 0
    for at, order, mark in sorted(cuts):
        out.append(text[pos:at])
        out.append(mark)
        pos = at + (len(IMAGE_TOKEN) if order == 2 else 0)
    out.append(text[pos:])
    return "".join(out)


def as_text(report: dict[str, Any]) -> str:
    """The report for a terminal: header, marked text, token table, check."""
    head = f"sample {report['id']!r}"
    if report["key"] and report["key"] != report["id"]:
        head += f" (key {report['key']})"
    head += f" · template {report['template']}"
    if report["template"] != "plain":
        head += f" · image {report['image_position']}"
    head += f" · {report['num_tokens']} tokens"
    if report["visual_tokens"]:
        a, b = report["visual_tokens"]
        head += f" ({b - a} visual at {a}..{b - 1})"
    else:
        head += " (text-only: no visual tokens)"
    head += f" · {report['num_supervised']} supervised"
    if report["num_dropped"]:
        head += f" · {report['num_dropped']} cut by --max-length"
    lines = [head, f"system prompt: {report['system_prompt']!r}", ""]
    lines += [f"--- text (supervised {OPEN}…{CLOSE}) ---", marked_text(report), ""]
    lines.append("--- tokens ---")
    lines.append(f"{'index':>11} {'id':>7} sup {'chars':>11}  piece, text")
    rows = [(t["index"], t) for t in report["tokens"]]
    if report["visual_tokens"]:
        rows.append((report["visual_tokens"][0], None))
    for index, t in sorted(rows, key=lambda r: (r[0], r[1] is not None)):
        if t is None:
            a, b = report["visual_tokens"]
            lines.append(
                f"{f'{a}..{b - 1}':>11} {'':>7}     {'':>11}  {b - a} visual tokens (projector output)"
            )
            continue
        chars = "(added)" if t["start"] is None else f"{t['start']}..{t['end']}"
        sup = " * " if t["supervised"] else "   "
        lines.append(f"{index:>11} {t['id']:>7} {sup} {chars:>11}  {t['piece']!r}, {t['text']!r}")
    lines += ["", "--- check ---"]
    if report["problems"]:
        lines += [f"MISMATCH: {p}" for p in report["problems"]]
    else:
        lines.append("ok: the supervised tokens decode to exactly the supervised characters")
    return "\n".join(lines)
