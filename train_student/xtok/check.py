"""May this student train on this cache, tokenizer-wise? (issue 12, item 8)

`check_student_tokenizer(manifest, student_tokenizer, cross_tokenizer)` decides the path before
training starts and returns it: "off" (the ordinary sparse KL over the teacher's vocabulary) or
the cross-tokenizer method ("exact-map", "uld", "hybrid").

- `--cross-tokenizer auto`: off when the student's tokenizer fingerprint equals the cache's, else
  AUTO_METHOD.
- A different tokenizer with `off` is an InputError whose message names `--cross-tokenizer`.
- Any method needs a cache that carries the teacher's tokenizer files (`tokenizer_files`, else the
  message gives the `kdcache add-tokenizer` command) and the conversations (`meta["messages"]`,
  recorded as `extra.template.messages_in_meta`; caches written before must be made again, since
  score mode did not keep them).

The student's chat template is checked by train_student/xtok/template.py.
"""

from __future__ import annotations

from formats.errors import InputError
from formats.manifest import manifest_get
from formats.tokenizer_files import add_tokenizer_command
from formats.tokenizer_id import fingerprint_matches
from train_student.loss_options import CROSS_TOKENIZER_MODES

AUTO_METHOD = "hybrid"  # what `auto` turns on: exact-map where token strings map, ULD for the rest
OPTION = "--cross-tokenizer"


def check_student_tokenizer(manifest: dict, student_tokenizer, cross_tokenizer: str, cache: str = "the cache") -> str:
    """The path the student trains on: "off" or a cross-tokenizer method (InputError when not possible)."""
    if cross_tokenizer not in CROSS_TOKENIZER_MODES:
        raise InputError(f"{OPTION} {cross_tokenizer!r}: must be one of {', '.join(CROSS_TOKENIZER_MODES)}")
    recorded = manifest_get(manifest, ("tokenizer", "fingerprint"))
    same = recorded is None or fingerprint_matches(
        student_tokenizer, manifest.get("tokenizer")
    )  # None: older checks decide
    mode = ("off" if same else AUTO_METHOD) if cross_tokenizer == "auto" else cross_tokenizer
    if mode == "off":
        if not same:
            raise InputError(
                f"{cache}: the student's tokenizer is not the teacher's ({manifest_get(manifest, ('tokenizer', 'name_or_path'))}, "
                f"fingerprint {recorded[:12]}...): the cached token ids mean other tokens to it. Pass {OPTION} auto "
                "(or exact-map, uld, hybrid) to align the two tokenizers, or train a student with the teacher's tokenizer"
            )
        return "off"
    if manifest.get("tokenizer_files") is None:
        raise InputError(
            f"{cache} carries no tokenizer files (written before caches stored the teacher's tokenizer); "
            f"{OPTION} {cross_tokenizer} needs them: `{add_tokenizer_command(cache, manifest)}`"
        )
    if not manifest_get(manifest, ("extra", "template", "messages_in_meta")):
        raise InputError(
            f'{cache} does not store its conversations (meta["messages"]; caches written before they '
            f"were stored), which {OPTION} {cross_tokenizer} needs to render them with the student's "
            "template; make the cache again with this version of `kdcache cache`"
        )
    return mode
