"""Data path: packing (packed == unpacked loss), target alignment, split, exact cursor, safety checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .kd_fixtures import K, VOCAB, make_model
from formats import CacheReader
from formats.errors import FormatError, InputError
from formats.ids import is_eval, keep_fraction, record_id
from train_student.data import IGNORE_INDEX, ExampleStream, Packer, eval_batches, pack_batch
from train_student.loss_options import LossSpec
from train_student.model import StudentLoss

LOSS = LossSpec(
    kd_weight=1.0, ce_weight=0.5, temperature=2.0, kind="forward_kl", tail="bucket", impl="chunked", chunk_size=16
)


def _examples(cache, n):
    return [ex for _, ex in zip(range(n), CacheReader(cache))]


def test_alignment_of_teacher_rows_with_shifted_hidden(tiny):
    a, b = _examples(tiny["cache"], 2)
    batch = pack_batch([a, b], K)
    La = len(a.input_ids)
    assert batch.input_ids.shape == (1, La + len(b.input_ids))
    assert batch.position_ids[0, La].item() == 0 and batch.position_ids[0, La - 1].item() == La - 1
    for off, ex in ((0, a), (La, b)):
        for n, t in enumerate(ex.target_positions):
            row = off + t - 1  # hidden row t-1 predicts token t
            assert batch.labels[row].item() == ex.input_ids[t]
            assert batch.topk_ids[row].tolist() == ex.topk_ids[n].tolist()
    trained = set(int(off + t - 1) for off, ex in ((0, a), (La, b)) for t in ex.target_positions)
    untrained = [i for i in range(batch.n_tokens) if i not in trained]
    assert all(batch.labels[i].item() == IGNORE_INDEX for i in untrained)
    assert (batch.topk_ids[untrained] == -1).all() and torch.isinf(batch.topk_logprobs[untrained]).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_loss_and_gradients(tiny, attn):
    """One packed sequence of 4 examples == the 4 examples one by one (token-weighted)."""
    examples = _examples(tiny["cache"], 4)
    torch.manual_seed(0)
    model = StudentLoss(make_model(seed=3, scale=0.12, attn=attn).double())

    def run(batch):
        model.zero_grad()
        b = batch
        loss, m = model(b.input_ids, b.position_ids, b.topk_ids, b.topk_logprobs.double(), b.labels, spec=LOSS)
        (loss * b.n_targets).backward()
        return (loss * b.n_targets).item(), [p.grad.clone() for p in model.parameters()]

    packed_loss, packed_grads = run(pack_batch(examples, K))
    parts = [run(pack_batch([ex], K)) for ex in examples]
    # sdpa runs in float64 throughout; HF's eager attention takes its softmax in float32 even in a float64
    # model, so there packed and unpacked agree to float32 rounding (with one thread a gradient element
    # differed by 1.4e-7 relative), still far below what attention across examples would change
    rel, atol = {"sdpa": (1e-10, 1e-10), "eager": (1e-5, 1e-8)}[attn]
    assert packed_loss == pytest.approx(sum(p[0] for p in parts), rel=rel)
    for i, g in enumerate(packed_grads):
        torch.testing.assert_close(g, sum(p[1][i] for p in parts), rtol=max(rel, 1e-8), atol=atol)
    # and packing really matters: without restarting positions the loss changes
    b = pack_batch(examples, K)
    flat = torch.arange(b.n_tokens)[None]
    with torch.no_grad():
        wrong, _ = model(b.input_ids, flat, b.topk_ids, b.topk_logprobs.double(), b.labels, spec=LOSS)
    assert abs(wrong.item() * b.n_targets - packed_loss) > 1e-6


def test_packer_budget_and_exact_cursor(tiny):
    def packer():
        return Packer(ExampleStream([CacheReader(tiny["cache"], shuffle=True, seed=3)]), max_tokens=100, k=K)

    p = packer()
    batches = list(p)
    assert all(b.n_tokens <= 100 for b in batches)
    assert sum(b.n_examples for b in batches) == 48
    # stop after 3 batches, save the cursor, resume in a fresh packer: the same remaining batches
    p = packer()
    for _ in range(3):
        next(p)
    state = json.loads(json.dumps(p.state_dict()))  # survives serialization
    q = packer()
    q.load_state_dict(state)
    rest = list(q)
    assert len(rest) == len(batches) - 3
    for x, y in zip(rest, batches[3:]):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.topk_ids, y.topk_ids)


def test_long_example_is_truncated_to_budget(tiny):
    ex = _examples(tiny["cache"], 1)[0]
    b = pack_batch([ex], K, max_tokens=10)
    assert b.n_tokens == 10 and b.truncated == 1
    assert (b.labels != IGNORE_INDEX).sum().item() == int((ex.target_positions < 10).sum())


def test_eval_split_is_stable_and_disjoint(tiny):
    ids = [f"ex{i}" for i in range(2000)]
    share = np.mean([is_eval(i, 0.1) for i in ids])
    assert 0.07 < share < 0.13
    assert [is_eval(i, 0.1) for i in ids] == [is_eval(i, 0.1) for i in ids]
    train = {e.id for e in ExampleStream([CacheReader(tiny["cache"])], split="train", eval_fraction=0.25)}
    held = {e.id for e in ExampleStream([CacheReader(tiny["cache"])], split="eval", eval_fraction=0.25)}
    assert train.isdisjoint(held) and len(train | held) == 48 and held


@pytest.mark.parametrize("max_examples", [None, 5])
def test_eval_batches_pack_the_held_out_examples_in_order_greedily(tiny, max_examples):
    """The first max_examples held-out examples, in stream order, each cut to the budget; a batch closes
    only when the next example would not fit."""
    held = list(ExampleStream([CacheReader(tiny["cache"])], split="eval", eval_fraction=0.25))[:max_examples]
    batches = eval_batches(
        [tiny["cache"]], rank=0, world_size=1, eval_fraction=0.25, max_tokens=40, max_examples=max_examples
    )
    assert sum(b.n_examples for b in batches) == len(held) > 1
    assert torch.equal(
        torch.cat([b.input_ids[0] for b in batches]),
        torch.cat([torch.tensor(e.input_ids[:40], dtype=torch.long) for e in held]),
    )
    firsts = np.cumsum([0] + [b.n_examples for b in batches])[1:-1]  # index of each next batch's first example
    for b, nxt in zip(batches, firsts):
        assert b.n_tokens <= 40 and b.n_tokens + min(len(held[nxt].input_ids), 40) > 40


def test_unknown_format_version_is_refused(tiny, tmp_path):
    import shutil

    bad = tmp_path / "cache"
    shutil.copytree(tiny["cache"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 999
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError):
        CacheReader(bad)


def test_resuming_with_other_reader_settings_is_refused(tiny):
    p = Packer(ExampleStream([CacheReader(tiny["cache"], shuffle=True, seed=3)]), max_tokens=100, k=K)
    next(p)
    state = p.state_dict()
    other = Packer(ExampleStream([CacheReader(tiny["cache"], shuffle=True, seed=4)]), max_tokens=100, k=K)
    with pytest.raises(InputError, match="seed"):
        other.load_state_dict(state)
    two = Packer(ExampleStream([CacheReader(tiny["cache"]), CacheReader(tiny["cache"])]), max_tokens=100, k=K)
    with pytest.raises(InputError, match="2 caches|1 caches"):
        two.load_state_dict(state)


def test_fraction_subsamples_are_nested_and_disjoint_from_eval(tmp_path):
    from formats import CacheReader
    from formats.ids import record_id
    from train_student.data import ExampleStream
    import numpy as np

    from formats import CacheWriter, CodecConfig, Example

    cache = tmp_path / "c"
    with CacheWriter(cache, codec=CodecConfig(k=2)) as w:
        for i in range(60):
            w.write(
                Example(
                    id=f"r{i}",
                    input_ids=np.arange(5, dtype=np.int32),
                    target_positions=np.array([3, 4], np.int32),
                    topk_ids=np.array([[1, 2], [3, 4]], np.int32),
                    topk_logprobs=np.full((2, 2), -1.0, np.float32),
                    target_logprobs=np.full(2, -1.0, np.float32),
                    target_ranks=np.ones(2, np.int32),
                )
            )

    def ids(fraction):
        return {
            ex.id for ex in ExampleStream([CacheReader(cache)], split="train", eval_fraction=0.2, fraction=fraction)
        }

    small, big, full = ids(0.3), ids(0.6), ids(1.0)
    assert small < big < full
    assert not any(is_eval(i, 0.2) for i in full)
    held = {ex.id for ex in ExampleStream([CacheReader(cache)], split="eval", eval_fraction=0.2, fraction=0.3)}
    assert held and held.isdisjoint(full) and len(held | full) == 60
    assert is_eval("abc#s1", 0.5) == is_eval("abc#s0", 0.5) == is_eval("abc", 0.5)
    assert record_id("x#s12") == "x" and record_id("x#dup3") == "x#dup3"


# ---- refusing what the student would misread (issue 9, items 2 and 12) --------------------------
class _ListReader:
    """Stands in for a CacheReader over a damaged cache (one never verified, e.g. read over hf://)."""

    def __init__(self, examples, epochs=1):
        self.path, self.examples, self.epochs = "hf://datasets/x/cache", examples, epochs
        self.shuffle = False  # the same examples every epoch

    def __iter__(self):
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            yield from self.examples
            epoch += 1

    def num_examples(self):
        return len(self.examples)

    def state_dict(self):
        return {}


def _damaged(tiny, **change):
    ex = _examples(tiny["cache"], 1)[0]
    for name, fn in change.items():
        setattr(ex, name, fn(getattr(ex, name)))
    return ex


@pytest.mark.parametrize(
    "change",
    [
        dict(target_positions=lambda p: p - p[0]),  # starts at 0: row -1 = the last row
        dict(target_positions=lambda p: p + 1),  # runs past the sequence
        dict(target_positions=lambda p: p[::-1].copy()),  # unsorted
        dict(target_positions=lambda p: np.concatenate([p[:1], p[:-1]])),  # overlapping spans (a position twice)
        dict(topk_ids=lambda a: a[:-1], topk_logprobs=lambda a: a[:-1]),  # fewer teacher rows than positions
    ],
)
def test_stream_refuses_target_positions_out_of_range(tiny, change):
    bad = _damaged(tiny, **change)
    stream = ExampleStream([_ListReader([bad])], split="all")
    with pytest.raises(FormatError, match=r"hf://datasets/x/cache.*'ex0000'"):
        next(stream)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(topk_ids=lambda a: np.where(a == a[0, 0], VOCAB + 5, a)), "teacher id 261"),
        (dict(input_ids=lambda a: np.where(np.arange(len(a)) == len(a) - 1, VOCAB, a)), "token id 256"),
        (dict(topk_ids=lambda a: np.where(a == a[0, 0], -7, a)), "teacher id -7"),
    ],
)
def test_stream_refuses_ids_outside_the_students_vocabulary(tiny, change, message):
    bad = _damaged(tiny, **change)
    stream = ExampleStream([_ListReader([bad])], split="all", input_size=VOCAB, output_size=VOCAB)
    with pytest.raises((FormatError, InputError), match=rf"hf://datasets/x/cache.*'ex0000'.*{message}"):
        next(stream)
    ok = _examples(tiny["cache"], 1)[0]
    assert next(ExampleStream([_ListReader([ok])], split="all", input_size=VOCAB, output_size=VOCAB)).id == ok.id


