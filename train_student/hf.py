"""A kdcache cache in the trainers people already run: Hugging Face `Trainer`, TRL's `SFTTrainer`.

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from train_student.hf import KDCacheDataset, KDDataCollator, KDTrainer

    student = AutoModelForCausalLM.from_pretrained("my-student")
    trainer = KDTrainer(
        model=student,
        args=TrainingArguments("out", per_device_train_batch_size=4, bf16=True, report_to="tensorboard"),
        train_dataset=KDCacheDataset("caches/tulu", split="train"),
        eval_dataset=KDCacheDataset("caches/tulu", split="eval"),
        data_collator=KDDataCollator(pad_token_id=0),
        kd_weight=1.0, ce_weight=0.0, temperature=1.0,   # the defaults of `kdcache train`
    )
    trainer.train(); trainer.evaluate()                  # eval_kl, eval_ce, eval_top1_agreement, ...

With TRL: `KDSFTTrainer` (= `KDLossMixin` + `trl.SFTTrainer`, built when first imported), given
`train_dataset=KDCacheDataset(...).to_datasets()` (SFTTrainer takes `datasets` datasets only) and
`SFTConfig(..., dataset_kwargs={"skip_prepare_dataset": True})`: the cache is already tokenized.

Items (`KDCacheDataset[i]`), Hugging Face's layout (unshifted, as `formats.batch.example_rows` builds it):
`input_ids` int64 [T], `labels` int64 [T] (the token where trained, -100 elsewhere), `teacher_ids`
int32 [T, K] and `teacher_logprobs` float32 [T, K]: row t is the teacher's top-k for token t in the
cache's rank order, -1 / -inf where there is none. The split is `kdcache train`'s (a hash of the
example id, `train_student.data.in_split`); each cache is verified when the dataset opens it and each
shard's sha256 checked again as it is read.

The loss (`KDLossMixin.compute_loss`): the model's own forward runs (so DDP, FSDP, PEFT and
accelerate's autocast wrappers all stay in the call), with the forward of its output head replaced,
for that call only, by the sparse loss: the head receives the final hidden states and `student_loss`
(kd_loss, train_student/loss.py) takes them with the head's weight; the [T, V] logits are never
formed. The model's "logits" output is a [B, S, 1] view of the loss, so DDP's search for unused
parameters sees every parameter that the loss used. The loss is the mean over every trained
position of the optimizer step (all micro-batches and processes), as in `kdcache train`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from formats.batch import concat_rows, example_rows
from formats.errors import InputError
from formats.reader import CacheReader
from formats.tools import verify_cache
from train_student.checks import check_example_fits_student
from train_student.config import Stage, TrainConfig
from train_student.data import in_split
from train_student.loss import eval_row, eval_sums, head_inputs, student_loss
from train_student.loss_options import LossSpec
from train_student.model import check_output_head

log = logging.getLogger("train_student")

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")
INPUT_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", *TEACHER_KEYS)


def _default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# ---- the dataset -------------------------------------------------------------------------------
class KDCacheDataset(torch.utils.data.Dataset):
    """The examples of one split of one or more caches (paths or fsspec URLs), map-style.

    split: "train", "eval" (the held-out share `eval_fraction` of example ids, by hash) or "all";
    fraction: the nested training subsample of `kdcache train --fraction` (seed: its seed; 0, the
    default, takes the records `kdcache cache --fraction` and `kdcache train` take); max_length: cut longer
    examples to their first max_length tokens (the positions cut are not trained); tokenizer: the
    student's, checked against the cache's (a student with another tokenizer is refused: cross-tokenizer
    KD runs in `kdcache train --cross-tokenizer`); verify: run `kdcache verify` on each cache when
    opened, and check each shard's sha256 as it is read (False skips both hashes, never the bounds).

    Examples are decoded a row group at a time and the last `cached_row_groups` are kept: read in
    cache order, or with `row_group_sampler` (what KDTrainer uses for a random order), each row group
    is decoded once per epoch.
    """

    def __init__(
        self,
        cache: str | Sequence[str],
        *,
        split: str = "train",
        eval_fraction: float = _default(TrainConfig, "eval_fraction"),
        fraction: float = 1.0,
        max_length: int | None = None,
        seed: int = 0,
        tokenizer=None,
        verify: bool = True,
        storage_options: dict | None = None,
        cached_row_groups: int = 4,
    ):
        if split not in ("train", "eval", "all"):
            raise InputError(f"split={split!r}: one of train, eval, all")
        if not 0.0 <= eval_fraction < 1.0:
            raise InputError(f"eval_fraction={eval_fraction} must be in [0, 1)")
        if not 0.0 < fraction <= 1.0:
            raise InputError(f"fraction={fraction} must be in (0, 1]")
        if max_length is not None and max_length < 2:
            raise InputError(f"max_length={max_length} must be >= 2 (or None)")
        self.paths = [str(cache)] if isinstance(cache, (str, bytes)) or not isinstance(cache, Sequence) else list(cache)
        self.paths = [str(p) for p in self.paths]
        if not self.paths:
            raise InputError("KDCacheDataset needs at least one cache")
        self.split, self.eval_fraction, self.fraction, self.max_length = split, eval_fraction, fraction, max_length
        self.seed = seed
        self.verify, self.storage_options, self.cached_row_groups = verify, storage_options, cached_row_groups
        self.input_size = self.output_size = None  # the student's sizes, once known (KDTrainer sets them)
        if verify:
            for path in self.paths:
                verify_cache(path, storage_options=storage_options)
        readers = self._open()
        if tokenizer is not None:
            from train_student.xtok.check import check_student_tokenizer

            for reader in readers:
                if check_student_tokenizer(reader.manifest, tokenizer, "auto", reader.path) != "off":
                    raise InputError(
                        f"{reader.path}: the student's tokenizer is not the teacher's (cross-tokenizer KD); "
                        "train_student.hf trains students that share the teacher's tokenizer only: train this "
                        "one with `kdcache train --cross-tokenizer auto`"
                    )
        self.k = max(int(r.manifest["codec"]["k"]) for r in readers)
        self.teachers = [r.manifest["teacher"].get("name_or_path") for r in readers]
        index = []  # (reader, unit, row) of each example of the split, in cache order
        for r, reader in enumerate(readers):
            for u, unit in enumerate(reader.units):
                ids = reader._shard(unit.shard).read(unit.row_group, columns=["id"]).column("id").to_pylist()
                for row, example_id in enumerate(ids[: unit.rows]):
                    if in_split(example_id, split, eval_fraction, fraction, seed):
                        index.append((r, u, row))
        self.index = np.asarray(index, np.int64).reshape(-1, 3)
        self._readers = readers

    def _open(self) -> list[CacheReader]:
        readers = []
        for path in self.paths:
            try:
                readers.append(
                    CacheReader(
                        path,
                        shuffle=False,
                        epochs=1,
                        drop_remainder=False,
                        prefetch=0,
                        verify=self.verify,
                        storage_options=self.storage_options,
                    )
                )
            except FileNotFoundError as exc:
                raise InputError(f"cache {path} not found ({exc})") from None
        self._units: OrderedDict = OrderedDict()
        return readers

    def __getstate__(self):  # DataLoader workers reopen the caches (files and descriptors do not pickle)
        state = dict(self.__dict__)
        state["_readers"], state["_units"] = None, OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.index)

    def example(self, i: int):
        """The i-th example of the split as the cache holds it (formats.Example)."""
        if self._readers is None:
            self._readers = self._open()
        r, u, row = (int(v) for v in self.index[i])
        key = (r, u)
        if key not in self._units:
            reader = self._readers[r]
            self._units[key] = reader.load_unit(reader.units[u])
            while len(self._units) > max(self.cached_row_groups, 1):
                self._units.popitem(last=False)
        self._units.move_to_end(key)
        ex = self._units[key][row]
        check_example_fits_student(ex, self.paths[r], input_size=self.input_size, output_size=self.output_size)
        return ex

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        rows = example_rows(self.example(i % len(self)), self.k, self.max_length)
        return {
            "input_ids": torch.from_numpy(rows.input_ids),
            "labels": torch.from_numpy(rows.labels),
            "teacher_ids": torch.from_numpy(rows.topk_ids),
            "teacher_logprobs": torch.from_numpy(rows.topk_logprobs),
        }

    def to_datasets(self, cache_dir: str | None = None):
        """The items as a `datasets.Dataset` (what TRL's SFTTrainer requires), written once to an Arrow
        file in `cache_dir` (datasets' cache by default): the decoded teacher rows take about 8 * K bytes
        per token there, against the cache's ~2 per K entry; the map-style KDCacheDataset reads the cache
        itself. Columns: input_ids, labels, teacher_ids, teacher_logprobs (lists)."""
        import datasets

        features = datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int64")),
                "labels": datasets.List(datasets.Value("int64")),
                "teacher_ids": datasets.List(datasets.List(datasets.Value("int32"))),
                "teacher_logprobs": datasets.List(datasets.List(datasets.Value("float32"))),
            }
        )
        return datasets.Dataset.from_generator(
            _items, gen_kwargs={"dataset": self}, features=features, cache_dir=cache_dir
        )

    def row_groups(self) -> list[np.ndarray]:
        """The dataset's indices grouped by the row group that holds them (for `row_group_sampler`)."""
        if not len(self.index):
            return []
        keys = self.index[:, 0] * (1 << 32) + self.index[:, 1]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        return np.split(np.arange(len(self.index)), starts[1:])


def _items(dataset: KDCacheDataset):
    for i in range(len(dataset)):
        yield {key: value.numpy() for key, value in dataset[i].items()}


class RowGroupSampler(torch.utils.data.Sampler):
    """A random order that decodes each row group once per epoch: the row groups permuted, then the
    examples inside each (both seeded by `seed` and the epoch), as `kdcache train` reads a cache."""

    def __init__(self, dataset: KDCacheDataset, seed: int = 0):
        self.groups, self.seed, self.epoch = dataset.row_groups(), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for g in rng.permutation(len(self.groups)):
            yield from (int(i) for i in rng.permutation(self.groups[g]))


# ---- the collator ------------------------------------------------------------------------------
@dataclasses.dataclass
class KDDataCollator:
    """KDCacheDataset items -> a batch a Trainer feeds the model.

    pack=False: padded to the longest item (to a multiple of `pad_to_multiple_of`): input_ids and
    attention_mask [B, S], labels [B, S] (-100 on padding), teacher_ids [B, S, K] (-1),
    teacher_logprobs [B, S, K] (-inf). pack=True: the items end to end in one row, [1, sum T], with
    position_ids restarting at 0 for each (no attention_mask: transformers keeps packed examples apart
    from the restarting position ids), the layout of `kdcache train`'s batches (formats.batch.concat_rows).
    """

    pad_token_id: int = 0
    pack: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("KDDataCollator: an empty batch")
        rows = [_as_rows(f) for f in features]
        if self.pack:
            seq = concat_rows(rows)
            return {
                "input_ids": torch.from_numpy(seq["input_ids"])[None],
                "position_ids": torch.from_numpy(seq["position_ids"])[None],
                "labels": torch.from_numpy(seq["labels"])[None],
                "teacher_ids": torch.from_numpy(seq["topk_ids"])[None],
                "teacher_logprobs": torch.from_numpy(seq["topk_logprobs"])[None],
            }
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        k = max(r.topk_ids.shape[1] for r in rows)
        b = len(rows)
        out = {
            "input_ids": torch.full((b, length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(b, length, dtype=torch.long),
            "labels": torch.full((b, length), -100, dtype=torch.long),
            "teacher_ids": torch.full((b, length, k), -1, dtype=torch.int32),
            "teacher_logprobs": torch.full((b, length, k), -torch.inf, dtype=torch.float32),
        }
        for i, r in enumerate(rows):
            n, kk = len(r), r.topk_ids.shape[1]
            out["input_ids"][i, :n] = torch.from_numpy(r.input_ids)
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.from_numpy(r.labels)
            out["teacher_ids"][i, :n, :kk] = torch.from_numpy(r.topk_ids)
            out["teacher_logprobs"][i, :n, :kk] = torch.from_numpy(r.topk_logprobs)
        return out


def _as_rows(feature: dict):
    from formats.batch import ExampleRows

    missing = [key for key in ("input_ids", "labels", *TEACHER_KEYS) if key not in feature]
    if missing:
        raise ValueError(
            f"KDDataCollator: an item without {', '.join(missing)} (items come from KDCacheDataset; a Trainer "
            "with remove_unused_columns=True drops columns its model does not take: use KDTrainer, or "
            "remove_unused_columns=False)"
        )

    def arr(key, dtype):
        value = feature[key]
        return (value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)).astype(dtype, copy=False)

    return ExampleRows(
        arr("input_ids", np.int64),
        arr("labels", np.int64),
        arr("teacher_ids", np.int32),
        arr("teacher_logprobs", np.float32),
    )


# ---- the loss in a Trainer -----------------------------------------------------------------------
class _SparseHead:
    """For one call of the model: the output head's forward replaced by the sparse loss on the hidden
    states it receives; the loss, kd_loss's metrics (and the evaluation spec's, when given) are kept."""

    def __init__(self, head: nn.Module, spec: LossSpec, labels, teacher_ids, teacher_logprobs, eval_spec=None):
        self.head, self.spec, self.eval_spec = head, spec, eval_spec
        self.labels, self.teacher_ids, self.teacher_logprobs = labels, teacher_ids, teacher_logprobs
        self.loss = self.metrics = self.eval_metrics = None

    def __enter__(self):
        self._saved = self.head.__dict__.get("forward")
        self.head.forward = self._forward
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            del self.head.forward
        else:
            self.head.forward = self._saved

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[:2] != self.labels.shape:
            raise ValueError(
                f"the output head got hidden states of shape {tuple(hidden.shape)} for labels of shape "
                f"{tuple(self.labels.shape)}: a model that slices its hidden states before the head "
                "(logits_to_keep) cannot train on the sparse loss"
            )
        b, s, d = hidden.shape
        k = self.teacher_ids.shape[-1]
        h = hidden[:, :-1].reshape(-1, d)  # row t-1 predicts token t
        labels = self.labels[:, 1:].reshape(-1)
        ids = self.teacher_ids[:, 1:].reshape(-1, k)
        lps = self.teacher_logprobs[:, 1:].reshape(-1, k).float()
        weight = self.head.weight
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h, weight = head_inputs(h, weight, dtype)
        self.loss, self.metrics = student_loss(self.spec, h, weight, ids, lps, labels)
        if self.eval_spec is not None:
            with torch.no_grad():
                _, self.eval_metrics = student_loss(self.eval_spec, h, weight, ids, lps, labels)
        return self.loss.reshape(1, 1, 1).expand(b, s, 1)


class KDLossMixin:
    """The sparse KD loss for a `transformers.Trainer` subclass (KDTrainer, KDSFTTrainer, or yours:
    `class MyTrainer(KDLossMixin, SomeTrainer)`). Keywords: kd_weight, ce_weight, temperature, kind,
    tail, impl, chunk_size, as `kdcache train` takes them (and with its defaults):
    total = ce_weight * CE + kd_weight * temperature^2 * KD over the trained positions.

    Training logs gain kd, ce and top1_agreement (means over the logging window); `evaluate()` reports
    eval_loss (the training objective) and `kdcache train`'s held-out metrics: eval_kl (forward KL at
    temperature 1 with the training tail), eval_ce, eval_ppl, eval_top1_agreement,
    eval_student_topk_mass, eval_targets.
    """

    loss_is_scaled_for_ga = True  # compute_loss normalizes over the whole accumulated step itself

    def __init__(
        self,
        *args,
        kd_weight: float = _default(Stage, "kd_weight"),
        ce_weight: float = _default(Stage, "ce_weight"),
        temperature: float = _default(Stage, "temperature"),
        kind: str = _default(Stage, "kind"),
        tail: str = _default(Stage, "tail"),
        impl: str = _default(TrainConfig, "impl"),
        chunk_size: int = _default(TrainConfig, "chunk_size"),
        **kwargs,
    ):
        try:
            self.loss_spec = LossSpec(
                kd_weight=kd_weight,
                ce_weight=ce_weight,
                temperature=temperature,
                kind=kind,
                tail=tail,
                impl=impl,
                chunk_size=chunk_size,
            )
        except ValueError as exc:
            raise InputError(f"{type(self).__name__}: {exc}") from None
        if kd_weight + ce_weight == 0:
            raise InputError(f"{type(self).__name__}: need kd_weight, ce_weight >= 0, not both 0")
        self.eval_spec = self.loss_spec.for_evaluation()
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # so the Trainer counts the step's trained positions
        base = _base_model(self.model)
        check_output_head(base, type(base).__name__)
        self._head = _plain_head(base)
        sizes = dict(input_size=base.get_input_embeddings().num_embeddings, output_size=self._head.out_features)
        for dataset in (self.train_dataset, *_eval_sets(self.eval_dataset)):
            if isinstance(dataset, KDCacheDataset):
                dataset.input_size, dataset.output_size = sizes["input_size"], sizes["output_size"]
        self._window: dict[str, torch.Tensor] = {}
        self._eval_window: dict[str, torch.Tensor] = {}

    # -- the loss --
    def _sparse_forward(self, model, inputs, eval_spec=None) -> _SparseHead:
        inputs = dict(inputs)
        missing = [key for key in ("labels", *TEACHER_KEYS) if key not in inputs]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: a batch without {', '.join(missing)}; use KDCacheDataset with "
                "KDDataCollator (or a dataset whose items carry them)"
            )
        labels, ids, lps = (inputs.pop(key) for key in ("labels", *TEACHER_KEYS))
        with _SparseHead(self._head, self.loss_spec, labels, ids, lps, eval_spec) as head:
            model(**inputs, use_cache=False)
        if head.loss is None:
            raise RuntimeError(f"{type(self).__name__}: the model's forward never called its output head")
        return head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = self._sparse_forward(model, inputs)
        loss, metrics = head.loss, head.metrics
        if model.training:
            if num_items_in_batch is not None:  # the mean over every trained position of the step
                loss = loss * metrics["n_tokens"] / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
            else:
                loss = loss / self.args.gradient_accumulation_steps
            self._add(self._window, {**eval_sums(metrics, metrics["n_tokens"])})
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            head = self._sparse_forward(model, inputs, eval_spec=self.eval_spec)
        self._add(self._eval_window, eval_sums(head.eval_metrics, head.eval_metrics["n_tokens"]))
        return head.loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self._eval_window = {}
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_window:
            output.metrics.update({f"{prefix}_{key}": value for key, value in self._reduced(self._eval_window).items()})
        self._eval_window = {}
        return output

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._window:  # a training log: the window's KD metrics (one host sync)
            row = self._reduced(self._window)
            logs = {**logs, "kd": row["kl"], "ce": row["ce"], "top1_agreement": row["top1_agreement"]}
            self._window = {}
        return super().log(logs, *args, **kwargs)

    def _reduced(self, window: dict[str, torch.Tensor]) -> dict:
        keys = sorted(window)
        values = torch.stack([window[key].double() for key in keys])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        return eval_row(dict(zip(keys, values.tolist())))

    @staticmethod
    def _add(window: dict, sums: dict) -> None:
        for key, value in sums.items():
            value = value.detach()
            window[key] = window[key] + value if key in window else value

    # -- what the Trainer must not drop or reorder --
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *INPUT_KEYS]))

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, KDCacheDataset) and self.args.train_sampling_strategy == "random":
            return RowGroupSampler(dataset, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)


