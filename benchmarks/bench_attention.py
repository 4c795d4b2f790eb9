"""BASIC's patch weights: the cheap text->visual path vs eager ``output_attentions`` (time and peak memory).

Three forwards of the same LLM on the same inputs (576 visual tokens + text, batch 1 by default):

* ``sdpa``     plain SDPA forward, nothing captured (the floor);
* ``cheap``    SDPA + ``capture_text_to_visual`` on layers 1..k (k = half the layers, BASIC's default);
* ``eager``    eager attention with ``output_attentions=True`` (every layer's [B, H, T, T] probabilities),
               averaged the same way afterwards: what an HF-only implementation has to do.

Forward + backward into the inputs (the projector's gradient path).

Time: all three variants in one process (an ``sdpa`` and an ``eager`` copy of the model), one warm-up round,
then ``--repeat`` rounds round-robin, min per variant: a shared machine's drifting load hits every variant
alike, and the ratios of a run come from that run only. ``--runs`` such processes; the summary gives
min / median / max of each ratio. Memory: each variant in a fresh subprocess, peak resident set
(``ru_maxrss``) above the resident set after loading the model and inputs (CPU), or
``torch.cuda.max_memory_allocated`` above the allocation after loading (``--device cuda``).

    .venv/bin/python benchmarks/bench_attention.py --llm smollm2-135m --runs 3
    .venv/bin/python benchmarks/bench_attention.py --llm tiny-llm --text 64

Letters: B batch, T sequence, P visual tokens, d width.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


VARIANTS = ("sdpa", "cheap", "eager")


def setup(llm_name: str, num_batch: int, num_visual: int, num_text: int, device: str, variants=VARIANTS):
    """-> ({variant: fn() -> (seconds, weights_BP)}, info): one forward + backward per call."""
    import torch

    from trainer.models.attention import capture_text_to_visual
    from trainer.models.llm import load_llm

    models = {}
    for impl in sorted({"eager" if v == "eager" else "sdpa" for v in variants}):
        llm, _ = load_llm(llm_name, attn_implementation=impl)
        models[impl] = llm.to(device).requires_grad_(False)
    any_llm = next(iter(models.values()))
    num_layers = any_llm.config.num_hidden_layers
    layers = tuple(range(1, max(num_layers // 2, 1) + 1))
    num_tokens = 8 + num_visual + num_text
    torch.manual_seed(0)
    embeds_BTd = torch.randn(num_batch, num_tokens, any_llm.config.hidden_size, device=device).mul_(0.02)
    embeds_BTd.requires_grad_(True)
    mask_BT = torch.ones(num_batch, num_tokens, dtype=torch.long, device=device)
    start_B = torch.full((num_batch,), 8, device=device)
    text_BT = mask_BT.bool().clone()
    text_BT[:, : 8 + num_visual] = False

    def call(variant: str):
        start = time.perf_counter()
        if variant == "eager":
            out = models["eager"].model(
                inputs_embeds=embeds_BTd, attention_mask=mask_BT, output_attentions=True
            )
            rows = []
            for b in range(num_batch):
                att_LHTT = torch.stack([out.attentions[layer - 1][b] for layer in layers])
                rows.append(att_LHTT[:, :, text_BT[b]][..., 8 : 8 + num_visual].mean(dim=(0, 1, 2)))
            weights_BP = torch.stack(rows).detach()
        elif variant == "cheap":
            with capture_text_to_visual(models["sdpa"], layers, start_B, num_visual, text_BT) as holder:
                out = models["sdpa"].model(inputs_embeds=embeds_BTd, attention_mask=mask_BT)
            weights_BP = holder.result_BP
        else:
            out = models["sdpa"].model(inputs_embeds=embeds_BTd, attention_mask=mask_BT)
            weights_BP = torch.zeros(num_batch, num_visual)
        out.last_hidden_state.float().pow(2).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        del out
        embeds_BTd.grad = None
        return seconds, weights_BP

    return call, {"layers": len(layers), "num_tokens": num_tokens}


def memory_one(variant: str, llm_name: str, num_batch: int, num_visual: int, num_text: int, device: str):
    """Peak memory of one variant's forward + backward above the loaded model and inputs (fresh process)."""
    import torch

    call, info = setup(llm_name, num_batch, num_visual, num_text, device, variants=(variant,))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    _, weights_BP = call(variant)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"peak_mib": peak, "weights": weights_BP[0, :4].tolist(), **info}


def time_all(llm_name: str, num_batch: int, num_visual: int, num_text: int, device: str, repeat: int):
    """Seconds per variant: one warm-up round, then ``repeat`` rounds round-robin, min per variant."""
    call, _ = setup(llm_name, num_batch, num_visual, num_text, device)
    for variant in VARIANTS:
        call(variant)
    best = {variant: float("inf") for variant in VARIANTS}
    for round_index in range(repeat):
        # each round starts with another variant: none always runs right after the memory-hungry eager one
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(round_index + i) % len(VARIANTS)]
            best[variant] = min(best[variant], call(variant)[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--text", type=int, default=128)
    parser.add_argument(
        "--repeat", type=int, default=2, help="timed rounds per run (after one warm-up round)"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="timing processes; the summary gives min/median/max"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.llm, args.batch, args.visual, args.text, args.device)
    if args.one:
        print("RESULT " + json.dumps(memory_one(args.one, *shape)))
        return
    if args.time:
        print("RESULT " + json.dumps(time_all(*shape, args.repeat)))
        return

    def child(extra: list[str]) -> dict:
        cmd = [sys.executable, __file__, *extra, "--llm", args.llm, "--batch", str(args.batch)]
        cmd += ["--visual", str(args.visual), "--text", str(args.text), "--repeat", str(args.repeat)]
        cmd += ["--device", args.device]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(stdout.split("RESULT ", 1)[1])

    memory = {variant: child(["--one", variant]) for variant in VARIANTS}
    info = memory["sdpa"]
    print(
        f"text->visual patch weights, {args.llm}, batch {args.batch}, T = {info['num_tokens']} "
        f"({args.visual} visual), layers 1..{memory['cheap']['layers']}, forward+backward, device {args.device}; "
        f"time: min of {args.repeat} round-robin rounds in one process per run; memory: one process per variant"
    )
    runs = []
    for run in range(args.runs):
        seconds = child(["--time"])
        runs.append(seconds)
        print(f"run {run + 1}/{args.runs}: " + "  ".join(f"{v} {s:.3f} s" for v, s in seconds.items()))
    print(
        f"{'variant':>8} {'time/sdpa min':>13} {'median':>7} {'max':>6} {'peak MiB':>9} {'peak/sdpa':>9}  first weights"
    )
    for variant in VARIANTS:
        ratios = [r[variant] / r["sdpa"] for r in runs]
        m = memory[variant]
        print(
            f"{variant:>8} {min(ratios):>13.2f} {statistics.median(ratios):>7.2f} {max(ratios):>6.2f} "
            f"{m['peak_mib']:>9.0f} {m['peak_mib'] / max(info['peak_mib'], 1e-9):>9.2f}  "
            f"{[round(w, 6) for w in m['weights']]}"
        )


if __name__ == "__main__":
    main()
