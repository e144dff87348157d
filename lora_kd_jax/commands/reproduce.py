"""The reference study in one call: LoRA gpt2, LoRA gpt2-medium, distillation from each, the RNN from scratch.

Each experiment is an ordinary run (the configs in configs/, the same trainers as the single-run scripts) in
`<root>/<name>/`; the distillation runs read the LoRA runs of the same study as their teachers. A finished run
(its metrics.json covers every epoch of the same config) is reused rather than trained again, and an interrupted
one is resumed from its latest checkpoint, so re-running the command continues the study where it stopped.
After every run `<root>/results.md` (the table beside the reference numbers) and `<root>/results.png` (validation
accuracy per epoch of every run) are rewritten.

`tiny=True` is the offline CPU check of the whole pipeline: random-init 2-layer GPT-2 teachers (64 wide in place
of gpt2, 128 wide in place of gpt2-medium; `model.init=random`, so no download) and a 64/64 student. Its numbers
say nothing about the reference; that it runs end to end says that the study does.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from lora_kd_jax.commands import study_scores
from lora_kd_jax.runs import rundir
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.core.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

DEFAULT_ROOT, DEFAULT_TINY_ROOT = "runs/reproduce", "runs/reproduce_tiny"
MAJORITY_REFERENCE = 365 / 527  # majority class of the CoLA in-domain dev set


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str  # run sub-directory
    label: str  # row of the table
    config: str  # file in configs/
    kind: str  # lora | distill | rnn
    teacher: str = ""  # name of the LoRA experiment a distillation reads
    tiny: tuple[str, ...] = ()  # overrides of the --tiny mode
    ref_val: float = math.nan  # the reference's best val accuracy
    ref_train: float = math.nan  # ... and train accuracy at that epoch
    ref_params: str = ""  # ... and its trainable / total parameters


TINY_STUDENT = ("student.embed_dim=64", "student.hidden_dim=64")
EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("lora_gpt2", "LoRA gpt2, rank 4", "lora_gpt2.yaml", "lora",
               tiny=("model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4"),
               ref_val=0.7932, ref_train=0.9785, ref_params="0.63M / 125.03M"),
    Experiment("lora_gpt2_medium", "LoRA gpt2-medium, rank 4", "lora_gpt2_medium.yaml", "lora",
               tiny=("model.init=random", "model.n_layer=2", "model.n_embd=128", "model.n_head=4"),
               ref_val=0.8406, ref_train=0.9819, ref_params="1.68M / 356.40M"),
    Experiment("distil_rnn_gpt2", "DistilRNN, gpt2 teacher", "distil_rnn_gpt2.yaml", "distill", teacher="lora_gpt2",
               tiny=TINY_STUDENT, ref_val=0.7006, ref_train=0.7108, ref_params="≈39.8M"),
    Experiment("distil_rnn_gpt2_medium", "DistilRNN, gpt2-medium teacher", "distil_rnn_gpt2_medium.yaml", "distill",
               teacher="lora_gpt2_medium", tiny=TINY_STUDENT, ref_val=0.7185, ref_train=0.7221, ref_params="≈39.8M"),
    Experiment("rnn_scratch", "RNN from scratch", "rnn_scratch.yaml", "rnn", tiny=TINY_STUDENT,
               ref_val=0.6945, ref_train=0.7085, ref_params="≈39.8M"),
)


@dataclasses.dataclass
class Outcome:
    experiment: Experiment
    run_dir: Path
    summary: dict
    history: list
    reused: bool
    scores: dict = dataclasses.field(default_factory=dict)  # checkpoint_scores: in-domain, out-of-domain, glue MCC


def _split_root(overrides: Sequence[str], tiny: bool) -> tuple[Path, list[str]]:
    """`run.dir=PATH` names the study's root (every run gets a sub-directory); the rest apply to every run."""
    root, rest = DEFAULT_TINY_ROOT if tiny else DEFAULT_ROOT, []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key == "run.dir":
            root = item.split("=", 1)[1]
        elif key == "distill.teacher":
            raise ConfigError("distill.teacher: reproduce sets each teacher itself (the LoRA runs of the same study); "
                              "use scripts/distill.py to distil from another run")
        else:
            rest.append(item)
    return Path(root), rest


def default_configs_dir() -> Path:
    """The study's configs, shipped inside the package (the repository's configs/ links there)."""
    from lora_kd_jax.assets import CONFIGS_DIR

    return CONFIGS_DIR


