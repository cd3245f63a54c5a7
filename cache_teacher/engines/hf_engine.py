"""The transformers teacher engine: forward + log-softmax + top-k, for CPU-only runs and as the
reference the vLLM engine is checked against. Same outputs as `VLLMEngine`.

Score mode packs records of similar length into right-padded batches of at most `hf_batch_tokens` padded
tokens and applies the LM head only at the trained positions (the full [B, L, V] logits of a 4k-token
batch would be 800 MB). Generate mode samples with `model.generate`, one prompt (n sequences) at a
time, and takes the top-k from the raw (unprocessed) logits of each step.
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


class HFEngine:
    name = "hf"

    def __init__(self, config):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.config = config
        self.version = transformers.__version__
        self.torch = torch
        dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(config.teacher, revision=config.revision, dtype=dtype)
        self.model.to(self.device).eval()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)

    def info(self) -> dict:
        c = self.config
        return {"name_or_path": c.teacher, "revision": c.revision, "dtype": c.dtype, "engine": "hf",
                "engine_version": self.version}

    def _topk(self, logits, actual, k: int) -> Scored:
        """logits [N, V] (any float dtype) and actual token ids [N] -> Scored (log-softmax in fp32).

        On a CPU these vocabulary-wide passes (log-softmax, top-k, rank), not a small model's body,
        take most of the time; logsumexp-based variants measured no faster.
        """
        torch = self.torch
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logprobs = torch.log_softmax(logits, dim=-1)
        k = min(k, logprobs.shape[-1])
        top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
        act_lp = logprobs.gather(1, actual[:, None])[:, 0]
        ranks = rank_of(logprobs, act_lp)
        return Scored(top_ids.to(torch.int32).cpu().numpy(), top_lp.cpu().numpy().astype(np.float32),
                      act_lp.cpu().numpy().astype(np.float32), ranks.to(torch.int32).cpu().numpy())

    def score(self, items, config=None) -> list[Scored]:
        """Teacher-forced top-k at each item's target positions, in item order."""
        torch = self.torch
        c = config or self.config
        results: list[Scored | None] = [None] * len(items)
        body = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        head = self.model.get_output_embeddings()
        with torch.inference_mode():
            for batch in _batches(items, c.hf_batch_tokens):
                longest = max(len(items[i].input_ids) for i in batch)
                ids = torch.zeros(len(batch), longest, dtype=torch.long)
                mask = torch.zeros(len(batch), longest, dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(items[i].input_ids)
                    ids[row, :n] = torch.from_numpy(items[i].input_ids.astype(np.int64))
                    mask[row, :n] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, H]
                rows = [np.full(len(items[i].target_positions), r) for r, i in enumerate(batch)]
                cols = [items[i].target_positions.astype(np.int64) - 1 for i in batch]  # col t predicts t + 1
                rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)
                cols_t = torch.from_numpy(np.concatenate(cols)).to(self.device)
                logits = head(hidden[rows_t, cols_t])  # [N_total, V]
                scored = self._topk(logits, ids[rows_t, cols_t + 1], c.k)
                start = 0
                for i in batch:
                    n = len(items[i].target_positions)
                    sl = slice(start, start + n)
                    results[i] = Scored(scored.topk_ids[sl], scored.topk_logprobs[sl],
                                        scored.target_logprobs[sl], scored.target_ranks[sl])
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
            do_sample=sample, temperature=c.temperature if sample else None, top_p=c.top_p if sample else None,
            top_k=0 if sample else None, max_new_tokens=c.max_new_tokens, num_return_sequences=c.n,
            eos_token_id=eos, pad_token_id=eos[0], output_logits=True, return_dict_in_generate=True,
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
                    tokens = out.sequences[j, prompt.shape[1]:]
                    stops = [g for g, t in enumerate(tokens.tolist()) if t in eos]
                    length = stops[0] + 1 if stops else len(tokens)
                    tokens = tokens[:length]
                    scored = self._topk(logits[j, :length], tokens, c.k)
                    samples.append(Generated(tokens.to(torch.int32).cpu().numpy(), scored, "stop" if stops else "length"))
                results.append(samples)
        return results

    def close(self) -> None:
        self.model = None

