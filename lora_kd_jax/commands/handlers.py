"""What each `lora-kd-jax` subcommand does once its arguments are parsed (`cli.py` parses them and owns the clean
exit). Heavy imports (jax, transformers) happen inside each handler, after the config is known to be valid."""
from __future__ import annotations

import argparse
import logging
import sys

from lora_kd_jax.commands.settings import load_named
from lora_kd_jax.core.config import Config
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.core.logs import LOG_FORMAT

PROG = "lora-kd-jax"


# libraries whose notes are not the user's business: JAX's INFO on backend probing ("Unable to initialize backend
# 'tpu'") and cache set-up ("Resetting cache at <empty>"; its warnings stay, e.g. a GPU without a CUDA jaxlib), and
# the absl warnings Orbax gives at every read-only restore ("CheckpointManagerOptions.read_only=True, setting
# save_interval_steps=0", "Given directory is read only")
QUIET = {"jax": logging.WARNING, "absl": logging.ERROR, "orbax": logging.ERROR}


def setup_logging() -> None:
    """INFO lines of this package on the console; the libraries in QUIET only from their level up."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)


def report(summary: dict, run_dir: str) -> None:
    """The one line a finished training command prints (for a seeded run: mean ± std (min–max) over its seeds)."""
    if "seed_stats" in summary:
        from lora_kd_jax.core.seed_stats import format_stat, seed_headline

        agg = summary["seed_stats"]
        line = f"{len(summary['seeds'])} seeds {summary['seeds']}: {seed_headline(agg, summary.get('select', 'accuracy'))}"
        if "out_of_domain_accuracy_at_best" in agg:
            line += f"; out-of-domain accuracy {format_stat(agg['out_of_domain_accuracy_at_best'], 100)}%"
        print(f"{line} (mean ± std (min–max)) -> {run_dir}")
        return
    if summary.get("select", "accuracy") != "accuracy":  # another metric picked the best epoch (train.select)
        from lora_kd_jax.core.selection import headline

        print(f"{headline(summary)} -> {run_dir}")
        return
    line = (f"best val accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']}, train accuracy "
            f"{summary['train_accuracy_at_best']:.4f}, val MCC {summary['val_mcc_at_best']:.4f}")
    if "out_of_domain_accuracy_at_best" in summary:
        line += (f"; out-of-domain accuracy {summary['out_of_domain_accuracy_at_best']:.4f}, MCC "
                 f"{summary['out_of_domain_mcc_at_best']:.4f}")
    print(f"{line}) -> {run_dir}")


# ------------------------------------------------------------------------------------------------- commands


def _config(args: argparse.Namespace) -> Config:
    """CONFIG (a YAML path or a packaged config's name) with the command line's overrides."""
    return load_named(args.config, args.overrides).config


def cmd_train_lora(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from lora_kd_jax.training import finetune  # imports jax: after the config is known to be valid

    if args.dry_run:
        print(finetune.dry_run_plan(cfg))
        return
    report(finetune.train_lora(cfg, resume=args.resume, progress=not args.no_progress, profile=args.profile),
           cfg.run.dir)


def _student_report(cfg: Config) -> str:
    import jax

    from lora_kd_jax.models.students.build import build_student, count_params

    _, shapes = build_student(cfg, jax.random.key(0), shapes_only=True)
    n = count_params(shapes)
    return f"student params: {n / 1e6:.2f}M ({n:,}), all trainable"


def cmd_distill(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from lora_kd_jax.distill import teacher, trainer

    if args.dry_run:
        infos = teacher.teacher_runs(cfg)
        cfg = trainer.transformer_student_config(cfg, infos)  # a transformer student: the teacher's layers it takes
        teachers = sorted({str(info.path) for info in infos.values()})
        name = next(iter(infos.values())).config.model.name
        which = (f"teacher: {teachers[0]}" if len(teachers) == 1 else
                 "teachers: " + ", ".join(f"seed {k} <- {info.path}" for k, info in infos.items()))
        print(f"{which} (LoRA {name})\n{_student_report(cfg)}")
        return
    report(trainer.distill(cfg, resume=args.resume, progress=not args.no_progress, profile=args.profile),
           cfg.run.dir)


def cmd_train_student(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.dry_run:
        print(_student_report(cfg))
        return
    from lora_kd_jax.distill import trainer as distill

    report(distill.train_student(cfg, resume=args.resume, progress=not args.no_progress, profile=args.profile),
           cfg.run.dir)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from lora_kd_jax.commands import reproduce

    overrides = list(args.overrides)
    if args.seeds:
        overrides.append(f"train.seeds=[{args.seeds}]")
    root, _ = reproduce.study_configs(overrides, tiny=args.tiny, configs_dir=args.configs)  # all checked first
    outcomes = reproduce.run_study(overrides, tiny=args.tiny, configs_dir=args.configs,
                                   progress=not args.no_progress)
    print(reproduce.results_table(outcomes))
    print(f"-> {root / 'results.md'}, {root / 'results.png'}")


def _one_run(args: argparse.Namespace) -> str:
    """The run a one-run command reads: RUN itself, or one seed of a seeded RUN (--seed, default the best); the
    choice is said on stderr."""
    from lora_kd_jax.runs import reader as runs

    path, note = runs.one_run_dir(args.run_dir, args.seed)
    if note:
        print(f"using {note}", file=sys.stderr)
    return str(path)


def cmd_export_peft(args: argparse.Namespace) -> None:
    from lora_kd_jax.interop import export

    out = export.export_peft(_one_run(args), args.out_dir, which=args.which, base_model=args.base_model,
                             save_base=args.save_base, overwrite=args.overwrite)
    print(f"PEFT adapter -> {out}")


def cmd_import_peft(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from lora_kd_jax.interop import export

    cfg, model, params = export.import_peft(args.peft_dir, cfg)
    out = export.write_imported_run(cfg, model, params, args.out, source=args.peft_dir)
    print(f"imported {args.peft_dir} -> {out}; continue training with: {PROG} train-lora {out / 'config.yaml'} "
          "--resume")


def cmd_merge(args: argparse.Namespace) -> None:
    from lora_kd_jax.interop import export

    out = export.merge_and_save(_one_run(args), args.out_dir, which=args.which, overwrite=args.overwrite)
    print(f"merged checkpoint -> {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from lora_kd_jax.commands import bench
    from lora_kd_jax.core import precision

    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    if args.load:
        return _bench_load(args)
    seeds = _seed_counts(args.seeds)
    family = args.family is not None  # --family: that family's LoRA step alone, at bench.FAMILY_SIZES
    if family and args.family not in bench.FAMILY_VOCAB:
        raise UsageError(f"--family: unknown value '{args.family}'; choose from {', '.join(bench.FAMILY_VOCAB)}")
    args.variants = args.variants or ("base" if family else "gpt2,gpt2-medium")
    if family and (seeds or args.lora_variants):
        raise UsageError(f"--family {args.family} times the LoRA train step alone: drop --seeds / --lora-variants")
    if family:
        bench_flag, known_benches = f"--benches (with --family {args.family})", bench.FAMILY_BENCHES
        benches = args.benches or ",".join(bench.FAMILY_BENCHES)
    elif seeds:  # the seeded benches instead of the single-seed ones; --benches picks among them
        bench_flag, known_benches = "--benches (with --seeds)", bench.SEEDED_BENCHES
        benches = args.benches or ",".join(bench.SEEDED_BENCHES)
    else:
        bench_flag, known_benches = "--benches", bench.BENCHES
        benches = args.benches or ",".join(bench.default_benches(split(args.variants)))
    for flag, values, known in ((bench_flag, benches, known_benches), ("--modes", args.modes, bench.MODES),
                                ("--variants", args.variants, bench.FAMILY_SIZES if family else bench.VARIANTS),
                                ("--lora-variants", args.lora_variants, bench.LORA_VARIANTS),
                                ("--student-dtypes", args.student_dtypes, ("auto", *precision.DTYPES))):
        for name in split(values):
            if name not in known:
                raise UsageError(f"{flag}: unknown value '{name}'; choose from {', '.join(known)}")
    if args.steps < 1 or args.limit < 0 or not split(args.student_dtypes):
        raise UsageError(f"--steps {args.steps}, --limit {args.limit}, --student-dtypes '{args.student_dtypes}': "
                         "expected --steps >= 1, --limit >= 0 and at least one student dtype")
    for setting in args.student:
        if not setting.startswith("student."):
            raise UsageError(f"--student {setting}: expected a student.* setting, e.g. --student student.arch=cnn")
    if args.steps < 20:
        print("note: --steps below 20 gives a noisy median", file=sys.stderr)
    bench.run(bench.BenchArgs(variants=split(args.variants), modes=split(args.modes), benches=split(benches),
                              batch=args.batch, seq=args.seq, steps=args.steps, peak_tflops=args.peak_tflops,
                              trim=not args.no_trim, data_dir=args.data_dir, tokenizer=args.tokenizer, out=args.out,
                              limit=args.limit, student_dtypes=split(args.student_dtypes), seeds=seeds,
                              profile=args.profile, profile_dir=args.profile_dir, student=args.student,
                              lora_variants=split(args.lora_variants), family=args.family))


def _bench_load(args: argparse.Namespace) -> None:
    """bench --load SIZE: the checkpoint-loading bench alone (`commands.bench_load`), JSON lines as the others."""
    import json

    from lora_kd_jax.commands.bench_load import bench_load
    from lora_kd_jax.models.families import named_size

    if named_size(args.load) is None:
        raise UsageError(f"--load {args.load}: not a released size; choose from gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                         "distilgpt2")
    for rec in bench_load(args.load, keep=args.load_dir, shard_mb=args.shard_mb):
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


def _seed_counts(value: str) -> list[int]:
    """--seeds '1,2,4,8' -> [1, 2, 4, 8]; '' -> [] (no seeded benches). Positive integers, each once."""
    if not value:
        return []
    try:
        counts = [int(x) for x in value.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or len(set(counts)) < len(counts):
        raise UsageError(f"--seeds '{value}': expected a comma list of distinct positive seed counts, "
                         "e.g. --seeds 1,2,4,8")
    return counts


def cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    from lora_kd_jax.commands import evaluation
    from lora_kd_jax.runs import reader as runs
    from lora_kd_jax.training import runtime

    if args.limit < 0 or (args.batch_size is not None and args.batch_size < 1):
        raise UsageError(f"--limit {args.limit}, --batch-size {args.batch_size}: expected --limit >= 0 and "
                         "--batch-size >= 1")
    dirs = runs.seed_run_dirs(args.run_dir, args.seed)
    infos = {k: runs.inspect_run(d, which=args.which) for k, d in dirs.items()}  # cheap checks first
    runtime.enable_compilation_cache(next(iter(infos.values())).config.run.compilation_cache)
    results = {k: evaluation.evaluate_run(info, args.data or evaluation.DEFAULT_SETS, which=args.which,
                                        limit=args.limit, batch_size=args.batch_size) for k, info in infos.items()}
    records = {k: evaluation.evaluation_record(clf, reports) for k, (clf, reports) in results.items()}
    if len(records) == 1:
        (record,) = records.values()
        if args.json:
            print(json.dumps(record, indent=2))
            return
        (clf, reports), = results.values()
        out = evaluation.write_evaluation(record["run"], record)
        print(evaluation.format_reports(clf, reports))
        print(f"-> {out}")
        return
    combined = evaluation.seeds_record(runs.find_run_dir(args.run_dir), records)
    if args.json:
        print(json.dumps(combined, indent=2))
        return
    for k, (clf, reports) in results.items():
        print(f"seed {k}: -> {evaluation.write_evaluation(records[k]['run'], records[k])}")
    out = evaluation.write_evaluation(runs.find_run_dir(args.run_dir), combined)
    print(evaluation.format_seed_reports(combined))
    print(f"-> {out}")


def cmd_predict(args: argparse.Namespace) -> None:
    import json

    from lora_kd_jax.commands import evaluation
    from lora_kd_jax.runs import reader as runs
    from lora_kd_jax.training import runtime
    from lora_kd_jax.training.restore import open_run

    given = [bool(args.sentences), bool(args.file), bool(args.pair)]
    if sum(given) != 1:
        raise UsageError("give the sentences on the command line, --pair FIRST SECOND, or --file FILE (one per line), "
                         "one of them" if any(given) else "no sentences: give them on the command line, --pair FIRST "
                         "SECOND or --file FILE")
    info = runs.inspect_run(_one_run(args), which=args.which)
    on_pairs = bool(info.config.data.text_pair)
    if args.pair:
        sentences, pairs = evaluation.check_sentences([a for a, _ in args.pair]), [b for _, b in args.pair]
    else:
        sentences = evaluation.check_sentences(args.sentences) if args.sentences else evaluation.read_sentence_file(
            args.file)
        pairs = evaluation.split_pairs(sentences, args.file) if on_pairs and args.file else None
        sentences = [s.split("\t")[0] for s in sentences] if pairs else sentences
    if on_pairs != (pairs is not None):
        raise UsageError(f"{info.path} was trained on sentence pairs (data.text_pair={info.config.data.text_pair}): "
                         "give --pair FIRST SECOND or a --file of tab-separated pairs" if on_pairs else
                         f"{info.path} was trained on single sentences: give sentences, not --pair")
    runtime.enable_compilation_cache(info.config.run.compilation_cache)
    clf = evaluation.Predictor(open_run(info, which=args.which))
    predictions = clf.predict(sentences, pairs)
    shown = [f"{s} ||| {b}" for s, b in zip(sentences, pairs)] if pairs else sentences
    if args.json:
        print(json.dumps([{"sentence": s, **({"pair": b} if pairs else {}),
                           **{k: v for k, v in p._asdict().items() if k != "score" or v is not None}}
                          for s, b, p in zip(sentences, pairs or sentences, predictions)], indent=2))
    else:
        print(evaluation.format_predictions(shown, predictions, clf.max_length))


class UsageError(UserError):
    """A command-line flag has a value the command cannot use."""
    label = "usage error"


# -------------------------------------------------------------------------------------------------- parsing
