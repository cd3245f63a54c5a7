"""`kdcache push` / `kdcache pull` (formats/share.py): to a local folder and a real S3 server (moto) for real;
to and from the Hub up to huggingface_hub's API boundary (tests/formats/fake_hub.py records the calls)."""

import hashlib
import json
import os

import pytest
from .fake_hub import FakeHub
from .format_helpers import edit_manifest

from formats import CacheReader
from formats import share as share_mod
from formats.errors import ChecksumError, FormatError, InputError
from formats.schema import CARD_NAME, MANIFEST_NAME
from formats.share import pull_cache, push_cache
from formats.tools import listed_files, verify_cache
from formats.trust import CacheFiles
from kdcache.cli import main as kdcache

REPO = "someone/kd-cache"


def rows(path, **kw):
    return {
        ex.id: (ex.input_ids.tolist(), ex.target_positions.tolist(), ex.topk_ids.tolist(), ex.topk_logprobs.tolist())
        for ex in CacheReader(path, prefetch=0, **kw)
    }


def files_of(folder):
    return sorted(rel for rel, kind in CacheFiles(folder).walk() if kind == "file")


def expected_files(cache):
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    return sorted([*listed_files(manifest), CARD_NAME])


def quiet(_text):
    pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHub(tmp_path / "hub").install(monkeypatch)


# ---- a local folder and S3, for real ----------------------------------------------------------


def test_push_to_a_folder_sends_exactly_the_listed_files(cache, tmp_path):
    (cache / "notes.txt").write_text("mine, not the cache's")  # unlisted: verify notes it, push never sends it
    out = tmp_path / "published"
    result = push_cache(cache, str(out), log=quiet)
    assert files_of(out) == expected_files(cache)
    assert result["sent"][-1] == MANIFEST_NAME and result["skipped"] == 0
    assert [n.endswith(".parquet") for n in result["sent"][:3]] == [True] * 3  # shards first
    assert verify_cache(out)["examples"] == 40
    assert rows(out) == rows(cache)


def test_push_to_s3_and_read_it_back(cache, s3):
    fs, options = s3
    url = "s3://kd-bucket/shared/c1"
    (cache / "notes.txt").write_text("unlisted")
    push_cache(cache, url, storage_options=options, log=quiet)
    held = sorted(p.split("kd-bucket/shared/c1/", 1)[1] for p in fs.find("kd-bucket/shared/c1"))
    assert held == expected_files(cache)
    assert verify_cache(url, storage_options=options)["examples"] == 40
    assert rows(url, storage_options=options) == rows(cache)


def test_a_partial_push_to_s3_resumes(cache, s3, monkeypatch):
    from formats.remote_write import Remote

    fs, options = s3
    url = "s3://kd-bucket/shared/c2"
    real_put, sent = Remote.put, []

    def put_then_fail(self, local, name):
        if len(sent) == 3:
            raise InputError("the network went away")
        sent.append(name)
        real_put(self, local, name)

    monkeypatch.setattr(Remote, "put", put_then_fail)
    with pytest.raises(InputError, match="went away"):
        push_cache(cache, url, storage_options=options, log=quiet)
    held = [p.rsplit("/", 1)[1] for p in fs.find("kd-bucket/shared/c2")]
    assert len(held) == 3 and MANIFEST_NAME not in held  # some shards, no manifest: not a cache yet
    monkeypatch.setattr(Remote, "put", real_put)
    result = push_cache(cache, url, storage_options=options, log=quiet)
    assert result["skipped"] == 3 and set(result["sent"]).isdisjoint(held)
    assert rows(url, storage_options=options) == rows(cache)


def test_a_partial_push_to_a_folder_resumes_and_redoes_a_damaged_file(cache, tmp_path):
    out = tmp_path / "published"
    push_cache(cache, str(out), log=quiet)
    shards = sorted(p.name for p in out.glob("*.parquet"))
    (out / MANIFEST_NAME).unlink()
    (out / shards[1]).unlink()
    data = bytearray((out / shards[2]).read_bytes())
    data[100] ^= 0xFF  # the same size, other bytes: the hash says so
    (out / shards[2]).write_bytes(bytes(data))
    result = push_cache(cache, str(out), log=quiet)
    assert sorted(result["sent"]) == sorted([shards[1], shards[2], MANIFEST_NAME])
    assert rows(out) == rows(cache)