def _eval_sets(eval_dataset) -> list:
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT's wrappers."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _plain_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise InputError(
            f"the student's output head is a {type(head).__name__}, not a plain nn.Linear (an adapter on "
            "lm_head, e.g. a LoRA target_modules or modules_to_save entry for it?): the sparse loss "
            "computes logits as hidden @ lm_head.weight and would ignore the adapter; leave lm_head out of "
            "the adapter"
        )
    return head


def _make_trainers():
    from transformers import Trainer

    class KDTrainer(KDLossMixin, Trainer):
        """`transformers.Trainer` with the sparse KD loss on a kdcache cache (see KDLossMixin)."""

    return KDTrainer


KDTrainer = _make_trainers()


def __getattr__(name: str):
    if name == "KDSFTTrainer":  # TRL is an optional dependency: built on first use
        try:
            from trl import SFTTrainer
        except ImportError as exc:
            raise ImportError(f"train_student.hf.KDSFTTrainer needs TRL: pip install trl ({exc})") from None

        class KDSFTTrainer(KDLossMixin, SFTTrainer):
            """`trl.SFTTrainer` with the sparse KD loss on a kdcache cache (see KDLossMixin). Give it
            `SFTConfig(..., dataset_kwargs={"skip_prepare_dataset": True})` and KDDataCollator."""

        globals()[name] = KDSFTTrainer
        return KDSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
