"""formats/hub.py: every hub failure is one InputError line naming its cause, wherever it happens (push,
pull, --push-to-hub, and reading a cache over hf://datasets/ through formats/trust.py)."""

import httpx
import pytest
import requests
from huggingface_hub import HfFileSystem
from huggingface_hub import errors as hf

from formats import CacheReader
from formats import hub
from formats.errors import InputError
from formats.manifest import load_manifest
from formats.tools import verify_cache


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/datasets/u/c"))


def _http(cls, status: int):
    return cls(f"{status} Client Error for url https://huggingface.co/api/datasets/u/c", response=_response(status))


CASES = [
    (lambda: hf.OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE=1 is set, so the hub is not contacted"),
    (lambda: hf.LocalEntryNotFoundError("not cached"), "the hub cannot be reached and the file is not in the local"),
    (lambda: _http(hf.GatedRepoError, 403), "the repo is gated: accept its conditions"),
    (lambda: _http(hf.RepositoryNotFoundError, 404), "the repo does not exist \\(or it is private"),
    (lambda: _http(hf.RevisionNotFoundError, 404), "the revision does not exist in that repo: check --revision"),
    (lambda: _http(hf.HfHubHTTPError, 401), "the hub refused the token \\(HTTP 401"),
    (lambda: _http(hf.HfHubHTTPError, 403), "the hub forbids this \\(HTTP 403\\): the token lacks write access"),
    (lambda: _http(hf.HfHubHTTPError, 500), "the hub answered HTTP 500: 500 Client Error"),
    (lambda: hf.LocalTokenNotFoundError("no token"), "no Hugging Face token found: run `hf auth login`"),
    (lambda: httpx.ConnectError("[Errno -2] Name or service not known"), "cannot reach the hub \\(ConnectError"),
    (lambda: httpx.ReadTimeout("timed out"), "cannot reach the hub \\(ReadTimeout"),
    (lambda: requests.ConnectionError("refused"), "cannot reach the hub \\(ConnectionError"),
    (lambda: FileNotFoundError("u/c (repository not found)"), None),  # raised from the hub's error: below
]


@pytest.mark.parametrize("make, text", CASES[:-1], ids=[c[1][:30] for c in CASES[:-1]])
def test_each_hub_failure_is_one_line_naming_its_cause(make, text, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(InputError, match=f"^hf://datasets/u/c: {text}") as got:
        with hub.hub_errors("hf://datasets/u/c"):
            raise make()
    assert "\n" not in str(got.value)


def test_the_cause_behind_an_hffilesystem_file_not_found_is_named():
    """HfFileSystem raises FileNotFoundError from the hub's RepositoryNotFoundError; a missing file alone is
    not a hub failure (the caller says what is missing)."""
    try:
        try:
            raise _http(hf.RepositoryNotFoundError, 404)
        except hf.RepositoryNotFoundError as err:
            raise FileNotFoundError("datasets/u/c/manifest.json (repository not found)") from err
    except FileNotFoundError as exc:
        assert hub.hub_error_text(exc).startswith("the repo does not exist")
    try:
        try:
            raise _http(hf.RemoteEntryNotFoundError, 404)
        except hf.RemoteEntryNotFoundError:
            raise FileNotFoundError("datasets/u/c/manifest.json") from None
    except FileNotFoundError as exc:
        assert hub.hub_error_text(exc) is None
    assert hub.hub_error_text(ValueError("a bug")) is None


def test_other_errors_pass_unchanged():
    with pytest.raises(ZeroDivisionError):
        with hub.hub_errors("x"):
            1 / 0


# ---- reading a cache over hf:// -----------------------------------------------------------------


def test_verify_over_hf_offline_names_offline_mode_not_a_missing_manifest(monkeypatch):
    """Issue 23: `kdcache verify hf://datasets/x/y` with HF_HUB_OFFLINE=1 said "no manifest.json"."""
    monkeypatch.setattr(
        HfFileSystem, "info", lambda self, path, **kw: (_ for _ in ()).throw(hf.OfflineModeIsEnabled("offline"))
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="^hf://datasets/x/y: HF_HUB_OFFLINE=1 is set") as got:
        verify_cache("hf://datasets/x/y")
    assert "manifest" not in str(got.value)


@pytest.mark.skipif(
    not __import__("huggingface_hub").constants.HF_HUB_OFFLINE,
    reason="calls the real HfFileSystem: only where huggingface_hub was imported with HF_HUB_OFFLINE=1 (make test)",
)
def test_kdcache_verify_hf_offline_for_real(capsys):
    """The issue's reproduction, unpatched: `HF_HUB_OFFLINE=1 kdcache verify hf://datasets/x/y`."""
    from kdcache.cli import main

    assert main(["verify", "hf://datasets/x/y"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "kdcache verify: error: hf://datasets/x/y: HF_HUB_OFFLINE=1 is set, so the hub is not contacted: "
        "unset HF_HUB_OFFLINE (or use a local copy)"
    ]


def _info_raising(exc):
    def info(self, path, **kw):
        raise exc

    return info


def _not_found_from(err):
    try:
        raise err
    except Exception as cause:
        try:
            raise FileNotFoundError(str(cause)) from cause
        except FileNotFoundError as exc:
            return exc


@pytest.mark.parametrize(
    "exc, text",
    [
        (httpx.ConnectError("[Errno -2] Name or service not known"), "cannot reach the hub"),
        (_not_found_from(_http(hf.RepositoryNotFoundError, 404)), "the repo does not exist"),
        (_not_found_from(_http(hf.RevisionNotFoundError, 404)), "the revision does not exist"),
        (_http(hf.HfHubHTTPError, 401), "the hub refused the token"),
    ],
)
def test_reading_and_training_over_hf_name_the_cause(exc, text, monkeypatch):
    monkeypatch.setattr(HfFileSystem, "info", _info_raising(exc))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for read in (load_manifest, verify_cache, lambda url: list(CacheReader(url, prefetch=0))):
        with pytest.raises(InputError, match=f"^hf://datasets/x/y@v1: {text}"):
            read("hf://datasets/x/y@v1")


def test_a_repo_without_a_manifest_still_says_so(monkeypatch):
    monkeypatch.setattr(HfFileSystem, "info", _info_raising(FileNotFoundError("datasets/x/y/manifest.json")))
    with pytest.raises(Exception, match="no manifest.json"):
        load_manifest("hf://datasets/x/y")


# ---- repo ids and tokens ------------------------------------------------------------------------


def test_targets_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.dataset_repo_id("user/name") == "user/name"
    assert hub.dataset_repo_id("hf://datasets/user/name/") == "user/name"
    for local in ("s3://b/p", "file:///x", "/x", "./user/name", "gs://b/p", "folder"):
        assert hub.dataset_repo_id(local) is None
    with pytest.raises(InputError, match="pushed to a dataset repo"):
        hub.dataset_repo_id("hf://user/model")
    with pytest.raises(InputError, match="not a hub repo id"):
        hub.dataset_repo_id("hf://datasets/a/b/c")


def test_token_from_env(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(InputError, match="HF_TOKEN is not set"):
        hub.token_from_env()
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert hub.token_from_env() == "hf_abc"


def test_check_can_write_offline_and_without_a_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE=1 is set, so nothing can be uploaded"):
        hub.check_can_write("u/m", "push")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(InputError, match="no Hugging Face token found"):
        hub.check_can_write("u/m", "push")
    assert hub.check_can_write("u/m", "push", token="hf_x") == "hf_x"
    with pytest.raises(InputError, match="not a hub repo id"):
        hub.check_can_write("not a repo", "push", token="hf_x")


def test_upload_folder_files_sends_plain_files_only(tmp_path, monkeypatch):
    from . import fake_hub

    calls = fake_hub.FakeHub(tmp_path / "hub").install(monkeypatch)
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    (final / "README.md").write_text("# card")
    hub.upload_folder_files(final, "u/student", token="hf_x", log=lambda _: None)
    assert calls.commits[0]["add"] == ["README.md", "config.json"]
    assert next(kw for n, kw in calls.calls if n == "create_repo")["repo_type"] == "model"
    (final / "link").symlink_to(tmp_path / "hub")
    with pytest.raises(InputError, match="not a plain file"):
        hub.upload_folder_files(final, "u/student", token="hf_x", log=lambda _: None)


@pytest.mark.parametrize(
    "exc, text",
    [
        (ConnectionError("connection refused"), "cannot reach the store \\(ConnectionError: connection refused\\)"),
        (PermissionError(13, "Access Denied"), "cannot be read \\(PermissionError"),
    ],
)
def test_another_store_that_cannot_answer_is_named_too(exc, text, monkeypatch):
    """Not the hub: an object store's connection or permission failure is one line, not "no manifest.json"."""
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setattr(MemoryFileSystem, "info", _info_raising(exc))
    with pytest.raises(InputError, match=f"^memory://kd-store/c: {text}") as got:
        load_manifest("memory://kd-store/c")
    assert "hub" not in str(got.value)
