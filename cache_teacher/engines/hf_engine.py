"""The transformers teacher engine: the CPU default (`--engine auto`) and the reference the vLLM engine
is checked against. Same outputs as `VLLMEngine`.

Score mode packs records of similar length into right-padded batches of at most `hf_batch_tokens` padded
tokens, runs the decoder body, and applies the LM head only at the trained positions, `HEAD_CHUNK` rows
at a time: top-k on the raw logits and one logsumexp per row for the logprobs; the actual token's
logprob and rank come from the chunk shifted by that logsumexp in place (no [T, V] log-softmax; the
full [B, L, V] logits of a 4k-token batch would be 800 MB). Generate mode samples with `model.generate`, one prompt (n sequences) at a time, and takes
the top-k from the raw (unprocessed) logits of each step.
"""

from __future__ import annotations

import numpy as np

from cache_teacher.data import stable_hash
from cache_teacher.engines.base import Generated, Scored, rank_of


def _batches(items, max_tokens: int):
    """Index lists of items, by length (less padding), each of padded size (count x longest) <= max_tokens."""
    batch, longest = [], 0
    for i in sorted(range(len(items)), key=lambda j: len(items[j].input_ids)):
        n = len(items[i].input_ids)
        if batch and max(longest, n) * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch


HEAD_CHUNK = 256  # trained positions per LM-head call: [256, V] fp32 logits (48 MiB at V = 49,152)


class HFEngine:
    name = "hf"

    def __init__(self, config):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        from cache_teacher.config import resolve_auto
        from cache_teacher.engines.base import EngineStartError

        config = resolve_auto(config)
        self.config = config
        self.version = transformers.__version__
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                config.teacher, revision=config.revision, dtype=getattr(torch, config.dtype)
            )
        except (OSError, ValueError) as exc:  # missing or broken checkpoint files, unknown architecture
            raise EngineStartError(
                f"the hf engine cannot load the teacher {config.teacher!r}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                fix="--teacher DIR (a complete HF checkpoint; `kdcache prepare-teacher "
                "smollm2-135m-instruct --out DIR` makes the offline one)",
            ) from exc
        self.model.to(self.device).eval()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)

    def info(self) -> dict:
        c = self.config
        return {
            "name_or_path": c.teacher,
            "revision": c.revision,
            "dtype": c.dtype,
            "engine": "hf",
            "engine_version": self.version,
        }

    def _topk(self, logits, actual, k: int) -> Scored:
        """logits [N, V] (any float dtype) and actual token ids [N] -> Scored, in fp32.

        Top-k comes from the raw logits and one logsumexp per row turns it into logprobs (log-softmax is
        monotone per row). The actual token's rank (entries >= it, as vLLM counts) is taken on the
        logprobs, as vLLM does: on raw logits, rounding can break near-ties the other way."""
        torch = self.torch
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        lse = torch.logsumexp(logits, dim=-1)
        top, top_ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
        logits -= lse[:, None]  # in place: the rows' logprobs
        act = logits.gather(1, actual[:, None])[:, 0]
        ranks = rank_of(logits, act)
        return Scored(
            top_ids.to(torch.int32).cpu().numpy(),
            (top - lse[:, None]).cpu().numpy().astype(np.float32),
            act.cpu().numpy().astype(np.float32),
            ranks.to(torch.int32).cpu().numpy(),
        )

    def _head_topk(self, head, hidden, actual, k: int) -> Scored:
        """The LM head and `_topk` over hidden rows [N, H], HEAD_CHUNK rows at a time."""
        parts = [
            self._topk(head(hidden[s : s + HEAD_CHUNK]), actual[s : s + HEAD_CHUNK], k)
            for s in range(0, max(1, hidden.shape[0]), HEAD_CHUNK)
        ]
        if len(parts) == 1:
            return parts[0]
        return Scored(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("topk_ids", "topk_logprobs", "target_logprobs", "target_ranks")
            )
        )

    def _body(self, items, batch):
        """The decoder body over one padded batch: (hidden [B, L, H], input ids [B, L])."""
        torch = self.torch
        longest = max(len(items[i].input_ids) for i in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(items[i].input_ids)
            ids[row, :n] = torch.from_numpy(items[i].input_ids.astype(np.int64))
            mask[row, :n] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        body = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        return body(input_ids=ids, attention_mask=mask).last_hidden_state, ids

    def prefill(self, items, config=None) -> None:
        """The body alone over the same batches as `score` (no LM head): the plain prefill that
        `kdcache bench cache` compares the top-k capture against."""
        with self.torch.inference_mode():
            for batch in _batches(items, (config or self.config).hf_batch_tokens):
                self._body(items, batch)

    def score(self, items, config=None) -> list[Scored]:
        """Teacher-forced top-k at each item's target positions, in item order."""
        torch = self.torch
        c = config or self.config
        results: list[Scored | None] = [None] * len(items)
        head = self.model.get_output_embeddings()
        with torch.inference_mode():
            for batch in _batches(items, c.hf_batch_tokens):
                hidden, ids = self._body(items, batch)  # [B, L, H], [B, L]
                rows = [np.full(len(items[i].target_positions), r) for r, i in enumerate(batch)]
                cols = [items[i].target_positions.astype(np.int64) - 1 for i in batch]  # col t predicts t + 1
                rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)
                cols_t = torch.from_numpy(np.concatenate(cols)).to(self.device)
                scored = self._head_topk(head, hidden[rows_t, cols_t], ids[rows_t, cols_t + 1], c.k)
                start = 0
                for i in batch:
                    n = len(items[i].target_positions)
                    sl = slice(start, start + n)
                    results[i] = Scored(
                        scored.topk_ids[sl],
                        scored.topk_logprobs[sl],
                        scored.target_logprobs[sl],
                        scored.target_ranks[sl],
                    )
                    start += n
        return results  # type: ignore[return-value]

    def generate(self, items, stop_ids, config=None) -> list[list[Generated]]:
        """`n` sampled responses per item (prompt ids in item.input_ids), stopping after any of stop_ids."""
        torch = self.torch
        from transformers import GenerationConfig

        c = config or self.config
        eos = sorted(stop_ids)
        sample = c.temperature > 0
        gen_config = GenerationConfig(
            do_sample=sample,
            temperature=c.temperature if sample else None,
            top_p=c.top_p if sample else None,
            top_k=0 if sample else None,
            max_new_tokens=c.max_new_tokens,
            num_return_sequences=c.n,
            eos_token_id=eos,
            pad_token_id=eos[0],
            output_logits=True,
            return_dict_in_generate=True,
        )
        results = []
        with torch.inference_mode():
            for item in items:
                torch.manual_seed(stable_hash(item.id, f"sample:{c.seed}") % (2**31))
                prompt = torch.from_numpy(item.input_ids.astype(np.int64))[None].to(self.device)
                out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_config)
                logits = torch.stack(out.logits, dim=1)  # [n, G, V] raw logits
                samples = []
                for j in range(out.sequences.shape[0]):
                    tokens = out.sequences[j, prompt.shape[1] :]
                    stops = [g for g, t in enumerate(tokens.tolist()) if t in eos]
                    length = stops[0] + 1 if stops else len(tokens)
                    tokens = tokens[:length]
                    scored = self._topk(logits[j, :length], tokens, c.k)
                    samples.append(
                        Generated(tokens.to(torch.int32).cpu().numpy(), scored, "stop" if stops else "length")
                    )
                results.append(samples)
        return results

    def close(self) -> None:
        self.model = None
