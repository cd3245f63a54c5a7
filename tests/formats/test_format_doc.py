"""docs/FORMAT.md's reference decoder, run as written, agrees with CacheReader (the spec stays true)."""

from pathlib import Path

import numpy as np
import pytest
from .format_helpers import make_example

from formats import CacheReader, CacheWriter, CodecConfig
from formats.manifest import load_manifest

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def reference_decoder_source(version: int) -> str:
    """The numpy decoder FORMAT.md gives for a format version: 2 under "Reference decoder", 1 under "Version 1"."""
    text = DOC.read_text().split("## Reference decoder (numpy)")[1]
    if version == 1:
        text = text.split("### Version 1")[1]
    return text.split("```python")[1].split("```")[0]


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("hot, mass", [(8, 0.97), (0, None)], ids=["hot8-mass", "empty-hot-table"])
def test_reference_decoder_matches_reader(tmp_path, rng, monkeypatch, hot, mass, version):
    examples = [make_example(rng, i, k=12) for i in range(8)]
    examples[3].topk_logprobs = examples[3].topk_logprobs.copy()
    examples[3].topk_logprobs[:, 6:] -= 12.0  # deltas >= 255 steps: the escape stream is exercised
    examples[4].topk_logprobs = examples[4].topk_logprobs.copy()
    examples[4].topk_logprobs[:, 10:] -= 3000.0  # q = 65535: probability 0 (when mass keeps them)
    examples[5].topk_logprobs = examples[5].topk_logprobs.copy()
    examples[5].topk_logprobs[:, 7:11] = examples[5].topk_logprobs[:, 7:8]  # ties: v2 stores them as gaps
    with CacheWriter(
        tmp_path / "c", codec=CodecConfig(k=12, mass=mass, hot=hot, version=version), row_group_positions=10**6
    ) as w:
        for ex in examples:
            w.write(ex)
    assert load_manifest(tmp_path / "c")["format_version"] == version
    printed = []
    monkeypatch.chdir(tmp_path / "c")
    exec(reference_decoder_source(version), {"print": lambda *a: printed.append(a)})
    got = {
        (ex.id, int(t)): (ex.topk_ids[r], ex.topk_logprobs[r])
        for ex in CacheReader(tmp_path / "c")
        for r, t in enumerate(ex.target_positions)
    }
    assert len(printed) == len(got)
    for ex_id, t, entries in printed:
        ids, lps = got[(ex_id, int(t))]
        c = len(entries)
        assert c >= 1 and (c == len(ids) or ids[c] == -1)
        assert [int(i) for i, _ in entries] == ids[:c].tolist()
        np.testing.assert_allclose([lp for _, lp in entries], lps[:c], atol=1e-5)
        if hot == 0 and ex_id == "ex4":
            assert np.isneginf([lp for _, lp in entries][10:]).all()
