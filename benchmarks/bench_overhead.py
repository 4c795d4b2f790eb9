"""The trainer's framework cost: one iteration of ``trainer run``'s loop against a bare PyTorch loop doing the
same arithmetic on the same batch, same model and same optimiser.

Project side: a real ``trainer.train.Trainer`` built from ``trainer run`` flags over synthetic CLIP-L-sized
shards (576 patches x 1024 float16 features, 10 labels per patch, a caption of ~40 words as a one-turn
conversation), objective ``lm``, its defaults otherwise (loader in the main process, log every step to
log.jsonl and TensorBoard, gradient clipping at 1.0, the non-finite guard). Its ``train()`` runs as
``trainer run`` does; one iteration = taking the micro-batch from the stream + ``train_step`` (forward,
objectives, backward, rank reductions, clipping, AdamW, scheduler) + the loop's bookkeeping and logging.
Checkpoint writing is switched off (not part of a step).

Bare side, on a copy of the same ``VisualLM`` (same weights, same trainable parameters, same AdamW
settings), fed the project's own micro-batch::

    embeds = llm.embed(ids); embeds[visual slots] = projector(feats)       (one scatter)
    hidden = llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    loss   = cross_entropy(lm_head(hidden at supervised positions).float(), next tokens)   (token mean)
    loss.backward(); clip_grad_norm_(trainable, 1.0); AdamW.step(); zero_grad()

(the same numbers as the project's ``lm`` loss: the first step's two losses are printed side by side).

Timing: the bare step runs inside the project's loop, right before or right after the project's
``train_step`` (alternating), so both sides see the same load drift; the project's iteration time is the time
between two loop iterations minus the bare step that ran inside it. One warm-up iteration, then ``--rounds``
timed ones; per run the ratio is min(project) / min(bare) (robust to a shared machine's bursts). Each run and
each stage is a fresh process; the summary gives min / median / max of the ratio over ``--runs``.
``step only`` = the project's ``train_step`` alone (no data, no logging) over the bare step. ``CPU time`` =
the same ratio in this process's CPU time (``time.process_time``) instead of wall time: on a machine shared
with other work it does not count the time spent waiting for a core, so with ``--threads 1`` it is the
steadier measure of the work each side does (with more threads it also counts their spin-waiting).

    .venv/bin/python benchmarks/bench_overhead.py --llm smollm2-135m --runs 3
    .venv/bin/python benchmarks/bench_overhead.py --llm tiny-llm --runs 1 --rounds 2 --stages pretrain

Letters: B batch, T sequence, P patches, D feature width, d LLM width, K label slots.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

P, D, K = 576, 1024, 10
WORDS = (
    "a photo of the small red cat sitting on wooden table next to cup coffee in bright kitchen with white "
    "walls and green plant near window while sunlight falls across floor tiles old clock hangs above door"
).split()


def write_shards(
    root: Path,
    num_samples: int,
    num_patches: int = P,
    feature_dim: int = D,
    turns: int = 1,
    words_per_reply: int = 40,
    words: list[str] | None = None,
    expert: tuple[str, int, int] | None = None,
    samples_per_shard: int = 1000,
) -> Path:
    """CLIP-L/336-shaped samples through the contract's one writer: conversations of ``turns`` question /
    reply pairs whose replies hold ``words_per_reply`` words (one ~40-word reply: LLaVA's stage-1 captions;
    several longer ones: stage-2 conversations), labels into ``words`` (default: a small list), optionally one
    expert's features ``(name, patches, width)``. Features differ per sample by one row (drawing 590k
    normal numbers per sample would cost more than writing it)."""
    import numpy as np

    from visalign import shards as S

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    words = list(words) if words else sorted(set(WORDS))
    S.write_wordlist(words, root / S.WORDLIST)
    feat_PD = rng.standard_normal((num_patches, feature_dim)).astype(np.float16)
    expert_QE = None
    if expert is not None:
        expert_QE = rng.standard_normal((expert[1], expert[2])).astype(np.float16)
    infos = []
    for first in range(0, num_samples, samples_per_shard):
        with S.ShardWriter(root, len(infos)) as writer:
            for i in range(first, min(first + samples_per_shard, num_samples)):
                conversation = []
                for turn in range(turns):
                    question = "<image>\nDescribe the image in detail." if turn == 0 else "Tell me more."
                    reply = " ".join(rng.choice(WORDS, words_per_reply)) + "."
                    conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
                meta = {"id": f"s{i:06d}", "source": "synthetic", "orig_size": [336, 336],
                        "conversations": conversation}  # fmt: skip
                feat_PD[i % num_patches] = rng.standard_normal(feature_dim)
                labels = rng.integers(0, len(words), (num_patches, K)).astype(np.int32)
                scores = -np.sort(-rng.random((num_patches, K)), axis=1).astype(np.float16)
                experts = None
                if expert_QE is not None:
                    expert_QE[i % expert[1]] = rng.standard_normal(expert[2])
                    experts = {expert[0]: expert_QE}
                writer.write(f"s{i:06d}", feat_PD, labels, scores, meta, experts)
            infos.append(S.shard_info(root, writer.close()))
    side = int(round(num_patches**0.5))
    experts_info = []
    if expert is not None:
        grid = int(round(expert[1] ** 0.5))
        experts_info = [S.ExpertInfo(expert[0], "hf", "1" * 64, -2, [grid, expert[1] // grid], expert[2])]
    manifest = S.Manifest(
        encoder=S.EncoderInfo(
            "synthetic-clip-l-336", "hf", "0" * 64, 336, -2, [side, num_patches // side], feature_dim, 768
        ),  # fmt: skip
        wordlist=S.WordlistInfo("bench", S.sha256_file(root / S.WORDLIST), len(words)),
        templates=["{}"],
        score_sign="cos",
        top_k=K,
        shards=infos,
        num_samples=num_samples,
        num_rejects=0,
        experts=experts_info,
    )
    S.write_manifest(root, manifest)
    return root


def bare_loop(vlm, cfg):
    """-> step(batch) -> (seconds, loss): the bare loop on a copy of ``vlm`` (module docstring)."""
    import torch
    import torch.nn.functional as F

    from trainer.train import param_groups

    model = copy.deepcopy(vlm)
    model.train()
    llm, projector = model.llm, model.projector
    trainable = [p for p in model.parameters() if p.requires_grad]
    holder = torch.nn.Module()
    holder.vlm = model  # the project's parameter names, so param_groups splits decay / no decay alike
    optimizer = torch.optim.AdamW(
        param_groups(holder, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.projector_lr),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    max_norm = cfg.optim.max_grad_norm

    def step(batch) -> tuple[float, float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        ids_BT, feats_BPD = batch["input_ids_BT"], batch["feats_BPD"]
        embeds_BTd = llm.get_input_embeddings()(ids_BT)
        visual_BPd = projector(feats_BPD)
        positions_BP = batch["visual_start_B"][:, None] + torch.arange(feats_BPD.shape[1])
        index_BPd = positions_BP[:, :, None].expand(-1, -1, embeds_BTd.shape[-1])
        embeds_BTd = embeds_BTd.scatter(1, index_BPd, visual_BPd.to(embeds_BTd.dtype))
        hidden_BTd = llm.base_model(
            inputs_embeds=embeds_BTd, attention_mask=batch["attention_mask_BT"], use_cache=False
        ).last_hidden_state
        targets_BT1 = batch["labels_BT"][:, 1:]
        supervised_BT1 = targets_BT1 != -100
        logits_MN = llm.get_output_embeddings()(hidden_BTd[:, :-1][supervised_BT1]).float()
        loss = F.cross_entropy(logits_MN, targets_BT1[supervised_BT1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - start_cpu, float(loss.detach())

    return step


def run_one(args) -> dict:
    """One stage in this process: the project's loop with the bare step interleaved (module docstring)."""
    import torch

    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(getattr(args, "work", None) or tempfile.mkdtemp(prefix="bench-overhead-"))
    shards = write_shards(work / "shards", args.samples, args.patches, args.feature_dim)
    steps = 1 + args.rounds + 1  # warm-up, timed rounds, one more loop entry closing the last interval
    argv = ["--shards", str(shards), "--output", str(work / "run"), "--llm", args.llm, "--stage", args.stage]
    argv += ["--objective", "lm", "--batch-size", str(args.batch), "--max-steps", str(steps)]
    argv += ["--logging.progress", "false", *args.extra]
    cfg = parse_run_args(argv)
    trainer = Trainer(cfg)
    trainer.save = lambda: None  # checkpoints are not part of a step
    bare = bare_loop(trainer.vlm, cfg)
    real_step = trainer.train_step
    entries: list[float] = []
    entries_cpu: list[float] = []
    bare_s: list[float] = []
    bare_cpu: list[float] = []
    step_s: list[float] = []
    losses: list[tuple[float, float]] = []

    shapes: list[list[int]] = []

    def interleaved(micro_batches):
        entries.append(time.perf_counter())
        entries_cpu.append(time.process_time())
        shapes.append(list(micro_batches[0]["input_ids_BT"].shape))
        k = len(entries) - 1
        if k % 2 == 0:
            seconds, cpu, loss = bare(micro_batches[0])
        start = time.perf_counter()
        metrics = real_step(micro_batches)
        step_s.append(time.perf_counter() - start)
        if k % 2 == 1:
            seconds, cpu, loss = bare(micro_batches[0])
        bare_s.append(seconds)
        bare_cpu.append(cpu)
        losses.append((metrics["lm_loss"], loss))
        return metrics

    trainer.train_step = interleaved
    trainer.train()
    # iteration k of the project = from loop entry k to entry k + 1, less the bare step run inside it
    project = [entries[k + 1] - entries[k] - bare_s[k] for k in range(len(entries) - 1)]
    project_cpu = [entries_cpu[k + 1] - entries_cpu[k] - bare_cpu[k] for k in range(len(entries) - 1)]
    return {
        "project_s": project[1:],
        "project_cpu_s": project_cpu[1:],
        "bare_cpu_s": bare_cpu[1:-1],
        "step_s": step_s[1:-1],
        "bare_s": bare_s[1:-1],
        "first_losses": losses[0],
        "threads": torch.get_num_threads(),
        "tokens": shapes[0],
        "trainable": sum(p.numel() for p in trainer.vlm.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument(
        "--stages", nargs="+", default=["pretrain", "finetune"], choices=["pretrain", "finetune"]
    )
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per stage")
    parser.add_argument("--rounds", type=int, default=3, help="timed iterations per run (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16, help="samples in the synthetic shards")
    parser.add_argument("--patches", type=int, default=P)
    parser.add_argument("--feature-dim", type=int, default=D)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="more `trainer run` flags (after --)")
    args = parser.parse_args()
    if args.one:
        args.stage = args.one
        print("RESULT " + json.dumps(run_one(args)))
        return

    print(
        f"{args.llm}, batch {args.batch} x ({args.patches} visual + text) tokens, objective lm, {args.runs} "
        f"run(s) per stage, {args.rounds} timed rounds each; load average {os.getloadavg()[0]:.2f} at start"
    )
    results: dict[str, list[dict]] = {stage: [] for stage in args.stages}
    for run in range(args.runs):
        for stage in args.stages:
            cmd = [sys.executable, __file__, "--one", stage, "--llm", args.llm, "--rounds", str(args.rounds)]
            cmd += [
                "--batch",
                str(args.batch),
                "--samples",
                str(args.samples),
                "--patches",
                str(args.patches),
            ]
            cmd += ["--feature-dim", str(args.feature_dim), "--threads", str(args.threads)]
            if args.extra:
                cmd += ["--", *args.extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"the {stage} run failed")
            r = json.loads(proc.stdout.split("RESULT ", 1)[1])
            r["ratio"] = min(r["project_s"]) / min(r["bare_s"])
            r["step_ratio"] = min(r["step_s"]) / min(r["bare_s"])
            r["cpu_ratio"] = min(r["project_cpu_s"]) / min(r["bare_cpu_s"])
            r["loadavg"] = os.getloadavg()[0]
            results[stage].append(r)
            lp, lb = r["first_losses"]
            print(
                f"run {run + 1} {stage:>8}: project {min(r['project_s']):.3f} s (step only "
                f"{min(r['step_s']):.3f}), bare {min(r['bare_s']):.3f} s, ratio {r['ratio']:.3f} "
                f"(step only {r['step_ratio']:.3f}; CPU time {r['cpu_ratio']:.3f}); batch {r['tokens'][0]} x {r['tokens'][1]} tokens, "
                f"{r['trainable']:,} trainable, {r['threads']} threads; first loss project {lp:.6f} / bare "
                f"{lb:.6f}; load average {r['loadavg']:.2f}",
                flush=True,
            )
    print(f"\nproject iteration / bare step, {args.runs} run(s): min / median / max")
    for stage, rows in results.items():
        for key, label in (
            ("ratio", "loop iteration"),
            ("step_ratio", "train_step only"),
            ("cpu_ratio", "loop, CPU time"),
        ):
            values = [r[key] for r in rows]
            print(
                f"{stage:>8} {label:>16}: {min(values):.3f} / {statistics.median(values):.3f} / "
                f"{max(values):.3f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
