"""The one command line: `lora-kd-jax COMMAND ...` (and the thin `scripts/*.py` aliases).

This module owns argument parsing, logging set-up and the clean exit of every command: a mistake a user can make
(any `UserError`: config, data, weights, run dir, checkpoint, file system) ends the command with one line and exit
status 1; anything else is a bug and keeps its traceback (as does every error under `--debug`). Heavy imports (jax,
transformers) happen only after the arguments and the config are known to be valid.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from typing import Callable, Iterator, Sequence

from lora_kd_jax.core.config import all_keys
from lora_kd_jax.core.config.suggest import did_you_mean, suggestions
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.commands.handlers import (PROG, UsageError, cmd_bench, cmd_distill, cmd_evaluate, cmd_export_peft,
                                          cmd_import_peft, cmd_merge, cmd_predict, cmd_reproduce, cmd_train_lora,
                                          cmd_train_student, setup_logging)
from lora_kd_jax.commands.settings import cmd_config, packaged_configs, version

DESCRIPTION = ("LoRA fine-tuning of GPT-2, BERT, RoBERTa, Llama, Qwen3 and ModernBERT classifiers (LoRA, rsLoRA, "
               "DoRA, LoRA+, PiSSA, OLoRA; QLoRA's NF4 or int8 base) on CoLA, a GLUE task or your own tables (TSV, CSV, JSONL, Parquet), and knowledge distillation "
               "into small students (the study's RNN, a BiLSTM, a CNN, a smaller transformer), in JAX. "
               "`%(prog)s COMMAND --help` lists a command's options; `%(prog)s config CONFIG` every config key.")
CONFIG_HELP = f"a YAML config file, or a config the package ships by name: {', '.join(packaged_configs())}"


@contextlib.contextmanager
def clean_exit(debug: bool = False) -> Iterator[None]:
    """A `UserError` (or a file-system error such as a full disk) ends the command with `label: message` on stderr
    and exit status 1, no traceback; `debug` re-raises everything."""
    try:
        yield
    except UserError as e:
        if debug:
            raise
        sys.exit(f"{e.label}: {e}")
    except OSError as e:
        if debug or e.errno not in _USER_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"file system error: {where}{e.strerror or e}")


# what the file system says when the disk is full, read-only, failing, or a path is of the wrong kind: not bugs
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT,
                errno.ENOENT, errno.EEXIST, errno.EIO}


SEED_HELP = ("a seeded run (train.seeds): the seed to use (default: the seed with the best validation accuracy, "
             "named on stderr)")


def _debug_flag() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a traceback for every error")
    return common


def _steps(text: str) -> int:
    """--profile's value: a number of steps, 0 = off."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of steps >= 0, got {text!r}")
    return int(text)


