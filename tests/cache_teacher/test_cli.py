"""cache_teacher.cli: `kdcache cache` flags, --help, dry run, and one-line errors."""

from __future__ import annotations

import kdcache.cli as kdcache_cli


def test_cli_help_documents_every_setting():
    """Guards the generator (formats.common.settings.add_flags): every CacheConfig field is a documented flag."""
    import argparse
    import dataclasses

    from cache_teacher.cli import register
    from cache_teacher.config import CacheConfig

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    cache = parser._subparsers._group_actions[0].choices["cache"]
    text = cache.format_help()
    for f in dataclasses.fields(CacheConfig):
        if f.name not in ("command", "engine_reason", "dtype_reason"):  # set by the program, not by flags
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert all(a.help for a in cache._actions)
    args = parser.parse_args(
        ["cache", "--teacher", "t", "--out", "o", "--k", "5", "--no-resume", "--sources", "a,b", "--sources", "c"]
    )
    from cache_teacher.cli import config_from_args

    c = config_from_args(args)
    assert (c.k, c.resume, c.engine, c.sources) == (5, False, "auto", ["a", "b", "c"])  # engine: resolved when run


def test_cli_dry_run_and_config_file(tiny_dir, rows_path, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher: {tiny_dir}\ndataset: {rows_path}\nk: 16\nmax_length: 128\n")
    assert kdcache_cli.main(["cache", "--config", str(cfg), "--dry-run", "--max-length", "256"]) == 0
    out = capsys.readouterr().out
    assert "dry run over 24 inputs" in out and "B/position at k=16" in out and "estimated teacher time" in out
    assert kdcache_cli.main(["cache", "--config", str(cfg)]) == 1  # no --out: a one-line InputError
    assert "no output folder" in capsys.readouterr().err


def test_cli_rerun_into_a_finished_cache_with_other_settings_fails(smollm2_dir, tiny_dir, rows_path, tmp_path, capsys):
    out = tmp_path / "c"
    common = [
        "cache",
        "--dataset",
        str(rows_path),
        "--out",
        str(out),
        "--engine",
        "hf",
        "--max-examples",
        "0",
        "--no-progress",
    ]
    assert kdcache_cli.main([*common, "--teacher", str(smollm2_dir), "--k", "64"]) == 0  # finished (no inputs)
    before = (out / "manifest.json").read_text()
    assert kdcache_cli.main([*common, "--teacher", str(tiny_dir), "--k", "128"]) == 1
    err = capsys.readouterr().err
    assert "codec.k: 64 -> 128" in err and "teacher.name_or_path: " in err and "new folder" in err
    assert (out / "manifest.json").read_text() == before
    assert kdcache_cli.main([*common, "--teacher", str(tiny_dir), "--k", "128", "--no-resume"]) == 1
    assert "already holds a complete cache" in capsys.readouterr().err
