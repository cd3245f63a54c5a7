"""The student's chat template (issue 12, item 7): base-model students have none of their own.

A student with another tokenizer than the teacher's renders each cached conversation
(`meta["messages"]`) with its own template. Which template, in this order:

1. the option (`--student-template`): a named built-in (`tulu3`) or a Jinja file;
2. the student tokenizer's own `chat_template`;
3. else an InputError naming `--student-template` (a base model, e.g. Gemma 3 270M from GGUF).

`render_conversation` gives the token ids, the trained positions (every assistant turn, through its
end-of-turn token, exactly as the teacher's side: formats/template.py cuts and tokenizes the
rendering the same way) and, per assistant message, the character span of its content in the
rendered text and the token span of its turn.

`check_student_rendering` runs before training and returns what the trainer records in its run:

- **BOS**: the token the model needs first. It is the tokenizer's `bos_token` when the tokenizer
  adds it to plain text itself, sets `add_bos_token`, or the model config's `bos_token_id` names
  the same id; a tokenizer without a `bos_token` (Qwen2-style) needs none. A rendering that does
  not start with the needed BOS gets it **prepended** (a Gemma 3 tokenizer from GGUF has `<bos>`
  but does not add it: the model's NLL is 5.9 nats/token without it, 2.4 with it). **Refused**: a
  config `bos_token_id` that differs from the tokenizer's BOS (which one is right cannot be told),
  and a rendering that starts with the BOS twice.
- **Every assistant message rendered**: a template that drops an assistant message, or alters its
  text so that it no longer appears verbatim, or does not render incrementally, is an error before
  training starts.
- The template's source and the sha256 of its text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.errors import InputError
from formats.tokenizer_id import template_text_sha256

# The Tulu 3 chat template, character for character: `CHAT_TEMPLATES["tulu"]` in allenai/open-instruct,
# open_instruct/dataset_transformation.py (commit 29e5ad1), the template of allenai/Llama-3.1-Tulu-3-8B.
# <|user|>\n...\n<|assistant|>\n...<eos>\n; the last assistant turn ends at eos.
TULU3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)
BUILTIN_TEMPLATES = {"tulu3": TULU3}
OPTION = "--student-template"

# The conversation check_student_rendering renders: two assistant turns, with text no template adds.
PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4, so the answer is four."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six: 3 + 3 = 6."},
]


@dataclass(frozen=True)
class StudentTemplate:
    text: str  # the Jinja source
    source: str  # "builtin:tulu3", "file:/abs/path.jinja" or "tokenizer"

    @property
    def sha256(self) -> str:
        return template_text_sha256(self.text)


def resolve_student_template(option: str | None, tokenizer) -> StudentTemplate:
    """The student's template: the option (a built-in name or a file), else the tokenizer's own, else an
    InputError naming the option."""
    if option:
        if option in BUILTIN_TEMPLATES:
            return StudentTemplate(BUILTIN_TEMPLATES[option], f"builtin:{option}")
        path = Path(option).expanduser()
        if not path.is_file():
            raise InputError(
                f"{OPTION} {option!r}: neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a "
                "file; give a built-in name or the path of a Jinja chat template"
            )
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise InputError(f"{OPTION} {path}: the file is empty; give a Jinja chat template")
        return StudentTemplate(text, f"file:{path.resolve()}")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return StudentTemplate(own, "tokenizer")
    raise InputError(
        f"the student's tokenizer has no chat template (a base model?): pass {OPTION} "
        f"({' or '.join(BUILTIN_TEMPLATES)}, or a Jinja file) to say how it renders conversations"
    )


# ---- rendering --------------------------------------------------------------------------------


@dataclass
class Rendering:
    text: str  # the rendered conversation (with the prepended BOS token's text, if any)
    input_ids: np.ndarray  # int32 [L]
    target_positions: np.ndarray  # int32 [N]: assistant-turn tokens, 1 <= t < L, increasing
    assistant_chars: list[tuple[int, int]] = field(default_factory=list)  # per assistant message: its content in `text`
    assistant_tokens: list[tuple[int, int]] = field(default_factory=list)  # per assistant message: its turn's tokens
    bos_prepended: bool = False


def render_conversation(
    tokenizer, template: StudentTemplate, messages: list[dict], *, bos_id: int | None = None
) -> Rendering:
    """Render `messages` with the student's template and tokenizer; `bos_id` (check_student_rendering's
    `bos_token_id`) is prepended when the rendering does not start with it. InputError when the
    template cannot render the conversation or drops an assistant message's text."""
    from formats.template import ChatTemplater, TemplateReject, encode_text

    templater = ChatTemplater(with_template(tokenizer, template.text))
    try:
        pieces = templater.pieces(messages)
    except TemplateReject as exc:
        raise InputError(
            f"the student template ({template.source}) cannot render the conversation: {exc.reason}"
        ) from None
    assistants = iter(m["content"] for m in messages if m["role"] == "assistant")
    text, ids, mask, chars, tokens = "", [], [], [], []
    for piece, is_turn in pieces:
        piece_ids = encode_text(tokenizer, piece)
        if is_turn:
            content = next(assistants, None)
            at = piece.find(content) if content is not None else -1
            if at < 0:
                raise InputError(
                    f"the student template ({template.source}) does not render assistant message "
                    f"{len(chars)} verbatim (its text is not in the rendered turn {piece[:60]!r}); "
                    f"pass {OPTION} with a template that renders every assistant message"
                )
            chars.append((len(text) + at, len(text) + at + len(content)))
            tokens.append((len(ids), len(ids) + len(piece_ids)))
            mask.extend(templater.turn_mask(piece_ids))
        else:
            mask.extend([False] * len(piece_ids))
        text += piece
        ids.extend(piece_ids)
    missing = sum(1 for _ in assistants)
    if missing:
        raise InputError(
            f"the student template ({template.source}) drops {missing} of the conversation's assistant "
            f"messages; pass {OPTION} with a template that renders every assistant message"
        )
    prepend = bos_id is not None and (not ids or ids[0] != bos_id)
    if prepend:
        shift_text = tokenizer.convert_ids_to_tokens(bos_id)
        text, ids, mask = shift_text + text, [bos_id, *ids], [False, *mask]
        chars = [(a + len(shift_text), b + len(shift_text)) for a, b in chars]
        tokens = [(a + 1, b + 1) for a, b in tokens]
    positions = np.flatnonzero(np.asarray(mask, dtype=bool)).astype(np.int32)
    return Rendering(text, np.asarray(ids, np.int32), positions[positions >= 1], chars, tokens, prepend)