def study_configs(overrides: Sequence[str] = (), *, tiny: bool = False, configs_dir: str | Path | None = None
                  ) -> tuple[Path, list[tuple[Experiment, Config]]]:
    """(root, [(experiment, its validated config)]): every config is checked before anything runs."""
    root, rest = _split_root(overrides, tiny)
    configs_dir = configs_dir or default_configs_dir()
    out = []
    for exp in EXPERIMENTS:
        extra = [f"run.dir={root / exp.name}"]
        if exp.teacher:
            extra.append(f"distill.teacher={root / exp.teacher}")
        cfg = load_config(Path(configs_dir) / exp.config, [*(exp.tiny if tiny else ()), *rest, *extra])
        out.append((with_student_label(exp, cfg), cfg))
    return root, out


STUDENT_NAMES = {"bilstm": "BiLSTM", "cnn": "CNN", "transformer": "transformer"}


def with_student_label(exp: Experiment, cfg: Config) -> Experiment:
    """A student row names the student it trained: `student.arch=cnn` makes "DistilRNN, gpt2 teacher" read
    "Distil CNN, gpt2 teacher" and "RNN from scratch" read "CNN from scratch" (the reference columns stay the
    study's RNN's, the row it is compared with)."""
    name = STUDENT_NAMES.get(cfg.student.arch)
    if exp.kind == "lora" or name is None:
        return exp
    label = exp.label.replace("DistilRNN", f"Distil {name}").replace("RNN from scratch", f"{name} from scratch")
    return dataclasses.replace(exp, label=label)


def finished(cfg: Config, kind: str) -> dict | None:
    """metrics.json of a run in cfg.run.dir that has the same settings and covers every epoch, else None."""
    run_dir = Path(cfg.run.dir)
    cfg_path, metrics_path = run_dir / rundir.CONFIG_FILE, run_dir / rundir.METRICS_FILE
    if cfg.run.overwrite or not (cfg_path.is_file() and metrics_path.is_file()):
        return None
    same = lambda d: {k: v for k, v in d.items() if k != "run"}  # noqa: E731
    try:
        wanted = _recorded_config(kind, cfg)
    except UserError:  # e.g. its teacher is not there yet: not a finished run; the trainer will say what is wrong
        return None
    if same(rundir.stored_config(run_dir)) != same(rundir.recorded(wanted)):
        return None
    record = json.loads(metrics_path.read_text())
    return record if len(record.get("epochs", [])) >= cfg.train.epochs else None


def _recorded_config(kind: str, cfg: Config) -> Config:
    """The config a run of `kind` records for `cfg` (its trainer's resolution: architecture, label set, teacher)."""
    from lora_kd_jax.distill.trainer import baseline_config, distill_config
    from lora_kd_jax.training.finetune import lora_config

    if kind == "lora":
        return lora_config(cfg)
    return (distill_config if kind == "distill" else baseline_config)(cfg)[0]


def _runner(kind: str) -> Callable[..., dict]:
    """The trainer that writes a run of `kind` (imported here: they import jax)."""
    from lora_kd_jax.distill.trainer import distill, train_student
    from lora_kd_jax.training.finetune import train_lora

    return {"lora": train_lora, "distill": distill, "rnn": train_student}[kind]


def run_study(overrides: Sequence[str] = (), *, tiny: bool = False, configs_dir: str | Path | None = None,
              progress: bool = True) -> list[Outcome]:
    """Run (or reuse) the five experiments in order; write results.md and results.png into the root. With
    `train.seeds=[...]` among the overrides every experiment trains those seeds at once and each distillation
    seed learns from the same seed of its teacher; the table then gives mean ± std (min–max)."""
    from tqdm.auto import tqdm

    root, plan = study_configs(overrides, tiny=tiny, configs_dir=configs_dir)
    root.mkdir(parents=True, exist_ok=True)
    majority = majority_share(plan[0][1])
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    bar = tqdm(plan, desc="reproduce", unit="run", disable=not progress)
    for exp, cfg in bar:
        bar.set_postfix_str(exp.name)
        record = finished(cfg, exp.kind)
        if record is None:
            resume = rundir.holds_step(Path(cfg.run.dir) / "checkpoints" / "latest") and not cfg.run.overwrite
            log.info("=== %s: %s -> %s%s", exp.label, exp.config, cfg.run.dir, " (resuming)" if resume else "")
            _runner(exp.kind)(cfg, resume=resume, progress=progress)
            record = json.loads((Path(cfg.run.dir) / "metrics.json").read_text())
            reused = False
        else:
            log.info("=== %s: reusing the finished run in %s", exp.label, cfg.run.dir)
            reused = True
        if cfg.train.seeds:
            scores = study_scores.seeded_scores(Path(cfg.run.dir), cfg.data.limit)
            for seed, seed_scores in scores["per_seed"].items():
                seed_dir = Path(cfg.run.dir) / f"seed_{seed}"
                _check_scores(exp, cfg, json.loads((seed_dir / rundir.METRICS_FILE).read_text())["summary"],
                              seed_scores)
        else:
            scores = study_scores.checkpoint_scores(Path(cfg.run.dir), cfg.data.limit)
            _check_scores(exp, cfg, record["summary"], scores)
        outcomes.append(Outcome(exp, Path(cfg.run.dir), record["summary"], record["epochs"], reused, scores))
        write_results(root, outcomes, tiny=tiny, overrides=overrides, majority=majority,
                      wall=time.perf_counter() - t0)
    bar.close()
    return outcomes


