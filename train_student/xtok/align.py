"""Cross-tokenizer alignment: which teacher distribution, if any, each student position learns from.

The cache holds one conversation tokenized by the teacher, with the teacher's top-k at every
assistant token. A student with another tokenizer renders the same messages with its own chat
template (the same rules as the teacher's: `formats.template.ChatTemplater`, so the student's
trained positions are its assistant tokens through the end-of-turn token). Then, for each assistant
turn (GOLD/ULD style; docs/CROSS_TOKENIZER.md):

1. Both sides' trained tokens of the turn are turned into bytes (`vocab_map.token_bytes`), so each
   token covers a byte range of the turn's text.
2. The message text (the message's `content`, found in both) is the region both sides spell the
   same way; the template text before and after it joins the region only where both templates
   render it byte for byte the same (so an example aligned with itself is the identity, while
   `<|im_end|>` against `<end_of_turn>` stays unaligned).
3. Inside the region, a *boundary* is a byte offset where both sides have a token boundary. Tokens
   between two consecutive common boundaries form a span: m teacher tokens, n student tokens, the
   same text. A token that ends inside a multi-byte UTF-8 character has a boundary only the other
   side shares if it splits the same character at the same byte; otherwise it merges into the next
   span. Tokens that cross the region's edge (a piece that glues message text to template text)
   are not aligned.

The next-token shift. Teacher row r of the cache is the teacher's distribution for the token at
position `target_positions[r]` given everything before it; a student's row for its token at
position s is its hidden state at s - 1. Two rows are comparable when they predict from the same
text: the teacher's row for the first token of a span and the student's row for the first token of
that span both condition on exactly the text before the span. So each span pairs its first student
position with its first teacher row; the other student positions of a span (mid-span contexts no
teacher row shares) are trained positions without a teacher (CE only). A 1:1 span (one token each
side) predicts the same string on both sides: the vocabulary map can translate the teacher's top-k.

numpy + the two tokenizers; no torch (this runs in the data pipeline's prefetch thread).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from formats.errors import InputError
from formats.example import Example
from formats.common.prefetch import prefetch
from train_student.xtok.template import StudentTemplate, resolve_student_template, with_template
from train_student.xtok.vocab_map import map_topk, token_bytes

__all__ = ["Alignment", "Aligner", "StudentTargets", "student_targets", "student_example", "align_stream"]


@dataclass
class Alignment:
    """One conversation in the student's tokens, and the teacher row paired with each trained position.

    input_ids: int32 [L] the student's rendering; target_positions: int32 [N] its trained positions
    (assistant tokens, 1 <= s < L, increasing); teacher_row: int32 [N] the row of the cached
    teacher arrays whose distribution is paired with the student's distribution for the token at
    target_positions[n] (-1: none); one_to_one: bool [N] the pair comes from a span of one teacher
    and one student token; teacher_spans, student_spans: int32 [S, 2] every aligned span as
    half-open position ranges in the teacher's and the student's input_ids (span i is
    teacher_spans[i] and student_spans[i]).
    """

    id: str
    input_ids: np.ndarray
    target_positions: np.ndarray
    teacher_row: np.ndarray
    one_to_one: np.ndarray
    teacher_spans: np.ndarray
    student_spans: np.ndarray

    @property
    def spans(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The spans as (teacher positions, student positions) tuples (for reading and tests)."""
        return [
            (tuple(range(t0, t1)), tuple(range(s0, s1)))
            for (t0, t1), (s0, s1) in zip(self.teacher_spans.tolist(), self.student_spans.tolist())
        ]

    @property
    def aligned_fraction(self) -> float:
        """Student trained positions that have a teacher row, over all of them."""
        return float((self.teacher_row >= 0).mean()) if len(self.teacher_row) else 0.0


