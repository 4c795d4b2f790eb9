"""BASIC's patch weights: the cheap text->visual path vs eager ``output_attentions`` (time and peak memory).

Three forwards of the same LLM on the same inputs (576 visual tokens + text, batch 1 by default):

* ``sdpa``     plain SDPA forward, nothing captured (the floor);
* ``cheap``    SDPA + ``capture_text_to_visual`` on layers 1..k (k = half the layers, BASIC's default);
* ``eager``    eager attention with ``output_attentions=True`` (every layer's [B, H, T, T] probabilities),
               averaged the same way afterwards: what an HF-only implementation has to do.

Forward + backward into the inputs (the projector's gradient path); each variant runs in a fresh subprocess
and reports its peak resident set (``ru_maxrss``) above the resident set after loading the model and inputs
(CPU), or ``torch.cuda.max_memory_allocated`` above the allocation after loading (``--device cuda``).

    .venv/bin/python benchmarks/bench_attention.py --llm smollm2-135m
    .venv/bin/python benchmarks/bench_attention.py --llm tiny-llm --text 64

Letters: B batch, T sequence, P visual tokens, d width.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(
    variant: str, llm_name: str, num_batch: int, num_visual: int, num_text: int, device: str, repeat: int
):
    import torch

    from trainer.models.attention import capture_text_to_visual
    from trainer.models.llm import load_llm

    llm, _ = load_llm(llm_name, attn_implementation="eager" if variant == "eager" else "sdpa")
    llm.to(device).requires_grad_(False)
    num_layers = llm.config.num_hidden_layers
    layers = tuple(range(1, max(num_layers // 2, 1) + 1))
    num_tokens = 8 + num_visual + num_text
    torch.manual_seed(0)
    embeds_BTd = torch.randn(num_batch, num_tokens, llm.config.hidden_size, device=device).mul_(0.02)
    embeds_BTd.requires_grad_(True)
    mask_BT = torch.ones(num_batch, num_tokens, dtype=torch.long, device=device)
    start_B = torch.full((num_batch,), 8, device=device)
    text_BT = mask_BT.bool().clone()
    text_BT[:, : 8 + num_visual] = False
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        if variant == "eager":
            out = llm.model(inputs_embeds=embeds_BTd, attention_mask=mask_BT, output_attentions=True)
            rows = []
            for b in range(num_batch):
                att_LHTT = torch.stack([out.attentions[layer - 1][b] for layer in layers])
                rows.append(att_LHTT[:, :, text_BT[b]][..., 8 : 8 + num_visual].mean(dim=(0, 1, 2)))
            weights_BP = torch.stack(rows).detach()
        elif variant == "cheap":
            with capture_text_to_visual(llm, layers, start_B, num_visual, text_BT) as holder:
                out = llm.model(inputs_embeds=embeds_BTd, attention_mask=mask_BT)
            weights_BP = holder.result_BP
        else:
            out = llm.model(inputs_embeds=embeds_BTd, attention_mask=mask_BT)
            weights_BP = torch.zeros(num_batch, num_visual)
        out.last_hidden_state.float().pow(2).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del out
        embeds_BTd.grad = None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {
        "seconds": min(times),
        "peak_mib": peak,
        "weights": weights_BP[0, :4].tolist(),
        "layers": len(layers),
        "num_tokens": num_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--text", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.llm, args.batch, args.visual, args.text, args.device, args.repeat)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, *shape)))
        return

    results = {}
    for variant in ("sdpa", "cheap", "eager"):
        cmd = [sys.executable, __file__, "--one", variant, "--llm", args.llm, "--batch", str(args.batch)]
        cmd += ["--visual", str(args.visual), "--text", str(args.text), "--repeat", str(args.repeat)]
        cmd += ["--device", args.device]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(stdout.split("RESULT ", 1)[1])
    info = results["sdpa"]
    print(
        f"text->visual patch weights, {args.llm}, batch {args.batch}, T = {info['num_tokens']} "
        f"({args.visual} visual), layers 1..{results['cheap']['layers']}, forward+backward, "
        f"device {args.device}"
    )
    print(f"{'variant':>8} {'time s':>8} {'peak MiB':>9} {'time/sdpa':>9} {'peak/sdpa':>9}  first weights")
    for variant, r in results.items():
        print(
            f"{variant:>8} {r['seconds']:>8.3f} {r['peak_mib']:>9.0f} {r['seconds'] / info['seconds']:>9.2f} "
            f"{r['peak_mib'] / max(info['peak_mib'], 1e-9):>9.2f}  {[round(w, 6) for w in r['weights']]}"
        )


if __name__ == "__main__":
    main()
