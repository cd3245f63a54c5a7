"""The trainer end to end on tiny models: learning, exact resume (SIGKILL, SIGTERM), DDP == one
process, SFT and multi-stage recipes, pruned students, refusals, plots."""

from __future__ import annotations

import signal

import pytest
import torch

from formats.errors import IncompatibleCachesError, InputError
from train_student.__main__ import main as train_main

from .kd_fixtures import (
    PYTHON,
    REPO,
    final_weights,
    make_model,
    make_tokenizer,
    python_env,
    read_metrics,
    reorder_cache,
    run_train,
    save_model,
    train_args,
    write_cache,
)

RESUME_FLAGS = dict(steps=8, save_every=2, shuffle=True, epochs=0, grad_accum=2)


def _assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs")


@pytest.mark.slow
def test_short_run_lowers_heldout_kl(tiny, tmp_path):
    out = tmp_path / "run"
    rc = train_main(
        train_args(
            tiny["student"],
            tiny["cache"],
            out,
            steps=30,
            lr=1e-2,
            epochs=0,
            eval_every=15,
            max_tokens=128,
            ce_weight=0.1,
        )
        + ["--tensorboard"]
    )
    assert rc == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    evals = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[-1]["kl"] < 0.6 * evals[0]["kl"], evals
    assert evals[-1]["ppl"] > 1 and evals[-1]["targets"] > 0
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert len(train) == 30 and all(0 <= r["data_wait_frac"] < 1 for r in train)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # loads like any checkpoint
    from kdcache.study.plot import plot_runs

    png = plot_runs([str(out)], out=str(tmp_path / "plots"))[0]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    res = run_train(train_args(tiny["student"], tiny["cache"], out, **RESUME_FLAGS))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.multiprocess
def test_sigkill_then_resume_equals_uninterrupted(tiny, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = train_args(tiny["student"], tiny["cache"], out, **RESUME_FLAGS)
    killed = run_train(args, signal_at=4, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "final").exists() and (out / "checkpoints" / "step-00000004").exists()
    again = run_train(args)  # without --resume the run refuses to overwrite
    assert again.returncode == 1 and "--resume" in again.stderr
    resumed = run_train(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(final_weights(out), final_weights(uninterrupted))
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, 9))  # the killed run's lines after step 4 were dropped


@pytest.mark.multiprocess
def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = train_args(tiny["student"], tiny["cache"], out, **RESUME_FLAGS)
    stopped = run_train(args, signal_at=2, sig=signal.SIGTERM)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "SIGTERM" in stopped.stderr and (out / "checkpoints" / "step-00000003").exists()
    resumed = run_train(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(final_weights(out), final_weights(uninterrupted))


@pytest.mark.multiprocess
def test_ddp_and_fsdp_two_processes_equal_one_process(tmp_path):
    """DDP or FSDP2, 2 ranks x 2 micro-batches == 1 rank x 4 micro-batches over the same examples per step (one
    example per packed sequence), token-weighted loss, so the same updates. 11 examples on 2 ranks: 5 each, the
    last one left over (and said so); the last step is partial on every rank (1 sequence + 1 empty micro-batch)
    and is trained, not dropped."""
    import subprocess

    tok = make_tokenizer()
    teacher = make_model(seed=1, scale=0.12).eval()
    student = save_model(make_model(seed=2), tok, tmp_path / "student")
    cache = write_cache(teacher, tok, tmp_path / "cache", n=11, min_len=21, max_len=40, row_group_positions=1)
    # rank 0 reads ex0..ex4, rank 1 ex5..ex9; one process reads them in the order the two ranks' steps take them
    order = [0, 1, 5, 6, 2, 3, 7, 8, 4, 9]
    one_cache = reorder_cache(cache, tmp_path / "cache-one", [f"ex{i:04d}" for i in order])
    flags = dict(max_tokens=40, eval_fraction=0, shuffle=False, grad_clip=0.5)
    one = run_train(train_args(student, one_cache, tmp_path / "one", grad_accum=4, **flags))
    assert one.returncode == 0, one.stderr[-3000:]
    a = [r for r in read_metrics(tmp_path / "one") if r["split"] == "train"]
    assert [r["step"] for r in a] == [1, 2, 3]
    for run, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        cmd = [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "train_student",
            *train_args(student, cache, tmp_path / run, grad_accum=2, **flags),
            *extra,
        ]
        two = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
        assert two.returncode == 0, two.stderr[-3000:]
        assert "1 of 11 examples per epoch are left over" in two.stderr
        b = [r for r in read_metrics(tmp_path / run) if r["split"] == "train"]
        assert [r["step"] for r in b] == [1, 2, 3]
        for x, y in zip(a, b):
            assert x["tokens"] == y["tokens"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        _assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / run), exact=False)


