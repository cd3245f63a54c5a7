import pytest
from .format_helpers import make_example, write_cache


@pytest.fixture
def examples(rng):
    return [make_example(rng, i) for i in range(40)]


@pytest.fixture
def cache(tmp_path, examples):
    path = tmp_path / "cache"
    write_cache(path, examples, rejects=[("bad-1", "no assistant turn"), ("bad-2", "unknown role: 'bot'")])
    return path


# formats/template.py is tested on the real teacher tokenizer and Tulu rows (the cache_teacher fixtures).
from ..cache_teacher.conftest import sample_rows, smollm2_dir, tokenizer  # noqa: E402,F401
