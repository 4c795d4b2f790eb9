"""Chunked vs naive SDS KL (BASIC's distribution loss) at LLaVA sizes: peak memory and time, forward+backward.

Naive = plain autograd over full softmaxes: log_softmax(V E^T) and softmax(V_hat E^T) over the whole
vocabulary, every P x N intermediate kept for the backward.
Chunked = ``trainer.objectives.basic.sds_loss(chunk_size=C)``: a custom autograd Function that computes
each chunk's loss and gradient together and keeps no softmax. ``--rows R`` adds ``sds_loss(sample_rows=R)``
(``sds_mode=rows``: R patches drawn per sample; an estimate, so its loss differs from the others).

Memory on CPU: each variant runs in a fresh subprocess; we report the peak resident set (``ru_maxrss``) minus
the resident set right after the inputs (V, V_hat, E, a) were allocated and one small GEMM + softmax ran
(the BLAS/OpenMP runtime's one-time setup, ~18 MiB, which a training process has paid before the loss), i.e.
what the loss itself adds. On CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` minus the
allocation after the inputs. ``--runs`` repeats everything; the summary gives min / median / max of each
ratio to naive.

    .venv/bin/python benchmarks/bench_kl.py                       # 576 x {32k, 152k} x 4096, batch 1
    .venv/bin/python benchmarks/bench_kl.py --vocab 32000 --chunk 32 64 --runs 3

Letters: B batch, P patches, d width, N vocabulary.
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


def run_one(variant: str, num_patches: int, vocab: int, width: int, chunk: int, device: str) -> dict:
    import torch

    from trainer.objectives.basic import sds_loss

    torch.manual_seed(0)
    # embeddings at a real LLM's scale (row norm ~1): the softmaxes are peaked, as in training
    # in-place scaling: a temporary copy of E would set the process's peak before the loss even runs
    embed_Nd = torch.randn(vocab, width, device=device).mul_(0.02)
    v_BPd = torch.randn(1, num_patches, width, device=device).mul_(0.5).requires_grad_(True)
    v_hat_BPd = torch.randn(1, num_patches, width, device=device).mul_(0.5)
    a_BP = torch.softmax(torch.randn(1, num_patches, device=device), -1)
    # the BLAS/OpenMP runtime's one-time setup (thread pools, per-thread packing buffers: ~18 MiB on CPU) is
    # paid by the first GEMM of a process; a training process has paid it long before the loss runs, so a
    # small GEMM + softmax of the same width pays it here, before the baseline, for every variant alike
    warm_Cd = torch.randn(64, width, device=device)
    torch.log_softmax(warm_Cd @ embed_Nd[:1024].T, dim=-1)
    del warm_Cd
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()

    start = time.perf_counter()
    if variant == "naive":
        log_q_BPN = torch.log_softmax(v_BPd @ embed_Nd.T, dim=-1)
        log_p_BPN = torch.log_softmax(v_hat_BPd @ embed_Nd.T, dim=-1)
        kl_BP = (log_p_BPN.exp() * (log_p_BPN - log_q_BPN)).sum(-1)
        loss = (a_BP * kl_BP).sum(1).mean()
    elif variant == "rows":
        generator = torch.Generator().manual_seed(0)
        loss = sds_loss(
            v_BPd, v_hat_BPd, embed_Nd, a_BP, chunk_size=64, sample_rows=chunk, generator=generator
        )
    else:
        loss = sds_loss(v_BPd, v_hat_BPd, embed_Nd, a_BP, chunk_size=chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # ru_maxrss is KiB on Linux
    return {"loss": float(loss), "seconds": seconds, "peak_mib": peak, "grad_norm": float(v_BPd.grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=576)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--chunk", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--rows", type=int, nargs="*", default=[], help="sample_rows values to add (chunk 64)"
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "VOCAB", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, vocab, chunk = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_one(variant, args.patches, vocab, args.width, chunk, args.device)))
        return

    variants = [("naive", 0)] + [("chunked", c) for c in args.chunk] + [("rows", r) for r in args.rows]
    print(f"SDS KL, batch 1, {args.patches} patches, width {args.width}, device {args.device}")
    print(
        f"{'run':>3} {'vocab':>7} {'variant':>12} {'peak MiB':>9} {'time s':>7} {'peak/naive':>10} "
        f"{'time/naive':>10} {'loss':>9}"
    )
    ratios: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for run in range(args.runs):
        for vocab in args.vocab:
            rows = []
            for variant, chunk in variants:
                cmd = [sys.executable, __file__, "--one", variant, str(vocab), str(chunk)]
                cmd += ["--patches", str(args.patches), "--width", str(args.width), "--device", args.device]
                result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                rows.append((f"{variant}" + (f"/{chunk}" if chunk else ""), result))
            naive = rows[0][1]
            for name, r in rows:
                peak_ratio, time_ratio = r["peak_mib"] / naive["peak_mib"], r["seconds"] / naive["seconds"]
                ratios.setdefault((vocab, name), []).append((peak_ratio, time_ratio))
                print(
                    f"{run + 1:>3} {vocab:>7} {name:>12} {r['peak_mib']:>9.0f} {r['seconds']:>7.2f} "
                    f"{peak_ratio:>10.3f} {time_ratio:>10.2f} {r['loss']:>9.5f}"
                )
    if args.runs > 1:
        print(f"\n{args.runs} runs: min / median / max")
        print(f"{'vocab':>7} {'variant':>12} {'peak/naive':>22} {'time/naive':>18}")
        for (vocab, name), values in ratios.items():
            peaks, times = [v[0] for v in values], [v[1] for v in values]
            print(
                f"{vocab:>7} {name:>12} {min(peaks):>8.3f} {statistics.median(peaks):>6.3f} {max(peaks):>6.3f} "
                f"{min(times):>6.2f} {statistics.median(times):>5.2f} {max(times):>5.2f}"
            )


if __name__ == "__main__":
    main()