def test_multistage_yaml_kd_then_sft_with_pruned_student(tiny, tmp_path):
    cfg = tmp_path / "two_stage.yaml"
    cfg.write_text(f"""
init_from_teacher: {tiny["teacher"]}
keep_layers: [1]
out: {tmp_path / "run"}
max_tokens: 96
eval_fraction: 0.2
lr: 0.003
warmup_steps: 1
log_every: 1
stages:
  - {{name: kd, cache: {tiny["cache"]}, steps: 3, kd_weight: 1.0, temperature: 2.0, tail: bucket}}
  - {{name: sft, cache: [{tiny["cache"]}], steps: 2, kd_weight: 0.0, ce_weight: 1.0, max_examples: 20}}
""")
    rc = train_main(["train", "--config", str(cfg), "--no-progress", "--no-tensorboard"])
    assert rc == 0
    rows = read_metrics(tmp_path / "run")
    assert [(r["stage"], r["step"]) for r in rows if r["split"] == "train"] == [
        ("kd", 1),
        ("kd", 2),
        ("kd", 3),
        ("sft", 4),
        ("sft", 5),
    ]
    sft = [r for r in rows if r["split"] == "train" and r["stage"] == "sft"]
    assert all(r["loss"] == pytest.approx(r["ce"]) for r in sft)  # SFT: the loss is the CE alone
    # the pruned student is the teacher's layer 1 (before training) and loads with from_pretrained
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student-init")
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    assert init.config.num_hidden_layers == 1
    torch.testing.assert_close(init.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)


def test_student_with_another_tokenizer_is_refused(tiny, tmp_path, capsys):
    """--cross-tokenizer off refuses another tokenizer naming the option; auto (the default) needs the
    cache's tokenizer files, which this cache lacks: the add-tokenizer command (tests/train_student/
    test_train_xtok.py trains such a student)."""
    from train_student.config import make_config
    from train_student.train import run

    other = save_model(make_model(seed=2), make_tokenizer(extra="x"), tmp_path / "other")
    with pytest.raises(InputError, match="not the teacher's .*Pass --cross-tokenizer auto"):
        run(
            make_config(
                student=str(other),
                cache=[str(tiny["cache"])],
                out=str(tmp_path / "run"),
                steps=1,
                cross_tokenizer="off",
            )
        )
    with pytest.raises(InputError, match="carries no tokenizer files.*kdcache add-tokenizer"):
        run(make_config(student=str(other), cache=[str(tiny["cache"])], out=str(tmp_path / "run"), steps=1))
    rc = train_main(train_args(other, tiny["cache"], tmp_path / "run", steps=1))
    assert rc == 1 and "kdcache add-tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("dtype,saved", [("bfloat16", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_bf16_gradient_checkpointing_naive_impl_runs(tiny, tmp_path, dtype, saved):
    out = tmp_path / "run"
    rc = train_main(
        train_args(
            tiny["student"],
            tiny["cache"],
            out,
            steps=2,
            dtype=dtype,
            gradient_checkpointing=True,
            impl="naive",
            ce_weight=0.5,
        )
    )
    assert rc == 0
    rows = [r for r in read_metrics(out) if r["split"] == "train"]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rows)
    assert {w.dtype for w in final_weights(out).values()} == {saved}


