"""Safety checks between a cache and the student: refuse what the student would misread, warn when the
teacher signal is thin.

- `check_cache_fits_student`: the cache's tokenizer and ids against the student's (per cache, at start).
- `check_example_fits_student`: one example's spans and ids (every example the stream hands out).
- `check_same_teacher`: one stage distils one teacher.
- `check_signal`: a warning for small k or much teacher mass outside the cached entries.
"""

from __future__ import annotations

import logging

import numpy as np

from formats import CacheReader, Example, FormatError, IncompatibleCachesError, InputError
from formats.manifest import manifest_get
from formats.shard import check_example
from formats.tools import COMPAT_KEYS

log = logging.getLogger("train_student")

TEACHER_KEYS = [key for key in COMPAT_KEYS if key[0] == "teacher"]  # what makes two caches one teacher's
MIN_K = 16  # below this many teacher entries per position, the KD signal is thin
MAX_TAIL_MASS = 0.3  # mean teacher mass outside the cached entries above which we warn


def check_cache_fits_student(
    manifest: dict,
    where: str,
    *,
    fingerprint: str | None,
    tokenizer_vocab: int | None,
    output_size: int,
    cross_tokenizer: bool = False,
) -> None:
    """Refuse a cache whose token ids would mean something else to the student (InputError).

    `fingerprint`: the student tokenizer's at the version the manifest records
    (`formats.tokenizer_id.manifest_fingerprint(tokenizer, manifest["tokenizer"])`), None to skip the check.

    `cross_tokenizer`: the student has another tokenizer and trains on aligned examples
    (`--cross-tokenizer`, train_student/xtok/align.py): the cache's ids are the teacher's, so the tokenizer
    equality checks (vocabulary size, fingerprint) and the teacher's sizes against the student's head
    do not apply; the student's own tokenizer must fit its LM head (`tokenizer_vocab` <= `output_size`),
    and every aligned example is checked by `check_example_fits_student` as usual.

    `output_size` is the student's LM head rows. The cache's tokens (tokenizer.vocab_size) must fit
    it; the teacher's own output size (teacher.output_size, when the manifest records it) may be
    larger (a padded output layer): then only a warning, and `check_example_fits_student` refuses an id that is
    actually out of range. The format version was already checked by `load_manifest`.
    """
    if cross_tokenizer:
        if tokenizer_vocab is not None and int(tokenizer_vocab) > output_size:
            raise InputError(
                f"{where}: the student's tokenizer has {tokenizer_vocab} tokens but its LM head only "
                f"{output_size} rows; use the student's own tokenizer (--tokenizer)"
            )
        return
    tok = manifest.get("tokenizer") or {}
    cache_vocab = tok.get("vocab_size")
    if cache_vocab is not None and tokenizer_vocab is not None and int(cache_vocab) != int(tokenizer_vocab):
        raise InputError(
            f"{where}: the cache was made with a tokenizer of {cache_vocab} tokens "
            f"({tok.get('name_or_path', '?')}), the student's tokenizer has {tokenizer_vocab}; "
            "train a student that shares the teacher's tokenizer"
        )
    if cache_vocab is not None and int(cache_vocab) > output_size:
        raise InputError(
            f"{where}: the cache's vocabulary has {cache_vocab} tokens but the student's LM head "
            f"has only {output_size} rows"
        )
    teacher_out = (manifest.get("teacher") or {}).get("output_size")
    if teacher_out is not None and int(teacher_out) > output_size:
        log.warning(
            "%s: the teacher's output layer has %d rows, the student's %d: a cached teacher id >= %d "
            "(padding rows past the tokenizer's %s tokens) stops training with an error",
            where,
            int(teacher_out),
            output_size,
            output_size,
            cache_vocab,
        )
    if tok.get("fingerprint") and fingerprint and tok["fingerprint"] != fingerprint:
        raise InputError(
            f"{where}: tokenizer fingerprints differ (cache {tok['fingerprint'][:12]}… from "
            f"{tok.get('name_or_path', '?')}, student {fingerprint[:12]}…): same vocabulary size "
            "but different tokens or special tokens; use the teacher's tokenizer"
        )
    if not tok.get("fingerprint"):
        log.warning("%s: the manifest has no tokenizer fingerprint; cannot check the student's tokenizer", where)


