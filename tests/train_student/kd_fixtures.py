"""Helpers for the trainer tests: a 256-token word-level tokenizer, a random 2-layer Llama teacher
(hidden 64), a random student of the same shape, and a small cache of the teacher's own top-k."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
VOCAB = 256
K = 8


def make_tokenizer(vocab: int = VOCAB, extra: str = ""):
    """A word-level fast tokenizer with tokens <unk>, <s>, </s>, w3..w{vocab-1} (+`extra` renamed)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}{extra if i == vocab - 1 else ''}" for i in range(3, vocab)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_model(seed: int, layers: int = 2, vocab: int = VOCAB, scale: float = 0.0, attn: str = "sdpa"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if scale:
        with torch.no_grad():  # larger embeddings: peaked (learnable) teacher distributions
            model.model.embed_tokens.weight.normal_(0.0, scale)
    return model


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_cache(
    teacher,
    tokenizer,
    out: Path,
    *,
    n: int = 48,
    seed: int = 0,
    k: int = K,
    min_len: int = 12,
    max_len: int = 40,
    row_group_positions: int = 65536,
) -> Path:
    """A cache of `n` random sequences scored by `teacher` (its own top-k at every position >= 1)."""
    import torch

    from formats.tokenizer_id import FINGERPRINT_VERSION, tokenizer_fingerprint
    from formats import CacheWriter, CodecConfig, Example

    rng = np.random.default_rng(seed)
    provenance = {
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "fingerprint_version": FINGERPRINT_VERSION,
            "vocab_size": VOCAB,
            "name_or_path": "tiny-wordlevel",
        },
        "teacher": {"name_or_path": "tiny-teacher"},
    }
    with CacheWriter(
        out, codec=CodecConfig(k=k, hot=64), provenance=provenance, row_group_positions=row_group_positions
    ) as w:
        for i in range(n):
            L = int(rng.integers(min_len, max_len + 1))
            ids = rng.integers(3, VOCAB, size=L).astype(np.int32)
            with torch.no_grad():
                logp = torch.log_softmax(teacher(torch.from_numpy(ids).long()[None]).logits[0].double(), -1)
            # trained positions: the second half (an "assistant" turn), as chat caches do
            tpos = np.arange(L // 2, L, dtype=np.int32)
            rows = logp[tpos - 1]
            top = torch.topk(rows, k, dim=-1)
            target = rows.gather(1, torch.from_numpy(ids[tpos]).long()[:, None])[:, 0]
            ranks = (rows > target[:, None]).sum(1) + 1
            w.write(
                Example(
                    id=f"ex{i:04d}",
                    input_ids=ids,
                    target_positions=tpos,
                    topk_ids=top.indices.numpy().astype(np.int32),
                    topk_logprobs=top.values.numpy().astype(np.float32),
                    target_logprobs=target.numpy().astype(np.float32),
                    target_ranks=ranks.numpy().astype(np.int32),
                )
            )
    return out


def reorder_cache(src: Path, out: Path, order: list[str]) -> Path:
    """A copy of cache `src` holding the examples `order` (ids), in that order, one per row group."""
    from formats import CacheReader, CacheWriter, CodecConfig

    reader = CacheReader(src)
    by_id = {ex.id: ex for ex in reader}
    m = reader.manifest
    with CacheWriter(
        out,
        codec=CodecConfig.from_dict(m["codec"]),
        row_group_positions=1,
        provenance={"tokenizer": m["tokenizer"], "teacher": m["teacher"]},
    ) as w:
        for ex_id in order:
            w.write(by_id[ex_id])
    return out


def python_env() -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


PYTHON = sys.executable


def train_args(student, cache, out, **flags) -> list[str]:
    """`train` arguments for a tiny quiet run; flags as keyword arguments (True = bare flag)."""
    base = dict(
        student=student,
        cache=cache,
        out=out,
        max_tokens=64,
        lr=3e-3,
        warmup_steps=2,
        eval_fraction=0.2,
        eval_every=0,
        save_every=0,
        log_every=1,
        seed=0,
        dtype="float32",
    )  # exact comparisons: not --dtype auto, which is bf16-mixed on bf16 CPUs
    base.update(flags)
    args = ["train"]
    for key, value in base.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args + ["--no-progress", "--no-tensorboard"]


# Runs `python -m train_student ARGS`, after patching checkpoint.save to send SIGNAL to the process
# itself once the checkpoint of step AT is written (AT = 0: no signal).
_WRAPPER = """
import os, signal, sys
from train_student import checkpoint
from train_student.__main__ import main
AT, SIG, ARGS = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
orig = checkpoint.save
def save(*a, **kw):
    out = orig(*a, **kw)
    if AT and kw["step"] == AT:
        os.kill(os.getpid(), SIG)
    return out
checkpoint.save = save
sys.exit(main(ARGS))
"""


def run_train(args: list[str], *, signal_at: int = 0, sig: int = 9, timeout: int = 180):
    import subprocess

    return subprocess.run(
        [PYTHON, "-c", _WRAPPER, str(signal_at), str(sig), *args],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def final_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def read_metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
