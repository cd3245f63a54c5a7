"""Benchmark of kd_loss's implementations (naive, chunked, fused) on one GPU.

    bash bench/kernel_gpu.sh                   # one H200: correctness, then the table (< 5 minutes)
    bash bench/kernel_gpu.sh --quick           # only the target row
    kdcache bench kernel-gpu --dry-run         # CPU: tiniest shapes under TRITON_INTERPRET=1
    kdcache bench kernel-gpu --compile-only    # no GPU: compile every kernel for sm_90a, ptxas report

Needs torch and triton only (Liger-Kernel is used if importable, as a CE-only lower bound): importing
it loads neither transformers nor vLLM nor datasets. Run from the repository root without installing
kdcache: `python -m train_student.kernels.bench_gpu` (what bench/kernel_gpu.sh does).

1. Correctness at real sizes: fused vs chunked (relative error of loss, dH and dW), fp32 for
   every kind x tail (TF32 off on both sides), then bf16.
2. Timing: median fwd+bwd time (triton.testing.do_bench) and peak extra memory (max allocated
   above the inputs; the gradients dH and dW are part of it) over T x V x D x K, bf16.
3. Against published fused KD kernels (NeMo-RL #3314, Liger #1423) at their shapes, beside their numbers.
4. The target row T=16384, V=128256, D=4096, K=64 bf16: achieved TFLOP/s = 8 T V D / time
   (the recompute design's FLOPs, docs/KD_MATH.md), against the H200's ~790 TFLOP/s bf16 peak.
Output: markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from train_student.loss_options import IMPLS, KINDS, TAILS  # torch-free: fine on the GPU machine

# Defaults: the grid the table sweeps, and the target row.
GRID_T = (4096, 16384)
GRID_V = (49152, 128256)
GRID_D = (576, 2048, 4096)
GRID_K = (32, 128)
TARGET = dict(t=16384, v=128256, d=4096, k=64)
# Published fused top-k / dense KD kernels (docs/BENCHMARKS.md cites them): (what, T, V, D, K, their ms fwd+bwd,
# their peak GiB, their GPU). NeMo-RL PR #3314 gives no hidden size: D = 4096 (Qwen3-8B's) is our assumption.
PEERS = (
    ("NeMo-RL #3314 fused top-k KD", 4096, 151936, 4096, 64, 1.7, 2.32, "RTX 4090"),
    ("NeMo-RL #3314 fused top-k KD", 8192, 151936, 4096, 64, 3.2, 4.64, "RTX 4090"),
    ("Liger #1423 fused linear KL (dense teacher)", 8192, 128256, 4096, 64, 129.0, 2.0, "A100"),
)
PEAK_TFLOPS = 790.0  # H200 dense bf16, as measured on this kind of machine
# Naive holds about this many bytes per logit at peak (bf16 logits, their fp32 copy, exp, grads).
NAIVE_BYTES_PER_LOGIT = 24


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="kdcache bench kernel-gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiniest shapes: checks this script's logic"
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="no GPU needed: compile every kernel variant for sm_90a and print ptxas's "
        "registers / spills / shared memory (Triton internals: may break across versions)",
    )
    p.add_argument("--quick", action="store_true", help="correctness + the target row only")
    p.add_argument("--kind", default="forward_kl", choices=KINDS)
    p.add_argument("--tail", default="bucket", choices=TAILS)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--chunk-size", type=int, default=1024)
    return p.parse_args(argv)


def make_inputs(t, v, d, k, dtype, device, seed=0):
    """Student hidden/head at LLM-like scale and a teacher top-k cache with some padding and masking."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(t, d, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d) * 4).to(device=device, dtype=dtype)
    # Teacher: a random, fairly peaked distribution's top-k (sorted, Zipf-like logprobs).
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    logits = -2.0 * torch.log(ranks)[None, :] + 0.3 * torch.randn(t, k, generator=g)
    logprobs = torch.log_softmax(logits, dim=-1) + math.log(0.95)  # 5% tail mass
    logprobs, order = logprobs.sort(dim=-1, descending=True)
    ids = torch.randint(0, v, (t, k), generator=g)
    ids = ids.gather(1, order)
    ids[::7, k // 2 :] = -1  # mass-adaptive: fewer entries at some positions
    logprobs[::7, k // 2 :] = -math.inf
    labels = torch.randint(0, v, (t,), generator=g)
    labels[::11] = -100
    return (hidden, weight, ids.to(device), logprobs.to(device), labels.to(device))


def fwd_bwd(impl, inputs, opts):
    """One forward + backward; returns (loss, dH, dW)."""
    import torch
    from train_student.loss import kd_loss

    hidden, weight, ids, logprobs, labels = inputs
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        out = LigerFusedLinearCrossEntropyLoss()(weight, hidden, labels)
        loss = out[0] if isinstance(out, tuple) else out
    else:
        loss, _ = kd_loss(
            hidden,
            weight,
            ids,
            logprobs,
            labels,
            impl=impl,
            kind=opts.kind,
            tail=opts.tail,
            temperature=opts.temperature,
            ce_weight=opts.ce_weight,
            chunk_size=opts.chunk_size,
        )
    dh, dw = torch.autograd.grad(loss, [hidden, weight])
    return loss.detach(), dh, dw


def rel_err(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def correctness(opts, device, sizes):
    """fused vs chunked on the same inputs: relative error of loss, dH, dW."""
    import torch

    print("## Correctness: fused vs chunked\n")
    print("| dtype | T | V | D | K | kind | tail | tau | ce | loss | dH | dW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    try:
        for dtype, (t, v, d, k), variants in sizes:
            inputs = make_inputs(t, v, d, k, dtype, device)
            inputs = tuple(x.requires_grad_() if i < 2 else x for i, x in enumerate(inputs))
            for kind, tail, tau, ce in variants:
                o = argparse.Namespace(
                    **{**vars(opts), "kind": kind, "tail": tail, "temperature": tau, "ce_weight": ce}
                )
                ref = fwd_bwd("chunked", inputs, o)
                got = fwd_bwd("fused", inputs, o)
                errs = [rel_err(a, b) for a, b in zip(got, ref)]
                worst = max(worst, max(errs)) if dtype == torch.float32 else worst
                name = str(dtype).replace("torch.", "")
                print(
                    f"| {name} | {t} | {v} | {d} | {k} | {kind} | {tail} | {tau:g} | {ce:g} | "
                    + " | ".join(f"{e:.1e}" for e in errs)
                    + " |"
                )
                del ref, got
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"\nworst fp32 relative error: {worst:.1e} ({'ok' if worst < 1e-3 else 'TOO LARGE'})\n")


def measure(impl, inputs, opts, device):
    """(median ms of fwd+bwd, peak extra MiB) or a string saying why not."""
    import torch

    fn = lambda: fwd_bwd(impl, inputs, opts)  # noqa: E731
    try:
        if device.type == "cuda":
            import triton.testing

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        else:
            fn()  # warm-up (interpreter "compiles" nothing, but torch allocates)
            start = time.perf_counter()
            fn()
            ms, peak = (time.perf_counter() - start) * 1e3, float("nan")
        return ms, peak
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except ImportError:
        return "n/a"


def fmt(result):
    if isinstance(result, str):
        return result, result
    ms, mib = result
    return f"{ms:.2f}", ("-" if math.isnan(mib) else f"{mib:.0f}")


def timing_table(opts, device, shapes, dtype, impls):
    import torch

    print(
        f"## fwd+bwd median time (ms) and peak extra memory (MiB), {str(dtype).replace('torch.', '')}, "
        f"{opts.kind}/{opts.tail}, tau={opts.temperature:g}, ce={opts.ce_weight:g}\n"
    )
    print("| T | V | D | K | " + " | ".join(f"{i} ms | {i} MiB" for i in impls) + " |")
    print("|---|---|---|---|" + "---|---|" * len(impls))
    results = {}
    for t, v, d, k in shapes:
        inputs = make_inputs(t, v, d, k, dtype, device)
        inputs = tuple(x.requires_grad_() if i < 2 else x for i, x in enumerate(inputs))
        cells = []
        for impl in impls:
            if impl == "naive" and device.type == "cuda":
                free = torch.cuda.mem_get_info()[0]
                if NAIVE_BYTES_PER_LOGIT * t * v > 0.9 * free:
                    cells += ["OOM", "OOM"]
                    continue
            r = measure(impl, inputs, opts, device)
            results[(t, v, d, k, impl)] = r
            cells += list(fmt(r))
        print(f"| {t} | {v} | {d} | {k} | " + " | ".join(cells) + " |", flush=True)
        del inputs
    print()
    return results


def peers_table(opts, device, impls, tiny: bool = False):
    """Our impls at the shapes public fused KD kernels published numbers for, beside those numbers (other
    GPUs: read the ratios with that in mind; Liger #1423 computes a dense teacher, a different job).
    tiny: every shape becomes 16 x 100 x 32, K=4 (--dry-run: the table's logic under the interpreter)."""
    import torch

    peers = [(n, 16, 100, 32, 4, *rest) if tiny else (n, t, v, d, k, *rest) for n, t, v, d, k, *rest in PEERS]
    shapes = sorted({(t, v, d, k) for _, t, v, d, k, *_ in peers})
    res = timing_table(opts, device, shapes, torch.bfloat16, impls)
    print("## Against published fused KD kernels (bf16)\n")
    print("| peer (their GPU) | T x V x D, K | their ms | their GiB | our fused ms | our fused GiB | our chunked ms |")
    print("|---|---|---|---|---|---|---|")
    for name, t, v, d, k, ms, gib, gpu in peers:
        fused, chunked = res.get((t, v, d, k, "fused")), res.get((t, v, d, k, "chunked"))
        f_ms, f_mib = fmt(fused) if fused is not None else ("-", "-")
        f_gib = f"{float(f_mib) / 1024:.2f}" if f_mib.replace(".", "").isdigit() else f_mib
        c_ms = fmt(chunked)[0] if chunked is not None else "-"
        print(f"| {name} ({gpu}) | {t} x {v} x {d}, {k} | {ms} | {gib} | {f_ms} | {f_gib} | {c_ms} |")
    print()


def compile_check():
    """Compile each kernel as launched on CUDA for sm_90a (Hopper) on any machine, and report."""
    import re
    import subprocess
    import tempfile
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from train_student.kernels import sparse_kl_triton as sk

    warnings.filterwarnings("ignore")
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas-blackwell"
    if not ptxas.exists():
        ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"

    def one(dt, fn, sig, consts, cfg):
        cfg = dict(cfg)
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        consts = {**consts, **cfg}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            cmd = [str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")]
            out = subprocess.run(cmd, capture_output=True, text=True)
        text = out.stdout + out.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores", text)
        flags = ", ".join(f"{k}={v}" for k, v in consts.items() if not k.startswith(("BLOCK", "GROUP")))
        print(
            f"| {dt} | {fn.__name__} | {flags} | {'wgmma' if 'wgmma' in kernel.asm['ptx'] else '-'} | "
            f"{regs.group(1) if regs else '?'} | {spill.group(1) if spill else '?'} | "
            f"{kernel.metadata.shared} |"
        )

    print("| dtype | kernel | variant | MMA | registers | spill bytes | shared bytes |")
    print("|---|---|---|---|---|---|---|")
    # fp32 runs IEEE FMA dots by default (exact, slow, spills); TF32 when torch allows it.
    for dt, precision in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")):
        io = dict(H="*" + dt, W="*" + dt)
        up = dict(UPCAST=dt == "fp32", DOT_PRECISION=precision)
        for need in (False, True):
            one(
                dt,
                sk._lse_forward_kernel,
                dict(
                    io,
                    LSE_TAU="*fp32",
                    LSE_1="*fp32",
                    MAX="*fp32",
                    ARGMAX="*i32",
                    T="i32",
                    V="i32",
                    D="i32",
                    stride_h="i32",
                    stride_w="i32",
                    inv_tau="fp32",
                    tiles_per_split="i32",
                ),
                dict(NEED_LSE1=need, **up),
                sk._GPU_FORWARD,
            )
        for has1, dh, dw in ((False, True, True), (True, True, True), (False, False, True), (False, True, False)):
            one(
                dt,
                sk._dense_backward_kernel,
                dict(
                    io,
                    LSE_TAU="*fp32",
                    LSE_1="*fp32",
                    COEF_TAU="*fp32",
                    COEF_1="*fp32",
                    DH="*fp32",
                    DW="*fp32",
                    T="i32",
                    V="i32",
                    D="i32",
                    stride_h="i32",
                    stride_w="i32",
                    inv_tau="fp32",
                ),
                dict(HAS_COEF_1=has1, COMPUTE_DH=dh, COMPUTE_DW=dw, **up),
                sk._GPU_BACKWARD,
            )
        one(
            dt,
            sk._sparse_forward_kernel,
            dict(io, IDS="*i64", OUT="*fp32", J="i32", D="i32", stride_h="i32", stride_w="i32"),
            {},
            sk._GPU_SPARSE,
        )
        for dh, dw in ((True, True), (True, False), (False, True)):
            one(
                dt,
                sk._sparse_backward_kernel,
                dict(
                    io,
                    IDS="*i64",
                    COEF="*fp32",
                    DH="*fp32",
                    DW="*fp32",
                    J="i32",
                    D="i32",
                    stride_h="i32",
                    stride_w="i32",
                ),
                dict(COMPUTE_DH=dh, COMPUTE_DW=dw),
                sk._GPU_SPARSE,
            )


def main(argv=None):
    opts = parse_args(argv)
    if opts.compile_only:
        compile_check()
        return
    if opts.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if opts.dry_run:
        device = torch.device("cpu")
        corr = [
            (torch.float32, (16, 100, 32, 4), [("forward_kl", "bucket", 1.0, 0.0), ("reverse_kl", "bucket", 2.0, 0.5)]),
            (torch.bfloat16, (16, 100, 32, 4), [("forward_kl", "renormalize", 1.0, 0.0)]),
        ]
        grid = [(16, 100, 32, 4)]
        target = dict(t=16, v=100, d=32, k=4)
    else:
        if not torch.cuda.is_available():
            sys.exit("kdcache bench kernel-gpu: no CUDA device; run with --dry-run to check the script on the CPU")
        device = torch.device("cuda")
        variants = [(kind, tail, tau, ce) for kind in KINDS for tail in TAILS for tau, ce in ((1.0, 0.0), (2.0, 0.5))]
        corr = [
            (torch.float32, (2048, 128256, 2048, 64), variants),
            (
                torch.bfloat16,
                (4096, 128256, 4096, 64),
                [("forward_kl", "bucket", 1.0, 0.0), ("reverse_kl", "bucket", 2.0, 0.5)],
            ),
        ]
        grid = [(t, v, d, k) for t in GRID_T for v in GRID_V for d in GRID_D for k in GRID_K]
        target = TARGET
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")

    started = time.perf_counter()
    correctness(opts, device, corr)
    try:
        import liger_kernel  # noqa: F401

        impls = IMPLS + ("liger",)
    except ImportError:
        impls = IMPLS
        print("(Liger-Kernel not importable: no CE-only lower bound column)\n")
    if not opts.quick:
        timing_table(opts, device, grid, torch.bfloat16, impls)

    if not opts.quick:
        peers_table(opts, device, impls, tiny=opts.dry_run)
    t, v, d, k = target["t"], target["v"], target["d"], target["k"]
    res = timing_table(opts, device, [(t, v, d, k)], torch.bfloat16, impls)
    print("## Target row\n")
    print("| impl | ms | TFLOP/s (8TVD/t) | % of peak |")
    print("|---|---|---|---|")
    for impl in impls:
        r = res.get((t, v, d, k, impl))
        if r is None or isinstance(r, str):
            print(f"| {impl} | {r or 'OOM'} | - | - |")
            continue
        tflops = 8 * t * v * d / (r[0] * 1e-3) / 1e12
        print(f"| {impl} | {r[0]:.2f} | {tflops:.1f} | {100 * tflops / PEAK_TFLOPS:.1f}% |")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
