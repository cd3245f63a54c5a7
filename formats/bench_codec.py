"""`kdcache bench codec`: bytes per position, fidelity and decode speed of each codec setting.

Input: an .npz with `ids` [N, K] integers and `logprobs` [N, K] float32 (a teacher's top-k in rank
order; `kdcache bench codec-data` makes one from the real teacher). For each setting the positions are
cut into pseudo-examples, encoded exactly as the writer does, and written as one in-memory Parquet
file (zstd, the writer's level) holding only the codec streams and the per-shard hot-id table, so
bytes/position is the file size over positions. Decoding reads that file back and decodes the
streams as the reader does, in this one process: the table gives positions/s with Parquet
decompression included, and for the codec stage alone.

Fidelity: `max_abs_logprob_error` over kept entries whose true logprob >= -10; `mean_kl` is the
mean over positions of KL(p || p_hat) between the top-k distribution with a tail bucket before and
after coding (both over the coded entries plus one bucket for everything else); `dropped_mass`
is the mean teacher probability that mass-adaptive truncation moved into the tail.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from formats import codec as C
from formats.schema import read_shard_metadata, shard_key_value, shard_metadata
from formats.shard import column_bytes

SETTINGS = [  # (name, k, mass, codec version): v1 beside v2 (the writer's) at k=64 and k=128
    ("k=32", 32, None, 2),
    ("k=64, codec v1", 64, None, 1),
    ("k=64", 64, None, 2),
    ("k=128, codec v1", 128, None, 1),
    ("k=128", 128, None, 2),
    ("k=128,mass=0.95", 128, 0.95, 2),
    ("k=64,mass=0.9, codec v1", 64, 0.9, 1),
    ("k=64,mass=0.9", 64, 0.9, 2),
]


def encode_file(ids: np.ndarray, lps: np.ndarray, cfg: C.CodecConfig, rows_per_example: int, level: int) -> bytes:
    hot = C.build_hot_table(ids[:65536, : cfg.k], cfg.hot)  # the writer builds it from a shard's first row group
    codes = C.IdCodes(hot)
    id_bytes = C.code_bytes(int(ids.max()) + len(hot))
    names = C.stream_names(cfg.version, id_bytes)
    cols = {n: [] for n in names}
    for s in range(0, len(ids), rows_per_example):
        enc = C.encode_topk(ids[s : s + rows_per_example], lps[s : s + rows_per_example], cfg, codes, id_bytes)
        for n in names:
            cols[n].append(enc[n])
    meta = shard_metadata(cfg.to_dict(), id_bytes, hot)
    table = pa.table({n: pa.array(cols[n], pa.binary()) for n in names})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd", compression_level=level) as writer:
        writer.write_table(table, row_group_size=max(1, 65536 // rows_per_example))
        writer.add_key_value_metadata(shard_key_value(meta))  # once, as the cache writer does
    return buf.getvalue()


def read_streams(data: bytes):
    """Parquet bytes -> (id codes, [stream dict per row group]): the reader's I/O half."""
    pf = pq.ParquetFile(io.BytesIO(data))
    meta = read_shard_metadata(pf.schema_arrow, "bench", check_columns=False, key_value=pf.metadata.metadata or {})
    tables = [pf.read_row_group(g, use_threads=False) for g in range(pf.metadata.num_row_groups)]
    return C.IdCodes(meta["hot_table"]), [{n: column_bytes(t, n) for n in t.column_names} for t in tables]