def test_endless_stream_with_everything_filtered_out_is_an_error(tiny):
    examples = _examples(tiny["cache"], 6)
    held = [ex for ex in examples if is_eval(ex.id, 0.5)]
    assert held and len(held) < len(examples)
    # every example of the cache is held out: the training split is empty, forever
    stream = ExampleStream([_ListReader(held, epochs=None)], split="train", eval_fraction=0.5)
    with pytest.raises(InputError, match="no example .* split 'train'"):
        next(stream)
    # one cache of two empty: an error too (not a silent single-cache stage)
    kept = [ex for ex in examples if not is_eval(ex.id, 0.5)]
    mixed = ExampleStream(
        [_ListReader(kept, epochs=None), _ListReader(held, epochs=None)], split="train", eval_fraction=0.5
    )
    with pytest.raises(InputError, match="no example"):
        for _ in range(100):
            next(mixed)
    # a finite stream simply ends
    assert list(ExampleStream([_ListReader(held)], split="train", eval_fraction=0.5)) == []


def test_endless_shuffled_stream_waits_for_an_epoch_that_deals_this_rank_data(tiny):
    """Shuffling deals each rank a new slice every epoch: one epoch's slice with nothing to keep (a
    small fraction, many ranks) is no error while the cache holds examples to keep."""
    ids = [ex.id for ex in CacheReader(tiny["cache"])]
    fraction = 0.1
    kept = {i for i in ids if not is_eval(i, 0.0) and keep_fraction(record_id(i), fraction, 0)}
    assert 0 < len(kept) < len(ids) // 4
    world = 8
    for rank in range(world):
        first_epoch = {ex.id for ex in CacheReader(tiny["cache"], rank=rank, world_size=world, shuffle=True, seed=3)}
        if not first_epoch & kept:
            break
    else:
        pytest.fail("every rank's first epoch holds a kept example: pick another fraction")
    reader = CacheReader(tiny["cache"], rank=rank, world_size=world, shuffle=True, seed=3, epochs=None)
    stream = ExampleStream([reader], split="train", eval_fraction=0.0, fraction=fraction)
    assert next(stream).id in kept


def test_the_module_docstrings_example_runs(tiny):
    """issue 10: the example at the top of train_student/data.py calls functions that exist, as written."""
    import train_student.data as data

    example = "\n".join(line[4:] for line in data.__doc__.splitlines() if line.startswith("    "))
    seen = {}
    namespace = {
        **vars(data),
        "StudentLoss": StudentLoss,
        "LossSpec": LossSpec,
        "cache": str(tiny["cache"]),
        "student": make_model(seed=1),
    }
    exec(compile(example + "\n    seen[len(seen)] = loss.item()", "data.__doc__", "exec"), {**namespace, "seen": seen})
    assert seen and all(np.isfinite(v) for v in seen.values())