def test_dummy_eval_batch_is_harmless():
    """Ranks without held-out data run this batch to keep FSDP's collectives in step: zero tokens, no NaN."""
    from train_student.loss_options import LossSpec
    from train_student.model import StudentLoss
    from train_student.train import _dummy_batch

    b = _dummy_batch()
    loss, m = StudentLoss(make_model(seed=0))(
        b.input_ids,
        b.position_ids,
        b.topk_ids,
        b.topk_logprobs,
        b.labels,
        spec=LossSpec(kd_weight=1.0, ce_weight=1.0, impl="chunked"),
    )
    assert b.n_targets == 0 and loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())


def test_top1_agreement_sums_exact_counts_over_batches():
    """Top-1 agreement of a window is agreeing / scored positions over all its batches: a batch with few
    scored positions (most without a teacher entry) does not count as much as its trained targets."""
    from train_student.train import Sums, _top1

    window = Sums("n_top1_agree", "n_scored", "targets")
    window.add(n_top1_agree=2, n_scored=2, targets=10)  # ratio 1.0 over 2 scored of 10 targets
    window.add(n_top1_agree=0, n_scored=10, targets=10)  # ratio 0.0 over 10 scored
    sums = window.reduced(lambda t: t)
    assert sums == {"n_top1_agree": 2.0, "n_scored": 12.0, "targets": 20.0}
    assert _top1(sums) == 2 / 12  # the old target-weighted mean of ratios said 0.5
    window.zero()
    assert _top1(window.reduced(lambda t: t)) == 0.0


def test_lr_schedule_warms_up_from_lr_over_warmup_then_cosine_to_min():
    """The rate of each update: lr * (s + 1) / warmup while warming up (never 0), 1 at the end of the
    warmup, min_ratio at the last step, constant once warm when the total is unknown."""
    from train_student.train import lr_lambda

    f = [lr_lambda(s, warmup=4, total=12, min_ratio=0.1) for s in range(13)]
    assert f[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert f[8] == pytest.approx(0.1 + 0.9 * 0.5) and f[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert [lr_lambda(s, warmup=2, total=None, min_ratio=0.1) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_lambda(0, warmup=0, total=10, min_ratio=0.0) == 1.0


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [2, 4])  # inside stage one; inside stage two
def test_multistage_crash_and_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch, crash_at):
    """In-process: a crash right after a checkpoint, then --resume, ends with the same weights."""
    from train_student import checkpoint

    def cfg(out):
        path = tmp_path / f"{out}.yaml"
        path.write_text(f"""
student: {tiny["student"]}
out: {tmp_path / out}
max_tokens: 80
grad_accum: 2
eval_fraction: 0.2
lr: 0.003
warmup_steps: 1
save_every: 2
log_every: 1
stages:
  - {{name: one, cache: {tiny["cache"]}, steps: 3, epochs: 0, temperature: 2.0}}
  - {{name: two, cache: [{tiny["cache"]}, {tiny["cache"]}], steps: 3, epochs: 0, kd_weight: 0.5, ce_weight: 0.5,
     max_examples: 30}}
""")
        return ["train", "--config", str(path), "--no-progress", "--no-tensorboard"]

    assert train_main(cfg("straight")) == 0
    orig = checkpoint.save

    def crashing_save(*a, **kw):
        out = orig(*a, **kw)
        if kw["step"] == crash_at:
            raise _Crash
        return out

    monkeypatch.setattr(checkpoint, "save", crashing_save)
    with pytest.raises(_Crash):
        train_main(cfg("crashed"))
    monkeypatch.setattr(checkpoint, "save", orig)
    assert train_main(cfg("crashed") + ["--resume"]) == 0
    _assert_same_weights(final_weights(tmp_path / "crashed"), final_weights(tmp_path / "straight"))
    steps = [(r["stage"], r["step"]) for r in read_metrics(tmp_path / "crashed") if r["split"] == "train"]
    assert steps == [("one", 1), ("one", 2), ("one", 3), ("two", 4), ("two", 5), ("two", 6)]


def test_resume_of_a_run_killed_before_final_writes_final(tiny, tmp_path):
    """Killed after the last checkpoint, before final/ was written: --resume writes final/ (and trains nothing)."""
    out = tmp_path / "run"
    args = train_args(tiny["student"], tiny["cache"], out, steps=2)
    assert train_main(args) == 0
    expected = final_weights(out)
    import shutil

    shutil.rmtree(out / "final")  # what a kill between the last checkpoint and final/ leaves
    assert train_main(args + ["--resume"]) == 0
    _assert_same_weights(final_weights(out), expected)
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2]


