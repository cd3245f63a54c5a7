"""`kdcache bench train`: what a training step costs on this machine.

    kdcache bench train                       # all three parts, markdown tables
    kdcache bench train --parts loss --tokens 4096 --vocab 49152

1. loss: tokens/s (forward + backward) and peak extra memory of kd_loss impl=naive vs chunked at
   SmolLM2's shapes (V = 49,152, D = 576, K = 64) over T tokens. Each impl runs in its own
   subprocess, so the peak resident memory (ru_maxrss) above the inputs is that impl's alone.
2. reader: examples/s and positions/s of CacheReader and of the packer over a cache written from
   real teacher top-k (bench/data/smollm2_tulu_top128.npz: SmolLM2-135M-Instruct on Tulu 3).
3. step: a training loop (a random student of SmolLM2's width with --layers layers, AdamW,
   packed sequences of --tokens tokens from that cache, impl=chunked) and the fraction of its
   time spent waiting for the next batch (target: < 2%), once per --dtypes choice (float32 and
   bf16-mixed: the two that `--dtype auto` picks between; the table marks the one it picks here).
4. xtok (`--parts xtok`): the same loop for a student with another tokenizer (issue 12): a cache of
   the Tulu 3 sample rendered by a byte-level BPE teacher tokenizer (ChatML), top-k rows from the
   bench data, the teacher's tokenizer files; a SentencePiece-style Unigram student (byte fallback,
   a Gemma-style template); both tokenizers trained offline on the sample (--xtok-vocab tokens each).
   Alignment runs in the reader's prefetch (`data.AlignedStream`) and the loss is `xtok_loss`
   (hybrid): reported are alignment alone (positions/s) and the step's data wait (target: < 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from train_student.loss_options import LossSpec

REPO = Path(__file__).resolve().parents[1]  # the repository root
DATA = REPO / "bench" / "data" / "smollm2_tulu_top128.npz"
TULU = Path(os.environ.get("KDCACHE_TULU_SAMPLE", REPO.parent / "shared" / "data" / "tulu3_sft_sample.jsonl"))
# the xtok student's template: Gemma's turn markers (the Unigram student's specials)
GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
    "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- 1. loss ---------------------------------------------------------------------------------------
def loss_one(impl: str, T: int, V: int, D: int, K: int, iters: int, chunk: int) -> dict:
    """Time fwd+bwd of one impl in this process; report peak RSS growth over the inputs."""
    import torch

    from train_student import loss as loss_module
    from train_student.loss import kd_loss

    if "@" in impl:  # IMPL@REV: that revision's loss_torch.py behind today's kd_loss (side-by-side comparisons)
        impl, rev = impl.split("@", 1)
        loss_module.loss_torch = _module_at(rev, "train_student/loss_torch.py")
    torch.manual_seed(0)
    h = (torch.randn(T, D) * 0.5).requires_grad_()
    w = (torch.randn(V, D) * 0.05).requires_grad_()
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(min(T, 64))]).repeat(T // min(T, 64) + 1, 1)[:T]
    lps = torch.log_softmax(torch.randn(T, K) * 3, -1).sort(-1, descending=True).values
    labels = ids[:, 0].clone()
    labels[::7] = -100
    if impl.startswith("liger"):  # dense KL over V: the teacher's hidden states and head stand in for the cache
        liger = _liger_jsd(compiled=impl == "liger")
        if liger is None:
            raise SystemExit("liger-kernel is not installed (pip install liger-kernel)")
        t_h, t_w = torch.randn(T, D) * 0.5, torch.randn(V, D) * 0.05

        def run():
            return liger(h, w, t_h, t_w, labels)
    else:

        def run():
            return kd_loss(h, w, ids, lps, labels, kd_weight=1.0, ce_weight=0.5, impl=impl, chunk_size=chunk)[0]

    base = _rss_mb()
    times = []
    for i in range(iters + 1):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        run().backward()
        if i:  # the first iteration warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    best = min(times)  # best of `iters`: the machine may be shared, the minimum is the least disturbed
    impl = f"{impl}@{rev}" if "rev" in locals() else impl
    return {"impl": impl, "s_per_step": best, "tokens_per_s": T / best, "peak_extra_mb": _rss_mb() - base}


def _module_at(rev: str, path: str):
    """The module `path` as it is at git revision `rev` (a fresh module object, not installed)."""
    import types

    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True)
    module = types.ModuleType(f"{Path(path).stem}_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(src.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def bench_loss(args) -> list[dict]:
    rows = []
    for impl in args.impls:
        cmd = [
            sys.executable,
            "-m",
            "train_student.bench",
            "--_loss-one",
            impl,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--k",
            str(args.k),
            "--iters",
            str(args.iters),
            "--chunk-size",
            str(args.chunk_size),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
        if out.returncode != 0:
            rows.append({"impl": impl, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


# ---- 2. reader -------------------------------------------------------------------------------------
def make_cache(out: Path, k: int, length: int = 512) -> Path:
    """A cache of real teacher top-k rows cut into examples of `length` tokens (inputs = top-1 ids)."""
    from formats import CacheWriter, CodecConfig, Example

    if not DATA.exists():
        from formats.errors import InputError

        raise InputError(
            f"{DATA} not found: the reader and step benchmarks read real teacher top-k rows; "
            "make them once with `make bench-data`, or give --cache DIR"
        )
    d = np.load(DATA)
    ids, lps = d["ids"][:, :k], d["logprobs"][:, :k]
    n_pos = length - 1
    prov = {"tokenizer": {"vocab_size": 49152, "name_or_path": "SmolLM2 (bench)"}, "teacher": {"name_or_path": "bench"}}
    with CacheWriter(out, codec=CodecConfig(k=k), provenance=prov) as w:
        for e, start in enumerate(range(0, len(ids) - n_pos + 1, n_pos)):
            rows = slice(start, start + n_pos)
            tokens = np.concatenate([[1], ids[rows, 0]]).astype(np.int32)
            w.write(
                Example(
                    id=f"b{e:05d}",
                    input_ids=tokens,
                    target_positions=np.arange(1, length, dtype=np.int32),
                    topk_ids=ids[rows],
                    topk_logprobs=lps[rows],
                    target_logprobs=lps[rows, 0].copy(),
                    target_ranks=np.ones(n_pos, np.int32),
                )
            )
    return out


def bench_reader(cache: Path, max_tokens: int, repeats: int = 3) -> list[dict]:
    from formats import CacheReader
    from train_student.data import ExampleStream, Packer

    rows = []
    best = {True: None, False: None}
    for _ in range(repeats):  # interleaved: the sha256 every reader checks (verify) vs --no-verify
        for verify in (True, False):
            t0, n, pos = time.perf_counter(), 0, 0
            for ex in CacheReader(cache, verify=verify):
                n, pos = n + 1, pos + ex.num_targets
            dt = time.perf_counter() - t0
            best[verify] = min(best[verify] or dt, dt)
    for verify, what in (
        (True, "CacheReader (decode, sha256 checked)"),
        (False, "CacheReader --no-verify (no sha256)"),
    ):
        rows.append({"what": what, "examples_per_s": n / best[verify], "positions_per_s": pos / best[verify]})
    best = None
    for _ in range(repeats):
        t0, toks, m = time.perf_counter(), 0, 0
        for b in Packer(
            ExampleStream([CacheReader(cache)]), max_tokens=max_tokens, k=int(CacheReader(cache).manifest["codec"]["k"])
        ):
            toks, m = toks + b.n_tokens, m + b.n_examples
        dt = time.perf_counter() - t0
        best = min(best or dt, dt)
    rows.append(
        {"what": f"reader + packing ({max_tokens} tokens)", "examples_per_s": m / best, "positions_per_s": toks / best}
    )
    return rows


# ---- 3. training step --------------------------------------------------------------------------------
def timed_steps(module, opt, packer, spec: LossSpec, steps: int) -> tuple[float, float, int]:
    """Run 1 + `steps` optimizer steps on `packer`'s batches; (seconds waiting for batches, seconds in all,
    tokens) over the last `steps` (the first warms up)."""
    wait = total = 0.0
    tokens = 0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        batch = next(packer)
        t1 = time.perf_counter()
        loss, _ = module(
            batch.input_ids, batch.position_ids, batch.topk_ids, batch.topk_logprobs, batch.labels, spec=spec
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step:
            wait, total, tokens = wait + t1 - t0, total + t2 - t0, tokens + batch.n_tokens
    return wait, total, tokens


def bench_step(cache: Path, args, dtype: str = "float32") -> dict:
    import torch

    from formats import CacheReader
    from train_student.data import ExampleStream, Packer
    from train_student.model import StudentLoss

    module = StudentLoss(_bench_student(args.layers), autocast=torch.bfloat16 if dtype == "bf16-mixed" else None)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    reader = CacheReader(cache, shuffle=True, epochs=None)
    packer = Packer(ExampleStream([reader]), max_tokens=args.tokens, k=int(reader.manifest["codec"]["k"]))
    spec = LossSpec(kd_weight=1.0, ce_weight=0.5, chunk_size=args.chunk_size)
    wait, total, tokens = timed_steps(module, opt, packer, spec, args.steps)
    return {
        "dtype": dtype,
        "layers": args.layers,
        "tokens_per_step": args.tokens,
        "s_per_step": total / args.steps,
        "tokens_per_s": tokens / total,
        "data_wait_frac": wait / total,
        "peak_rss_mb": _rss_mb(),
    }


# ---- 5. the same step in transformers' Trainer (train_student.hf) --------------------------------------
HF_CONTENDERS = ("kdcache train loop", "KDTrainer", "Trainer (full-logit CE)")


def _bench_student(layers: int):
    """A random model of SmolLM2-135M's shape (SmolLM2-135M itself has 30 layers) with `layers` layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def hf_one(name: str, cache: Path, args) -> dict:
    """One contender of the hf part in this (fresh) process: s/step over args.steps steps after one warm-up,
    peak RSS growth over the loaded model and data. Each step trains on ~args.tokens tokens (packed)."""
    import torch

    from train_student.data import ExampleStream, Packer
    from formats import CacheReader

    model = _bench_student(args.layers)
    length = len(next(iter(CacheReader(cache))).input_ids)
    per_step = max(args.tokens // length, 1)
    base = _rss_mb()
    times: list[float] = []
    if name == "kdcache train loop":
        from train_student.model import StudentLoss

        module = StudentLoss(model)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        reader = CacheReader(cache, shuffle=False, epochs=None)
        packer = Packer(ExampleStream([reader]), max_tokens=per_step * length, k=int(reader.manifest["codec"]["k"]))
        spec = LossSpec(kd_weight=1.0, ce_weight=0.5, chunk_size=args.chunk_size)
        _, total, tokens = timed_steps(module, opt, packer, spec, args.steps)
        return {
            "contender": name,
            "s_per_step": total / args.steps,
            "tokens_per_s": tokens / total,
            "peak_extra_mb": _rss_mb() - base,
        }
    import transformers

    from train_student.hf import KDCacheDataset, KDDataCollator, KDTrainer

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter())

    targs = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=per_step,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,  # the plain contender drops the teacher columns itself
    )
    dataset = KDCacheDataset(str(cache), split="all")
    collator = KDDataCollator(pack=True)
    if name == "KDTrainer":
        trainer = KDTrainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            data_collator=collator,
            ce_weight=0.5,
            chunk_size=args.chunk_size,
            callbacks=[Clock()],
        )
    else:  # the plain Trainer: the model's own loss on full [T, V] logits (CE only: it has no teacher)

        def plain(features):
            batch = collator(features)
            return {key: batch[key] for key in ("input_ids", "position_ids", "labels")}

        trainer = transformers.Trainer(
            model=model, args=targs, train_dataset=dataset, data_collator=plain, callbacks=[Clock()]
        )
    trainer.train()
    total = times[-1] - times[0]
    return {
        "contender": name,
        "s_per_step": total / args.steps,
        "tokens_per_s": per_step * length * args.steps / total,
        "peak_extra_mb": _rss_mb() - base,
    }


