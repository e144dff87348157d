"""The repository stands alone: CoLA and the GPT-2 tokenizer ship in the package (byte-exact, found after a
non-editable install), the defaults reproduce the reference's splits, and offline failures read as one line."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax import assets, data
from lora_kd_jax.training import records
from tiny import XLA_CACHE, core_install_env, tiny_config

REPO = Path(__file__).resolve().parents[1]
# As published with the CoLA v1.1 release archive and GPT-2's encoder files (see the assets' SOURCES notes).
RELEASED_SHA256 = {
    "cola/in_domain_train.tsv": "f320a10f92d3bce6b29152fde322a362eac39238e50d8de0c8815457fdf4fc12",
    "cola/in_domain_dev.tsv": "77176f6a03faa5a1c4f23c69971fc1bff565931112fb65af47b2d6e24b7f42f7",
    "cola/out_of_domain_dev.tsv": "201b9c57b2a20f1282242eec0ed8995729e3be19c29a46c047b3727338836c05",
    "gpt2_tokenizer/vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2_tokenizer/merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def test_packaged_files_are_the_released_bytes():
    assert assets.SHA256 == RELEASED_SHA256
    for name, digest in RELEASED_SHA256.items():
        assert hashlib.sha256((assets.ASSETS / name).read_bytes()).hexdigest() == digest, name
    assert not (assets.COLA_DIR / "out_of_domain_dev.tsv").read_bytes().endswith(b"\n")  # as released
    readme = (assets.COLA_DIR / "README.cola_public").read_text()
    assert "Warstadt" in readme  # the release's own README (authors, citation, disclaimer) travels with the data


def test_defaults_read_the_packaged_splits_of_the_reference():
    cfg = tiny_config()  # no data keys
    splits = data.load_splits(cfg, tokenizer_for(cfg))
    assert splits.rows == {"train": 8551, "validation": 527, "out_of_domain": 516}
    assert {s: len(e) for s, e in splits.encoded.items()} == splits.rows
    assert int(splits.encoded["validation"].labels.sum()) == 365  # in_domain_dev: majority 365/527 = 69.26%
    assert int(splits.encoded["out_of_domain"].labels.sum()) == 354
    tok = data.load_tokenizer("")
    assert tok("Hello world")["input_ids"] == [15496, 995] and tok.pad_token_id == data.PAD_ID


def test_limit_is_reported_beside_the_source_row_counts():
    cfg = tiny_config("data.limit=100")
    report = data.load_splits(cfg, tokenizer_for(cfg)).report()
    assert report["rows"] == {"train": 8551, "validation": 527, "out_of_domain": 516}
    assert report["rows_used"] == {"train": 100, "validation": 100, "out_of_domain": 100}
    assert report["source"].startswith("packaged CoLA v1.1")


def test_out_of_domain_is_reported_but_never_picks_the_best_epoch():
    def epoch(n, val, ood):
        m = lambda acc: {"loss": 1.0 - acc, "accuracy": acc, "mcc": acc - 0.5, "count": 10}  # noqa: E731
        return {"epoch": n, "train": m(0.5), "val": m(val), "reported": {"out_of_domain": m(ood)}}

    summary = records.run_summary([epoch(1, 0.60, 0.90), epoch(2, 0.70, 0.10), epoch(3, 0.65, 0.95)])
    assert summary["best_epoch"] == 2 and summary["best_val_accuracy"] == 0.70
    assert summary["out_of_domain_accuracy_at_best"] == 0.10  # the figure at the epoch validation chose


def test_a_run_scores_out_of_domain_every_epoch_and_records_its_data(tmp_path):
    from lora_kd_jax.training import finetune

    cfg = tiny_config("data.limit=48", "train.batch_size=16", "train.epochs=2", f"run.dir={tmp_path / 'r'}")
    summary = finetune.train_lora(cfg, progress=False)
    record = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert all(e["reported"]["out_of_domain"]["count"] == 48 for e in record["epochs"])
    best = max(record["epochs"], key=lambda e: e["val"]["accuracy"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["out_of_domain_mcc_at_best"] == best["reported"]["out_of_domain"]["mcc"]
    assert summary["data"]["rows"] == {"train": 8551, "validation": 527, "out_of_domain": 516}
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "train 8551 rows, validation 527 rows, out_of_domain 516 rows" in log and "out_of_domain acc" in log


def test_a_wheel_ships_the_data_and_finds_it_outside_the_source_tree(tmp_path):
    """A non-editable install: build the wheel, unpack it elsewhere, import it from a directory with no sources."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("lora_kd_jax-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    for name in RELEASED_SHA256:
        assert f"lora_kd_jax/assets/{name}" in names, name
    assert "lora_kd_jax/assets/cola/README.cola_public" in names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("lora_gpt2", "lora_gpt2_medium", "distil_rnn_gpt2", "distil_rnn_gpt2_medium", "rnn_scratch", "smoke"):
        assert f"lora_kd_jax/assets/configs/{name}.yaml" in names, name  # reproduce needs no repository
    probe = ("import lora_kd_jax, lora_kd_jax.data as d; from lora_kd_jax.assets import COLA_DIR; "
             "from lora_kd_jax.commands.reproduce import study_configs; print(lora_kd_jax.__file__); "
             "s, _ = d.read_cola_tsv(COLA_DIR / 'in_domain_dev.tsv'); print(len(s)); "
             "print(d.load_tokenizer('')('Hello world')['input_ids']); "
             "print(len(study_configs(tiny=True)[1]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-2000:]
    where, rows, ids, experiments = out.stdout.split("\n")[:4]
    assert where.startswith(str(site)) and rows == "527" and ids == "[15496, 995]" and experiments == "5"


def _offline(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = core_install_env({**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"})
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train_lora.py"), *argv,
                           f"run.dir={tmp_path / 'run'}", XLA_CACHE],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


@pytest.mark.parametrize("extra, names", [
    ((), ("model.path", "model.init=random")),
    (("model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "data.dir=hub"),
     ("data.dir=hub", "nyu-mll/glue", "packaged CoLA")),
    (("model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "data.tokenizer=gpt2"),
     ("data.tokenizer=gpt2", "packaged GPT-2 tokenizer")),
], ids=["weights", "dataset", "tokenizer"])
def test_no_network_ends_in_one_line_naming_the_way_out(extra, names, tmp_path):
    out = _offline(str(REPO / "configs" / "lora_gpt2.yaml"), *extra, tmp_path=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if " INFO " not in line and line.strip()]
    assert len(errors) == 1, errors
    assert all(n in errors[0] for n in names), errors[0]
    assert not (tmp_path / "run").exists()  # a start that never trained leaves nothing behind to block the rerun
