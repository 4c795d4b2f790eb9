"""BASIC at real model shapes: its SDS term and attention capture against one real decoder layer, projected to
a full training step (stage 1 and stage 2), on the machine at hand (CPU by default).

Shapes (``--shapes``; P = 576 visual tokens, ``--text`` text tokens after them, the last half supervised,
batch 1, float32 unless ``--dtype``):

* ``7b``:   Vicuna-7B / Llama-2-7B (LLaVA-1.5-7B's LLM): ``LlamaDecoderLayer``, d 4096, 32 layers, 32 heads
            (32 KV heads), FFN 11008, N 32,000, untied embeddings.
* ``0.5b``: Qwen2-0.5B: ``Qwen2DecoderLayer``, d 896, 24 layers, 14 heads (2 KV heads), FFN 4864,
            N 151,936, tied embeddings.

Pieces, each timed forward + backward, random init (speed does not depend on the weights):

* ``layer/s1``  one decoder layer (a one-layer model of the real class and config, SDPA attention, fed
                ``inputs_embeds``), gradient into its input only (stage 1: the LLM is frozen, but gradients
                still cross every layer to reach the projector);
* ``layer/s2``  the same with the layer's weights training (stage 2);
* ``head/s1``, ``head/s2``  lm head + float32 cross-entropy on the supervised positions, checkpointed as
                ``VisualLM`` does (the backward recomputes the logits); s2 also into the head weight;
* ``embed/s2``  embedding lookup + backward into the N x d table (stage 1: frozen, nothing to count);
* ``sds/s1``, ``sds/s2``  ``sds_loss`` exact at the default chunk (64), into V; s2 also into E;
* ``rows/s1``, ``rows/s2``  ``sds_loss(sample_rows=R)`` (``sds_mode=rows``), attention-like patch weights;
* ``capture``   what ``capture_text_to_visual`` adds to one captured layer: GQA key expansion +
                ``text_to_visual_probs`` for the text query rows (no padding: the mask HF hands SDPA is None);
* ``das``       V_hat from the k hidden states (gather at the visual positions + weighted sum) + ``das_loss``.

Projection (per stage s; every assumption errs towards a larger BASIC share):

    step_lm(s) = L x layer/s + head/s + embed/s      (projector, optimiser, data and communication left out:
                                                      they lengthen the real step, so BASIC's share is smaller)
    BASIC(s)   = sds/s + k x capture + das            (k = L // 2, the paper's choice; hidden states are kept
                                                      for the backward anyway, so returning them is free)
    ratio      = (step_lm + BASIC) / step_lm          (time per step vs plain ``lm``; the target is <= 1.15)

A run = one fresh process timing every piece of one shape: one warm-up round, then ``--repeat`` rounds
round-robin over the pieces (a shared machine's drifting load hits every piece alike), min per piece; the
ratios of a run come from that run only. ``--runs`` runs per shape; the summary gives min / median / max.

    .venv/bin/python benchmarks/bench_basic.py                 # 3 runs each of 0.5b and 7b (CPU: ~30 min)
    .venv/bin/python benchmarks/bench_basic.py --quick         # 1 run of each, no warm-up round
    .venv/bin/python benchmarks/bench_basic.py --shapes 0.5b --runs 3 --rows 32 64

Letters: B batch, T sequence, P visual tokens, d width, N vocabulary, L layers, k BASIC layers, R drawn rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SHAPES = {
    "7b": {
        "name": "vicuna-7b (llama)",
        "family": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "tiny": {  # a smoke test of the script itself, not a measurement
        "name": "tiny (qwen2 class)",
        "family": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    },
    "0.5b": {
        "name": "qwen2-0.5b",
        "family": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}
NUM_VISUAL, PREFIX = 576, 8
ASSUMPTIONS = __doc__[
    __doc__.index("Projection (per stage s;") : __doc__.index("A run = one fresh process")
].rstrip()


def one_layer_model(shape: dict, dtype):
    """A one-layer model of the real class: its decoder layer at the real width/heads/GQA/FFN; a 16-token
    embedding table (the pieces ``head`` and ``embed`` measure the real N x d tables separately)."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    config_cls, model_cls = (
        (Qwen2Config, Qwen2Model) if shape["family"] == "qwen2" else (LlamaConfig, LlamaModel)
    )
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    config = config_cls(
        **{k: shape[k] for k in keys},
        num_hidden_layers=1,
        vocab_size=16,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    return model_cls(config).to(dtype)


def build_pieces(shape: dict, args) -> dict:
    """name -> a closure running that piece once (forward + backward); gradients are dropped after each call."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    from transformers.integrations.sdpa_attention import repeat_kv

    from trainer.models.attention import text_to_visual_probs
    from trainer.objectives.basic import das_loss, layer_weights, sds_loss

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    width, vocab = shape["hidden_size"], shape["vocab_size"]
    num_layers = shape["num_hidden_layers"]
    k = max(num_layers // 2, 1)
    num_tokens = PREFIX + NUM_VISUAL + args.text
    num_supervised = max(args.text // 2, 1)
    visual = slice(PREFIX, PREFIX + NUM_VISUAL)

    model = one_layer_model(shape, dtype)
    embeds_BTd = torch.randn(1, num_tokens, width, dtype=dtype).mul_(0.02).requires_grad_(True)
    mask_BT = torch.ones(1, num_tokens, dtype=torch.long)
    upstream_BTd = torch.randn(1, num_tokens, width, dtype=dtype)

    def layer(train_weights: bool):
        def run():
            model.requires_grad_(train_weights)
            out = model(inputs_embeds=embeds_BTd, attention_mask=mask_BT).last_hidden_state
            out.backward(upstream_BTd)
            embeds_BTd.grad = None
            model.zero_grad(set_to_none=True)

        return run

    # the real N x d table: lm head and input embeddings are one tensor when tied (Qwen2-0.5B), else two
    embed_Nd = torch.randn(vocab, width, dtype=dtype).mul_(0.02)
    head_Nd = embed_Nd if shape["tie_word_embeddings"] else torch.randn(vocab, width, dtype=dtype).mul_(0.02)
    hidden_Sd = torch.randn(num_supervised, width, dtype=dtype).requires_grad_(True)
    targets_S = torch.randint(0, vocab, (num_supervised,))

    def nll(h_Sd, t_S, w_Nd):
        return F.cross_entropy(F.linear(h_Sd, w_Nd).float(), t_S, reduction="sum")

    def head(train_weights: bool):
        def run():
            head_Nd.requires_grad_(train_weights)
            checkpoint(nll, hidden_Sd, targets_S, head_Nd, use_reentrant=False).backward()
            hidden_Sd.grad = head_Nd.grad = None
            head_Nd.requires_grad_(False)

        return run

    ids_T = torch.randint(0, vocab, (num_tokens,))

    def embed():
        embed_Nd.requires_grad_(True)
        F.embedding(ids_T, embed_Nd).backward(upstream_BTd[0])
        embed_Nd.grad = None
        embed_Nd.requires_grad_(False)

    v_BPd = torch.randn(1, NUM_VISUAL, width, dtype=dtype).mul_(0.5).requires_grad_(True)
    v_hat_BPd = torch.randn(1, NUM_VISUAL, width, dtype=dtype).mul_(0.5)
    # attention-like patch weights: a few patches carry most of the mass, as text->image attention does
    a_BP = torch.softmax(3.0 * torch.randn(1, NUM_VISUAL), -1)
    generator = torch.Generator().manual_seed(0)

    def sds(train_embed: bool, rows: int | None):
        def run():
            embed_Nd.requires_grad_(train_embed)
            loss = sds_loss(
                v_BPd, v_hat_BPd, embed_Nd, a_BP, chunk_size=args.chunk, sample_rows=rows, generator=generator
            )
            loss.backward()
            v_BPd.grad = embed_Nd.grad = None
            embed_Nd.requires_grad_(False)

        return run

    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = width // heads
    query_BHTh = torch.randn(1, heads, num_tokens, head_dim, dtype=dtype)
    key_BKTh = torch.randn(1, kv_heads, num_tokens, head_dim, dtype=dtype)
    start_B = torch.full((1,), PREFIX)
    text_BT = torch.zeros(1, num_tokens, dtype=torch.bool)
    text_BT[:, PREFIX + NUM_VISUAL :] = True

    def capture():
        with torch.no_grad():
            key_full = repeat_kv(key_BKTh, heads // kv_heads)
            text_to_visual_probs(query_BHTh, key_full, None, head_dim**-0.5, start_B, NUM_VISUAL, text_BT)

    states_kBTd = [torch.randn(1, num_tokens, width, dtype=dtype) for _ in range(k)]
    weights_k = layer_weights(k).tolist()

    def das():
        v_hat = None
        for w, states_BTd in zip(weights_k, states_kBTd):
            term = w * states_BTd[:, visual].detach().float()
            v_hat = term if v_hat is None else v_hat + term
        das_loss(v_BPd, v_hat, a_BP).backward()
        v_BPd.grad = None

    pieces = {
        "layer/s1": layer(False),
        "layer/s2": layer(True),
        "head/s1": head(False),
        "head/s2": head(True),
        "embed/s2": embed,
        "sds/s1": sds(False, None),
        "sds/s2": sds(True, None),
    }
    for rows in args.rows:
        pieces[f"rows{rows}/s1"] = sds(False, rows)
        pieces[f"rows{rows}/s2"] = sds(True, rows)
    pieces["capture"] = capture
    pieces["das"] = das
    return pieces


def project(seconds: dict[str, float], num_layers: int, rows: list[int]) -> dict[str, dict[str, float]]:
    """{stage: {"lm": step_lm, "<mode>": ratio}} from the piece times (see the module docstring)."""
    k = max(num_layers // 2, 1)
    out = {}
    for stage in ("s1", "s2"):
        lm = num_layers * seconds[f"layer/{stage}"] + seconds[f"head/{stage}"]
        lm += seconds["embed/s2"] if stage == "s2" else 0.0
        extra = k * seconds["capture"] + seconds["das"]
        ratios = {"lm_s": lm, "exact": (lm + seconds[f"sds/{stage}"] + extra) / lm}
        for r in rows:
            ratios[f"rows{r}"] = (lm + seconds[f"rows{r}/{stage}"] + extra) / lm
        out[stage] = ratios
    return out


def run_one(shape_key: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[shape_key]
    pieces = build_pieces(shape, args)
    rounds = args.repeat + (0 if args.no_warmup else 1)
    times: dict[str, list[float]] = {name: [] for name in pieces}
    names = list(pieces)
    for round_index in range(rounds):
        # each round starts at another piece, so no piece always follows the same neighbour
        for i in range(len(names)):
            name = names[(round_index + i) % len(names)]
            start = time.perf_counter()
            pieces[name]()
            if round_index >= rounds - args.repeat:
                times[name].append(time.perf_counter() - start)
    seconds = {name: min(t) for name, t in times.items()}
    return {"seconds": seconds, "threads": torch.get_num_threads()}


def describe(shape: dict, args) -> str:
    return (
        f"{shape['name']}: d {shape['hidden_size']}, {shape['num_hidden_layers']} layers (BASIC k = "
        f"{max(shape['num_hidden_layers'] // 2, 1)}), {shape['num_attention_heads']} heads / "
        f"{shape['num_key_value_heads']} KV, FFN {shape['intermediate_size']}, N {shape['vocab_size']:,}"
        f"{' tied' if shape['tie_word_embeddings'] else ''}; batch 1 x (P {NUM_VISUAL} + {args.text} text, "
        f"{max(args.text // 2, 1)} supervised), {args.dtype}, SDS chunk {args.chunk}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["0.5b", "7b"], choices=sorted(SHAPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--repeat", type=int, default=1, help="timed rounds per run (after one warm-up round)"
    )
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one run per shape, no warm-up round")
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="sds_chunk_size (the default of the objective)")
    parser.add_argument("--rows", type=int, nargs="*", default=[64], help="sds_rows values to time")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.no_warmup = 1, True
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return

    print(ASSUMPTIONS)
    summary: dict[str, dict[str, list[float]]] = {}
    for shape_key in args.shapes:
        shape = SHAPES[shape_key]
        print(f"\n== {describe(shape, args)}")
        for run in range(args.runs):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                shape_key,
                "--text",
                str(args.text),
                "--chunk",
                str(args.chunk),
            ]
            cmd += ["--repeat", str(args.repeat), "--dtype", args.dtype, "--threads", str(args.threads)]
            cmd += ["--rows", *map(str, args.rows)] + (["--no-warmup"] if args.no_warmup else [])
            stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(stdout.split("RESULT ", 1)[1])
            seconds = result["seconds"]
            proj = project(seconds, shape["num_hidden_layers"], args.rows)
            print(f"-- run {run + 1}/{args.runs} ({result['threads']} threads): seconds per piece, fwd + bwd")
            print("   " + "  ".join(f"{name} {s:.3f}" for name, s in seconds.items()))
            num_layers, k = shape["num_hidden_layers"], max(shape["num_hidden_layers"] // 2, 1)
            for stage, label in (("s1", "stage 1"), ("s2", "stage 2")):
                r = proj[stage]
                modes = "  ".join(f"{m} {v:.3f}" for m, v in r.items() if m != "lm_s")
                print(
                    f"   {label}: step_lm = {num_layers} x {seconds[f'layer/{stage}']:.3f} + head "
                    f"{seconds[f'head/{stage}']:.3f}"
                    + (f" + embed {seconds['embed/s2']:.3f}" if stage == "s2" else "")
                    + f" = {r['lm_s']:.2f} s; BASIC adds sds + {k} x capture {seconds['capture']:.4f} + das "
                    f"{seconds['das']:.4f}; time / lm: {modes}"
                )
                for mode, value in r.items():
                    if mode != "lm_s":
                        summary.setdefault(f"{shape_key} {label} {mode}", []).append(value)
            share = seconds["sds/s1"] / seconds["layer/s1"]
            print(f"   sds/s1 = {share:.2f} layers of stage 1 (of {num_layers})")

    print(f"\nBASIC step time / lm step, {args.runs} run(s) per shape: min / median / max")
    print(f"{'shape':>6} {'stage':>8} {'sds mode':>9} {'min':>6} {'median':>7} {'max':>6}")
    for key, values in summary.items():
        shape_key, s, n, mode = key.split(" ")
        print(
            f"{shape_key:>6} {s + ' ' + n:>8} {mode:>9} {min(values):>6.3f} {statistics.median(values):>7.3f} "
            f"{max(values):>6.3f}"
        )


if __name__ == "__main__":
    main()
