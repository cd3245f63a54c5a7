"""Apply the teacher's chat template and find the trained positions.

Trained positions are the tokens of every assistant turn, from the first content token through the
end-of-turn token, and nothing else. The mask does not rely on `{% generation %}` markers, so it
works with any template that renders conversations incrementally:

    F   = render(messages)                                   the full conversation
    P_i = render(messages[:i], add_generation_prompt=True)   everything before assistant turn i
    Q_i = render(messages[:i + 1])                           everything through assistant turn i

For each assistant turn i we check P_i is a prefix of Q_i and Q_i a prefix of F; the text F[P_i:Q_i]
is the turn. F is cut at those boundaries into untrained and turn pieces that reassemble to F
exactly; each piece is tokenized on its own, so the prompt before a response ends on a token
boundary exactly as it does when the teacher generates. Inside a turn piece the trained tokens end
at the last end-of-turn token (eos, `<|im_end|>`, `<|eot_id|>`, ...); text the template puts after
it (a newline) is not trained. A template without such a token trains the piece minus trailing
whitespace tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Work per record is bounded by max_length: a conversation's text beyond max_length x CHARS_PER_TOKEN
# characters (and messages beyond max_length: each renders to a token at least) cannot reach its first
# max_length tokens at the 3-5 characters per token of real text, so it is cut before templating. A record
# the cut changed but whose tokens did not then exceed max_length is rejected (too_long) rather than
# trained with a turn the cut ended early. Without max_length, a record is bounded by what one cache row
# stores (formats.shard.MAX_META_BYTES).
CHARS_PER_TOKEN = 16
MAX_MESSAGES = 4096  # per record without max_length (templating is quadratic in turns)
MAX_CHARS = 16 << 20  # per record without max_length (its conversation is stored in the row's meta)

# Special tokens that end a turn in common templates, besides the tokenizer's eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>")


class TemplateReject(Exception):
    """A record the template cannot handle; `reason` reads `code: detail`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Templated:
    """One templated record. input_ids int32 [L]; target_positions int32 [N] (1 <= t < L, increasing).

    Score mode: the trained positions are the assistant tokens. Generate mode: input_ids is the prompt
    (ending in the generation prompt) and target_positions is empty.
    """

    id: str
    input_ids: np.ndarray
    target_positions: np.ndarray
    source: str = ""
    truncated: bool = False
    messages: list | None = None  # the conversation (generate mode: the prompt), stored in meta["messages"]
    wanted: set | None = None  # generate mode: the sample ids still to write (all but resumed ones)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template's raise_exception (e.g. roles must alternate): reject the record
        raise TemplateReject(f"template_error: {type(exc).__name__}: {exc}") from None
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab and tok in specials:
            ids.add(int(vocab[tok]))
    return ids