def _training_command(sub, name: str, handler: Callable, help_: str, example: str, dry_run: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_, epilog=f"example: {PROG} {name} {example}",
                       parents=[_debug_flag()])
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4 (anywhere on the line)")
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--profile", type=_steps, default=0, metavar="STEPS", help="write a jax.profiler trace of STEPS "
                   "training steps, after the first (compiling) one, into RUN_DIR/profile")
    p.set_defaults(handler=handler)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for --help and unknown commands) and each command's own parser."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, parents=[_debug_flag()])
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _training_command(sub, "train-lora", cmd_train_lora, "LoRA fine-tuning of a GPT-2, BERT, RoBERTa, Llama, "
                      "Qwen3 or ModernBERT classifier on CoLA, a GLUE task or your own table files (data.train=FILE)",
                      "lora_gpt2 run.dir=runs/lora_gpt2",
                      "build shapes only, print the parameter report and exit")
    _training_command(sub, "distill", cmd_distill, "distil a finished LoRA run (distill.teacher=RUN_DIR) into a "
                      "student: the study's RNN, a BiLSTM, a CNN or a smaller transformer (student.arch)",
                      "distil_rnn_gpt2 distill.teacher=runs/lora_gpt2",
                      "check the teacher, print the student's parameter count and exit")
    for name in ("train-student", "train-rnn"):  # train-rnn: its old name (it trains any student.arch)
        _training_command(sub, name, cmd_train_student, "train a student (student.arch: rnn, bilstm, cnn, "
                          "transformer) from scratch on the labels: the distillation's baseline"
                          + ("; the old name of train-student" if name == "train-rnn" else ""),
                          "rnn_scratch", "print the student's parameter count and exit")

    r = sub.add_parser("reproduce", help="the five runs of the reference study and its table", parents=[_debug_flag()],
                       description="Reproduce the reference table: LoRA gpt2, LoRA gpt2-medium, distillation from "
                       "each, the RNN from scratch; writes results.md and results.png into the study's root (run.dir)",
                       epilog=f"example: {PROG} reproduce --tiny data.limit=2000")
    r.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every run, e.g. "
                   "data.limit=2000; run.dir=PATH sets the study's root (default runs/reproduce)")
    r.add_argument("--tiny", action="store_true", help="offline CPU check of the whole study: random-init 2-layer "
                   "GPT-2 teachers (64 and 128 wide) in place of gpt2 and gpt2-medium and a 64/64 student; runs go "
                   "to runs/reproduce_tiny unless run.dir=PATH")
    r.add_argument("--configs", default=None, help="directory holding the five configs (default: the repository's "
                   "configs/)")
    r.add_argument("--seeds", default="", help="comma list, e.g. 0,1,2,3,4: every experiment trains these seeds at "
                   "once (train.seeds) and the table gives mean ± std (min–max)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(handler=cmd_reproduce)

    e = sub.add_parser("export-peft", help="a LoRA run -> a PEFT adapter dir (PeftModel.from_pretrained)", parents=[_debug_flag()],
                       epilog=f"example: {PROG} export-peft runs/smoke exports/smoke_peft --save-base")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--which", choices=("best", "latest"), default="best", help="checkpoint to export")
    e.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    e.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record (default: the run's model.path, absolute, or model.name)")
    e.add_argument("--save-base", action="store_true",
                   help="also write the run's frozen base to OUT_DIR/base and point the adapter at it")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(handler=cmd_export_peft)
    i = sub.add_parser("import-peft", help="a PEFT adapter dir -> a run dir (continue with train-lora --resume)", parents=[_debug_flag()],
                       epilog=f"example: {PROG} import-peft exports/adapter configs/smoke.yaml --out runs/imported")
    i.add_argument("peft_dir")
    i.add_argument("config", help="a YAML config or a packaged config's name, naming the same base (model.path / "
                   "model.name), data and training")
    i.add_argument("overrides", nargs="*", help="section.key=value overrides")
    i.add_argument("--out", required=True, help="the run dir to create")
    i.set_defaults(handler=cmd_import_peft)
    m = sub.add_parser("merge", help="a LoRA run -> a plain Hugging Face checkpoint of its family (config.json + "
                       "model.safetensors, the head included)", parents=[_debug_flag()],
                       epilog=f"example: {PROG} merge runs/smoke exports/smoke_merged")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument("--which", choices=("best", "latest"), default="best")
    m.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(handler=cmd_merge)

    from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR

    b = sub.add_parser("bench", help="step-time benchmarks (JSON lines on stdout, appended to --out)", parents=[_debug_flag()],
                       epilog=f"example: {PROG} bench --variants tiny --modes fp32 --steps 20")
    b.add_argument("--variants", default=None, help="comma list of gpt2, gpt2-medium, tiny (default: gpt2,gpt2-medium); "
                   "with --family, of tiny, base (default: base)")
    b.add_argument("--family", default=None, metavar="FAMILY",
                   help="bert, roberta, llama, qwen3, modernbert: time the LoRA train step of that family's "
                   "classifier (random init, --variants sizes) instead of the study's GPT-2 benches")
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--seq", type=int, default=64)
    b.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16")
    b.add_argument("--benches", default=None, help="comma list of lora_train_step, teacher_forward, distill_step, "
                   "distill_step_cached, epoch (default: all; on a CPU the gpt2-size epoch bench only when named); "
                   "with --seeds, of lora_train_step, distill_step_cached, student_step (default: all three)")
    b.add_argument("--seeds", default="", help="comma list of seed counts N, e.g. 1,2,4,8: instead of the "
                   "single-seed benches, time the LoRA, cached-distillation and RNN-baseline (student_step) steps of "
                   "N seeds in one program (train.seeds: vmapped, frozen base shared), each N in turn")
    b.add_argument("--lora-variants", default="", help="comma list of lora, rslora, dora, lora_plus, pissa, olora, "
                   "dora_rslora_plus, qlora_nf4, qlora_nf4_dq, qlora_int8: instead of the other benches, the LoRA train step of each beside plain LoRA "
                   "(records add lora_variant and ratio_vs_lora)")
    b.add_argument("--student-dtypes", default="auto", help="comma list of auto, float32, bfloat16: the distillation "
                   "benches run the student once in each (auto = this backend's choice, precision.py)")
    b.add_argument("--student", action="append", default=[], metavar="student.KEY=VALUE", help="a student.* "
                   "setting for the student benches (repeatable), e.g. --student student.arch=cnn")
    b.add_argument("--steps", type=int, default=30, help="timed steps after warm-up (median reported)")
    b.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (e.g. 989 for H100 bf16)")
    b.add_argument("--no-trim", action="store_true", help="keep all-padding columns (no length-aware trimming)")
    b.add_argument("--data-dir", default=str(COLA_DIR), help="CoLA dir (raw layout) for the epoch bench (default: the "
                   "packaged copy; '' skips the bench)")
    b.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="GPT-2 tokenizer dir or hub name (default: the "
                   "packaged one)")
    b.add_argument("--limit", type=int, default=0, help="epoch bench: first N training sentences (0 = all 8,551)")
    b.add_argument("--out", default=None)
    b.add_argument("--profile", type=_steps, default=0, metavar="STEPS", help="after each step bench's timed steps, a "
                   "jax.profiler trace of STEPS more into --profile-dir/<bench>_<variant>_<mode>...")
    b.add_argument("--profile-dir", default="bench_profile")
    b.add_argument("--load", nargs="?", const="gpt2-large", default=None, metavar="SIZE", help="instead of the step "
                   "benches: write a random checkpoint of GPT-2's layout at SIZE (default gpt2-large, 774M) as sharded "
                   "safetensors and time loading it, peak host memory too, here and with transformers' PyTorch "
                   "from_pretrained")
    b.add_argument("--load-dir", default=None, help="--load: write the checkpoint here and keep it (default: a "
                   "temporary dir)")
    b.add_argument("--shard-mb", type=int, default=500, help="--load: the checkpoint's shard size in MB")
    b.set_defaults(handler=cmd_bench)
    v = sub.add_parser("evaluate", help="score a run (LoRA, distilled student, student baseline) on its validation "
                       "and reported sets, CoLA's dev sets or any table file", parents=[_debug_flag()],
                       description="Score a run (LoRA, distilled student, student baseline) on its validation "
                       "and reported sets, CoLA's dev sets or any table file: accuracy, MCC, F1 and a confusion "
                       "matrix (CoLA: accuracy per source; a regression: Pearson and Spearman) of the run's checkpoint "
                       "on each set asked for (default: a CoLA run's in_domain and out_of_domain, a table run's "
                       "validation and reported files), with the run's own tokenizer, max_length, pooling and dtypes. "
                       "Prints a table and writes RUN_DIR/evaluation.json; --json prints that JSON instead and writes "
                       "nothing.",
                       epilog=f"example: {PROG} evaluate runs/lora_gpt2 --data in_domain out_of_domain glue")
    v.add_argument("run_dir", help="a run directory (or its checkpoints/ dir)")
    v.add_argument("--which", choices=("best", "latest"), default="best", help="checkpoint to score (default: best)")
    v.add_argument("--seed", type=int, default=None, help="a seeded run (train.seeds): score only this seed "
                   "(default: every seed, each written to its seed dir, and their mean ± std)")
    v.add_argument("--data", nargs="+", metavar="SET", default=None,
                   help="in_domain (527 rows), out_of_domain (516), glue (both: 1,043, GLUE's CoLA dev) or the "
                   "path of a CoLA TSV file (source, label, annotation, sentence); for a run on your own table files: "
                   "validation, train, a data.report file's name, or any table file with the run's columns "
                   "(default: validation and the reported files); several allowed")
    v.add_argument("--limit", type=int, default=0, help="score only the first N rows of each file (as data.limit "
                   "cuts a run's validation set; 0 = all)")
    v.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: the run's "
                   "train.eval_batch_size, which gives back its recorded validation numbers exactly)")
    v.add_argument("--json", action="store_true", help="print the results as JSON on stdout (no table, no file)")
    v.set_defaults(handler=cmd_evaluate)
    pr = sub.add_parser("predict", help="label sentences or pairs with a run (its label names; CoLA: acceptable / "
                        "unacceptable)",
                        parents=[_debug_flag()],
                        description="The label a run gives each sentence and its probability, in input order; a "
                        "sentence longer than the run's data.max_length is flagged (only its first max_length tokens "
                        "are read).",
                        epilog=f'example: {PROG} predict runs/lora_gpt2 "The cat sat on the mat." "Cat the on sat."')
    pr.add_argument("run_dir", help="a run directory (or its checkpoints/ dir)")
    pr.add_argument("sentences", nargs="*", help="sentences to label (quote each)")
    pr.add_argument("--file", default=None,
                    help="a UTF-8 text file with one sentence per line (instead of SENTENCES)")
    pr.add_argument("--pair", nargs=2, action="append", metavar=("FIRST", "SECOND"), default=None,
                    help="a sentence pair, for a run on pairs (data.text_pair); repeat for more (with --file: "
                    "one pair per line, the two texts separated by a tab)")
    pr.add_argument("--which", choices=("best", "latest"), default="best", help="checkpoint to use (default: best)")
    pr.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    pr.add_argument("--json", action="store_true", help="print a JSON list (sentence, label, probability, truncated)")
    pr.set_defaults(handler=cmd_predict)
    _config_command(sub)
    return parser, dict(sub.choices)