def check_example_fits_student(
    ex: Example, where: str, *, input_size: int | None = None, output_size: int | None = None
) -> None:
    """Refuse an example the student would misread, before it reaches a batch (cheap: one pass over its ids).

    Target spans must lie in 1..L-1, sorted, with one teacher row per position (else a label and a
    teacher row land on the wrong token): FormatError. Token ids must index the student's embedding
    (`input_size`) and labels and teacher ids its LM head (`output_size`), else the loss kernel
    reads out of bounds: InputError. A cache read over hf:// may never have been verified.
    """
    where = f"{where}, example {ex.id!r}"
    try:
        check_example(ex)
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}; the cache is damaged, run `kdcache verify` on it") from None
    check_ids_fit_student(ex, where, input_size=input_size, output_size=output_size)


def check_ids_fit_student(ex: Example, where: str, *, input_size: int | None, output_size: int | None) -> None:
    """The id part of `check_example_fits_student`: also what an aligned example (the student's tokens,
    teacher entries mapped to student ids, NaN target logprobs where the student's token has no
    teacher entry) is checked with."""
    ids, teacher = ex.input_ids, ex.topk_ids
    if len(ids) and ids.min() < 0:
        raise FormatError(f"{where}: negative token id {int(ids.min())}; run `kdcache verify` on the cache")
    if teacher.size and teacher.min() < -1:
        raise FormatError(f"{where}: teacher id {int(teacher.min())} (only -1 pads); run `kdcache verify` on the cache")
    if input_size is not None and len(ids) and ids.max() >= input_size:
        raise InputError(f"{where}: token id {int(ids.max())} >= the student's {input_size} embedding rows")
    if output_size is not None:
        labels = ids[ex.target_positions]
        if len(labels) and labels.max() >= output_size:
            raise InputError(f"{where}: label token id {int(labels.max())} >= the student's {output_size} LM head rows")
        if teacher.size and teacher.max() >= output_size:
            raise InputError(
                f"{where}: teacher id {int(teacher.max())} >= the student's {output_size} LM head rows; "
                "the cache's teacher has a larger output layer than the student"
            )


def check_same_teacher(manifests: list[dict], paths: list[str], stage: str, *, allow_mixed: bool) -> None:
    """Refuse a stage that mixes caches of different teachers (IncompatibleCachesError) unless allowed."""
    first = manifests[0]
    for m, path in zip(manifests[1:], paths[1:]):
        for key in TEACHER_KEYS:
            a, b = manifest_get(first, key), manifest_get(m, key)
            if a == b:
                continue
            if allow_mixed:
                log.warning(
                    "stage %s mixes teachers: %s has %s=%r, %s has %r (allow_mixed_teachers)",
                    stage,
                    path,
                    ".".join(key),
                    b,
                    paths[0],
                    a,
                )
                continue
            raise IncompatibleCachesError(
                f"stage {stage}: {path} and {paths[0]} come from different teachers ({'.'.join(key)} {b!r} vs "
                f"{a!r}); one stage distils one teacher: put them in separate stages, or set "
                "allow_mixed_teachers: true (--allow-mixed-teachers) to mix them on purpose"
            )


def check_signal(reader: CacheReader, where: str, sample: int = 64) -> dict:
    """Warn when the cached teacher signal is thin (small k, much mass outside the top-k).

    Returns {"k", "mean_tail_mass"} (tail mass over the first `sample` examples)."""
    k = int(reader.manifest["codec"]["k"])
    if k < MIN_K:
        log.warning(
            "%s: the cache keeps only k=%d teacher entries per position (< %d): the KD signal is thin", where, k, MIN_K
        )
    tails = []
    for i, ex in enumerate(reader):
        if ex.num_targets:
            tails.append(ex.tail_mass)
        if i + 1 >= sample:
            break
    tail = float(np.concatenate(tails).mean()) if tails else 0.0
    if tail > MAX_TAIL_MASS:
        log.warning(
            "%s: the teacher's top-%d misses %.0f%% of its probability mass on average (> %.0f%%); "
            "consider tail='bucket' or a cache with larger k",
            where,
            k,
            100 * tail,
            100 * MAX_TAIL_MASS,
        )
    return {"k": k, "mean_tail_mass": tail}
