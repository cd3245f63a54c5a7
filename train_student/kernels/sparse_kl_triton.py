"""Fused LM head + sparse top-k KD loss in Triton (kd_loss(impl="fused")): no [T, V] tensor.

Any loss L = F(lse, s_{i_1}, ..., s_{i_J}) of the log-sum-exp of the logits s = W h and a few
gathered logits has dL/ds_v = a * softmax(s)_v + sum_j c_j [v = i_j] (docs/KD_MATH.md, "the general
shape"). So, per position, the kernel needs only:

  forward   an online log-sum-exp over vocab tiles of s = h W^T (tl.dot of hidden tiles with
            weight tiles), at temperature tau and, when needed, at 1 (CE), plus a running
            max/argmax (a metric); the J gathered logits come from a small gather-dot kernel;
            `terms_fn` (plain torch on [T, J] tensors) turns them into the loss and a, c.
  backward  recompute each [BLOCK_T, BLOCK_V] logit tile, form g = a_tau q_tau + a_1 q_1 in
            registers, and accumulate dH += g W_tile and dW_tile += g^T H (Cut Cross-Entropy's
            recompute design, 8 T V D FLOPs in all); a second small kernel adds the sparse part
            sum_j c_j [v = i_j] (O(T J D) work).

dH and dW are summed with fp32 atomics, so they are not bitwise reproducible run to run (the
order of the fp32 additions varies); the loss and the forward are.

Order of this file: tuning constants, the @triton.jit kernels (dense forward, dense backward,
sparse forward, sparse backward), their launchers, the autograd.Function and the functional
entry point.
Imports torch and triton only; the loss itself (F) is passed in by `train_student.loss`.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tile sizes for CUDA, not yet timed on hardware (train_student/kernels/bench_gpu.py is the place to tune them).
# Chosen from `kdcache bench kernel-gpu --compile-only` (sm_90a, bf16, ptxas -v): 128 x 128 tiles keep
# wgmma busy; BLOCK_D=64 made both kernels spill registers (76 and 1392 bytes), 32 does not.
_GPU_FORWARD = dict(BLOCK_T=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)
_GPU_BACKWARD = dict(BLOCK_T=128, BLOCK_V=128, BLOCK_D=32, GROUP_T=8, num_warps=8, num_stages=3)
# Under TRITON_INTERPRET=1 (CPU tests): tiny tiles, so tiny test shapes still span several tiles
# in every dimension, partial last tiles included.
_INTERPRETER_FORWARD = dict(BLOCK_T=8, BLOCK_V=32, BLOCK_D=16)
_INTERPRETER_BACKWARD = dict(BLOCK_T=8, BLOCK_V=32, BLOCK_D=16, GROUP_T=2)
# The sparse kernels (one program per token; J = K + 1 gathered ids): tiles of ids x hidden.
_GPU_SPARSE = dict(BLOCK_J=32, BLOCK_D=128, num_warps=4)
_INTERPRETER_SPARSE = dict(BLOCK_J=4, BLOCK_D=16)
# Tests set this: outputs the kernels write (not accumulate into) start as NaN / -1, so an element
# a kernel forgets to write shows up instead of passing as a plausible zero.
POISON_BUFFERS = False


@triton.jit
def _lse_forward_kernel(
    H,  # [T, D] hidden, row stride stride_h
    W,  # [V, D] LM head, row stride stride_w
    LSE_TAU,  # [n_split, T] fp32 out: partial log-sum-exp of s / tau over this split's vocab
    LSE_1,  # [n_split, T] fp32 out: same at temperature 1 (written only if NEED_LSE1)
    MAX,  # [n_split, T] fp32 out: partial max of s
    ARGMAX,  # [n_split, T] int32 out: its vocab index
    T,
    V,
    D,
    stride_h,
    stride_w,
    inv_tau,
    tiles_per_split,
    NEED_LSE1: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # program_id(0) varies fastest: programs that run together share a vocab range, so the weight
    # tiles they stream are L2 hits for all but the first.
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows_t = offs_t.to(tl.int64)  # pointer offsets: V * D passes 2^31 for large heads
    offs_d = tl.arange(0, BLOCK_D)

    # One running max serves both temperatures: max(s / tau) = max(s) / tau for tau > 0.
    run_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    run_arg = tl.zeros([BLOCK_T], tl.int32)
    sum_tau = tl.zeros([BLOCK_T], tl.float32)
    sum_1 = tl.zeros([BLOCK_T], tl.float32)

    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        rows_v = offs_v.to(tl.int64)
        s = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            h = tl.load(H + rows_t[:, None] * stride_h + dd[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(W + rows_v[:, None] * stride_w + dd[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:  # the interpreter cannot do bf16 arithmetic; fp32 inputs are unchanged
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            s = tl.dot(h, tl.trans(w), s, input_precision=DOT_PRECISION)
        s = tl.where(mask_v[None, :], s, float("-inf"))

        tile_max, tile_arg = tl.max(s, axis=1, return_indices=True)
        new_max = tl.maximum(run_max, tile_max)
        # Strictly greater: on ties the earlier (lower) vocab index wins, like torch.argmax.
        run_arg = tl.where(tile_max > run_max, v0 + tile_arg, run_arg)
        shifted = s - new_max[:, None]
        sum_tau = sum_tau * tl.exp((run_max - new_max) * inv_tau) + tl.sum(tl.exp(shifted * inv_tau), axis=1)
        if NEED_LSE1:
            sum_1 = sum_1 * tl.exp(run_max - new_max) + tl.sum(tl.exp(shifted), axis=1)
        run_max = new_max

    out = pid_s * T + offs_t
    tl.store(LSE_TAU + out, run_max * inv_tau + tl.log(sum_tau), mask=mask_t)
    if NEED_LSE1:
        tl.store(LSE_1 + out, run_max + tl.log(sum_1), mask=mask_t)
    tl.store(MAX + out, run_max, mask=mask_t)
    tl.store(ARGMAX + out, run_arg, mask=mask_t)


@triton.jit
def _dense_backward_kernel(
    H,  # [T, D] hidden
    W,  # [V, D] LM head
    LSE_TAU,  # [T] fp32 log-sum-exp of s / tau
    LSE_1,  # [T] fp32 log-sum-exp of s (read only if HAS_COEF_1)
    COEF_TAU,  # [T] fp32 a_tau: dL/ds_v gets a_tau * softmax(s / tau)_v
    COEF_1,  # [T] fp32 a_1: dL/ds_v gets a_1 * softmax(s)_v (read only if HAS_COEF_1)
    DH,  # [T, D] fp32 accumulator (zeroed by the launcher), row stride D
    DW,  # [V, D] fp32 accumulator (zeroed by the launcher), row stride D
    T,
    V,
    D,
    stride_h,
    stride_w,
    inv_tau,
    HAS_COEF_1: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    # Grouped launch order (as in Triton's matmul tutorial): GROUP_T token tiles sweep the vocab
    # together, so both their hidden rows and the weight tiles stay in L2.
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    n_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_T * n_v
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_v = offs_v < V
    rows_t = offs_t.to(tl.int64)  # pointer offsets: V * D passes 2^31 for large heads
    rows_v = offs_v.to(tl.int64)

    coef_tau = tl.load(COEF_TAU + offs_t, mask=mask_t, other=0.0)
    if HAS_COEF_1:
        coef_1 = tl.load(COEF_1 + offs_t, mask=mask_t, other=0.0)
        live = tl.max(tl.abs(coef_tau) + tl.abs(coef_1), axis=0)
    else:
        live = tl.max(tl.abs(coef_tau), axis=0)
    # A tile whose rows all have zero coefficients (untrained positions) contributes exactly 0.
    if live > 0.0:
        s = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            h = tl.load(H + rows_t[:, None] * stride_h + dd[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(W + rows_v[:, None] * stride_w + dd[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            s = tl.dot(h, tl.trans(w), s, input_precision=DOT_PRECISION)

        lse_tau = tl.load(LSE_TAU + offs_t, mask=mask_t, other=0.0)
        g = coef_tau[:, None] * tl.exp(s * inv_tau - lse_tau[:, None])
        if HAS_COEF_1:
            lse_1 = tl.load(LSE_1 + offs_t, mask=mask_t, other=0.0)
            g += coef_1[:, None] * tl.exp(s - lse_1[:, None])
        # Padding columns (v >= V) hold s = 0, which is not a logit: select, do not multiply, so an
        # overflowing exp there cannot leak a NaN.
        g = tl.where(mask_t[:, None] & mask_v[None, :], g, 0.0)
        if not UPCAST:
            g = g.to(H.dtype.element_ty)  # bf16/fp16 operands for the tensor cores, fp32 accumulate

        # dH and dW receive contributions from every tile of a row / column of the (T, V) grid.
        # A split reduction would need a partial buffer per tile row or column ((T / BLOCK_T) * V * D
        # floats for dW: tens of GB at LLM sizes); fp32 atomics into one buffer keep the extra memory
        # at O((T + V) D) and the read-modify-writes land in L2.
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            if COMPUTE_DH:
                w = tl.load(
                    W + rows_v[:, None] * stride_w + dd[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0
                )
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(g, w, input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_D]
                tl.atomic_add(
                    DH + rows_t[:, None] * D + dd[None, :], dh, mask=mask_t[:, None] & mask_d[None, :], sem="relaxed"
                )
            if COMPUTE_DW:
                h = tl.load(
                    H + rows_t[:, None] * stride_h + dd[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0
                )
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(g), h, input_precision=DOT_PRECISION)  # [BLOCK_V, BLOCK_D]
                tl.atomic_add(
                    DW + rows_v[:, None] * D + dd[None, :], dw, mask=mask_v[:, None] & mask_d[None, :], sem="relaxed"
                )


@triton.jit
def _sparse_forward_kernel(
    H,  # [T, D] hidden
    W,  # [V, D] LM head
    IDS,  # [T, J] int64 ids in [0, V)
    OUT,  # [T, J] fp32 out: OUT[t, j] = H[t] . W[IDS[t, j]]
    J,
    D,
    stride_h,
    stride_w,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    ids = tl.load(IDS + t * J + offs_j, mask=mask_j, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_J], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        # J rows of W per token: too few for tl.dot; fp32 multiply-add (bf16 math is not portable).
        h = tl.load(H + t.to(tl.int64) * stride_h + dd, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(W + ids[:, None] * stride_w + dd[None, :], mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(
            tl.float32
        )
        acc += tl.sum(w * h[None, :], axis=1)
    tl.store(OUT + t * J + offs_j, acc, mask=mask_j)


@triton.jit
def _sparse_backward_kernel(
    H,  # [T, D] hidden
    W,  # [V, D] LM head
    IDS,  # [T, J] int64 ids in [0, V)
    COEF,  # [T, J] fp32 c: dL/ds at IDS
    DH,  # [T, D] fp32 in/out (row stride D): DH[t] += sum_j c[t, j] W[IDS[t, j]]
    DW,  # [V, D] fp32 in/out (row stride D): DW[IDS[t, j]] += c[t, j] H[t]
    J,
    D,
    stride_h,
    stride_w,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token: it owns DH[t] (plain read-add-write), while rows of DW are shared by
    # every token that lists the id, hence atomics there (as in torch's index_add_ on CUDA).
    t = tl.program_id(0)
    row = t.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        h = tl.load(H + row * stride_h + dd, mask=mask_d, other=0.0).to(tl.float32)
        dh = tl.zeros([BLOCK_D], tl.float32)
        for j0 in range(0, J, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < J
            ids = tl.load(IDS + t * J + offs_j, mask=mask_j, other=0).to(tl.int64)
            c = tl.load(COEF + t * J + offs_j, mask=mask_j, other=0.0)
            if COMPUTE_DH:
                w = tl.load(
                    W + ids[:, None] * stride_w + dd[None, :], mask=mask_j[:, None] & mask_d[None, :], other=0.0
                ).to(tl.float32)
                dh += tl.sum(c[:, None] * w, axis=0)
            if COMPUTE_DW:
                # c = 0 (padding, untrained positions) issues no atomic at all.
                tl.atomic_add(
                    DW + ids[:, None] * D + dd[None, :],
                    c[:, None] * h[None, :],
                    mask=(mask_j & (c != 0.0))[:, None] & mask_d[None, :],
                    sem="relaxed",
                )
        if COMPUTE_DH:
            ptr = DH + row * D + dd
            tl.store(ptr, tl.load(ptr, mask=mask_d, other=0.0) + dh, mask=mask_d)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_flags(dtype: torch.dtype) -> dict:
    # fp32 inputs follow torch's own matmul setting: IEEE unless the user allowed TF32.
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(UPCAST=_interpreting() or dtype == torch.float32, DOT_PRECISION=precision)


def _num_splits(n_t_tiles: int, n_v_tiles: int, device: torch.device) -> int:
    """How many vocab ranges the forward splits into, so that short batches still fill the GPU."""
    if device.type != "cuda":
        return min(2, n_v_tiles)  # interpreter: 2 splits, so the combine step is tested too
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_v_tiles, triton.cdiv(target, n_t_tiles)))


def _output(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not POISON_BUFFERS:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def lse_forward(
    hidden: Tensor, weight: Tensor, temperature: float, need_lse1: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Online log-sum-exp of s = hidden @ weight.T over the vocabulary, without forming s.

    Args:
        hidden: [T, D] contiguous; weight: [V, D] contiguous, same dtype (fp16/bf16/fp32).
    Returns:
        lse_tau [T] fp32 (of s / tau), lse_1 [T] fp32 or None, argmax [T] int64.
    """
    (n, d), v = hidden.shape, weight.shape[0]
    cfg = dict(_INTERPRETER_FORWARD if _interpreting() else _GPU_FORWARD)
    block_t, block_v = cfg["BLOCK_T"], cfg["BLOCK_V"]
    n_t_tiles, n_v_tiles = triton.cdiv(n, block_t), triton.cdiv(v, block_v)
    splits = _num_splits(n_t_tiles, n_v_tiles, hidden.device)
    tiles_per_split = triton.cdiv(n_v_tiles, splits)
    splits = triton.cdiv(n_v_tiles, tiles_per_split)  # every split gets at least one tile

    dev = hidden.device
    lse_tau = _output((splits, n), torch.float32, dev)
    lse_1 = _output((splits, n), torch.float32, dev) if need_lse1 else lse_tau  # dummy when unused
    run_max = _output((splits, n), torch.float32, dev)
    argmax = _output((splits, n), torch.int32, dev)
    if n > 0:
        _lse_forward_kernel[(n_t_tiles, splits)](
            hidden,
            weight,
            lse_tau,
            lse_1,
            run_max,
            argmax,
            n,
            v,
            d,
            hidden.stride(0),
            weight.stride(0),
            1.0 / temperature,
            tiles_per_split,
            NEED_LSE1=need_lse1,
            **_kernel_flags(hidden.dtype),
            **cfg,
        )
    # Combine the vocab splits (tiny [splits, T] tensors).
    best = run_max.argmax(dim=0, keepdim=True)
    top = argmax.gather(0, best)[0].long()
    return (
        torch.logsumexp(lse_tau, dim=0),
        torch.logsumexp(lse_1, dim=0) if need_lse1 else None,
        top,
    )