def _config_command(sub) -> None:
    from lora_kd_jax.core.config.reference import REGENERATE

    c = sub.add_parser("config", help="every config key: its default, the value CONFIG and the overrides give it, "
                       "where that came from, and its doc", parents=[_debug_flag()],
                       description="Every config key with its default, its resolved value (after CONFIG and the "
                       "overrides), where that value came from, and its doc. Without CONFIG: the defaults.",
                       epilog=f"example: {PROG} config smoke train.lr=3e-4")
    c.add_argument("config", nargs="?", default=None, help=CONFIG_HELP)
    c.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    c.add_argument("--json", action="store_true", help="print the same as JSON")
    c.add_argument("--markdown", action="store_true", help="print the reference of every key as Markdown (the "
                   f"docs page): {REGENERATE}")
    c.set_defaults(handler=cmd_config)


def _flags_meant_as_keys(command: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """`--epochs 3`, as other trainers take it, is a config key here: a UsageError naming the override it means
    (argparse would call every word after it an unrecognized argument). Only for commands that take overrides."""
    if "overrides" not in {a.dest for a in parser._actions}:
        return
    options = list(parser._option_string_actions)
    for i, word in enumerate(argv):
        flag, _, value = word.partition("=")
        if not flag.startswith("--") or flag == "--" or any(o.startswith(flag) for o in options):
            continue  # an option of the command (argparse takes unambiguous prefixes too)
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
            value = argv[i + 1]
        close = suggestions(flag.lstrip("-").replace("-", "_"), all_keys())
        if close:
            raise UsageError(f"{flag} is not an option of {command}; config keys are set as section.key=value: "
                             f"{did_you_mean(close, value or 'VALUE')}")


def main(argv: Sequence[str] | None = None) -> None:
    """`lora-kd-jax COMMAND ...`: options and overrides may come in any order (`--resume lora.rank=8`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    first = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if first is None or argv[first] not in commands or any(a not in ("--debug",) for a in argv[:first]):
        parser.parse_args(argv)  # --help, no command, an unknown one: argparse says so and exits
        parser.error(f"unrecognized arguments before the command: {' '.join(argv[:first])}")
    with clean_exit("--debug" in argv):
        _flags_meant_as_keys(argv[first], commands[argv[first]], argv[first + 1:])
    args = commands[argv[first]].parse_intermixed_args(argv[first + 1:])
    setup_logging()
    with clean_exit(args.debug or "--debug" in argv[:first]):
        args.handler(args)


def _alias(command: str) -> Callable[[Sequence[str] | None], None]:
    def run(argv: Sequence[str] | None = None) -> None:
        main([command, *(sys.argv[1:] if argv is None else argv)])

    run.__doc__ = f"`{PROG} {command}` (the entry point of the matching scripts/*.py)."
    return run


main_train_lora = _alias("train-lora")
main_distill = _alias("distill")
main_train_student = _alias("train-student")
main_train_rnn = _alias("train-rnn")
main_reproduce = _alias("reproduce")
main_bench = _alias("bench")
