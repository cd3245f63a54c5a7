"""`kdcache train --push-to-hub REPO_ID` (train_student/train.py `run`): the token and offline mode are checked
before training starts; a finished run uploads final/ (whatever is in it) to a model repo, up to
huggingface_hub's API boundary (tests/formats/fake_hub.py); a run stopped by SIGTERM uploads nothing."""

from pathlib import Path

import pytest
from ..formats.fake_hub import FakeHub

from formats.errors import InputError
from train_student import train as train_mod
from train_student.config import make_config


class FakeTrainer:
    """Stands in for the Trainer: writes final/ the way a finished run leaves it (or stops early)."""

    started = False
    finish = True

    def __init__(self, cfg):
        self.cfg, self.out, self.stages, self.stage_idx, self.main = cfg, Path(cfg.out), [0], 0, True
        FakeTrainer.started = True

    def setup(self):
        pass

    def train(self):
        final = self.out / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")
        (final / "model.safetensors").write_bytes(b"\0" * 64)
        (final / "README.md").write_text("# student\n")
        if FakeTrainer.finish:
            self.stage_idx = len(self.stages)
        return 0

    def cleanup(self):
        pass


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "Trainer", FakeTrainer)
    FakeTrainer.started, FakeTrainer.finish = False, True
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    cfg = make_config(cache=["unused-cache"], student="s", out=str(tmp_path / "run"), push_to_hub="me/student")
    return hub, cfg


def test_a_finished_run_uploads_final(setup):
    hub, cfg = setup
    assert train_mod.run(cfg) == 0
    create_repo = next(kw for name, kw in hub.calls if name == "create_repo")
    assert create_repo["args"] == ("me/student",) and create_repo["repo_type"] == "model"
    assert hub.commits[0]["add"] == ["README.md", "config.json", "model.safetensors"]
    assert (hub.folder("me/student") / "model.safetensors").read_bytes() == b"\0" * 64


def test_a_stopped_run_uploads_nothing(setup):
    hub, cfg = setup
    FakeTrainer.finish = False
    assert train_mod.run(cfg) == 0
    assert hub.calls == []


@pytest.mark.parametrize(
    "env, text",
    [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 is set"), ({"HF_TOKEN": None}, "no Hugging Face token found")],
)
def test_push_to_hub_is_checked_before_training(setup, monkeypatch, env, text):
    hub, cfg = setup
    for key, value in env.items():
        monkeypatch.delenv(key) if value is None else monkeypatch.setenv(key, value)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(InputError, match=f"^--push-to-hub: {text}"):
        train_mod.run(cfg)
    assert not FakeTrainer.started and hub.calls == []


def test_push_to_hub_needs_a_repo_id(setup):
    _, cfg = setup
    cfg.push_to_hub = "no slash"
    with pytest.raises(InputError, match="not a hub repo id"):
        train_mod.run(cfg)
    assert not FakeTrainer.started