def with_template(tokenizer, template_text: str):
    """A shallow copy of the tokenizer whose chat_template is the student's (the caller's is left as it
    is); `align.Aligner` renders through it too."""
    clone = copy.copy(tokenizer)
    clone.chat_template = template_text
    return clone


# ---- the check before training ----------------------------------------------------------------


def needed_bos(tokenizer, model_config=None) -> tuple[int | None, str]:
    """(the BOS id the model needs first, or None; why). See the module docstring for the rule."""
    bos = tokenizer.bos_token_id if getattr(tokenizer, "bos_token", None) is not None else None
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    config_bos = getattr(config, "bos_token_id", None) if config is not None else None
    if bos is None:
        return None, "the student tokenizer has no bos_token"
    if config_bos is not None and config_bos != bos:
        raise InputError(
            f"the student's model config has bos_token_id {config_bos}, its tokenizer's bos_token "
            f"{tokenizer.bos_token!r} is id {bos}: which one the model needs first cannot be told; make "
            "them agree (the tokenizer's special_tokens or the config)"
        )
    adds_itself = list(tokenizer("a")["input_ids"][:1]) == [bos]
    if adds_itself or getattr(tokenizer, "add_bos_token", False):
        return bos, f"the tokenizer adds {tokenizer.bos_token!r} to text itself"
    if config_bos == bos:
        return bos, f"the model config's bos_token_id is {tokenizer.bos_token!r} (the tokenizer does not add it)"
    return None, f"the tokenizer has {tokenizer.bos_token!r} but neither adds it nor does the model config name it"


def check_student_rendering(tokenizer, template: StudentTemplate, model_config=None) -> dict:
    """Refuse (InputError) a student template that cannot render a conversation with every assistant
    message, or a BOS that cannot be decided; returns the run record:
    {"source", "sha256", "bos_token_id", "bos": "rendered" | "prepended" | "none", "bos_reason"}."""
    bos_id, reason = needed_bos(tokenizer, model_config)
    rendering = render_conversation(tokenizer, template, PROBE, bos_id=bos_id)
    ids = rendering.input_ids
    if bos_id is not None and len(ids) > 1 and ids[1] == bos_id:
        raise InputError(
            f"the student template ({template.source}) renders {tokenizer.bos_token!r} twice at the "
            "start; the model expects it once"
        )
    bos = "none" if bos_id is None else "prepended" if rendering.bos_prepended else "rendered"
    return {
        "source": template.source,
        "sha256": template.sha256,
        "bos_token_id": bos_id,
        "bos": bos,
        "bos_reason": reason,
    }
