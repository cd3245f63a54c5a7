"""Seeds for every randomized test, in one place.

`make test` is deterministic: a randomized test takes its inputs from the `seed` fixture (or from
`gen` / `rng` built on it), which is DEFAULT_SEED unless told otherwise, and hypothesis runs
derandomized (the "ci" profile). Random mode is one variable away:

    KD_TEST_SEED=<n>        replay seed n (a failure prints the seed it ran with)
    KD_TEST_SEED=random     a fresh seed per test (printed)
    KD_FUZZ_SEEDS=<n>[:<a>] run only the randomized tests, each over seeds a .. a+n-1 (default a = 0),
                            and hypothesis with fresh random examples (`make fuzz`)
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

DEFAULT_SEED = 20261130

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile(
    "fuzz", derandomize=False, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)


def _fuzz_seeds() -> list[int] | None:
    spec = os.environ.get("KD_FUZZ_SEEDS")
    if not spec:
        return None
    count, _, start = spec.partition(":")
    try:
        count, start = int(count), int(start or 0)
    except ValueError:
        raise pytest.UsageError(f"KD_FUZZ_SEEDS={spec!r}: expected N or N:START (integers)") from None
    return list(range(start, start + count))


settings.load_profile("fuzz" if _fuzz_seeds() else "ci")


def _is_randomized(item) -> bool:
    return "seed" in getattr(item, "fixturenames", ()) or hasattr(getattr(item, "obj", None), "hypothesis")


def pytest_generate_tests(metafunc):
    seeds = _fuzz_seeds()
    if seeds and "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", seeds, ids=[f"seed{s}" for s in seeds])


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _cuda_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (marker `gpu`)"))
    if not _fuzz_seeds():
        return
    keep = [item for item in items if _is_randomized(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _is_randomized(item)])
    items[:] = keep


@pytest.fixture
def seed() -> int:
    """The seed of a randomized test (see the module docstring); printed, so a failure shows it."""
    env = os.environ.get("KD_TEST_SEED", "")
    if env == "random":
        value = int.from_bytes(os.urandom(4), "little")
    elif env:
        value = int(env)
    else:
        value = DEFAULT_SEED
    print(f"KD_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed):
    """A torch.Generator seeded with `seed`."""
    import torch

    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rng(seed):
    """A numpy Generator seeded with `seed`."""
    import numpy as np

    return np.random.default_rng(seed)
