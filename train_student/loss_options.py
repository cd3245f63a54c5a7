"""The choices `kd_loss` takes, defined once and torch-free, so the settings and the CLI can name
them without importing torch."""

KINDS = ("forward_kl", "reverse_kl")  # the KD divergence
TAILS = ("renormalize", "bucket")  # teacher mass outside its top-k: renormalize, or one tail bucket
IMPLS = ("naive", "chunked", "fused")  # kd_loss implementations (train_student/loss.py)
# the teacher entries kd_loss takes: the top-k (logprobs), or sampled ids with log importance weights
# (`loss_torch.sampled_log_weights`; docs/KD_MATH.md, "Sampled targets")
TARGETS = ("topk", "sampled")
ESTIMATORS = ("unbiased", "self_normalized")  # importance weights of sampled targets
XTOK_MODES = ("exact-map", "uld", "hybrid")  # the cross-tokenizer KD losses (train_student/xtok/loss.py)
# --cross-tokenizer: off (the student shares the teacher's tokenizer), auto (on when the tokenizers
# differ, off when they are the same), or one of XTOK_MODES (docs/CROSS_TOKENIZER.md)
CROSS_TOKENIZER_MODES = ("off", "auto", *XTOK_MODES)


from dataclasses import dataclass, replace  # noqa: E402


@dataclass(frozen=True)
class LossSpec:
    """Every setting of the student's loss, typed and validated once: built per stage from the config
    (`for_stage`), carried to `train_student.loss.student_loss`, which picks kd_loss or xtok_loss.

    total = ce_weight * CE + kd_weight * temperature^2 * KD (+ uld_weight * ULD for a student with
    another tokenizer); kind, tail, impl and chunk_size as `kd_loss` takes them; cross_tokenizer
    "off" (kd_loss) or one of XTOK_MODES (xtok_loss in that mode).
    """

    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    kind: str = "forward_kl"
    tail: str = "renormalize"
    impl: str = "chunked"
    chunk_size: int = 1024
    cross_tokenizer: str = "off"
    uld_weight: float = 1.0

    def __post_init__(self):
        for name, value, choices in (
            ("kind", self.kind, KINDS),
            ("tail", self.tail, TAILS),
            ("impl", self.impl, IMPLS),
            ("cross_tokenizer", self.cross_tokenizer, ("off", *XTOK_MODES)),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: one of {', '.join(choices)}")
        for name in ("kd_weight", "ce_weight", "uld_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number > 0")
        if not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be an integer >= 1")

    @classmethod
    def for_stage(cls, stage, cfg, cross_tokenizer: str = "off") -> "LossSpec":
        """A stage's training loss: its weights, temperature, kind and tail; the run's impl and chunk size."""
        return cls(
            kd_weight=stage.kd_weight,
            ce_weight=stage.ce_weight,
            temperature=stage.temperature,
            kind=stage.kind,
            tail=stage.tail,
            impl=cfg.impl,
            chunk_size=cfg.chunk_size,
            cross_tokenizer=cross_tokenizer,
            uld_weight=stage.uld_weight,
        )

    def for_evaluation(self) -> "LossSpec":
        """What held-out evaluation scores: forward KL at tau = 1 with the stage's tail, and CE, each at
        weight 1 (ULD too, for a student with another tokenizer)."""
        return replace(self, kd_weight=1.0, ce_weight=1.0, temperature=1.0, kind="forward_kl", uld_weight=1.0)

    def kd_kwargs(self) -> dict:
        """The keywords kd_loss takes (xtok_loss takes these and uld_weight, mode)."""
        return dict(
            kd_weight=self.kd_weight,
            ce_weight=self.ce_weight,
            temperature=self.temperature,
            kind=self.kind,
            tail=self.tail,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