def bench_hf(cache: Path, args) -> list[dict]:
    rows = []
    for name in HF_CONTENDERS:  # a fresh process each: peak memory is not shared
        cmd = [
            sys.executable,
            "-m",
            "train_student.bench",
            "--_hf-one",
            name,
            "--cache",
            str(cache),
            "--tokens",
            str(args.tokens),
            "--layers",
            str(args.layers),
            "--steps",
            str(args.steps),
            "--chunk-size",
            str(args.chunk_size),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if res.returncode:
            raise SystemExit(f"bench hf {name!r} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = rows[0]["s_per_step"]
    for row in rows:
        row["vs_kdcache"] = row["s_per_step"] / ref
    return rows


# ---- 6. offline (a cache) vs online KD (the teacher every step) -----------------------------------------
ONLINE_CONTENDERS = (
    "offline: kdcache cache + sparse KL",
    "online: teacher forward + dense KL",
    "online: Liger fused JSD",
)


def _liger_jsd(compiled: bool = True):
    """Liger-Kernel's LigerFusedLinearJSDLoss (beta=0: forward KL over the whole vocabulary, computing the
    teacher's logits itself, chunked; torch.compile'd unless `compiled=False`), or None where liger-kernel is
    not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    return LigerFusedLinearJSDLoss(
        weight_hard_loss=0.5, weight_soft_loss=1.0, beta=0.0, chunk_size=1024, compiled=compiled
    )


def online_step(name: str, student, teacher, batch, spec: LossSpec, liger=None):
    """The loss of one packed batch for one contender (the caller runs backward and the optimizer).

    offline: the cache's top-k and kdcache's sparse loss (StudentLoss). online, dense: the teacher's full
    logits every step and the forward KL over all V plus 0.5 CE (as TRL's GKD at beta 0 and torchtune's
    ForwardKLLoss compute it). online, Liger: the teacher's final hidden states every step and Liger's fused
    linear JSD at beta 0 (the same dense KL without [T, V] logits)."""
    import torch
    import torch.nn.functional as F

    from train_student.model import StudentLoss

    if name == ONLINE_CONTENDERS[0]:
        loss, _ = StudentLoss(student)(
            batch.input_ids, batch.position_ids, batch.topk_ids, batch.topk_logprobs, batch.labels, spec=spec
        )
        return loss
    trained = batch.labels != -100
    kw = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    with torch.no_grad():
        t_hidden = teacher.get_decoder()(**kw).last_hidden_state[0][trained]
    s_hidden = student.get_decoder()(**kw).last_hidden_state[0][trained]
    labels = batch.labels[trained]
    s_weight, t_weight = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    if name == ONLINE_CONTENDERS[2]:
        return liger(s_hidden, s_weight, t_hidden, t_weight, labels)
    with torch.no_grad():
        t_logp = F.log_softmax(t_hidden @ t_weight.T, dim=-1)
    s_logp = F.log_softmax(s_hidden @ s_weight.T, dim=-1)
    kd = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    return kd + 0.5 * F.nll_loss(s_logp, labels)


def bench_online(cache: Path, args) -> list[dict]:
    """Seconds per training step of each contender on the same packed batches, interleaved over args.steps
    rounds in one process (median), after one warm-up round; and the cache's cost: the teacher forward and
    top-k per token, which `kdcache cache` pays once. Break-even: the student epochs after which the cache
    has paid for itself, cache_s_per_token / (online_s_per_token - offline_s_per_token)."""
    import statistics

    import torch

    from formats import CacheReader
    from train_student.data import ExampleStream, Packer

    student, teacher = _bench_student(args.layers), _bench_student(args.teacher_layers).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    reader = CacheReader(cache, shuffle=False, epochs=None)
    packer = Packer(ExampleStream([reader]), max_tokens=args.tokens, k=int(reader.manifest["codec"]["k"]))
    batches = [next(packer) for _ in range(args.steps + 1)]
    spec = LossSpec(kd_weight=1.0, ce_weight=0.5, chunk_size=args.chunk_size)
    liger = _liger_jsd()
    names = [n for n in ONLINE_CONTENDERS if liger is not None or n != ONLINE_CONTENDERS[2]]
    times: dict[str, list[float]] = {n: [] for n in names + ["cache"]}
    for i, batch in enumerate(batches):
        for name in names:
            t0 = time.perf_counter()
            online_step(name, student, teacher, batch, spec, liger).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():  # what the cache stage computes per sequence (the codec's encode is ~1M positions/s)
            logits = teacher(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
            torch.log_softmax(logits.float(), dim=-1).topk(args.k, dim=-1)
        times["cache"].append(time.perf_counter() - t0)
    tokens = batches[0].n_tokens
    per_token = {n: statistics.median(t[1:]) / tokens for n, t in times.items()}
    rows = []
    for name in names:
        row = {"contender": name, "s_per_step": per_token[name] * tokens, "tokens_per_s": 1 / per_token[name]}
        row["vs_offline"] = per_token[name] / per_token[names[0]]
        gain = per_token[name] - per_token[names[0]]
        if name != names[0]:  # an online contender: how many student epochs the cache takes to pay back
            row["break_even_epochs"] = per_token["cache"] / gain if gain > 0 else float("inf")
        rows.append(row)
    rows.append(
        {"contender": "the cache itself (teacher forward + top-k, once)", "s_per_step": per_token["cache"] * tokens}
    )
    rows[-1]["tokens_per_s"] = 1 / per_token["cache"]
    if liger is None:
        print("(Liger-Kernel is not installed: `pip install liger-kernel` adds its fused JSD to this table)\n")
    return rows


# ---- 4. cross-tokenizer step -----------------------------------------------------------------------
def _offline_tokenizers(texts: list[str], vocab: int):
    """(teacher, student): a byte-level BPE with ChatML (SmolLM2 style) and a Unigram with `▁` pieces, byte
    fallback, <bos> and Gemma's turn markers (Gemma style), both trained on `texts` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab,
            show_progress=False,
            special_tokens=["<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    teacher = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    teacher.chat_template = CHATML
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    uni.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=vocab,
            unk_token="<unk>",
            show_progress=False,
            special_tokens=["<unk>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        ),
    )
    uni.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    student = PreTrainedTokenizerFast(
        tokenizer_object=uni, bos_token="<bos>", eos_token="<end_of_turn>", unk_token="<unk>"
    )
    student.chat_template = GEMMA_STYLE
    return teacher, student


def make_xtok_cache(out: Path, k: int, vocab: int, max_length: int):
    """A cache of the Tulu sample as `kdcache cache` writes it for the offline teacher tokenizer (its files
    and the conversations included; top-k rows from the bench data, ids folded into its vocabulary).
    Returns (cache, the student's tokenizer)."""
    from formats import CacheWriter, CodecConfig, Example
    from formats.template import ChatTemplater, TemplateReject
    from formats.tokenizer_files import save_tokenizer_files
    from formats.tokenizer_id import tokenizer_info

    if not TULU.exists():
        raise SystemExit(f"{TULU}: the Tulu 3 sample is needed for --parts xtok (set KDCACHE_TULU_SAMPLE)")
    records = [json.loads(line) for line in TULU.read_text(encoding="utf-8").splitlines() if line.strip()]
    teacher, student = _offline_tokenizers([m["content"] for r in records for m in r["messages"]], vocab)
    d = np.load(DATA)
    ids, lps = d["ids"][:, :k] % len(teacher), d["logprobs"][:, :k]
    templater = ChatTemplater(teacher, max_length=max_length)
    prov = {
        "tokenizer": tokenizer_info(teacher, "bench-bpe"),
        "teacher": {"name_or_path": "bench"},
        "template": {"messages_in_meta": True, "end_of_turn_ids": sorted(templater.eot_ids)},
    }
    row = 0
    with CacheWriter(out, codec=CodecConfig(k=k), provenance=prov) as w:
        for r in records:
            try:
                t = templater.score(r)
            except TemplateReject as exc:  # e.g. no assistant token within --tokens: kept as a reject
                w.reject(r["id"], exc.reason, r.get("source") or "")
                continue
            n = len(t.target_positions)
            take = np.arange(row, row + n) % len(ids)
            row += n
            w.write(
                Example(
                    id=t.id,
                    input_ids=t.input_ids,
                    target_positions=t.target_positions,
                    topk_ids=ids[take].astype(np.int32),
                    topk_logprobs=lps[take],
                    target_logprobs=lps[take, 0].copy(),
                    target_ranks=np.ones(n, np.int32),
                    meta={"messages": r["messages"]},
                )
            )
        w.manifest["tokenizer_files"] = save_tokenizer_files(teacher, out)
    return out, student


def bench_xtok(args) -> list[dict]:
    """Alignment alone (positions/s), then the training loop of part 3 for the Unigram student (hybrid)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from formats import CacheReader
    from formats.tokenizer_files import load_cache_tokenizer
    from train_student.xtok.align import Aligner, student_example
    from train_student.data import AlignedStream, ExampleStream, Packer
    from train_student.model import StudentLoss
    from train_student.xtok.template import check_student_rendering, resolve_student_template
    from train_student.xtok.vocab_map import build_vocab_map

    with tempfile.TemporaryDirectory() as tmp:
        cache, student_tok = make_xtok_cache(Path(tmp) / "cache", args.k, args.xtok_vocab, args.tokens)
        teacher_tok = load_cache_tokenizer(cache)
        template = resolve_student_template(None, student_tok)
        bos = check_student_rendering(student_tok, template)["bos_token_id"]
        aligner = Aligner(teacher_tok, student_tok, template, bos_id=bos)
        vmap = build_vocab_map(teacher_tok, student_tok)
        examples = list(CacheReader(cache))
        t0 = time.perf_counter()
        aligned = [student_example(ex, aligner, vmap, "hybrid") for ex in examples]
        align_s = time.perf_counter() - t0
        positions = sum(len(ex.target_positions) for ex in aligned)
        frac = float(np.mean([ex.meta["aligned_fraction"] for ex in aligned]))

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(student_tok),
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=args.layers,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            attn_implementation="sdpa",
        )
        module = StudentLoss(LlamaForCausalLM(cfg))
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        reader = CacheReader(cache, shuffle=True, epochs=None)
        stream = AlignedStream(ExampleStream([reader]), aligner, vmap, "hybrid")
        packer = Packer(stream, max_tokens=args.tokens, k=args.k)
        spec = LossSpec(kd_weight=1.0, ce_weight=0.5, chunk_size=args.chunk_size, cross_tokenizer="hybrid")
        wait, total, _ = timed_steps(module, opt, packer, spec, args.steps)  # step 0 also starts the alignment thread
        stream.close()
    return [
        {
            "examples": len(examples),
            "align_positions_per_s": positions / align_s,
            "aligned_fraction": frac,
            "vocab": len(student_tok),
            "tokens_per_step": args.tokens,
            "s_per_step": total / args.steps,
            "data_wait_frac": wait / total,
        }
    ]


# ---- table -----------------------------------------------------------------------------------------
def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """One part's result: its markdown table and a blank line."""
    print(table(rows, cols) + "\n", flush=True)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        body.append(
            "| "
            + " | ".join(("{:" + c[2] + "}").format(r[c[0]]) if c[0] in r else str(r.get("error", "-")) for c in cols)
            + " |"
        )
    return "\n".join([head, sep, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kdcache bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--parts",
        default="loss,reader,step",
        help="comma-separated: loss, reader, step, xtok (a "
        "student with another tokenizer: alignment throughput and data wait), hf (the step in "
        "KDTrainer and in a plain full-logit Trainer against kdcache's loop), online (offline KD from the cache "
        "against online KD with the teacher every step: dense KL, Liger's fused JSD; the cache's break-even)",
    )
    p.add_argument("--xtok-vocab", type=int, default=8192, help="xtok part: tokens of each offline-trained tokenizer")
    p.add_argument("--tokens", type=int, default=4096, help="T: tokens per loss call / packed sequence")
    p.add_argument("--vocab", type=int, default=49152, help="V of the loss benchmark")
    p.add_argument("--hidden", type=int, default=576, help="D of the loss benchmark")
    p.add_argument("--k", type=int, default=64, help="teacher entries per position")
    p.add_argument(
        "--impls",
        default="naive,chunked,liger",
        help="kd_loss impls to compare; IMPL@REV runs git revision REV's loss_torch.py (e.g. chunked@HEAD~3); "
        "liger / liger-eager: Liger-Kernel's fused linear JSD at beta 0 (dense KL over V against a teacher's "
        "hidden states and head), torch.compile'd / eager, where liger-kernel is installed",
    )
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk for impl=chunked")
    p.add_argument("--iters", type=int, default=3, help="timed loss iterations after one warm-up (best is reported)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers of the step benchmark's student")
    p.add_argument(
        "--teacher-layers", type=int, default=30, help="online part: the teacher's layers (SmolLM2-135M: 30)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    p.add_argument("--dtypes", default="float32,bf16-mixed", help="step part: student dtypes to compare")
    p.add_argument(
        "--cache",
        default=None,
        help="cache for the reader/step parts (default: one made from "
        "bench/data/smollm2_tulu_top128.npz in a temporary folder)",
    )
    p.add_argument("--_loss-one", dest="loss_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_hf-one", dest="hf_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.impls = [x for x in args.impls.split(",") if x]
    if args.loss_one:
        print(
            json.dumps(
                loss_one(args.loss_one, args.tokens, args.vocab, args.hidden, args.k, args.iters, args.chunk_size)
            )
        )
        return 0
    if args.hf_one:
        print(json.dumps(hf_one(args.hf_one, Path(args.cache), args)))
        return 0
    parts = set(args.parts.split(","))
    import torch

    from formats.common.hardware import auto_dtype, cpu_summary

    auto = "bf16-mixed" if auto_dtype()[0] == "bfloat16" else "float32"
    print(f"CPU: {cpu_summary()}; load average {os.getloadavg()[0]:.1f}; `--dtype auto` here: {auto}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={args.tokens}, V={args.vocab}, "
        f"D={args.hidden}, K={args.k}\n"
    )
    if "loss" in parts:
        print(f"### kd_loss forward + backward (best of {args.iters})\n")
        print_table(
            bench_loss(args),
            [
                ("impl", "impl", ""),
                ("s_per_step", "s / step", ".2f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("peak_extra_mb", "peak extra memory (MB)", ",.0f"),
            ],
        )
    if parts & {"reader", "step", "hf", "online"}:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(args.cache) if args.cache else make_cache(Path(tmp) / "cache", args.k)
            if "reader" in parts:
                print("### reader\n")
                print_table(
                    bench_reader(cache, args.tokens),
                    [
                        ("what", "path", ""),
                        ("examples_per_s", "examples/s", ",.0f"),
                        ("positions_per_s", "positions/s", ",.0f"),
                    ],
                )
            if "step" in parts:
                print(f"### training step (random {args.layers}-layer SmolLM2-width student, chunked loss)\n")
                rows = [bench_step(cache, args, dtype) for dtype in args.dtypes.split(",") if dtype]
                for row in rows:
                    row["dtype"] += " (auto)" if row["dtype"] == auto else ""
                print_table(
                    rows,
                    [
                        ("dtype", "student dtype", ""),
                        ("tokens_per_step", "tokens/step", ""),
                        ("s_per_step", "s / step", ".2f"),
                        ("tokens_per_s", "tokens/s", ",.0f"),
                        ("data_wait_frac", "waiting for data", ".2%"),
                        ("peak_rss_mb", "peak RSS (MB)", ",.0f"),
                    ],
                )
            if "hf" in parts:
                print(
                    f"### the same step in transformers' Trainer (random {args.layers}-layer SmolLM2-width "
                    f"student, float32, ~{args.tokens} tokens packed per step, {args.steps} steps after one warm-up; "
                    "a fresh process each)\n"
                )
                print_table(
                    bench_hf(cache, args),
                    [
                        ("contender", "loop", ""),
                        ("s_per_step", "s / step", ".2f"),
                        ("tokens_per_s", "tokens/s", ",.0f"),
                        ("vs_kdcache", "time / kdcache loop", ".2f"),
                        ("peak_extra_mb", "peak RSS growth (MB)", ",.0f"),
                    ],
                )
            if "online" in parts:
                print(
                    f"### offline vs online KD (a random {args.teacher_layers}-layer teacher and {args.layers}-layer "
                    f"student of SmolLM2's width, float32, {args.tokens} tokens packed per step, the same batches; "
                    f"median of {args.steps} interleaved rounds after one warm-up)\n"
                )
                print_table(
                    bench_online(cache, args),
                    [
                        ("contender", "training step", ""),
                        ("s_per_step", "s / step", ".2f"),
                        ("tokens_per_s", "tokens/s", ",.0f"),
                        ("vs_offline", "time / offline", ".2f"),
                        ("break_even_epochs", "cache pays for itself after (student epochs)", ".2f"),
                    ],
                )
    if "xtok" in parts:
        print(
            f"### a student with another tokenizer (hybrid; random {args.layers}-layer SmolLM2-width student, "
            "chunked loss)\n"
        )
        print_table(
            bench_xtok(args),
            [
                ("examples", "Tulu examples", ""),
                ("align_positions_per_s", "alignment positions/s", ",.0f"),
                ("aligned_fraction", "aligned", ".2f"),
                ("vocab", "student vocab", ""),
                ("tokens_per_step", "tokens/step", ""),
                ("s_per_step", "s / step", ".2f"),
                ("data_wait_frac", "waiting for data", ".2%"),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