def dense_backward(
    hidden: Tensor,
    weight: Tensor,
    lse_tau: Tensor,
    lse_1: Tensor | None,
    coef_tau: Tensor,
    coef_1: Tensor | None,
    temperature: float,
    need_dh: bool,
    need_dw: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """dH = G W and dW = G^T H for G = coef_tau * softmax(s / tau) + coef_1 * softmax(s), tile by tile.

    Args:
        hidden [T, D], weight [V, D] contiguous; lse_*, coef_* [T] fp32 (coef_1/lse_1 None: no term).
    Returns:
        dH [T, D] fp32 or None, dW [V, D] fp32 or None.
    """
    (n, d), v = hidden.shape, weight.shape[0]
    dev = hidden.device
    # Accumulated by atomics, so they must start at zero (POISON_BUFFERS does not apply).
    dh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros((v, d), dtype=torch.float32, device=dev) if need_dw else None
    if n == 0 or not (need_dh or need_dw):
        return dh, dw
    cfg = dict(_INTERPRETER_BACKWARD if _interpreting() else _GPU_BACKWARD)
    grid = (triton.cdiv(n, cfg["BLOCK_T"]) * triton.cdiv(v, cfg["BLOCK_V"]),)
    has_1 = coef_1 is not None
    dummy = coef_tau  # stands in for pointers the kernel does not read
    _dense_backward_kernel[grid](
        hidden,
        weight,
        lse_tau,
        lse_1 if has_1 else dummy,
        coef_tau,
        coef_1 if has_1 else dummy,
        dh if need_dh else dummy,
        dw if need_dw else dummy,
        n,
        v,
        d,
        hidden.stride(0),
        weight.stride(0),
        1.0 / temperature,
        HAS_COEF_1=has_1,
        COMPUTE_DH=need_dh,
        COMPUTE_DW=need_dw,
        **_kernel_flags(hidden.dtype),
        **cfg,
    )
    return dh, dw


def gather_logits(hidden: Tensor, weight: Tensor, ids: Tensor) -> Tensor:
    """s[t, j] = hidden[t] . weight[ids[t, j]] in fp32: [T, D], [V, D], [T, J] int64 -> [T, J]."""
    n, j = ids.shape
    out = _output((n, j), torch.float32, hidden.device)
    if n == 0:
        return out
    cfg = dict(_INTERPRETER_SPARSE if _interpreting() else _GPU_SPARSE)
    _sparse_forward_kernel[(n, triton.cdiv(j, cfg["BLOCK_J"]))](
        hidden,
        weight,
        ids.contiguous(),
        out,
        j,
        hidden.shape[1],
        hidden.stride(0),
        weight.stride(0),
        **cfg,
    )
    return out


def sparse_backward(
    hidden: Tensor, weight: Tensor, ids: Tensor, coef: Tensor, dh: Tensor | None, dw: Tensor | None
) -> None:
    """In place: dH[t] += sum_j c[t, j] W[ids[t, j]] and dW[ids[t, j]] += c[t, j] H[t] (fp32 buffers)."""
    n, j = ids.shape
    if n == 0 or (dh is None and dw is None):
        return
    cfg = dict(_INTERPRETER_SPARSE if _interpreting() else _GPU_SPARSE)
    dummy = coef
    _sparse_backward_kernel[(n,)](
        hidden,
        weight,
        ids.contiguous(),
        coef.contiguous(),
        dh if dh is not None else dummy,
        dw if dw is not None else dummy,
        j,
        hidden.shape[1],
        hidden.stride(0),
        weight.stride(0),
        COMPUTE_DH=dh is not None,
        COMPUTE_DW=dw is not None,
        **cfg,
    )


# (lse_tau, lse_1 | None, s_sparse, argmax) -> (loss, coef_tau, coef_1 | None, coef_sparse); see
# train_student.loss_torch.make_terms_fn.
TermsFn = Callable[[Tensor, "Tensor | None", Tensor, Tensor], "tuple[Tensor, Tensor, Tensor | None, Tensor]"]


class LinearSparseLossFunction(torch.autograd.Function):
    """loss = F(lse(h W^T), gathered logits) with the LM head fused; saves O(T J) besides h, W."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        sparse_ids: Tensor,
        terms_fn: TermsFn,
        temperature: float,
        need_lse1: bool,
        need_coef_1: bool,
    ):
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        lse_tau, lse_1, argmax = lse_forward(hidden, weight, temperature, need_lse1)
        s_sparse = gather_logits(hidden, weight, sparse_ids)
        loss, coef_tau, coef_1, coef_sparse = terms_fn(lse_tau, lse_1, s_sparse, argmax)
        if not need_coef_1:
            coef_1 = None  # no CE term: skip the second softmax in the backward
        ctx.save_for_backward(hidden, weight)
        ctx.small = (sparse_ids, lse_tau, lse_1, coef_tau.float(), coef_1, coef_sparse.float())
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight = ctx.saved_tensors
        sparse_ids, lse_tau, lse_1, coef_tau, coef_1, coef_sparse = ctx.small
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_loss.float()
        coef_tau = (coef_tau * scale).contiguous()
        coef_1 = (coef_1 * scale).contiguous() if coef_1 is not None else None
        dh, dw = dense_backward(hidden, weight, lse_tau, lse_1, coef_tau, coef_1, ctx.temperature, need_dh, need_dw)
        sparse_backward(hidden, weight, sparse_ids, coef_sparse * scale, dh, dw)
        return (
            dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_linear_sparse_loss(
    hidden: Tensor,
    weight: Tensor,
    sparse_ids: Tensor,
    terms_fn: TermsFn,
    *,
    temperature: float = 1.0,
    need_lse1: bool = False,
    need_coef_1: bool = False,
) -> Tensor:
    """Differentiable loss F(lse, s_sparse) through the LM head without forming the logits.

    Args:
        hidden: [T, D] fp16/bf16/fp32 (CUDA, or CPU under TRITON_INTERPRET=1).
        weight: [V, D] same dtype and device.
        sparse_ids: [T, J] int64 in [0, V): the logits F reads besides the log-sum-exp.
        terms_fn: computes (loss, coef_tau, coef_1, coef_sparse) from (lse_tau [T], lse_1 [T] or
            None, s_sparse [T, J], argmax [T]); coef_tau multiplies softmax(s / tau), coef_1
            softmax(s), coef_sparse the one-hot at sparse_ids (see loss_torch.make_terms_fn).
        temperature: tau of lse_tau.
        need_lse1: also compute the temperature-1 log-sum-exp (for a CE term at tau != 1).
        need_coef_1: the backward uses coef_1 (False skips the second softmax).
    Returns:
        loss [] fp32.
    """
    return LinearSparseLossFunction.apply(
        hidden, weight, sparse_ids, terms_fn, float(temperature), bool(need_lse1), bool(need_coef_1)
    )