class Aligner:
    """Aligns cached teacher examples to one student tokenizer (build once, call `align` per example).

    Args:
        teacher_tokenizer, student_tokenizer: Hugging Face tokenizers (fast or slow).
        student_template: the resolved template (`student_template.resolve_student_template`: the
            --student-template option, else the tokenizer's own); None resolves it here without the
            option (the tokenizer's own, else the InputError naming --student-template).
        max_length: the student's rendering is truncated to this many tokens (None: no limit).
        bos_id: the BOS the student model needs first (`check_student_rendering`'s "bos_token_id"):
            prepended when the rendering does not start with it, as `render_conversation` does
            (record "prepended"); the student's positions shift by one.
    """

    def __init__(
        self,
        teacher_tokenizer,
        student_tokenizer,
        student_template: StudentTemplate | None = None,
        max_length: int | None = None,
        bos_id: int | None = None,
    ):
        from formats.template import ChatTemplater

        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.student_bytes = (
            self.teacher_bytes if student_tokenizer is teacher_tokenizer else token_bytes(student_tokenizer)
        )
        template = student_template or resolve_student_template(None, student_tokenizer)
        self.templater = ChatTemplater(with_template(student_tokenizer, template.text), max_length=max_length)
        self.max_length, self.bos_id = max_length, bos_id

    def align(
        self, example_id: str, messages: list[dict], teacher_input_ids: np.ndarray, teacher_target_positions: np.ndarray
    ) -> Alignment:
        """Render `messages` for the student and pair its trained positions with teacher rows.

        Args:
            example_id: named in every error.
            messages: the conversation, [{"role", "content"}], assistant replies included.
            teacher_input_ids: int [L_t] the cached tokens; teacher_target_positions: int [N_t]
                the cached trained positions (row r of the teacher arrays predicts the token at
                teacher_target_positions[r]).

        Raises:
            InputError (naming the example, the turn and the side) when the student's template
            cannot render the conversation or drops an assistant message, or when one side's tokens
            do not spell a message's text (they do not belong to these messages, or the tokenizer
            normalizes text).
        """
        from formats.template import TemplateReject

        where = f"example {example_id!r}"
        try:
            student = self.templater.score({"id": example_id, "messages": messages})
        except TemplateReject as exc:
            raise InputError(
                f"{where}: the student's chat template cannot render the conversation "
                f"({exc.reason}); check --student-template"
            ) from None
        student = self._with_bos(student)
        contents = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if not all(isinstance(c, str) for c in contents):
            raise InputError(
                f"{where}: an assistant message's content is not a string; the messages must be "
                "[{'role': ..., 'content': str}]"
            )
        t_ids = np.asarray(teacher_input_ids, np.int64)
        t_pos = np.asarray(teacher_target_positions, np.int64)
        if len(t_ids) and (t_ids.min() < 0 or t_ids.max() >= len(self.teacher_bytes)):
            raise InputError(
                f"{where}: teacher token id {int(t_ids.max())} is outside the teacher "
                f"tokenizer's {len(self.teacher_bytes)} ids (wrong tokenizer for this cache?)"
            )
        t_runs = _runs(t_pos)
        s_pos = student.target_positions.astype(np.int64)
        s_runs = _runs(s_pos)
        _check_turn_count(where, "teacher's cached", len(t_runs), len(contents), truncated=True)
        _check_turn_count(where, "student's", len(s_runs), len(contents), truncated=student.truncated)

        teacher_row = np.full(len(s_pos), -1, np.int32)
        one_to_one = np.zeros(len(s_pos), bool)
        t_spans, s_spans = [], []
        for turn, (t_rows, s_rows) in enumerate(zip(t_runs, s_runs)):
            t_tok = [self.teacher_bytes[i] for i in t_ids[t_pos[t_rows]].tolist()]
            s_tok = [self.student_bytes[i] for i in student.input_ids[s_pos[s_rows]].tolist()]
            content = contents[turn].encode("utf-8")
            last = turn == min(len(t_runs), len(s_runs)) - 1
            t_cut = last and int(t_pos[t_rows[-1]]) == len(t_ids) - 1  # the cache may have cut it (max_length)
            s_cut = last and student.truncated
            t_cuts, s_cuts = _align_turn(t_tok, s_tok, content, f"{where}, assistant turn {turn}", t_cut, s_cut)
            if len(t_cuts) < 2:
                continue
            first_s = s_rows[s_cuts[:-1]]
            teacher_row[first_s] = t_rows[t_cuts[:-1]]
            one_to_one[first_s] = (np.diff(t_cuts) == 1) & (np.diff(s_cuts) == 1)
            t_spans.append(np.stack([t_pos[t_rows[0]] + t_cuts[:-1], t_pos[t_rows[0]] + t_cuts[1:]], axis=1))
            s_spans.append(np.stack([s_pos[s_rows[0]] + s_cuts[:-1], s_pos[s_rows[0]] + s_cuts[1:]], axis=1))
        return Alignment(
            example_id,
            student.input_ids,
            student.target_positions,
            teacher_row,
            one_to_one,
            _stack(t_spans),
            _stack(s_spans),
        )

    def _with_bos(self, student):
        """The rendering with the needed BOS in front (positions shifted by one), cut back to max_length."""
        ids = student.input_ids
        if self.bos_id is None or (len(ids) and ids[0] == self.bos_id):
            return student
        ids = np.concatenate([np.asarray([self.bos_id], ids.dtype), ids])
        positions = student.target_positions + 1
        truncated = student.truncated
        if self.max_length is not None and len(ids) > self.max_length:
            ids, positions, truncated = ids[: self.max_length], positions[positions < self.max_length], True
        return dataclasses.replace(student, input_ids=ids, target_positions=positions, truncated=truncated)