def decode_streams(codes, groups, cfg: C.CodecConfig):
    """The reader's decode half: streams -> [N, k] ids and logprobs."""
    out = [C.decode_topk(streams, cfg, codes)[:2] for streams in groups]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def fidelity(lps: np.ndarray, dec_lps: np.ndarray, k: int) -> tuple[float, float, float]:
    true = lps[:, :k].astype(np.float64)
    kept = np.isfinite(dec_lps)
    err = np.abs(dec_lps.astype(np.float64) - true)
    sel = kept & (true >= -10)
    max_err = float(err[sel].max()) if sel.any() else 0.0
    p = np.where(kept, np.exp(true), 0.0)
    q = np.where(kept, np.exp(np.where(kept, dec_lps, -np.inf).astype(np.float64)), 0.0)
    p_tail = np.clip(1 - p.sum(1), 0, 1)
    q_tail = np.clip(1 - q.sum(1), 1e-12, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(kept, p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), 0).sum(1)
        kl += np.where(p_tail > 0, p_tail * (np.log(np.maximum(p_tail, 1e-300)) - np.log(q_tail)), 0)
    dropped = np.exp(true).sum(1) - p.sum(1)
    return max_err, float(kl.mean()), float(dropped.mean())


def run(path: str, level: int = 9, rows_per_example: int = 370, repeats: int = 3) -> list[dict]:
    data = np.load(path)
    ids_all, lps_all = data["ids"].astype(np.int64), data["logprobs"].astype(np.float32)
    n = len(ids_all)
    records = []
    for name, k, mass, version in SETTINGS:
        if k > ids_all.shape[1]:
            continue
        cfg = C.CodecConfig(k=k, mass=mass, version=version)
        t0 = time.perf_counter()
        blob = encode_file(ids_all[:, :k], lps_all[:, :k], cfg, rows_per_example, level)
        encode_s = time.perf_counter() - t0
        best = best_codec = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            codes, groups = read_streams(blob)
            t1 = time.perf_counter()
            dec_ids, dec_lps = decode_streams(codes, groups, cfg)
            t2 = time.perf_counter()
            best, best_codec = min(best, t2 - t0), min(best_codec, t2 - t1)
        kept = dec_ids >= 0
        want = np.where(kept, ids_all[:, :k], -1)
        assert np.array_equal(C.tie_canonical(dec_ids, dec_lps), C.tie_canonical(want, dec_lps)), (
            "ids must round-trip exactly (v2: in any order within a tie)"
        )
        max_err, mean_kl, dropped = fidelity(lps_all, dec_lps, k)
        records.append(
            {
                "setting": name,
                "k": k,
                "mass": mass,
                "bytes_per_position": len(blob) / n,
                "max_abs_logprob_error": max_err,
                "mean_kl": mean_kl,
                "dropped_mass": dropped,
                "mean_entries": float(kept.sum(1).mean()),
                "decode_positions_per_s": n / best,
                "codec_decode_positions_per_s": n / best_codec,
                "encode_positions_per_s": n / encode_s,  # codec + Parquet (zstd) write, one run
            }
        )
    return records


def table(records: list[dict], n_positions: int | None = None) -> str:
    head = (
        "| setting | bytes/position | max abs logprob error (>= -10) | mean KL (nat/position) | dropped mass "
        "| entries/position | decode positions/s (Parquet + codec) | codec alone | encode positions/s (codec + Parquet) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['setting']} | {r['bytes_per_position']:.1f} | {r['max_abs_logprob_error']:.4f} | "
            f"{r['mean_kl']:.2e} | {r['dropped_mass']:.4f} | {r['mean_entries']:.1f} | {r['decode_positions_per_s']:,.0f} | {r['codec_decode_positions_per_s']:,.0f} | "
            f"{r['encode_positions_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="kdcache bench codec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return run_cli(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help=".npz with `ids` [N, K] and `logprobs` [N, K] (rank order)")
    p.add_argument("--json", help="also write the records as a JSON list here")
    p.add_argument("--level", type=int, default=9, help="zstd level (the writer's default: 9)")
    p.add_argument("--rows-per-example", type=int, default=370, help="positions per pseudo-example (Tulu median: 370)")


def run_cli(args) -> int:
    records = run(args.input, level=args.level, rows_per_example=args.rows_per_example)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