class ChatTemplater:
    """Render records with one tokenizer: `score(record)` and `prompt(record)` give `Templated`."""

    def __init__(self, tokenizer, max_length: int | None = None, length_policy: str = "truncate"):
        if not getattr(tokenizer, "chat_template", None):
            from formats.errors import InputError

            raise InputError("the teacher's tokenizer has no chat template; pass --tokenizer with one")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.length_policy = length_policy
        self.eot_ids = end_of_turn_ids(tokenizer)

    def turn_mask(self, ids: list[int]) -> list[bool]:
        last = max((j for j, t in enumerate(ids) if t in self.eot_ids), default=None)
        if last is not None:
            return [j <= last for j in range(len(ids))]
        end = len(ids)
        while end > 0 and not self.tokenizer.decode([ids[end - 1]]).strip():
            end -= 1
        return [j < end for j in range(len(ids))]

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The full rendering cut into (text, is_assistant_turn) pieces that reassemble to it."""
        full = _render(self.tokenizer, messages, add_generation_prompt=False)
        pieces: list[tuple[str, bool]] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(self.tokenizer, messages[:i], add_generation_prompt=True)
            through = _render(self.tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not through.startswith(before) or not full.startswith(through) or len(before) < cursor:
                raise TemplateReject(
                    f"template_not_incremental: rendering messages[:{i}] is not a prefix of the rendering "
                    f"through assistant turn {i} and of the whole conversation"
                )
            pieces.append((full[cursor : len(before)], False))
            pieces.append((full[len(before) : len(through)], True))
            cursor = len(through)
        pieces.append((full[cursor:], False))
        if "".join(text for text, _ in pieces) != full:  # internal invariant
            raise AssertionError("template pieces do not reassemble to the full rendering")
        return [(text, trained) for text, trained in pieces if text]

    def bounded(self, messages: list[dict]) -> tuple[list[dict], bool]:
        """(the messages that can reach the first max_length tokens, whether anything was cut); see
        CHARS_PER_TOKEN. Raises TemplateReject for a record too large to template without max_length."""
        if self.max_length is None:
            chars = sum(len(m["content"]) for m in messages)
            if len(messages) > MAX_MESSAGES or chars > MAX_CHARS:
                raise TemplateReject(
                    f"too_large: {len(messages)} messages, {chars} characters (at most {MAX_MESSAGES} "
                    f"and {MAX_CHARS} without --max-length); set --max-length to cut long records"
                )
            return messages, False
        budget, kept = self.max_length * CHARS_PER_TOKEN, []
        for m in messages[: self.max_length]:
            if budget <= 0:
                break
            kept.append(m if len(m["content"]) <= budget else {**m, "content": m["content"][:budget]})
            budget -= len(kept[-1]["content"])
        cut = len(kept) < len(messages) or (bool(kept) and kept[-1] is not messages[len(kept) - 1])
        return kept, cut

    def score(self, record: dict) -> Templated:
        """Token ids of the whole conversation and its assistant positions (raises TemplateReject)."""
        ids: list[int] = []
        mask: list[bool] = []
        messages, cut = self.bounded(record["messages"])
        if cut and not any(m["role"] == "assistant" for m in messages):
            raise TemplateReject(f"no_trained_tokens: no assistant turn within max_length {self.max_length}")
        for text, is_turn in self.pieces(messages):
            piece = encode_text(self.tokenizer, text)
            ids.extend(piece)
            mask.extend(self.turn_mask(piece) if is_turn else [False] * len(piece))
        truncated = False
        if cut and len(ids) <= self.max_length:  # the cut reached into the first max_length tokens: do not guess
            raise TemplateReject(
                f"too_long: more than {self.max_length * CHARS_PER_TOKEN} characters (max_length x "
                f"{CHARS_PER_TOKEN}) or {self.max_length} messages, yet at most {self.max_length} tokens"
            )
        if self.max_length is not None and len(ids) > self.max_length:
            if self.length_policy == "drop":
                raise TemplateReject(f"too_long: {len(ids)} tokens > max_length {self.max_length}")
            ids, mask, truncated = ids[: self.max_length], mask[: self.max_length], True
        positions = np.flatnonzero(np.asarray(mask, dtype=bool)).astype(np.int32)
        positions = positions[positions >= 1]  # nothing predicts token 0
        if len(positions) == 0:
            raise TemplateReject(
                f"no_trained_tokens: no assistant token within max_length {self.max_length}"
                if truncated
                else "no_trained_tokens: the template left no assistant token"
            )
        return Templated(
            record["id"], np.asarray(ids, np.int32), positions, record.get("source", ""), truncated, messages=messages
        )

    def prompt(self, record: dict) -> Templated:
        """Generate mode: the conversation before its last assistant turn (all of it when it has none, or
        ends with a user turn), ending in the generation prompt."""
        messages = record["messages"]
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        ends_with_user = messages[-1]["role"] == "user"
        prompt_messages = messages if (ends_with_user or not assistant) else messages[: assistant[-1]]
        if not any(m["role"] == "user" for m in prompt_messages):
            raise TemplateReject("no_prompt: no user turn before the last assistant turn")
        if self.bounded(prompt_messages)[1]:  # a prompt is kept whole or not at all
            raise TemplateReject(
                f"too_long: prompt of more than {self.max_length * CHARS_PER_TOKEN} characters or "
                f"{self.max_length} messages (max_length {self.max_length})"
            )
        ids = encode_text(self.tokenizer, _render(self.tokenizer, prompt_messages, add_generation_prompt=True))
        if self.max_length is not None and len(ids) >= self.max_length:
            raise TemplateReject(f"too_long: prompt of {len(ids)} tokens >= max_length {self.max_length}")
        return Templated(
            record["id"],
            np.asarray(ids, np.int32),
            np.zeros(0, np.int32),
            record.get("source", ""),
            messages=prompt_messages,
        )
