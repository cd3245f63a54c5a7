"""The choices `kd_loss` takes, defined once and torch-free, so the settings and the CLI can name
them without importing torch."""

KINDS = ("forward_kl", "reverse_kl")    # the KD divergence
TAILS = ("renormalize", "bucket")       # teacher mass outside its top-k: renormalize, or one tail bucket
IMPLS = ("naive", "chunked", "fused")   # kd_loss implementations (train_student/loss.py)
XTOK_MODES = ("exact-map", "uld", "hybrid")  # the cross-tokenizer KD losses (train_student/xtok/loss.py)
# --cross-tokenizer: off (the student shares the teacher's tokenizer), auto (on when the tokenizers
# differ, off when they are the same), or one of XTOK_MODES (docs/CROSS_TOKENIZER.md)
CROSS_TOKENIZER_MODES = ("off", "auto", *XTOK_MODES)
