"""Which known key an unknown one meant, for the messages that refuse it.

Why more than a closest string: the words a first user types come from other trainers (`learning_rate`,
`num_epochs`, `--epochs 3`), whose closest dotted key by spelling is often wrong (`train.learning_rate` is nearest
`train.eval_batch_size`). So the last part of the key is read first: a common alias, then a key of another section
with that exact name, and only then the closest spelling.
"""
from __future__ import annotations

import difflib
from typing import Sequence

# words other trainers use -> the key that means the same here
ALIASES: dict[str, str] = {
    "learning_rate": "train.lr", "lr": "train.lr", "epochs": "train.epochs", "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs", "n_epochs": "train.epochs", "batch_size": "train.batch_size",
    "per_device_train_batch_size": "train.batch_size", "bs": "train.batch_size", "seed": "train.seed",
    "warmup_steps": "train.warmup", "warmup_ratio": "train.warmup", "r": "lora.rank", "lora_r": "lora.rank",
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "max_len": "data.max_length", "max_seq_length": "data.max_length", "max_seq_len": "data.max_length",
    "output_dir": "run.dir", "out_dir": "run.dir", "model_name": "model.name", "model_name_or_path": "model.name",
    "teacher": "distill.teacher", "temperature": "distill.temperature",
}


def _word(text: str) -> str:
    return text.strip().lstrip("-").lower().replace("-", "_")


def suggestions(key: str, known: Sequence[str]) -> list[str]:
    """The known keys `key` most likely meant (best first; [] when nothing is close): an alias of its last part,
    the keys of other sections with that last part, the closest last part in its own section, then in any; the
    closest whole key only when the section is unknown too (`trian.lr`)."""
    section, last = key.split(".")[0], _word(key.split(".")[-1])
    if ALIASES.get(last) in known:
        return [ALIASES[last]]
    same = [k for k in known if k.split(".")[-1] == last and k != key]
    if same:
        return same
    for cutoff, candidates in ((0.6, [k for k in known if "." in key and k.split(".")[0] == section]),
                               (0.75, list(known))):
        tails: dict[str, str] = {}
        for k in candidates:
            tails.setdefault(k.split(".")[-1], k)
        close = difflib.get_close_matches(last, list(tails), n=1, cutoff=cutoff)
        if close:
            return [tails[close[0]]]
    if any(k.split(".")[0] == section for k in known):
        return []
    return difflib.get_close_matches(key, known, n=1, cutoff=0.6)


def did_you_mean(options: Sequence[str], value: str | None = None) -> str:
    """"did you mean 'a'?" / "did you mean 'a', 'b' or 'c'?"; with `value`, each as an override key=value."""
    shown = [f"{o}={value}" if value is not None else f"'{o}'" for o in options]
    listed = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    return f"did you mean {listed}?"