def _stack(spans: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(spans).astype(np.int32) if spans else np.zeros((0, 2), np.int32)


def _runs(positions: np.ndarray) -> list[np.ndarray]:
    """Row indices of `positions` cut into runs of consecutive positions (one run per assistant turn)."""
    if len(positions) == 0:
        return []
    cuts = np.flatnonzero(np.diff(positions) != 1) + 1
    return np.split(np.arange(len(positions)), cuts)


def _check_turn_count(where: str, side: str, runs: int, messages: int, *, truncated: bool) -> None:
    if runs > messages or (runs < messages and not truncated):
        raise InputError(
            f"{where}: the {side} tokens have {runs} assistant turn(s) but the conversation has "
            f"{messages} assistant message(s); a template that drops or merges assistant messages "
            "cannot be aligned (check --student-template, and that the cache's messages are "
            "the ones it scored)"
        )


def _locate(turn: bytes, text: bytes, cut: bool) -> tuple[int, int] | None:
    """The byte range of `text` in one side's turn, else, when the turn was `cut` by max_length, of
    the prefix of `text` that runs to the end of the turn."""
    if (i := turn.find(text)) >= 0:
        return i, i + len(text)
    i = turn.find(text[:1]) if cut else -1
    while i >= 0:
        if text.startswith(turn[i:]):
            return i, len(turn)
        i = turn.find(text[:1], i + 1)
    return None


def _message_regions(t_turn: bytes, s_turn: bytes, content: bytes, where: str, t_cut: bool, s_cut: bool):
    """((ta, tb), (sa, sb)): where both sides spell the message, the same bytes on both. The content
    as it is, else stripped of surrounding whitespace (templates that trim); a side cut by
    max_length contributes the part it has."""
    for text in dict.fromkeys((content, content.strip())):
        if text and (ti := t_turn.find(text)) >= 0 and (si := s_turn.find(text)) >= 0:
            return (ti, ti + len(text)), (si, si + len(text))
    text = content.strip()
    found = [_locate(t_turn, text, t_cut) if text else None, _locate(s_turn, text, s_cut) if text else None]
    for side, region, turn in zip(("teacher", "student"), found, (t_turn, s_turn)):
        if region is None:
            raise InputError(
                f"{where}: the {side}'s tokens of this turn do not spell the assistant message "
                f"(message starts {content[:40].decode('utf-8', 'replace')!r}, the tokens spell "
                f"{turn[:60].decode('utf-8', 'replace')!r}); the tokens do not cover the message text: "
                f"wrong messages for this example, a template that drops the message, or a tokenizer that "
                f"rewrites text (normalizer, unknown tokens)"
            )
    (ta, tb), (sa, sb) = found
    n = min(tb - ta, sb - sa)  # the text both sides have
    return (ta, ta + n), (sa, sa + n)


def _align_turn(t_tok: list[bytes], s_tok: list[bytes], content: bytes, where: str, t_cut: bool, s_cut: bool):
    """The spans of one assistant turn as (teacher cuts, student cuts), run-local token indices (`_spans`).
    `t_cut`, `s_cut`: the side's turn may have been cut short by max_length."""
    t_turn, s_turn = b"".join(t_tok), b"".join(s_tok)
    (ta, tb), (sa, sb) = _message_regions(t_turn, s_turn, content, where, t_cut, s_cut)
    if t_turn[:ta] == s_turn[:sa]:  # the same template text before the message joins the region
        ta = sa = 0
    if t_turn[tb:] == s_turn[sb:]:  # and after it
        tb, sb = len(t_turn), len(s_turn)
    if t_turn[ta:tb] != s_turn[sa:sb]:  # internal invariant: a region spells the same bytes on both sides
        raise AssertionError(f"{where}: aligned regions differ")
    return _spans(_offsets(t_tok), ta, tb, _offsets(s_tok), sa, sb)


def _offsets(tokens: list[bytes]) -> np.ndarray:
    """int64 [n + 1]: token j covers bytes [off[j], off[j + 1]) of the turn."""
    return np.concatenate([[0], np.cumsum([len(b) for b in tokens], dtype=np.int64)])


def _spans(t_off: np.ndarray, ta: int, tb: int, s_off: np.ndarray, sa: int, sb: int):
    """(teacher cuts, student cuts): the token indices at the boundaries common to both sides inside
    the region (teacher bytes [ta, tb) spell the same text as student bytes [sa, sb)); span i is
    teacher tokens [t_cuts[i], t_cuts[i+1]) and student tokens [s_cuts[i], s_cuts[i+1])."""
    t_in, s_in = _inside(t_off, ta, tb), _inside(s_off, sa, sb)
    if t_in is None or s_in is None:
        return _NO_SPANS
    t_bounds = t_off[t_in[0] : t_in[1] + 1] - ta
    s_bounds = s_off[s_in[0] : s_in[1] + 1] - sa
    common = np.intersect1d(t_bounds, s_bounds)
    # "left": a zero-length token at a boundary belongs to the span that starts there.
    return (t_in[0] + np.searchsorted(t_bounds, common, "left"), s_in[0] + np.searchsorted(s_bounds, common, "left"))


_NO_SPANS = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _inside(off: np.ndarray, a: int, b: int) -> tuple[int, int] | None:
    """(first, end) token indices of the tokens lying wholly inside bytes [a, b), or None."""
    first = int(np.searchsorted(off[:-1], a, "left"))
    end = int(np.searchsorted(off[1:], b, "right"))
    return (first, end) if first < end else None


@dataclass
class StudentTargets:
    """The teacher's top-k at each student trained position, ready for `loss_xtok.xtok_loss`.

    Per student trained position n (the rows of `Alignment.target_positions`): topk_ids int32 [N, K]
    student ids where the position is an exact-map target (-1 elsewhere, and for entries without a
    student twin); topk_logprobs float32 [N, K] the paired teacher row's raw logprobs (-inf padding
    and where there is no teacher row; entries merged by `vocab_map.map_topk` on exact rows);
    exact bool [N] (a 1:1 span with at least one mapped entry; never in mode "uld"); aligned bool [N]
    (a teacher row is paired).
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    exact: np.ndarray
    aligned: np.ndarray


def student_targets(
    alignment: Alignment, teacher_topk_ids: np.ndarray, teacher_topk_logprobs: np.ndarray, vmap: np.ndarray, mode: str
) -> StudentTargets:
    """Gather each student position's paired teacher row and, on 1:1 spans, map its ids to the student's
    vocabulary (modes "exact-map" and "hybrid"; mode "uld" keeps every row vocabulary-free)."""
    from train_student.loss_options import XTOK_MODES

    if mode not in XTOK_MODES:
        raise InputError(f"cross-tokenizer mode must be one of {XTOK_MODES}, got {mode!r}")
    rows = alignment.teacher_row
    aligned = rows >= 0
    n, k = len(rows), teacher_topk_ids.shape[1]
    ids = np.full((n, k), -1, np.int32)
    logprobs = np.full((n, k), -np.inf, np.float32)
    ids[aligned] = teacher_topk_ids[rows[aligned]]
    logprobs[aligned] = teacher_topk_logprobs[rows[aligned]]
    exact = np.zeros(n, bool)
    if mode != "uld":
        candidates = aligned & alignment.one_to_one
        mapped, merged = map_topk(ids[candidates], logprobs[candidates], vmap)
        exact[candidates] = (mapped >= 0).any(axis=1)
        ids[candidates], logprobs[candidates] = mapped, merged
    ids[~exact] = -1
    return StudentTargets(ids, logprobs, exact, aligned)


def student_example(example: Example, aligner: Aligner, vmap: np.ndarray, mode: str) -> Example:
    """A cached teacher example as the student sees it: the student's tokens and trained positions,
    and at each the paired teacher top-k (`student_targets`) in the arrays `data.pack_batch` packs.

    Rows are told apart by their entries, so a packed batch needs no extra arrays: an exact-map row
    has at least one id >= 0; any other paired row has ids -1 and the teacher's finite logprobs (the
    ULD vector); a row without a teacher has -1 / -inf only (`loss_xtok.xtok_loss` derives its
    `exact` and `aligned` masks this way). target_logprobs is the paired teacher's logprob of the
    student's own token where it is one of the mapped entries, else NaN; target_ranks is its
    1-based place in the row there, else 0. meta gains "aligned_fraction" and "teacher_id".

    The conversation comes from `example.meta["messages"]` (caches written since the
    cross-tokenizer change store it); raises InputError naming the example when it is missing.
    """
    messages = example.meta.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(
            f"example {example.id!r}: the cache has no conversation messages (meta['messages']); "
            "aligning to a student with another tokenizer needs them: re-run `kdcache cache` "
            "with this version to write a cache that stores them"
        )
    alignment = aligner.align(example.id, messages, example.input_ids, example.target_positions)
    targets = student_targets(alignment, example.topk_ids, example.topk_logprobs, vmap, mode)
    own = targets.topk_ids == alignment.input_ids[alignment.target_positions][:, None]
    found = own.any(axis=1)
    place = own.argmax(axis=1)
    target_logprobs = np.where(found, targets.topk_logprobs[np.arange(len(place)), place], np.nan).astype(np.float32)
    return Example(
        id=example.id,
        input_ids=alignment.input_ids.astype(np.int32),
        target_positions=alignment.target_positions.astype(np.int32),
        topk_ids=targets.topk_ids,
        topk_logprobs=targets.topk_logprobs,
        target_logprobs=target_logprobs,
        target_ranks=np.where(found, place + 1, 0).astype(np.int32),
        source=example.source,
        finish_reason=example.finish_reason,
        meta={**example.meta, "aligned_fraction": alignment.aligned_fraction, "teacher_id": example.id},
    )


def align_stream(
    examples: Iterable[Example], aligner: Aligner, vmap: np.ndarray, mode: str, ahead: int = 16, cursor=None
) -> Iterator:
    """`student_example` over a stream of cached examples, run `ahead` examples in advance in a
    background thread (`formats.common.prefetch.prefetch`), so alignment overlaps the training step; errors
    re-raise in the consumer. `cursor`: a function giving the source's position (`state_dict`); then
    the items are (example, the source's cursor just after it), taken in the thread right after the
    example was read (`data.AlignedStream` resumes exactly with them)."""
    if cursor is None:
        return prefetch((student_example(ex, aligner, vmap, mode) for ex in examples), ahead, name="kdcache-align")
    return prefetch(
        ((student_example(ex, aligner, vmap, mode), copy.deepcopy(cursor())) for ex in examples),
        ahead,
        name="kdcache-align",
    )
