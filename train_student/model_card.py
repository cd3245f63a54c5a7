"""The model card (final/README.md) of a student trained by `kdcache train`, so final/ can be uploaded to the
hub as it is (`kdcache train --push-to-hub` uploads the folder unchanged).

Built with huggingface_hub's ModelCard / ModelCardData: `library_name: transformers`, the student's init as
`base_model` (a hub id; a local folder is named in the body), the caches' hub ids as `datasets`, the tags,
the held-out evaluation as `model-index` results, and a `kdcache` section with the run: every stage's
caches and loss (LossSpec: kd/ce weights, temperature, kind, tail, impl), steps, learning rate, batch, and
per cache its teacher (id, revision, weight hashes) and the sha256 of its manifest.json. A cache's manifest
is untrusted input (a cache from a stranger): every value taken from it is escaped to one line of text
(formats.card.card_value) before it reaches the header or the body.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from formats.card import card_value, header_yaml
from formats.common.version import kdcache_version
from formats.safe_write import write_text_atomic
from formats.schema import CARD_NAME, MANIFEST_NAME

TAGS = ["knowledge-distillation", "kdcache"]
HUB_DATASETS = "hf://datasets/"
# The held-out metrics kdcache train logs (train_student.loss.eval_row): (metrics.jsonl key, model-index type, name)
EVAL_METRICS = (
    ("kl", "kl_divergence", "KL from the teacher to the student, held out"),
    ("ce", "cross_entropy", "cross-entropy on the reference tokens, held out"),
    ("ppl", "perplexity", "perplexity, held out"),
    ("top1_agreement", "top1_agreement", "top-1 agreement with the teacher, held out"),
)


CACHE_KEYS = ("cache", "manifest_sha256", "teacher", "teacher_revision", "teacher_weights_sha256", "dataset")


def _opt(value) -> str | None:
    return None if value is None else card_value(value)


def _hub_repo(target: str) -> str | None:
    """`user/name` of a cache read from hf://datasets/user/name[@rev][/...]; None for a folder or other URL."""
    if not str(target).startswith(HUB_DATASETS):
        return None
    parts = str(target)[len(HUB_DATASETS) :].split("/")
    return "/".join(parts[:2]).split("@")[0] if len(parts) >= 2 else None


def _is_hub_model(name: str | None) -> bool:
    """A hub model id (user/name) rather than a local folder."""
    return bool(name) and name.count("/") == 1 and not Path(name).expanduser().exists() and "://" not in name


def cache_record(path: str, manifest: dict) -> dict:
    """What the card says of one training cache, taken while training starts (a hub cache is reachable
    then): where it was read from, the sha256 of its manifest.json (read again through formats.trust, as
    every read of a cache is), its teacher, dataset, license and size. Values are the manifest's, as they are
    (escaped when the card is written)."""
    from formats.manifest import MAX_MANIFEST_BYTES, open_cache

    raw = open_cache(path).read_bytes(MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES, listed_in="the cache")
    section = lambda key: manifest.get(key) if isinstance(manifest.get(key), dict) else {}  # noqa: E731
    teacher, dataset, counts = section("teacher"), section("dataset"), section("counts")
    return {
        "cache": str(path),
        "hub_id": _hub_repo(path),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "teacher": teacher.get("name_or_path"),
        "teacher_revision": teacher.get("commit") or teacher.get("revision"),  # the resolved commit, else as given
        "teacher_weights_sha256": teacher.get("weights_sha256"),
        "dataset": dataset.get("name"),
        "license": section("license").get("id"),
        "k": manifest["codec"]["k"],
        "mode": manifest.get("mode", "score"),
        "examples": counts.get("examples"),
        "positions": counts.get("positions"),
    }


def eval_rows(run_dir: Path) -> list[dict]:
    """The run's held-out evaluations from metrics.jsonl (first: before training, last: the student's)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "eval"]


def _loss(stage, cfg, method: str) -> dict:
    from train_student.loss_options import LossSpec

    return dataclasses.asdict(LossSpec.for_stage(stage, cfg, method))


def card_data(cfg, stages, methods: list[str], caches: list[list[dict]], step: int, world: int, evals: list[dict]):
    """The card's YAML header as a huggingface_hub ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    name = card_value(Path(cfg.out).name or "student")
    flat = [c for stage_caches in caches for c in stage_caches]
    hub_caches = sorted({card_value(c["hub_id"]) for c in flat if c["hub_id"]})
    final = evals[-1] if evals else {}
    results = [
        EvalResult(
            task_type="text-generation",
            task_name="held-out distillation metrics (kdcache train)",
            dataset_type=card_value(flat[0]["hub_id"] or flat[0]["cache"]) if flat else "unknown",
            dataset_name=f"held-out {cfg.eval_fraction:g} of the training caches' examples",
            dataset_split="held-out",
            metric_type=metric,
            metric_name=label,
            metric_value=float(final[key]),
        )
        for key, metric, label in EVAL_METRICS
        if isinstance(final.get(key), (int, float))
    ]
    init = cfg.student or cfg.init_from_teacher
    return ModelCardData(
        model_name=name,
        library_name="transformers",
        base_model=card_value(init) if _is_hub_model(init) else None,
        datasets=hub_caches or None,
        tags=list(TAGS),
        eval_results=results or None,
        kdcache={
            "kdcache_version": kdcache_version(),
            "init": {
                "student": _opt(cfg.student),
                "init_from_teacher": _opt(cfg.init_from_teacher),
                "keep_layers": cfg.keep_layers,
            },
            "steps": step,
            "optimizer": {
                "lr": cfg.lr,
                "min_lr_ratio": cfg.min_lr_ratio,
                "warmup_steps": cfg.warmup_steps,
                "weight_decay": cfg.weight_decay,
                "grad_clip": cfg.grad_clip,
            },
            "batch": {"max_tokens": cfg.max_tokens, "grad_accum": cfg.grad_accum, "processes": world},
            "dtype": cfg.dtype,
            "stages": [
                {
                    "name": card_value(stage.name),
                    "steps": stage.steps,
                    "epochs": stage.epochs,
                    "fraction": stage.fraction,
                    "loss": _loss(stage, cfg, method),
                    "caches": [{key: _opt(c[key]) for key in CACHE_KEYS} for c in stage_caches],
                }
                for stage, method, stage_caches in zip(stages, methods, caches)
            ],
            "eval": {key: final.get(key) for key, _, _ in EVAL_METRICS if key in final} or None,
        },
    )


