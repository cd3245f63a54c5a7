"""`kdcache inspect | verify | merge | add-tokenizer | export | push | pull`."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize a cache, or show one example with the teacher's top tokens",
        description="Print a cache's summary table (teacher, tokenizer, dataset, counts, size); with "
        "--example, one example's text and, at each trained position, the teacher's top tokens.",
    )
    p.add_argument("cache", help="cache folder or fsspec URL (s3://, gs://, hf://, memory://)")
    p.add_argument("--example", metavar="ID", help="show this example (its `id` column)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer to decode tokens with (default: the cache's own tokenizer/ files, "
        "else the one the manifest names when it can be loaded offline; else ids are shown)",
    )
    p.add_argument("--top", type=int, default=5, help="teacher entries shown per position (default 5)")
    p.add_argument("--positions", type=int, default=40, help="positions shown (default 40)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "verify",
        help="check checksums, schema and values of a cache",
        description="Check the manifest (types, file names inside the cache, no duplicate shard "
        "entries), every shard's size and sha256, its schema and metadata, every row's target spans "
        "(1 <= start < end <= length, sorted, one teacher row per position), unique example ids, "
        "the values of every row (ids < the teacher's output size, logprobs <= 0 in rank order, "
        "top-k mass <= 1), the counts, the rejects file and the tokenizer files (docs/FORMAT.md lists "
        "every check). "
        "Exits 1 naming the first bad file, row and field.",
    )
    p.add_argument("cache", help="cache folder or fsspec URL")
    p.add_argument(
        "--checksums-only",
        action="store_true",
        help="skip the per-row duplicate-id scan (every bound and value check that all readers apply still runs)",
    )
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "merge",
        help="combine caches written by several workers",
        description="Copy the shards of several compatible caches (same teacher, tokenizer, chat "
        "template, codec and mode; disjoint example ids) into a new cache folder with one manifest. "
        "Refuses caches that do not belong together. The inputs are left untouched.",
    )
    p.add_argument(
        "out", help="new, empty output folder, or an object-store URL (staged locally, manifest uploaded last)"
    )
    p.add_argument("caches", nargs="+", help="worker caches (folders or URLs)")
    p.add_argument(
        "--staging", metavar="DIR", help="URL output: the local staging folder (default: under the temp dir)"
    )
    p.set_defaults(func=_merge)

    p = sub.add_parser(
        "add-tokenizer",
        help="store the teacher's tokenizer files in a cache written without them",
        description="Caches carry the teacher's tokenizer files (tokenizer/, checksummed in the "
        "manifest), which a student with another tokenizer needs. This adds them to a local cache "
        "written before they were stored. The tokenizer must be the one the cache was made with: its "
        "fingerprint and chat-template hash must equal the manifest's, else nothing is changed.",
    )
    p.add_argument("cache", help="local cache folder")
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR_OR_HUB_ID",
        help="the teacher's tokenizer (a local folder or a hub id)",
    )
    p.set_defaults(func=_add_tokenizer)

    p = sub.add_parser(
        "export",
        help="write a cache as plain Parquet columns (datasets, DuckDB, Polars) or axolotl's KD layout",
        description="Decode a cache (verified as it is read) into Parquet files that other tools read with no "
        "kdcache code. decoded: id, source, input_ids, labels, target_token_ids and target_logprobs (per "
        "token, the teacher's entries for it; empty where not trained), finish_reason, meta. axolotl: the "
        "pre-tokenized columns axolotl's KD trainer reads (input_ids, attention_mask, labels, "
        "target_token_ids, target_logprobs, target_mask; docs/EXPORT.md). Part files are written atomically "
        "and _export.json last; a rerun resumes an interrupted export.",
    )
    p.add_argument("cache", help="cache folder or fsspec URL")
    p.add_argument("out", help="new (or partially exported) local folder, or an object-store URL (staged locally)")
    p.add_argument(
        "--staging", metavar="DIR", help="URL output: the local staging folder (default: under the temp dir)"
    )
    p.add_argument("--format", dest="fmt", choices=("decoded", "axolotl"), default="decoded")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="axolotl: the teacher's top-k renormalized at this temperature (axolotl's kd_temperature)",
    )
    p.add_argument("--rows-per-file", type=int, default=10_000, metavar="N", help="examples per part file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "push",
        help="publish a verified cache to a hub dataset repo, an object store or a folder",
        description="Verify the cache (a cache that fails is refused before anything is sent), then upload exactly "
        "the files its manifest lists, the card (README.md), shards first and manifest.json last; a rerun skips "
        "what the target already holds and finishes the rest. TARGET: a hub dataset repo (USER/NAME or "
        "hf://datasets/USER/NAME), an fsspec URL (s3://bucket/prefix, gs://...) or a local folder (/x, ./x, "
        "file:///x). docs/SHARING.md.",
    )
    p.add_argument("cache", help="local cache folder")
    p.add_argument("target", help="USER/NAME, hf://datasets/USER/NAME, s3://bucket/prefix, or a folder (./x)")
    p.add_argument(
        "--private", action="store_true", help="hub: create the repo private (an existing repo keeps its visibility)"
    )
    p.add_argument("--revision", metavar="BRANCH", help="hub: push to this branch (created from main if missing)")
    p.add_argument(
        "--token-from-env",
        action="store_true",
        help="hub: use HF_TOKEN and only it (default: huggingface_hub's lookup: HF_TOKEN, then `hf auth login`)",
    )
    p.set_defaults(func=_push)

    p = sub.add_parser(
        "pull",
        help="download a cache from a hub dataset repo and verify it",
        description="Download the repo's manifest.json, check it (names, types, sizes), then exactly the files it "
        "lists (each of the recorded size), all from one commit, into a staging folder beside DIR; `kdcache "
        "verify` it; only then it becomes DIR. A cache that fails verification is deleted and DIR is not "
        "created (exit 1). A stranger's repo is untrusted input: nothing in it is executed. docs/SHARING.md.",
    )
    p.add_argument("repo", help="USER/NAME or hf://datasets/USER/NAME")
    p.add_argument("dir", help="new (or empty) local folder")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    p.set_defaults(func=_pull)


def _inspect(args: argparse.Namespace) -> int:
    from formats.tools import show_example, summarize

    print(summarize(args.cache))
    if args.example:
        print()
        print(show_example(args.cache, args.example, _tokenizer(args), top=args.top, max_positions=args.positions))
    return 0


def _tokenizer(args):
    from formats.manifest import load_manifest

    manifest = load_manifest(args.cache)
    if not args.tokenizer and manifest.get("tokenizer_files"):  # the cache's own copy (verified when loaded)
        from formats.tokenizer_files import load_cache_tokenizer

        return load_cache_tokenizer(args.cache)
    name = args.tokenizer or (manifest.get("tokenizer") or {}).get("name_or_path")
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        # The manifest's tokenizer is tried from local files only: inspect must not hang on a hub.
        return AutoTokenizer.from_pretrained(name, local_files_only=not args.tokenizer)
    except Exception as exc:  # no transformers, no hub access: show ids instead
        print(
            f"(tokenizer {name!r} not loadable: {type(exc).__name__}; showing token ids; pass --tokenizer PATH)",
            file=sys.stderr,
        )
        return None


def _verify(args: argparse.Namespace) -> int:
    from formats.tools import verify_cache
    from formats.trust import printable

    result = verify_cache(
        args.cache, check_values=not args.checksums_only, progress=lambda name: print(f"ok  {name}", file=sys.stderr)
    )
    for name in result["unlisted"]:
        print(f"note: {printable(name)} is not listed in the manifest (no kdcache reader opens it)", file=sys.stderr)
    print(
        f"{args.cache}: OK ({result['shards']} shards, {result['examples']} examples, {result['positions']} positions, "
        f"{result['tokenizer_files']} tokenizer files)"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from formats.tools import merge_caches

    m = merge_caches(args.out, args.caches, staging=args.staging)
    print(
        f"merged {len(args.caches)} caches into {args.out}: {m['counts']['examples']} examples, "
        f"{m['counts']['positions']} positions, {len(m['shards'])} shards"
    )
    return 0


def _add_tokenizer(args: argparse.Namespace) -> int:
    from formats.tokenizer_files import add_tokenizer

    entries = add_tokenizer(args.cache, args.tokenizer)
    print(
        f"{args.cache}: added {len(entries)} tokenizer files ({', '.join(e['file'] for e in entries)}); "
        f"`kdcache verify {args.cache}` checks them"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from formats.export import export_cache

    record = export_cache(
        args.cache,
        args.out,
        fmt=args.fmt,
        temperature=args.temperature,
        rows_per_file=args.rows_per_file,
        progress=args.progress,
        staging=args.staging,
    )
    print(
        f"exported {record['examples']} examples of {args.cache} to {args.out} ({args.fmt}, {len(record['files'])} files)"
    )
    return 0


def _push(args: argparse.Namespace) -> int:
    from formats.hub import token_from_env
    from formats.share import push_cache

    token = token_from_env() if args.token_from_env else None
    result = push_cache(args.cache, args.target, private=args.private, revision=args.revision, token=token)
    print(
        f"pushed {args.cache} to {result['target']}: {len(result['sent'])} files sent, {result['skipped']} already there"
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    from formats.share import pull_cache

    result = pull_cache(args.repo, args.dir, revision=args.revision)
    print(
        f"pulled {args.repo} (commit {result['commit']}) into {args.dir}: verified, {result['shards']} shards, "
        f"{result['examples']} examples, {result['positions']} positions"
    )
    return 0
