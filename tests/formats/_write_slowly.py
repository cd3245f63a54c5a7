"""Helper process for test_writer: writes a deterministic cache and, when asked, SIGKILLs itself
right after its K-th shard is published (a crash at a known point, independent of timing)."""

import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, sys.argv[3])  # tests/formats, for conftest's factory
from format_helpers import make_example  # noqa: E402

from formats import CacheWriter, CodecConfig  # noqa: E402
from format_helpers import PROVENANCE  # noqa: E402


def main():
    out, seed = sys.argv[1], int(sys.argv[2])
    kill_after_shards = int(sys.argv[4]) if len(sys.argv) > 4 else None
    rng = np.random.default_rng(seed)
    examples = [make_example(rng, i) for i in range(60)]
    with CacheWriter(
        out, codec=CodecConfig(k=8), provenance=PROVENANCE, row_group_positions=64, shard_max_bytes=3000
    ) as w:
        for i, ex in enumerate(examples):
            if ex.id in w.done_ids:
                continue
            if i % 7 == 3:
                w.reject(f"bad-{i}", "no assistant turn")
            w.write(ex)
            if kill_after_shards is not None and len(list(Path(out).glob("*.parquet"))) >= kill_after_shards:
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