def _check_scores(exp: Experiment, cfg: Config, summary: dict, scores: dict) -> None:
    """On the packaged CoLA the in-domain scores are the run's own validation numbers: say so if they are not."""
    if cfg.data.dir:
        return
    for key, got in (("best_val_accuracy", scores["in_domain_accuracy"]), ("val_mcc_at_best", scores["in_domain_mcc"])):
        if not math.isclose(summary[key], got, rel_tol=1e-6, abs_tol=1e-6):
            log.warning("%s: the best checkpoint scores %s %.6f on the in-domain dev set, but metrics.json records "
                        "%.6f", exp.name, key, got, summary[key])


def majority_share(cfg: Config) -> float:
    """Share of the most frequent label in the validation split the runs evaluate on."""
    from lora_kd_jax import data as data_lib

    labels = data_lib.load_cola(cfg.data.dir, cfg.data.limit)["validation"]["label"]
    ones = sum(labels)
    return max(ones, len(labels) - ones) / len(labels)


# ------------------------------------------------------------------------------------------------ results


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _mcc(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _reduction(o: Outcome) -> str:
    """What the run saves: trainable parameters (LoRA) or size against its teacher (a distilled student)."""
    s = o.summary
    if s.get("teacher_total_params"):
        return f"{100 * (1 - s['total_params'] / s['teacher_total_params']):.2f}% smaller than its teacher"
    if s.get("reduction"):
        return f"{100 * s['reduction']:.2f}% fewer trainable"
    return "—"


def _stat(s: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    """mean ± std (min–max) of a seeds.stats dict, or — ."""
    from lora_kd_jax.core.seed_stats import format_stat

    return "—" if not s else format_stat(s, scale, digits)


Column = tuple[str, Callable[[Outcome], str]]
# cells every table shares: the parameter counts, the reduction, the wall time
_PARAMS: list[Column] = [
    ("trainable / total params", lambda o: f"{_millions(o.summary['trainable_params'])} / "
                                           f"{_millions(o.summary['total_params'])}"),
    ("reference", lambda o: o.experiment.ref_params),
    ("reduction", _reduction),
]


def _wall(o: Outcome) -> str:
    return f"{_time(o.summary.get('wall_time_s', 0.0))}{' (reused)' if o.reused else ''}"


def _single_columns() -> list[Column]:
    return [("experiment", lambda o: o.experiment.label),
            ("epochs", lambda o: f"{o.summary['best_epoch']}/{o.summary['epochs_run']}"),
            ("best val acc", lambda o: _pct(o.summary["best_val_accuracy"])),
            ("reference", lambda o: _pct(o.experiment.ref_val)),
            ("train acc at best", lambda o: _pct(o.summary["train_accuracy_at_best"])),
            ("reference", lambda o: _pct(o.experiment.ref_train)),
            ("val MCC", lambda o: f"{o.summary['val_mcc_at_best']:.4f}"),
            ("out-of-domain acc", lambda o: _pct(o.summary.get("out_of_domain_accuracy_at_best"))),
            ("out-of-domain MCC", lambda o: _mcc(o.summary.get("out_of_domain_mcc_at_best"))),
            ("GLUE-dev MCC", lambda o: _mcc(o.scores.get("glue_mcc"))),
            *_PARAMS, ("wall time", _wall)]


def _seeded_columns() -> list[Column]:
    agg = lambda o, key: o.summary.get("seed_stats", {}).get(key)  # noqa: E731
    return [("experiment", lambda o: o.experiment.label),
            ("seeds", lambda o: str(len(o.summary.get("seeds", [])) or 1)),
            ("best val acc (%)", lambda o: _stat(agg(o, "best_val_accuracy"))),
            ("reference", lambda o: _pct(o.experiment.ref_val)),
            ("train acc at best (%)", lambda o: _stat(agg(o, "train_accuracy_at_best"))),
            ("reference", lambda o: _pct(o.experiment.ref_train)),
            ("val MCC (x100)", lambda o: _stat(agg(o, "val_mcc_at_best"))),
            ("out-of-domain acc (%)", lambda o: _stat(agg(o, "out_of_domain_accuracy_at_best"))),
            ("out-of-domain MCC (x100)", lambda o: _stat(agg(o, "out_of_domain_mcc_at_best"))),
            ("GLUE-dev MCC (x100)", lambda o: _stat(o.scores.get("glue_mcc"))),
            ("best epoch", lambda o: _stat(agg(o, "best_epoch"), 1.0, 1)),
            *_PARAMS, ("wall time (all seeds)", _wall)]


def _markdown(columns: list[Column], outcomes: Sequence[Outcome]) -> str:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(o) for _, cell in columns) + " |" for o in outcomes]
    return "\n".join(lines)


