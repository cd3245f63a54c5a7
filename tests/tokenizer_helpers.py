"""Small tokenizers trained offline with `tokenizers` (deterministic, about 50 ms), for tests that need
a real Hugging Face tokenizer but not a model: `tiny_tokenizer()` (byte-level BPE, a ChatML-like
template, like SmolLM2's) and `tiny_tokenizer(bos="<bos>", template=None)` (a base model whose
tokenizer, like Gemma 3's from GGUF, has a `<bos>` it does not add)."""

from __future__ import annotations

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Two plus two is four.",
    "Hello, how are you today? I am fine, thank you.",
    "user assistant system",
    "0123456789 +-*/=?!",
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(
    *,
    bos: str | None = None,
    add_bos: bool = False,
    eos: str = "<|im_end|>",
    template: str | None = CHATML,
    vocab_size: int = 300,
    extra_specials=(),
):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [s for s in ("<pad>", bos, eos, "<|im_start|>", *extra_specials) if s]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if bos and add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>")
    fast.chat_template = template
    return fast
