"""Score a finished run on any CoLA set and classify new sentences: the code behind `lora-kd-jax evaluate` and
`lora-kd-jax predict`.

    clf = Predictor.from_run("runs/lora_gpt2")            # best checkpoint; which="latest" for the last epoch
    clf.predict(["The cat sat on the mat.", "Cat the mat on sat."])
    # [Prediction(label='acceptable', probability=0.93, truncated=False), ...]
    report = clf.evaluate("out_of_domain")                 # in_domain | out_of_domain | glue | a CoLA TSV path
    report.accuracy, report.mcc, report.confusion, report.per_source

Any run kind works (LoRA teacher, distilled student, RNN baseline): the model, tokenizer, `data.max_length`,
`data.buckets`, pooling and dtypes are the run's own (its config.yaml), and the forward pass is the training's eval
forward (the model's `logits`, jitted, batches from `data.batch_iterator`, counts from `metrics.batch_sums`), so
evaluating the in-domain dev set gives back exactly the validation numbers the run recorded for that checkpoint.
Batches are split over every device present (the run's `mesh.fsdp` is kept where it divides them).

The named sets are the CoLA v1.1 dev files this package ships: `in_domain` (527 rows, the study's validation set),
`out_of_domain` (516) and `glue` (both, 1,043 rows: the usual GLUE CoLA dev set). A path names any file in CoLA's
raw TSV layout (source, label, annotation, sentence), read strictly by `data.read_cola_rows`.

A run on your own table files (data.train) is scored on its own sets (`validation`, its data.report files, `train`)
or any file with its columns: every metric of its kind (accuracy, MCC, F1, macro-F1; MSE, Pearson and Spearman for a
regression) in `Report.scores`, with the run's label names; `predict` takes sentence pairs (`pairs=`). Inputs are
read in `eval_inputs` (its names are importable from here too).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import textwrap
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.core import precision
from lora_kd_jax.core.config import DistributedConfig, MeshConfig
from lora_kd_jax.core.config import n_outputs
from lora_kd_jax.core.metrics import matthews
from lora_kd_jax.core.seed_stats import format_stat
from lora_kd_jax.core.seed_stats import stats
from lora_kd_jax.models.interface import token_inputs
from lora_kd_jax.models.registry import TITLES
from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.runs import rundir
from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.training.restore import open_run
from lora_kd_jax.training.scoring import score_rows
from lora_kd_jax.training.state import cast_frozen, combine, partition
from lora_kd_jax.training.steps import for_steps
from lora_kd_jax.commands.eval_inputs import (DEFAULT_SETS, EVALUATION_FILE, LABELS, SETS, EvalSet, InputError,
                                             check_sentences, load_eval_set, load_table_set, read_sentence_file,
                                             split_pairs)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SETS", "EVALUATION_FILE", "LABELS", "SETS", "EvalSet", "InputError", "Prediction", "Predictor",
           "Report", "check_sentences", "combined_mcc", "evaluate_run", "evaluation_record", "format_predictions",
           "format_reports", "format_seed_reports", "format_table_reports", "load_eval_set", "load_table_set",
           "per_source_accuracy", "read_sentence_file", "seeds_record", "split_pairs", "write_evaluation"]


# -------------------------------------------------------------------------------------------- results


class Prediction(NamedTuple):
    """One sentence's answer: the label the run gives it, that label's probability, and whether the sentence was
    longer than the run's `data.max_length` (only its first max_length tokens were read). A regression run's answer
    is its predicted value: `score`, also as the label's text; probability NaN."""
    label: str  # the run's label name: acceptable | unacceptable for CoLA
    probability: float
    truncated: bool
    score: float | None = None  # a regression run's predicted value

    @property
    def label_id(self) -> int:
        return LABELS.index(self.label)