def test_a_cache_that_fails_verify_is_refused_before_anything_is_written(cache, tmp_path, hub):
    shard = sorted(cache.glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    out = tmp_path / "published"
    with pytest.raises(ChecksumError, match="refusing to push.*nothing was sent"):
        push_cache(cache, str(out), log=quiet)
    assert not out.exists()
    with pytest.raises(ChecksumError, match="refusing to push"):
        push_cache(cache, REPO, log=quiet)
    assert hub.calls == []  # not even the repo was created


def test_a_symlink_in_the_cache_is_never_sent(cache, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the hub")
    os.symlink(secret, cache / "notes.txt")
    out = tmp_path / "published"
    with pytest.raises(FormatError, match="symlink"):
        push_cache(cache, str(out), log=quiet)
    assert not out.exists()


def test_a_target_holding_another_caches_files_is_refused(cache, tmp_path):
    out = tmp_path / "published"
    out.mkdir()
    (out / "part-99999.parquet").write_bytes(b"another cache")
    with pytest.raises(InputError, match="holds files this cache does not list.*part-99999"):
        push_cache(cache, str(out), log=quiet)
    assert files_of(out) == ["part-99999.parquet"]


def test_a_link_planted_in_the_target_is_replaced_not_written_through(cache, tmp_path):
    out = tmp_path / "published"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, out / MANIFEST_NAME)
    push_cache(cache, str(out), log=quiet)
    assert victim.read_text() == "keep me"
    assert not (out / MANIFEST_NAME).is_symlink()
    verify_cache(out)


# ---- the Hub, up to huggingface_hub's API -------------------------------------------------------


def test_push_to_the_hub_commits_shards_first_and_the_manifest_last(cache, hub, monkeypatch):
    monkeypatch.setattr(share_mod, "SHARDS_PER_COMMIT", 2)
    (cache / "notes.txt").write_text("unlisted")
    result = push_cache(f"{cache}", f"hf://datasets/{REPO}", private=True, revision="v1", log=quiet)
    assert result["target"] == f"hf://datasets/{REPO}@v1"
    create_repo = next(kw for name, kw in hub.calls if name == "create_repo")
    assert create_repo == {"args": (REPO,), "repo_type": "dataset", "private": True, "exist_ok": True}
    branch = next(kw for name, kw in hub.calls if name == "create_branch")
    assert branch["branch"] == "v1" and branch["repo_type"] == "dataset"
    commits = [kw for name, kw in hub.calls if name == "create_commit"]
    assert all(c["repo_type"] == "dataset" and c["revision"] == "v1" for c in commits)
    shards = [c["add"] for c in hub.commits[:-1]]
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    assert [n for batch in shards for n in batch] == [s["file"] for s in manifest["shards"]]
    assert all(len(batch) <= 2 for batch in shards)
    assert hub.commits[-1]["add"] == ["rejects.jsonl", CARD_NAME, MANIFEST_NAME]
    assert not any("notes.txt" in c["add"] for c in hub.commits)
    repo = hub.folder(REPO, "v1")
    assert files_of(repo) == sorted([*expected_files(cache), ".gitattributes"])
    assert rows(repo) == rows(cache)


def test_a_hub_push_resumes_from_what_the_repo_holds(cache, hub):
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    first, second = (s["file"] for s in manifest["shards"][:2])
    hub._create_repo(REPO)
    hub.put(REPO, first, (cache / first).read_bytes())  # a complete shard: skipped
    hub.put(REPO, second, (cache / second).read_bytes()[:-5])  # a cut one: sent again
    result = push_cache(cache, REPO, log=quiet)
    assert first not in result["sent"] and second in result["sent"] and result["skipped"] == 1
    assert rows(hub.folder(REPO)) == rows(cache)
    again = push_cache(cache, REPO, log=quiet)  # all there: nothing to commit
    assert again["sent"] == [] and len(hub.commits) == 2


def test_an_interrupted_hub_push_never_leaves_a_manifest(cache, hub, monkeypatch):
    monkeypatch.setattr(share_mod, "SHARDS_PER_COMMIT", 1)
    hub.fail_commit_after = 2
    with pytest.raises(InputError, match=f"hf://datasets/{REPO}: cannot reach the hub"):
        push_cache(cache, REPO, log=quiet)
    assert not (hub.folder(REPO) / MANIFEST_NAME).exists()
    hub.fail_commit_after = None
    result = push_cache(cache, REPO, log=quiet)
    assert result["skipped"] == 2
    assert rows(hub.folder(REPO)) == rows(cache)


def test_a_new_cache_over_an_old_one_removes_the_old_manifest_first(cache, hub, tmp_path):
    push_cache(cache, REPO, log=quiet)
    edit_manifest(cache, lambda m: m.update(created="2030-01-01T00:00:00Z"))
    hub.commits.clear()
    push_cache(cache, REPO, log=quiet)
    assert hub.commits[-1]["add"][-1] == MANIFEST_NAME
    assert json.loads((hub.folder(REPO) / MANIFEST_NAME).read_text())["created"] == "2030-01-01T00:00:00Z"


def test_a_hub_repo_with_other_files_is_refused(cache, hub):
    hub._create_repo(REPO)
    hub.put(REPO, "train.parquet", b"someone else's data")
    with pytest.raises(InputError, match="holds files this cache does not list"):
        push_cache(cache, REPO, log=quiet)
    assert hub.commits == []


def test_push_checks_token_and_offline_mode_before_verifying(cache, hub, monkeypatch, capsys):
    monkeypatch.setattr(share_mod, "verify_cache", lambda *a, **k: pytest.fail("verified before the checks"))
    monkeypatch.delenv("HF_TOKEN")
    assert kdcache(["push", str(cache), REPO, "--token-from-env"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "kdcache push: error: --token-from-env: HF_TOKEN is not set (or empty); export HF_TOKEN=hf_... or drop the flag"
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert kdcache(["push", str(cache), REPO]) == 1
    assert "HF_HUB_OFFLINE=1 is set, so nothing can be uploaded" in capsys.readouterr().err
    assert hub.calls == []


def test_a_hub_id_that_is_also_a_local_folder_is_ambiguous(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(InputError, match="hf://datasets/runs/copy for the hub, ./runs/copy for the folder"):
        push_cache(cache, "runs/copy", log=quiet)


# ---- pull -------------------------------------------------------------------------------------


def test_pull_downloads_the_listed_files_at_one_commit_and_verifies(cache, hub, tmp_path):
    hub.serve(REPO, cache)
    hub.put(REPO, "extra.bin", b"not listed: never downloaded")
    out = tmp_path / "got"
    result = pull_cache(REPO, out, log=quiet)
    assert result["examples"] == 40 and result["commit"]
    assert files_of(out) == expected_files(cache)
    assert rows(out) == rows(cache)
    first = next(kw for name, kw in hub.calls if name == "hf_hub_download")
    assert first["args"] == (REPO, MANIFEST_NAME) and first["repo_type"] == "dataset"
    snap = next(kw for name, kw in hub.calls if name == "snapshot_download")
    assert snap["revision"] == result["commit"] and snap["repo_type"] == "dataset"
    assert sorted(snap["allow_patterns"]) == sorted(n for n in expected_files(cache) if n != MANIFEST_NAME)
    assert not list(tmp_path.glob(".got.kdcache-pull"))


def test_pull_of_a_revision(cache, hub, tmp_path, capsys):
    hub.serve(REPO, cache, revision="v2")
    assert kdcache(["pull", f"hf://datasets/{REPO}", str(tmp_path / "got"), "--revision", "v2"]) == 0
    assert "verified" in capsys.readouterr().out
    assert next(kw for name, kw in hub.calls if name == "repo_info")["revision"] == "v2"


def test_pull_refuses_a_manifest_naming_a_path_outside_the_cache(cache, hub, tmp_path):
    edit_manifest(cache, lambda m: m["shards"][0].update(file="../x.parquet"))
    hub.serve(REPO, cache)
    out = tmp_path / "got"
    with pytest.raises(FormatError, match="points outside the cache folder"):
        pull_cache(REPO, out, log=quiet)
    assert "snapshot_download" not in hub.names("snapshot_download")
    assert not out.exists() and not (tmp_path / ".got.kdcache-pull").exists()


def test_pull_refuses_an_oversized_manifest_before_downloading_it(cache, hub, tmp_path, monkeypatch):
    monkeypatch.setattr(share_mod, "MAX_MANIFEST_BYTES", 1000)
    hub.serve(REPO, cache)
    with pytest.raises(FormatError, match="more than the 1000 a manifest may hold"):
        pull_cache(REPO, tmp_path / "got", log=quiet)
    assert hub.names("hf_hub_download") == []


def test_pull_refuses_a_shard_whose_hash_differs(cache, hub, tmp_path):
    repo = hub.serve(REPO, cache)
    shard = sorted(repo.glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    out = tmp_path / "got"
    with pytest.raises(ChecksumError, match="has sha256 .* in the repo, the manifest says"):  # the listed LFS hash
        pull_cache(REPO, out, log=quiet)
    assert hub.names("snapshot_download") == [] and not out.exists()
    hub.lfs = False  # a server that lists no hash: downloaded, then verify refuses it
    with pytest.raises(ChecksumError, match="fails verify; deleted, .* not created: .*sha256"):
        pull_cache(REPO, out, log=quiet)
    assert not out.exists() and not (tmp_path / ".got.kdcache-pull").exists()


def test_pull_refuses_a_size_that_differs_from_the_manifest(cache, hub, tmp_path):
    repo = hub.serve(REPO, cache)
    shard = sorted(repo.glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0" * 10)
    with pytest.raises(ChecksumError, match="bytes in the repo, the manifest says"):
        pull_cache(REPO, tmp_path / "got", log=quiet)
    assert hub.names("snapshot_download") == []


def test_pull_of_a_repo_without_a_manifest(hub, tmp_path, capsys):
    hub._create_repo(REPO)
    assert kdcache(["pull", REPO, str(tmp_path / "got")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"kdcache pull: error: hf://datasets/{REPO}: no manifest.json in the repo; it is not a kdcache cache"
    ]


def test_pull_into_a_folder_that_is_not_empty_is_refused(cache, hub, tmp_path):
    (tmp_path / "got").mkdir()
    (tmp_path / "got" / "x").write_text("mine")
    with pytest.raises(InputError, match="not an empty folder"):
        pull_cache(REPO, tmp_path / "got", log=quiet)
    assert hub.calls == []


def test_the_manifest_pushed_is_the_one_verified(cache, hub):
    push_cache(cache, REPO, log=quiet)
    got = (hub.folder(REPO) / MANIFEST_NAME).read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256((cache / MANIFEST_NAME).read_bytes()).hexdigest()


@pytest.mark.skipif(
    not __import__("huggingface_hub").constants.HF_HUB_OFFLINE,
    reason="calls the real huggingface_hub: only where it was imported with HF_HUB_OFFLINE=1 (as make test runs it)",
)
def test_pull_with_hf_hub_offline_is_one_line_for_real(tmp_path, capsys):
    assert kdcache(["pull", REPO, str(tmp_path / "got")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"hf://datasets/{REPO}: HF_HUB_OFFLINE=1 is set" in err[0]
    assert not (tmp_path / "got").exists() and not (tmp_path / ".got.kdcache-pull").exists()


def _after_verify(monkeypatch, change):
    real = share_mod.verify_cache

    def verify_then_change(*args, **kwargs):
        result = real(*args, **kwargs)
        change()
        return result

    monkeypatch.setattr(share_mod, "verify_cache", verify_then_change)


def test_a_manifest_changed_while_it_was_verified_is_not_sent(cache, tmp_path, monkeypatch):
    _after_verify(monkeypatch, lambda: edit_manifest(cache, lambda m: m.update(created="later")))
    with pytest.raises(FormatError, match="changed while it was verified; nothing was sent"):
        push_cache(cache, str(tmp_path / "published"), log=quiet)
    assert not (tmp_path / "published").exists()


def test_a_shard_replaced_after_verify_stops_the_hub_push_before_the_manifest(cache, hub, monkeypatch):
    shard = sorted(cache.glob("*.parquet"))[0]

    def flip():
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01  # the same size: only the hash of what was uploaded tells
        shard.write_bytes(bytes(data))

    _after_verify(monkeypatch, flip)
    with pytest.raises(ChecksumError, match="the uploaded bytes differ from the manifest's sha256"):
        push_cache(cache, REPO, log=quiet)
    assert not (hub.folder(REPO) / MANIFEST_NAME).exists()


def test_tokenizer_files_go_up_and_come_back(tmp_path, hub, rng):
    """A cache carrying the teacher's tokenizer (tokenizer/): pushed to the Hub, pulled back, verified
    (the tokenizer identity check loads the files it pulled)."""
    from ..tokenizer_helpers import tiny_tokenizer
    from .format_helpers import PROVENANCE, make_example, write_cache

    from formats.tokenizer_files import add_tokenizer
    from formats.tokenizer_id import tokenizer_info

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    cache = tmp_path / "tcache"
    examples = [make_example(rng, i) for i in range(6)]
    write_cache(
        cache, examples, output_size=1000, provenance={**PROVENANCE, "tokenizer": tokenizer_info(tokenizer, "t")}
    )
    add_tokenizer(cache, str(tmp_path / "tok"))
    push_cache(cache, REPO, log=quiet)
    assert any(n.startswith("tokenizer/") for n in hub.commits[-1]["add"])
    result = pull_cache(REPO, tmp_path / "got", log=quiet)
    assert result["tokenizer_files"] >= 1
    assert files_of(tmp_path / "got") == expected_files(cache)
    assert rows(tmp_path / "got") == rows(cache)