def test_stage_mixing_two_teachers_is_refused_unless_allowed(tiny, tmp_path):
    import json
    import shutil

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny["cache"], other)
    m = json.loads((other / "manifest.json").read_text())
    m["teacher"]["name_or_path"] = "another-teacher"
    (other / "manifest.json").write_text(json.dumps(m))
    from train_student.config import make_config
    from train_student.train import run

    def cfg(**kw):
        return make_config(
            student=str(tiny["student"]),
            cache=[str(tiny["cache"]), str(other)],
            out=str(tmp_path / "run"),
            steps=1,
            progress=False,
            tensorboard=False,
            **kw,
        )

    with pytest.raises(
        IncompatibleCachesError, match="different teachers .*teacher.name_or_path.*allow_mixed_teachers"
    ):
        run(cfg())
    assert run(cfg(allow_mixed_teachers=True)) == 0


@pytest.mark.parametrize("extra", ["final_logit_softcapping", "logit_scale", "logits_scaling", "bias"])
def test_student_with_output_head_extras_is_refused(tmp_path, extra):
    from train_student.model import check_output_head

    lm = make_model(seed=0)
    check_output_head(lm, "plain")  # a plain head passes
    if extra == "bias":
        lm.lm_head.bias = torch.nn.Parameter(torch.zeros(lm.lm_head.out_features))
    else:
        setattr(lm.config, extra, 30.0)
    with pytest.raises(InputError, match=f"s{{0,1}}tudent's output head has .*{'bias' if extra == 'bias' else extra}"):
        check_output_head(lm, "x")


def test_student_whose_forward_transforms_logits_unannounced_is_refused():
    """A scale no config field names (MiniCPM, Falcon-H1 style): the probe of the forward finds it."""
    from train_student.model import check_output_head

    class ScaledHead(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.weight = linear.weight

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight) / 4.0

    lm = make_model(seed=0)
    lm.lm_head = ScaledHead(lm.lm_head)
    with pytest.raises(InputError, match="logits that differ from hidden @ lm_head.weight"):
        check_output_head(lm, "x")


def test_training_refuses_a_softcapped_student_before_it_starts(tiny, tmp_path):
    lm = make_model(seed=2)
    lm.config.final_logit_softcapping = 30.0
    student = save_model(lm, make_tokenizer(), tmp_path / "softcapped")
    rc = train_main(train_args(student, tiny["cache"], tmp_path / "run", steps=1))
    assert rc == 1 and not (tmp_path / "run" / "checkpoints").exists()


def test_no_host_read_inside_a_step_one_per_logging_window(tiny, tmp_path, monkeypatch):
    """The training loop reads no tensor value (on a GPU: no host sync) in a step that does not log, and
    one read per --log-every window (its metrics and the grad norm together). Counted by wrapping the
    Tensor methods that read a value and attributing each call to the file that made it (the loop's
    own code: train_student/ and formats/; what transformers does inside the model is its own)."""
    import sys
    from pathlib import Path

    import train_student
    import formats

    ours = (str(Path(train_student.__file__).parent), str(Path(formats.__file__).parent))
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                reads.append(f"{_name} {caller}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    marks: list[int] = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        marks.append(len(reads))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    assert (
        train_main(train_args(tiny["student"], tiny["cache"], out, steps=7, log_every=3, eval_fraction=0, grad_accum=2))
        == 0
    )
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # reads between optimizer steps k and k+1
    # between steps 3 and 4 and between 6 and 7: the window logged after steps 3 and 6; otherwise none
    assert per_step == [0, 0, 1, 0, 0, 1], (per_step, reads)
    assert len([r for r in read_metrics(out) if r["split"] == "train"]) == 2
