"""Step time and peak memory of each objective relative to plain ``lm`` training, on the same batches.

One optimiser step = VisualLM forward (computing only what the objectives need) + objectives + backward +
AdamW, stage-1 setting (projector and the objectives' own modules train, LLM frozen) unless ``--stage
finetune``. Batches are synthetic but LLaVA-shaped: 576 patches (24 x 24 grid) of 1024-wide features, 10
labels per patch into a word list taken from the tokenizer, one expert encoder on a 16 x 16 grid, text after
the image.

Memory: each configuration runs in a fresh subprocess; the peak resident set (``ru_maxrss``) above the
resident set once model and batches are built (CPU), or ``torch.cuda.max_memory_allocated`` above the
allocation at that point (``--device cuda``, e.g. with ``--llm /path/to/vicuna-7b``).
Time: all configurations in one process, round-robin over the same batches (each round starting at another
configuration), min over rounds (robust to a shared machine's drifting load).

    .venv/bin/python benchmarks/bench_objectives.py --llm smollm2-135m --steps 3
    .venv/bin/python benchmarks/bench_objectives.py --llm tiny-llm

Letters: B batch, T sequence, P patches, D feature width, K label slots.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

SPECS = ["lm", "sea", "basic", "distill", "sea+basic+distill"]
GRID, FEAT_DIM, TOP_K = (24, 24), 1024, 10
EXPERT_GRID, EXPERT_DIM = (16, 16), 768


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def make_words(tokenizer, limit: int = 2000) -> list[str]:
    """Alphabetic whole-word tokens of the tokenizer: a word list every label can be tokenised from."""
    words = set()
    for i in range(min(len(tokenizer), 20000)):
        text = tokenizer.decode([i]).strip().lower()
        if text.isalpha() and len(text) > 2:
            words.add(text)
    return sorted(words)[:limit]


def make_batches(tokenizer, num_words: int, num_batches: int, num_batch: int, num_text: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    num_patches = GRID[0] * GRID[1]
    prefix = 8
    num_tokens = prefix + num_patches + num_text
    batches = []
    for _ in range(num_batches):
        ids_BT = torch.randint(10, min(len(tokenizer), 5000), (num_batch, num_tokens), generator=gen)
        labels_BT = torch.full((num_batch, num_tokens), -100)
        labels_BT[:, -num_text // 2 :] = ids_BT[:, -num_text // 2 :]
        scores_BPK = torch.rand(num_batch, num_patches, TOP_K, generator=gen).sort(-1, descending=True).values
        batch = {
            "input_ids_BT": ids_BT,
            "labels_BT": labels_BT,
            "attention_mask_BT": torch.ones(num_batch, num_tokens, dtype=torch.long),
            "visual_start_B": torch.full((num_batch,), prefix),
            "feats_BPD": torch.randn(num_batch, num_patches, FEAT_DIM, generator=gen),
            "labels_BPK": torch.randint(0, num_words, (num_batch, num_patches, TOP_K), generator=gen),
            "scores_BPK": scores_BPK,
            "experts": {
                "expert": torch.randn(num_batch, EXPERT_GRID[0] * EXPERT_GRID[1], EXPERT_DIM, generator=gen)
            },
            "num_target_tokens": int((labels_BT[:, 1:] != -100).sum()),
        }
        batches.append(
            {
                k: (
                    v.to(device)
                    if hasattr(v, "to")
                    else {n: t.to(device) for n, t in v.items()}
                    if isinstance(v, dict)
                    else v
                )
                for k, v in batch.items()
            }
        )
    return batches


def build_setup(args):
    """LLM + VisualLM + a synthetic shards root (word list) + the objective context; shared by all specs."""
    import torch

    from trainer.models.llm import load_llm
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM, apply_stage
    from trainer.objectives import ObjectiveContext

    torch.manual_seed(0)
    llm, tokenizer = load_llm(args.llm, dtype=getattr(torch, args.dtype))
    words = make_words(tokenizer)
    root = Path(tempfile.mkdtemp(prefix="bench-objectives-"))
    (root / "wordlist.txt").write_text("".join(w + "\n" for w in words))
    manifest = types.SimpleNamespace(
        encoder=types.SimpleNamespace(patch_grid=list(GRID)),
        wordlist=types.SimpleNamespace(sha256=""),
        experts=[types.SimpleNamespace(name="expert", feature_dim=EXPERT_DIM, patch_grid=list(EXPERT_GRID))],
    )
    config = llm.config.get_text_config()
    ctx = ObjectiveContext(
        llm_config=config, projector="mlp2x_gelu", feature_dim=FEAT_DIM, manifest=manifest,
        shards_root=str(root), tokenizer=tokenizer, cache_dir=str(root),
    )  # fmt: skip
    model = VisualLM(llm, build_projector("mlp2x_gelu", FEAT_DIM, config.hidden_size)).to(args.device)
    apply_stage(model, args.stage)
    batches = make_batches(tokenizer, len(words), args.steps + 1, args.batch, args.text, args.device)
    return model, ctx, batches, config.num_hidden_layers


def make_step(model, ctx, spec: str, device: str):
    """-> step(batch): one forward + objectives + backward + AdamW step for ``spec``."""
    import torch

    from trainer.objectives import (
        ObjectivesConfig,
        build_objectives,
        objective_weights,
        parse_spec,
        union_needs,
    )
    from trainer.objectives.base import StepContext

    cfg = ObjectivesConfig()
    objectives = build_objectives(spec, cfg, ctx).to(device)
    weights = objective_weights(cfg, parse_spec(spec))
    needs = union_needs(objectives)
    params = [p for p in list(model.parameters()) + list(objectives.parameters()) if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)

    def step(batch) -> float:
        start = time.perf_counter()
        out = model(batch, needs)
        total = 0.0
        for obj in objectives.values():
            losses, _ = obj(batch, out, StepContext())
            total = total + sum(weights[k] * v for k, v in losses.items())
        optim.zero_grad(set_to_none=True)
        total.backward()
        optim.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def memory_one(spec: str, args) -> dict:
    """Peak memory of ``spec`` above the built model and batches (run in a fresh process)."""
    import torch

    model, ctx, batches, num_layers = build_setup(args)
    step = make_step(model, ctx, spec, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    for batch in batches[:2]:
        step(batch)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"peak_mib": peak, "layers": num_layers}


def time_all(specs: list[str], args) -> dict[str, float]:
    """Step time of every spec in one process, round-robin over the same batches, min over rounds: a shared
    machine's load drifts over minutes, and interleaving puts every spec under the same drift."""
    model, ctx, batches, _ = build_setup(args)
    steps = {spec: make_step(model, ctx, spec, args.device) for spec in specs}
    for spec in specs:  # warm-up: allocators, kernels, SEA's word table
        steps[spec](batches[0])
    best = {spec: float("inf") for spec in specs}
    for r, batch in enumerate(batches[1:]):
        # each round starts at another spec: none always pays for being first after a new batch
        for i in range(len(specs)):
            spec = specs[(r + i) % len(specs)]
            best[spec] = min(best[spec], steps[spec](batch))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--specs", nargs="+", default=SPECS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up step each)")
    parser.add_argument("--stage", default="pretrain", choices=["pretrain", "finetune"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(memory_one(args.one, args)))
        return
    results = {}
    for spec in args.specs:
        cmd = [sys.executable, __file__, "--one", spec, "--llm", args.llm, "--batch", str(args.batch)]
        cmd += ["--text", str(args.text), "--steps", str(args.steps), "--stage", args.stage]
        cmd += ["--dtype", args.dtype, "--device", args.device]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[spec] = json.loads(stdout.split("RESULT ", 1)[1])
    for spec, seconds in time_all(args.specs, args).items():
        results[spec]["seconds"] = seconds
    lm = results.get("lm") or next(iter(results.values()))
    print(
        f"{args.llm} ({lm['layers']} layers), batch {args.batch} x ({GRID[0] * GRID[1]} patches + "
        f"{args.text} text), stage {args.stage}, {args.dtype}, device {args.device}; "
        f"time: min of {args.steps} round-robin steps in one process; memory: one process per objective"
    )
    print(f"{'objective':>18} {'step s':>7} {'peak MiB':>9} {'time/lm':>8} {'peak/lm':>8}")
    for spec, r in results.items():
        print(
            f"{spec:>18} {r['seconds']:>7.3f} {r['peak_mib']:>9.0f} {r['seconds'] / lm['seconds']:>8.2f} "
            f"{r['peak_mib'] / max(lm['peak_mib'], 1e-9):>8.2f}"
        )


if __name__ == "__main__":
    main()