def results_table(outcomes: Sequence[Outcome]) -> str:
    """The study's table; a seeded study's gives every score as mean ± std (min–max) over the seeds (accuracies in
    %, MCC x100), beside the reference's single numbers."""
    seeded = any("seed_stats" in o.summary for o in outcomes)
    return _markdown(_seeded_columns() if seeded else _single_columns(), outcomes)


def write_results(root: str | Path, outcomes: Sequence[Outcome], *, tiny: bool, overrides: Sequence[str],
                  majority: float, wall: float) -> tuple[Path, Path]:
    from lora_kd_jax.runs import plots

    root = Path(root)
    limit = max((o.scores.get("limit", 0) for o in outcomes), default=0)
    mode = ("**tiny** (offline CPU check: random-init 2-layer GPT-2 teachers in place of gpt2 and gpt2-medium, "
            "a 64/64 student; the numbers only show that the pipeline runs)" if tiny else "full (the reference setup)")
    text = "\n".join([
        "# Reproduction of the reference table",
        "",
        f"- mode: {mode}",
        f"- overrides applied to every run: {' '.join(overrides) if overrides else '(none)'}",
        f"- runs: {', '.join(f'`{o.run_dir}`' for o in outcomes)}",
        f"- validation set: majority class {_pct(majority)} (the reference's dev set: {_pct(MAJORITY_REFERENCE)}); "
        "MCC 0 means a one-class predictor",
        f"- wall time of this invocation: {_time(wall)}; the table's wall time is each run's training loop "
        "(compilation, training, evaluation, checkpoints)",
        "",
        results_table(outcomes),
        "",
        *([f"Seeds {outcomes[0].summary['seeds']}: each cell is mean ± std (min–max) over the seeds (std: sample, "
           "n-1), each seed trained in the same program as the others (`train.seeds`), seed k exactly as a single run "
           "with train.seed=k; per-seed numbers are in each run's seed_<k>/metrics.json.", ""]
          if "seed_stats" in (outcomes[0].summary if outcomes else {}) else []),
        "Epochs: best epoch / epochs run. Val: CoLA in-domain dev (527 sentences), the set of the reference (the "
        "PyTorch original) and the one that picks the best epoch. Out-of-domain: CoLA out-of-domain dev (516 "
        "sentences), scored at the same epoch, never used to pick it. GLUE-dev MCC: the best checkpoint on both "
        "dev sets together (1,043 sentences, GLUE's CoLA dev set), from the summed confusion counts "
        "(`lora-kd-jax evaluate RUN_DIR` shows them); every number comes from the best checkpoint"
        + (f"; data.limit={limit}: each set is its first {limit} rows" if limit else "") + ".",
        "Distillation rows: loss T²·KL(teacher ‖ student) (+ alpha·CE); the reduction compares the student with its "
        "teacher's total size.",
        "",
        "![validation accuracy per epoch](results.png)",
        "",
    ])
    md = root / "results.md"
    md.write_text(text)
    png = plots.plot_val_accuracy({o.experiment.label: o.history for o in outcomes}, root / "results.png",
                                  reference={o.experiment.label: o.experiment.ref_val for o in outcomes})
    return md, png
