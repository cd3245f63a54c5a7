"""The student: load any HF causal LM, or build a layer-pruned copy of the teacher; the loss module.

`StudentLoss` runs the decoder to its final hidden states and calls `kd_loss` with the LM head's
weight inside one `forward`, so DDP and FSDP2 see the whole computation (FSDP2 gathers the head's
weight for the loss) and the [T, V] logits are never formed (except with impl="naive").
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from formats.errors import InputError
from formats.tokenizer_id import load_tokenizer
from train_student.loss_options import LossSpec

log = logging.getLogger("train_student")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16-mixed": torch.float32}  # weights


def load_student(name_or_path: str, *, dtype: str = "float32", attn_implementation: str | None = None):
    """An HF causal LM from a hub id or a folder (transformers imported lazily).

    attn_implementation: None (transformers' default, sdpa), "eager", "sdpa" or "flash_attention_2";
    all of them keep packed examples apart given restarting position ids (flash-attention through
    its varlen path, the others through a block-diagonal causal mask).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=TORCH_DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as exc:  # a missing folder, no hub access, no config.json, not a causal LM
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot load the student {name_or_path!r}: {first} — give a folder holding a causal LM checkpoint "
            "(config.json and weights) or a hub id"
        ) from None


def prune_layers(teacher_dir: str, keep_layers: list[int], out_dir: str | Path) -> Path:
    """Save a copy of the teacher that keeps only `keep_layers` (in order) of its decoder layers.

    The result (weights + config + tokenizer) loads with `from_pretrained` like any checkpoint.
    Works for models whose decoder layers live in `model.model.layers` (Llama, Qwen, Mistral, ...).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    decoder = teacher.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise InputError(f"{teacher_dir}: cannot prune {type(teacher).__name__}: no `layers` list in its decoder")
    n = len(layers)
    bad = [i for i in keep_layers if not 0 <= i < n]
    if bad or len(set(keep_layers)) != len(keep_layers) or not keep_layers:
        raise InputError(
            f"--keep-layers {keep_layers}: need distinct indices in 0..{n - 1} (the teacher has {n} layers)"
        )
    decoder.layers = nn.ModuleList([layers[i] for i in keep_layers])
    for new_idx, layer in enumerate(decoder.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    cfg = teacher.config
    cfg.num_hidden_layers = len(keep_layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep_layers]
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(out_dir)
    try:
        load_tokenizer(teacher_dir).save_pretrained(out_dir)
    except InputError:
        log.warning("%s has no tokenizer to copy next to the pruned student", teacher_dir)
    (out_dir / "PRUNED_FROM.txt").write_text(f"teacher: {teacher_dir}\nkeep_layers: {keep_layers}\n")
    log.info("pruned student: %d of %d layers of %s -> %s", len(keep_layers), n, teacher_dir, out_dir)
    return out_dir


class StudentLoss(nn.Module):
    """forward(batch tensors) -> (loss, metrics) for one packed sequence.

    input_ids, position_ids: [1, S]; topk_ids [S, K]; topk_logprobs [S, K]; labels [S].
    autocast: None, or a dtype (bf16) the decoder runs in under torch.autocast; the LM head and the
    loss then take hidden and weight in that dtype (kd_loss accumulates in fp32 anyway).
    """

    def __init__(self, lm: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.lm = lm
        self.autocast = autocast

    def forward(self, input_ids, position_ids, topk_ids, topk_logprobs, labels, *, spec: LossSpec):
        """The decoder to the final hidden states, then the loss `spec` describes (train_student.loss.student_loss)
        on the LM head's weight: never the full [T, V] logits."""
        from train_student.loss import head_inputs, student_loss

        device = input_ids.device.type
        with torch.autocast(device, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self.lm.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False
            )
        hidden = out.last_hidden_state[0]  # [S, D]
        weight = self.lm.get_output_embeddings().weight  # [V, D]
        hidden, weight = head_inputs(hidden, weight, self.autocast or weight.dtype)
        return student_loss(spec, hidden, weight, topk_ids, topk_logprobs, labels)


# Output-head extras the loss does not apply (it computes logits as hidden @ lm_head.weight):
# config field -> the value that means "none"
OUTPUT_HEAD_EXTRAS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def check_output_head(lm: nn.Module, name: str) -> None:
    """Refuse a student whose logits are not plain `hidden @ lm_head.weight.T` (InputError).

    kd_loss (every impl) computes exactly that product; a softcap (Gemma 2), a logit scale
    (Cohere, Granite) or an output bias would be silently ignored, training against logits the
    model never produces. Such students are refused rather than half supported.
    """
    found = []
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for field, neutral in OUTPUT_HEAD_EXTRAS.items():
        value = getattr(cfg, field, None)
        if value is not None and value != neutral and not (neutral is None and value == 0):
            found.append(f"{field}={value}")
    head = lm.get_output_embeddings()
    if head is None:
        raise InputError(f"{name}: {type(lm).__name__} has no output embeddings (LM head); need a causal LM")
    if getattr(head, "bias", None) is not None:
        found.append("an output bias (lm_head.bias)")
    if not found:
        found += _probe_output_head(lm, head)
    if found:
        raise InputError(
            f"{name}: the student's output head has {', '.join(found)}; the KD loss computes logits as "
            "hidden states @ lm_head.weight and would ignore it, so such students are refused "
            "(use a student without output-head extras)"
        )


def _probe_output_head(lm: nn.Module, head: nn.Module) -> list[str]:
    """What the config does not name (MiniCPM's width scale, Falcon-H1's lm_head_multiplier, ...):
    run the model's own forward on given final hidden states (the decoder stubbed out, so it costs
    one small LM-head product) and compare its logits with hidden @ lm_head.weight.T."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    weight = head.weight.detach()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 3, weight.shape[1], generator=gen).to(weight)
    plain = (hidden.float() @ weight.float().T)[0]
    hidden = hidden * (100.0 / plain.abs().max().clamp(min=1e-6))  # large logits: a softcap or scale shows
    plain = (hidden.float() @ weight.float().T)[0]
    decoder = lm.get_decoder()
    decoder.forward = lambda *args, **kwargs: BaseModelOutputWithPast(last_hidden_state=hidden)
    try:
        with torch.no_grad():
            logits = lm(input_ids=torch.zeros(1, 3, dtype=torch.long, device=weight.device), use_cache=False).logits
    except Exception as exc:  # a forward that needs more than last_hidden_state: the config checks stand alone
        log.warning(
            "could not probe the student's output head (%s: %s); relying on its config", type(exc).__name__, exc
        )
        return []
    finally:
        del decoder.forward  # back to the class's forward
    tol = 1e-2 if weight.dtype in (torch.bfloat16, torch.float16) else 1e-4
    diff = float((logits[0].float() - plain).abs().max())
    return (
        [f"logits that differ from hidden @ lm_head.weight by up to {diff:.3g} (a transform in the model's forward)"]
        if diff > tol * 100.0
        else []
    )


def prepare_student(lm: nn.Module, *, gradient_checkpointing: bool) -> nn.Module:
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    return lm