def _cell(value, default: str = "not recorded") -> str:
    return default if value is None else f"`{card_value(value)}`"


def card_body(cfg, stages, methods, caches, step: int, world: int, evals: list[dict]) -> str:
    """The Markdown under the header: the init, the caches, the settings, the evaluation, how to load it."""
    name = card_value(Path(cfg.out).name or "student")
    init = (
        f"{_cell(cfg.student)}"
        if cfg.student
        else f"{_cell(cfg.init_from_teacher)} pruned to its layers {_cell(cfg.keep_layers)}"
    )
    cache_rows = "\n".join(
        f"| {card_value(stage.name)} | {_cell(c['hub_id'] or c['cache'])} | {_cell(c['teacher'])} | "
        f"{_cell(c['teacher_revision'])} | {_cell(c['teacher_weights_sha256'])} | {_cell(c['manifest_sha256'])} | "
        f"{card_value(c['k'])} | {card_value(c['examples'])} | {_cell(c['license'], 'unknown')} |"
        for stage, stage_caches in zip(stages, caches)
        for c in stage_caches
    )
    stage_rows = "\n".join(
        f"| {card_value(stage.name)} | {card_value(stage.steps)} | {_loss_cell(_loss(stage, cfg, method))} |"
        for stage, method in zip(stages, methods)
    )
    first, final = (evals[0], evals[-1]) if evals else ({}, {})
    eval_rows_md = "\n".join(
        f"| {label} | {_number(first.get(key))} (step {card_value(first.get('step'))}) | "
        f"{_number(final.get(key))} (step {card_value(final.get('step'))}) |"
        for key, _, label in (*EVAL_METRICS, ("student_topk_mass", "", "student's mass on the teacher's top-k"))
    )
    return f"""# {name}

A student trained with kdcache (version {kdcache_version()}) by knowledge distillation from cached teacher
top-k log-probabilities: `kdcache train`, {step} optimizer steps.

| | |
|---|---|
| base model (the student's init) | {init} |
| optimizer | AdamW, lr {cfg.lr:g} (warmup {cfg.warmup_steps} steps, then cosine to {cfg.min_lr_ratio:g} x lr), weight decay {cfg.weight_decay:g}, gradient clip {cfg.grad_clip:g} |
| batch | {cfg.max_tokens} tokens per micro-batch x {cfg.grad_accum} micro-batches x {world} processes |
| dtype | {card_value(cfg.dtype)} |

## Caches (what it was distilled from)

| stage | cache | teacher | teacher revision | teacher weights sha256 | manifest.json sha256 | k | examples | license |
|---|---|---|---|---|---|---|---|---|
{cache_rows}

## KD settings

total loss = ce_weight x CE + kd_weight x temperature^2 x KD (+ uld_weight x ULD for another tokenizer)

| stage | steps | loss |
|---|---|---|
{stage_rows}

## Held-out evaluation

On the held-out {cfg.eval_fraction:g} of the caches' examples (split by a hash of the example id): KL to the
teacher on its top-k, cross-entropy on the dataset's tokens, perplexity, top-1 agreement.

| metric | before training | this student |
|---|---|---|
{eval_rows_md}

## Use it

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("USER/NAME")    # this repo, or the path of this folder
    tokenizer = AutoTokenizer.from_pretrained("USER/NAME")

`kdcache eval FOLDER --tasks ...` scores it on lm-evaluation-harness.
"""


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _loss_cell(spec: dict) -> str:
    return ", ".join(f"{key}={card_value(value)}" for key, value in spec.items())


def card_text(cfg, stages, methods, caches, step: int, world: int, run_dir: Path) -> str:
    """The whole card, parsed back by ModelCard (its header must be valid card metadata before it is written)."""
    from huggingface_hub import ModelCard

    evals = eval_rows(run_dir)
    data = card_data(cfg, stages, methods, caches, step, world, evals)
    text = f"---\n{header_yaml(data)}\n---\n{card_body(cfg, stages, methods, caches, step, world, evals)}"
    ModelCard(text)  # raises unless the header parses back as card metadata (str(card) would fold it again)
    return text


def write_model_card(folder: Path, *, cfg, stages, methods, caches, step: int, world: int, run_dir: Path) -> Path:
    """Write `folder`/README.md through formats.safe_write (never through a link). `methods`: each stage's
    cross-tokenizer method ("off": the student's own tokenizer); `caches`: each stage's cache_record()s."""
    path = Path(folder) / CARD_NAME
    write_text_atomic(path, card_text(cfg, stages, methods, caches, step, world, run_dir))
    return path