@dataclasses.dataclass(frozen=True, eq=False)
class Report:
    """One set's scores. `confusion` counts with acceptable (1) as the positive class: tp, fp, tn, fn."""
    name: str
    files: tuple[str, ...]
    rows: int
    truncated: int
    accuracy: float
    mcc: float
    loss: float  # mean cross-entropy against the gold labels, as the runs' validation loss
    confusion: dict[str, int]
    per_source: dict[str, dict[str, float]]  # source code -> {'rows', 'correct', 'accuracy'}
    limit: int = 0
    logits: np.ndarray = dataclasses.field(default=None, repr=False)  # float32 [rows, n_labels], file order
    scores: dict[str, float] = dataclasses.field(default_factory=dict)  # every metric (metrics.summarize; spearman)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "logits"}
        out["files"] = list(self.files)
        return out


def per_source_accuracy(sources: Sequence[str], correct: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    codes = np.asarray(sources)
    for code in sorted(set(sources)):
        hits = correct[codes == code]
        out[code] = {"rows": int(hits.size), "correct": int(hits.sum()), "accuracy": float(hits.mean())}
    return out


def combined_mcc(confusions: Sequence[dict[str, int]]) -> float:
    """MCC of several sets scored together, from their summed confusion counts (`Report.confusion`; e.g. in- and
    out-of-domain together = GLUE dev)."""
    return matthews(*(sum(c[k] for c in confusions) for k in ("tp", "fp", "tn", "fn")))


# ------------------------------------------------------------------------------------------ classifier


@functools.lru_cache(maxsize=8)
def _scoring_step(model: Any, replicated: Any) -> Callable[[Any, dict], tuple[jax.Array, dict]]:
    """(logits, `metrics.eval_sums`) of a batch, jitted once per model and mesh: a process that evaluates many runs
    of one configuration (a study's seeds, the tests) compiles it once."""
    def step(params: Any, batch: dict) -> tuple[jax.Array, dict]:
        logits = model.logits(params, batch["input_ids"], batch["attention_mask"], **token_inputs(batch))
        return logits, metrics_lib.eval_sums(logits, batch)

    return jax.jit(step, out_shardings=(replicated, replicated))


class Predictor:
    """A restored run as a sentence classifier (`from_run`): `predict`, `logits` and `evaluate`."""
    def __init__(self, run: Any, *, batch_size: int | None = None):


        self.run = run
        cfg = run.config
        self.tokenizer = tokenizer_for(cfg)
        self.labels = data_lib.label_names(cfg)  # by id; () for a regression run
        self.max_length = cfg.data.max_length
        self.buckets = list(cfg.data.buckets)
        n = jax.device_count()
        fsdp = cfg.mesh.fsdp if n % cfg.mesh.fsdp == 0 else 1
        parallel = n  # data=-1: the batch is split over every device (data x fsdp)
        wanted = batch_size or cfg.train.eval_batch
        if wanted < 1:
            raise InputError(f"batch_size={wanted}: expected >= 1")
        self.batch_size = -(-wanted // parallel) * parallel  # padding rows weigh 0: no effect on any number
        self.placement = mesh_lib.placement_for(MeshConfig(data=-1, fsdp=fsdp), DistributedConfig(),
                                                {"evaluation batch size": self.batch_size})
        self.params = self._place(run)
        self._step = _scoring_step(for_steps(run.model), mesh_lib.replicated(self.placement.mesh))

    @classmethod
    def from_run(cls, path: str | os.PathLike, which: str = "best", *, kind: str | None = None,
                 batch_size: int | None = None) -> "Predictor":
        """The run in `path` (a run dir or its checkpoints/ dir) at its `which` checkpoint (best | latest)."""
        return cls(open_run(path, kind=kind, which=which), batch_size=batch_size)

    def _place(self, run: Any) -> Any:
        """The run's parameters where training kept them: the frozen partition in its model.base_dtype, split like
        a frozen base; the trained leaves replicated."""
        trainable, frozen = partition(run.params, run.model.param_labels(run.params))
        frozen = cast_frozen(frozen, precision.base_dtype(run.config.model))
        return combine(self.placement.state(trainable), self.placement.frozen(frozen))

    @property
    def kind(self) -> str:
        return self.run.kind

    def describe(self) -> str:

        at = f", epoch {self.epoch}" if self.epoch else ""
        return (f"{self.run.path} ({TITLES.get(self.kind, self.kind)} {self.run.model.describe()}; {self.run.which} "
                f"checkpoint{at}; max_length {self.max_length})")

    @property
    def epoch(self) -> int | None:
        """The epoch the restored checkpoint ended (from metrics.json), when known."""
        if self.run.which == "best":
            return self.run.summary.get("best_epoch")
        return self.run.epochs_done or None

    # ------------------------------------------------------------------------------------------- scoring

    def encode(self, sentences: Sequence[str], labels: np.ndarray | None = None,
               pairs: Sequence[str] | None = None) -> data_lib.EncodedSplit:
        """Sentences (and the second texts of pairs) as the run encodes them."""
        labels = np.zeros(len(sentences), np.int32) if labels is None else labels
        if pairs is not None:
            if len(pairs) != len(sentences):
                raise InputError(f"{len(sentences)} first texts but {len(pairs)} second texts; expected pairs")
            return data_lib.encode_pairs(sentences, check_sentences(pairs), labels, self.tokenizer, self.max_length)
        return data_lib.encode(sentences, labels, self.tokenizer, self.max_length)

    def score(self, split: data_lib.EncodedSplit) -> tuple[np.ndarray, dict]:
        """(logits float32 [N, 2] in row order, summed metrics.batch_sums) over `split`, batched as the runs
        evaluate (eval batch size, data.buckets, file order)."""
        out, batch_sums = score_rows(split, self.batch_size, lambda b: self._step(self.params, b),
                                     self.placement.put_batch, lengths=self.buckets)
        sums = metrics_lib.zeros(n_outputs(self.run.config))
        for s in batch_sums:
            sums = metrics_lib.add(sums, s)
        return out, sums

    def logits(self, sentences: str | Sequence[str]) -> np.ndarray:
        """Logits float32 [N, 2] (index 1 = acceptable) for `sentences`, in order."""
        return self.score(self.encode(check_sentences(sentences)))[0]

    def predict(self, sentences: str | Sequence[str], pairs: Sequence[str] | None = None) -> list[Prediction]:
        """One `Prediction` per sentence (or pair: `pairs` holds the second texts), in input order, labelled with
        the run's label names."""
        split = self.encode(check_sentences(sentences), pairs=pairs)
        logits, _ = self.score(split)
        if not self.labels:  # regression: one output, the predicted value
            return [Prediction(f"{v:.4f}", math.nan, bool(t), float(v))
                    for v, t in zip(logits[:, 0], split.truncated_rows)]
        probs = _softmax(logits)
        labels = logits.argmax(axis=-1)
        return [Prediction(self.labels[k], float(p[k]), bool(t))
                for k, p, t in zip(labels, probs, split.truncated_rows)]

    def evaluate(self, data: str | os.PathLike | EvalSet = "in_domain", *, limit: int = 0) -> Report:
        """Accuracy, MCC, loss, confusion counts and accuracy per source code on a named set or CoLA TSV file
        (`limit`: its first rows only, see `load_eval_set`), or on an `EvalSet` already loaded."""

        eval_set = data if isinstance(data, EvalSet) else load_eval_set(data, limit, self.run.config)
        split = eval_set.encoded or self.encode(eval_set.sentences, eval_set.labels)
        logits, sums = self.score(split)
        summary = metrics_lib.summarize(sums)
        scores = {k: v for k, v in summary.items() if k != "count"}
        if "confusion" in sums:  # more than two classes: the matrix [gold, predicted]
            counts = {"matrix": np.rint(np.asarray(jax.device_get(sums["confusion"]))).astype(int).tolist()}
        elif "tp" in sums:
            counts = {k: int(round(float(jax.device_get(sums[k])))) for k in ("tp", "fp", "tn", "fn")}
        else:  # regression: Pearson's r and Spearman's rho from every prediction, in float64 (metrics.row_scores)
            counts = {}
            scores.update(metrics_lib.row_scores(split.labels, logits[:, 0]))
        correct = logits.argmax(axis=-1) == eval_set.labels
        return Report(name=eval_set.name, files=eval_set.files, rows=len(eval_set), truncated=split.n_truncated,
                      accuracy=summary.get("accuracy", math.nan), mcc=summary.get("mcc", math.nan),
                      loss=summary["loss"], confusion=counts, per_source=per_source_accuracy(eval_set.sources, correct),
                      limit=eval_set.limit, logits=logits, scores=scores)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------ the commands' core


def evaluate_run(path: str | os.PathLike | Any, data: Sequence[str] = DEFAULT_SETS, *, which: str = "best",
                 limit: int = 0, batch_size: int | None = None) -> tuple[Predictor, list[Report]]:
    """Score a run on each set of `data`. Every cheap check (the run dir, its checkpoint, each set's rows) comes
    before any weights are restored (`path` may be a `runs.reader.RunInfo` already inspected)."""
    info = path if isinstance(path, runs.RunInfo) else runs.inspect_run(path, which=which)
    names = list(dict.fromkeys(os.fspath(d) for d in data)) or list(DEFAULT_SETS)
    if data_lib.is_table_run(info.config) and names == list(DEFAULT_SETS):  # a table run: its own sets
        names = [n for n in data_lib.table_files(info.config) if n != "train"]
    sets = [load_eval_set(name, limit, info.config) for name in names]
    clf = Predictor(open_run(info, which=which), batch_size=batch_size)
    return clf, [clf.evaluate(s) for s in sets]


def evaluation_record(clf: Predictor, reports: Sequence[Report]) -> dict[str, Any]:
    """What `evaluate --json` prints and RUN_DIR/evaluation.json holds."""
    cfg = clf.run.config
    return {"run": str(clf.run.path), "kind": clf.kind, "which": clf.run.which, "epoch": clf.epoch,
            "max_length": clf.max_length, "tokenizer": cfg.data.tokenizer or "packaged GPT-2",
            "sets": {r.name: r.to_dict() for r in reports}}


def seeds_record(run_dir: str | os.PathLike, records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The evaluation of every seed of a seeded run: each seed's record and, per set, mean/std/min/max over seeds of
    accuracy, MCC and loss."""
    sets = next(iter(records.values()))["sets"]
    summary = {name: {m: stats([r["sets"][name][m] for r in records.values()]) for m in ("accuracy", "mcc", "loss")}
               for name in sets}
    return {"run": os.fspath(run_dir), "seeds": sorted(records), "sets": summary,
            "per_seed": {str(k): r for k, r in records.items()}}


def format_seed_reports(record: dict[str, Any]) -> str:
    """The terminal table of a seeded evaluation: per set, accuracy and MCC per seed and mean ± std (min–max)."""
    seeds = record["seeds"]
    lines = [f"run: {record['run']} ({len(seeds)} seeds)", "",
             f"{'set':<16}{'seed':>6}{'rows':>6}{'accuracy':>10}{'MCC':>9}"]
    for name, summary in record["sets"].items():
        for k in seeds:
            r = record["per_seed"][str(k)]["sets"][name]
            lines.append(f"{_short(name):<16}{k:>6}{r['rows']:>6}{r['accuracy']:>10.4f}{r['mcc']:>9.4f}")
        lines.append(f"{'':<16}{'all':>6}{'':>6}  accuracy {format_stat(summary['accuracy'], 100)}%, "
                     f"MCC {format_stat(summary['mcc'], 100)} (mean ± std (min–max), x100)")
    return "\n".join(lines)


def write_evaluation(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """RUN_DIR/evaluation.json, written whole or not at all (a temporary file renamed over it)."""
    return rundir.write_json(Path(run_dir) / EVALUATION_FILE, record)


def format_table_reports(clf: Predictor, reports: Sequence[Report]) -> str:
    """The terminal table of a run on table files: one row per set with every metric of the run's kind (and the
    confusion matrix of a classifier, labelled with the run's label names)."""
    metrics = [m for m in ("accuracy", "mcc", "f1", "macro_f1", "mse", "pearson", "spearman", "loss")
               if m in reports[0].scores]
    lines = [f"run: {clf.describe()}", "", f"{'set':<16}{'rows':>6}{'trunc':>7}" + "".join(f"{m:>10}" for m in metrics)]
    for r in reports:
        lines.append(f"{_short(r.name):<16}{r.rows:>6}{r.truncated:>7}"
                     + "".join(f"{r.scores[m]:>10.4f}" for m in metrics))
    for r in reports:
        if not r.confusion:
            continue
        c = r.confusion
        matrix = c.get("matrix") or [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
        lines += ["", f"{_short(r.name)}: {', '.join(r.files)} (rows gold, columns predicted)",
                  f"  {'':<16}" + "".join(f"{name[:12]:>13}" for name in clf.labels)]
        lines += [f"  {name[:16]:<16}" + "".join(f"{v:>13}" for v in row) for name, row in zip(clf.labels, matrix)]
    return "\n".join(lines)


def format_reports(clf: Predictor, reports: Sequence[Report]) -> str:
    """The terminal table: one row per set, then each set's confusion matrix and accuracy per source."""
    if data_lib.is_table_run(clf.run.config):
        return format_table_reports(clf, reports)
    lines = [f"run: {clf.describe()}", "",
             f"{'set':<16}{'rows':>6}{'trunc':>7}{'accuracy':>10}{'MCC':>9}{'loss':>9}"]
    for r in reports:
        lines.append(f"{_short(r.name):<16}{r.rows:>6}{r.truncated:>7}{r.accuracy:>10.4f}{r.mcc:>9.4f}"
                     f"{r.loss:>9.4f}")
    pair = [r for r in reports if r.name in ("in_domain", "out_of_domain")]
    if len(pair) == 2:  # the two together are GLUE's CoLA dev set (when not cut by a limit)
        both = "(both: glue)" if not any(r.limit for r in pair) else "(both)"
        lines.append(f"{both:<16}{sum(r.rows for r in pair):>6}{'':>7}"
                     f"{_pooled_accuracy(pair):>10.4f}{combined_mcc([r.confusion for r in pair]):>9.4f}")
    for r in reports:
        c = r.confusion
        cut = f" (first {r.limit} rows of each file)" if r.limit else ""
        lines += ["", f"{_short(r.name)}: {', '.join(r.files)}{cut}",
                  f"  {'':<20}{'predicted unacc.':>17}{'predicted acc.':>16}",
                  f"  {'gold unacceptable':<20}{c['tn']:>17}{c['fp']:>16}",
                  f"  {'gold acceptable':<20}{c['fn']:>17}{c['tp']:>16}",
                  *textwrap.wrap("accuracy per source (rows): " + ", ".join(
                      f"{code} {s['accuracy']:.3f} ({s['rows']})" for code, s in r.per_source.items()),
                      width=100, initial_indent="  ", subsequent_indent="    ")]
    return "\n".join(lines)


def _pooled_accuracy(reports: Sequence[Report]) -> float:
    n = sum(r.rows for r in reports)
    return sum(r.confusion["tp"] + r.confusion["tn"] for r in reports) / n if n else math.nan


def _short(name: str, width: int = 15) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def format_predictions(sentences: Sequence[str], predictions: Sequence[Prediction], max_length: int) -> str:
    lines = []
    for s, p in zip(sentences, predictions):
        flag = f"  [truncated to {max_length} tokens]" if p.truncated else ""
        lines.append(f"{p.label:<13}{p.probability:.4f}  {s}{flag}")
    return "\n".join(lines)
