"""Tests for lora_kd_jax.data: strict CoLA reading, tokenization, and fixed-shape batching."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_kd_jax.data import (
    PAD_ID,
    DataError,
    EncodedSplit,
    batch_iterator,
    encode,
    encode_splits,
    load_cola,
    load_tokenizer,
    num_batches,
    read_cola_rows,
    read_cola_tsv,
)

from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR


def write(tmp_path: Path, content: str | bytes, name: str = "cola.tsv") -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


GOOD = "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\nab12\t1\t\tDogs bark.\n"


# ------------------------------------------------------------------------------------ read_cola_tsv


@pytest.fixture
def good_file(tmp_path):
    return write(tmp_path, GOOD)


def test_read_good(good_file):
    sentences, labels = read_cola_tsv(good_file)
    assert sentences == ["The cat sat.", "Cat the sat.", "Dogs bark."]
    assert labels.dtype == np.int32
    assert labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(GOOD.replace("\n", "\r\n"), id="crlf"),
        pytest.param("\ufeff" + GOOD, id="bom"),
        pytest.param(GOOD.rstrip("\n"), id="no-trailing-newline"),
        pytest.param("\ufeff" + GOOD.replace("\n", "\r\n").rstrip("\r\n"), id="bom-crlf-no-trailing"),
    ],
)
def test_read_tolerated_variants(tmp_path, variant):
    sentences, labels = read_cola_tsv(write(tmp_path, variant))
    assert sentences == ["The cat sat.", "Cat the sat.", "Dogs bark."]
    assert labels.tolist() == [1, 0, 1]


def test_read_blank_lines_skipped_and_logged(tmp_path, caplog):
    text = "\n" + "gj04\t1\t\tA b.\n" + "\n  \n" + "gj04\t0\t*\tB a.\n" + "\r\n"
    with caplog.at_level(logging.INFO, logger="lora_kd_jax.data"):
        sentences, labels = read_cola_tsv(write(tmp_path, text))
    assert sentences == ["A b.", "B a."]
    assert labels.tolist() == [1, 0]
    assert any("skipped 4 blank line" in r.getMessage() for r in caplog.records)


def test_read_rows_adds_sources_and_lines(tmp_path):
    text = "\ufeff" + "gj04\t1\t\tA b.\r\n" + "\n" + "ab12\t0\t*\tB a.\n"
    rows = read_cola_rows(write(tmp_path, text))
    assert (rows.sources, rows.sentences, rows.labels.tolist(), rows.lines) == (["gj04", "ab12"], ["A b.", "B a."],
                                                                                [1, 0], [1, 3])
    sentences, labels = read_cola_tsv(tmp_path / "cola.tsv")  # the same rows, as before
    assert sentences == rows.sentences and labels.tolist() == rows.labels.tolist() and len(rows) == 2


def test_read_quotes_verbatim(tmp_path):
    s = '"I\'m here," she said, "and \'so\' is ""he""."'
    sentences, _ = read_cola_tsv(write(tmp_path, f"x\t1\t\t{s}\n"))
    assert sentences == [s]


def test_read_unicode_and_trailing_space_verbatim(tmp_path):
    s = "Café naïve — résumé. "
    sentences, _ = read_cola_tsv(write(tmp_path, f"x\t0\t*\t{s}\n"))
    assert sentences == [s]


def bad_cases():
    ok = "gj04\t1\t\tFine.\n"
    return [
        pytest.param(ok + ok + "gj04\t1\tOnly three.\n", 3, ["missing column", "found 3 "], id="missing-column"),
        pytest.param(ok + "gj04\t1\t\tA\tB.\n", 2, ["extra column", "found 5 "], id="extra-column"),
        pytest.param(ok + ok + ok + "gj04\t2\t\tTwo.\n", 4, ["'2'", "expected 0 or 1"], id="label-2"),
        pytest.param("gj04\tyes\t\tWord.\n", 1, ["'yes'", "expected 0 or 1"], id="label-word"),
        pytest.param(ok + "gj04\t\t\tNo label.\n", 2, ["''", "expected 0 or 1"], id="label-empty"),
        pytest.param(ok + "gj04\t 1\t\tSpaced.\n", 2, ["' 1'", "expected 0 or 1"], id="label-spaced"),
        pytest.param(ok + "gj04\t1\t\t\n", 2, ["empty sentence"], id="empty-sentence"),
        pytest.param(ok + ok + "gj04\t0\t\t   \n", 3, ["empty sentence"], id="blank-sentence"),
        pytest.param("\t\t\t\n", 1, ["expected 0 or 1"], id="tabs-only-is-not-blank"),
        pytest.param(ok.replace("\n", "\r\n") + "gj04\t1\n", 2, ["missing column"], id="crlf-missing"),
    ]


@pytest.mark.parametrize("content, line, fragments", bad_cases())
def test_read_bad_rows(tmp_path, content, line, fragments):
    p = write(tmp_path, content, name="bad_input.tsv")
    with pytest.raises(DataError) as ei:
        read_cola_tsv(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_read_bad_utf8_names_line_and_byte(tmp_path):
    content = b"gj04\t1\t\tFine.\n" b"gj04\t1\t\tAlso fine.\n" b"gj04\t0\t*\tBad \xff byte.\n"
    p = write(tmp_path, content, name="latin.tsv")
    with pytest.raises(DataError) as ei:
        read_cola_tsv(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3: "), msg
    assert "\\xff" in msg and "byte 13 of the line" in msg, msg
    offset = content.index(b"\xff")
    assert f"file offset {offset}" in msg, msg


def test_read_missing_file(tmp_path):
    p = tmp_path / "nope.tsv"
    with pytest.raises(DataError, match="nope.tsv: file not found"):
        read_cola_tsv(p)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xef\xbb\xbf\r\n"], ids=["empty", "blank-only", "bom-crlf"])
def test_read_no_data_rows(tmp_path, content):
    p = write(tmp_path, content, name="empty.tsv")
    with pytest.raises(DataError, match=r"empty\.tsv: no data rows"):
        read_cola_tsv(p)


# ---------------------------------------------------------------------------------------- load_cola


def test_load_cola_raw_layout_counts():
    ds = load_cola(str(COLA_DIR))
    assert set(ds) == {"train", "validation", "out_of_domain"}
    assert ds["train"].column_names == ["sentence", "label"]
    tr, va = np.asarray(ds["train"]["label"]), np.asarray(ds["validation"]["label"])
    ood = np.asarray(ds["out_of_domain"]["label"])
    assert (len(tr), int(tr.sum())) == (8551, 6023)
    assert (len(va), int(va.sum())) == (527, 365)
    assert (len(ood), int(ood.sum())) == (516, 354)
    packaged = load_cola("")  # the default data.dir reads the same files
    assert {s: packaged[s]["sentence"] for s in packaged} == {s: ds[s]["sentence"] for s in ds}
    assert ds["train"][0]["sentence"] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert isinstance(ds["train"][0]["label"], int)


def test_load_cola_limit(caplog):
    with caplog.at_level(logging.INFO, logger="lora_kd_jax.data"):
        ds = load_cola(str(COLA_DIR), limit=100)
    full = load_cola(str(COLA_DIR))
    assert (len(ds["train"]), len(ds["validation"])) == (100, 100)
    assert ds["train"]["sentence"] == full["train"]["sentence"][:100]  # the *first* rows
    assert ds["validation"]["label"] == full["validation"]["label"][:100]
    assert any("kept the first 100 of 8551 train rows" in r.getMessage() for r in caplog.records)


def test_load_cola_glue_layout_same(tmp_path):
    shutil.copyfile(COLA_DIR / "in_domain_train.tsv", tmp_path / "train.tsv")
    shutil.copyfile(COLA_DIR / "in_domain_dev.tsv", tmp_path / "dev.tsv")
    glue, raw = load_cola(str(tmp_path)), load_cola(str(COLA_DIR))
    assert set(glue) == {"train", "validation"}  # the GLUE layout has no separate out-of-domain file
    for split in ("train", "validation"):
        assert glue[split]["sentence"] == raw[split]["sentence"]
        assert glue[split]["label"] == raw[split]["label"]


def test_load_cola_neither_layout(tmp_path):
    (tmp_path / "in_domain_train.tsv").write_text(GOOD)  # raw layout half present, dev missing
    with pytest.raises(DataError) as ei:
        load_cola(str(tmp_path))
    msg = str(ei.value)
    for name in ("in_domain_train.tsv", "in_domain_dev.tsv", "train.tsv", "dev.tsv", str(tmp_path)):
        assert name in msg, (name, msg)


def test_load_cola_missing_dir(tmp_path):
    with pytest.raises(DataError, match="no_such_dir: not a directory.*in_domain_train.tsv.*train.tsv"):
        load_cola(str(tmp_path / "no_such_dir"))


def test_load_cola_bad_file_in_dir_reports_line(tmp_path):
    write(tmp_path, GOOD, "train.tsv")
    write(tmp_path, GOOD + "x\t7\t\tSeven.\n", "dev.tsv")
    with pytest.raises(DataError, match=r"dev\.tsv:4: invalid label '7'"):
        load_cola(str(tmp_path))


@pytest.mark.parametrize("limit", [-1, 1.5])
def test_load_cola_bad_limit(tmp_path, limit):
    write(tmp_path, GOOD, "train.tsv")
    write(tmp_path, GOOD, "dev.tsv")
    with pytest.raises(DataError, match="limit"):
        load_cola(str(tmp_path), limit=limit)


def test_load_cola_hub_branch(monkeypatch):
    import datasets

    def split(n, offset):
        return datasets.Dataset.from_dict(
            {"sentence": [f"s{offset + i}." for i in range(n)], "label": [i % 2 for i in range(n)],
             "idx": list(range(n))}
        )

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.DatasetDict({"train": split(5, 0), "validation": split(4, 100), "test": split(3, 200)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_cola("hub", limit=3)
    assert calls == [(("nyu-mll/glue", "cola"), {})]
    assert set(ds) == {"train", "validation"}
    assert ds["train"].column_names == ["sentence", "label"]
    assert ds["train"]["sentence"] == ["s0.", "s1.", "s2."]
    assert ds["validation"]["sentence"] == ["s100.", "s101.", "s102."]


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER_DIR))


def test_tokenizer_offline(tok):
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.pad_token_id == PAD_ID == tok.eos_token_id
    assert tok.padding_side == "right"


def test_tokenizer_dir_without_files(tmp_path):
    (tmp_path / "README").write_text("x")
    with pytest.raises(DataError, match="vocab.json \\+ merges.txt"):
        load_tokenizer(str(tmp_path))


# --------------------------------------------------------------------------------------------- encode


LONG = " ".join(["antidisestablishmentarianism"] * 20)  # far more than 16 tokens


def test_encode_shapes_padding_truncation(tok, caplog):
    sentences = ["Hello world", "The cat sat on the mat.", LONG, "A."]
    labels = np.array([1, 0, 1, 0])
    lengths = [len(tok(s)["input_ids"]) for s in sentences]
    assert lengths[2] > 16 and max(lengths[:2] + lengths[3:]) < 16
    with caplog.at_level(logging.INFO, logger="lora_kd_jax.data"):
        enc = encode(sentences, labels, tok, max_length=16)
    assert isinstance(enc, EncodedSplit) and len(enc) == 4
    assert enc.input_ids.shape == enc.attention_mask.shape == (4, 16)
    assert enc.input_ids.dtype == enc.attention_mask.dtype == enc.labels.dtype == np.int32
    assert enc.labels.tolist() == [1, 0, 1, 0]
    assert enc.attention_mask.sum(1).tolist() == [min(n, 16) for n in lengths]
    # right padding: real tokens first, then PAD_ID where the mask is 0
    assert enc.input_ids[0, :2].tolist() == [15496, 995]
    assert (enc.input_ids[0, 2:] == PAD_ID).all() and (enc.attention_mask[0, 2:] == 0).all()
    assert (enc.input_ids[enc.attention_mask == 0] == PAD_ID).all()
    # truncation keeps the first 16 tokens
    assert enc.input_ids[2].tolist() == tok(LONG)["input_ids"][:16]
    assert enc.n_truncated == 1 and enc.truncated_rows.tolist() == [False, False, True, False]
    assert any("truncated 1 of 4 sentences to 16 tokens" in r.getMessage() for r in caplog.records)


def test_encode_no_truncation_no_log(tok, caplog):
    with caplog.at_level(logging.INFO, logger="lora_kd_jax.data"):
        enc = encode(["Hello world"], np.array([1]), tok, max_length=8)
    assert enc.n_truncated == 0
    assert not any("truncated" in r.getMessage() for r in caplog.records)


def test_encode_rejects_left_padding(tok):
    tok.padding_side = "left"
    try:
        with pytest.raises(DataError, match="right"):
            encode(["Hello world"], np.array([1]), tok, max_length=8)
    finally:
        tok.padding_side = "right"


def test_encode_rejects_mismatched_labels(tok):
    with pytest.raises(DataError, match="2 sentences"):
        encode(["a", "b"], np.array([1]), tok, max_length=8)


def test_encode_splits_real(tok):
    ds = load_cola(str(COLA_DIR), limit=50)
    out = encode_splits(ds, tok, max_length=64)
    assert set(out) == {"train", "validation", "out_of_domain"}
    assert out["train"].input_ids.shape == (50, 64)
    assert out["train"].labels.tolist() == ds["train"]["label"]
    assert out["train"].n_truncated == 0  # CoLA sentences are short


# -------------------------------------------------------------------------------------------- batches


def synthetic_split(n: int, seq_len: int = 6) -> EncodedSplit:
    """Row i has input_ids[i, 0] == i, so the source row of any batch row can be recovered."""
    ids = np.full((n, seq_len), PAD_ID, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i in range(n):
        length = 1 + i % seq_len
        ids[i, :length] = i
        mask[i, :length] = 1
    return EncodedSplit(ids, mask, (np.arange(n) % 2).astype(np.int32), 0)


def recovered_rows(batches) -> list[int]:
    return [int(b["input_ids"][j, 0]) for b in batches for j in np.flatnonzero(b["weights"] == 1.0)]


def test_num_batches():
    assert [num_batches(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        num_batches(3, 0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_fixed_shape_and_padded_tail(shuffle):
    split = synthetic_split(10)
    batches = list(batch_iterator(split, 4, shuffle=shuffle, seed=3))
    assert len(batches) == num_batches(10, 4) == 3
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels", "weights", "index"}
        assert b["input_ids"].shape == b["attention_mask"].shape == (4, 6)
        assert b["labels"].shape == b["weights"].shape == (4,)
        assert b["input_ids"].dtype == b["attention_mask"].dtype == b["labels"].dtype == np.int32
        assert b["weights"].dtype == np.float32
    assert [b["weights"].tolist() for b in batches] == [[1.0] * 4, [1.0] * 4, [1.0, 1.0, 0.0, 0.0]]
    tail = batches[-1]
    assert (tail["input_ids"][2:] == PAD_ID).all()
    assert tail["attention_mask"][2:].tolist() == [[1, 0, 0, 0, 0, 0]] * 2
    assert tail["labels"][2:].tolist() == [0, 0]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_example_once_with_its_data(shuffle):
    split = synthetic_split(23)
    batches = list(batch_iterator(split, 5, shuffle=shuffle, seed=7, epoch=2))
    rows = recovered_rows(batches)
    assert sorted(rows) == list(range(23))
    for b in batches:  # each real row carries its own mask and label
        for j in np.flatnonzero(b["weights"] == 1.0):
            i = int(b["input_ids"][j, 0])
            assert (b["attention_mask"][j] == split.attention_mask[i]).all()
            assert (b["input_ids"][j] == split.input_ids[i]).all()
            assert b["labels"][j] == split.labels[i]
            assert b["index"][j] == i  # the index key points back at the row


def test_unshuffled_is_file_order():
    assert recovered_rows(batch_iterator(synthetic_split(11), 4, shuffle=False)) == list(range(11))


def test_shuffle_is_deterministic_per_seed_and_epoch():
    split = synthetic_split(40)

    def order(seed, epoch):
        return recovered_rows(batch_iterator(split, 8, shuffle=True, seed=seed, epoch=epoch))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != list(range(40))
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    import jax

    expected = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(0), 1), 40)).tolist()
    assert order(0, 1) == expected


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_start_batch_is_tail_of_epoch(shuffle, k):
    split = synthetic_split(21)
    full = list(batch_iterator(split, 4, shuffle=shuffle, seed=5, epoch=1))
    resumed = list(batch_iterator(split, 4, shuffle=shuffle, seed=5, epoch=1, start_batch=k))
    assert len(full) == 6 and len(resumed) == 6 - k
    for a, b in zip(full[k:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("k", [0, 2, 5])
def test_length_grouping_keeps_every_row_once_resumes_exactly_and_varies_by_epoch(k):
    split = synthetic_split(46, seq_len=12)  # rows of 1..12 tokens; 46 = 5 full batches of 8 + a partial one
    kwargs = dict(shuffle=True, seed=5, lengths=(4, 8), group_window=2)
    full = list(batch_iterator(split, 8, epoch=1, **kwargs))
    assert sorted(recovered_rows(full)) == list(range(46))
    assert [b["weights"].sum() for b in full] == [8] * 5 + [6]  # the partial batch stays last
    resumed = list(batch_iterator(split, 8, epoch=1, start_batch=k, **kwargs))
    for a, b in zip(full[k:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert recovered_rows(full) != recovered_rows(batch_iterator(split, 8, epoch=2, **kwargs))
    assert recovered_rows(full) == recovered_rows(batch_iterator(split, 8, epoch=1, **kwargs))
    ungrouped = list(batch_iterator(split, 8, epoch=1, **{**kwargs, "group_window": 0}))
    width = lambda batches: sum(b["input_ids"].shape[1] for b in batches)  # noqa: E731
    assert width(full) < width(ungrouped)  # grouped rows fit shorter buckets


def test_length_grouping_cuts_cola_padding():
    """Uniformly random batches of 128 CoLA sentences nearly always hold one of 17+ tokens, so buckets alone save
    nothing; grouped within windows of 16 batches they are cut to ~57% of the padded tokens."""
    split = encode_splits(load_cola(str(COLA_DIR)), load_tokenizer(str(TOKENIZER_DIR)), 20)["train"]

    def padded_fraction(group_window):
        widths = [b["input_ids"].shape[1] for b in batch_iterator(split, 128, shuffle=True, seed=0,
                                                                  lengths=(8, 12, 16), group_window=group_window)]
        return sum(widths) / (20 * len(widths))

    assert padded_fraction(0) > 0.95
    assert padded_fraction(16) < 0.65


def test_batch_sources_follow_the_config():
    """The trainers' batches (data.batch_sources): sizes, buckets and grouping come from the config."""
    from lora_kd_jax.core.config import load_config
    from lora_kd_jax.data import batch_sources

    splits = encode_splits(load_cola(str(COLA_DIR), limit=1024), load_tokenizer(str(TOKENIZER_DIR)), 20)
    over = ["train.batch_size=64", "train.eval_batch_size=100", "data.buckets=8,12,16"]
    plain = batch_sources(splits, load_config(None, over))
    grouped = batch_sources(splits, load_config(None, [*over, "data.group_window=8"]))
    assert plain.n_train_batches == grouped.n_train_batches == 16
    widths = {name: [b["input_ids"].shape[1] for b in src.train(0, 0)] for name, src in
              (("plain", plain), ("grouped", grouped))}
    assert len(widths["plain"]) == 16 and sum(widths["grouped"]) < 0.8 * sum(widths["plain"])
    assert [b["input_ids"].shape[0] for b in grouped.eval()] == [100] * 6  # 527 validation rows, eval batch 100
    assert len(list(grouped.train(0, 10))) == 6  # resumes at batch 10


def test_start_batch_out_of_range():
    with pytest.raises(ValueError, match="start_batch=4"):
        next(batch_iterator(synthetic_split(10), 4, shuffle=False, start_batch=4))


def test_encoded_split_validates():
    ids = np.zeros((3, 4), np.int32)
    with pytest.raises(DataError, match="shapes"):
        EncodedSplit(ids, ids, np.zeros((2,), np.int32), 0)
    with pytest.raises(DataError, match="int64"):
        EncodedSplit(ids.astype(np.int64), ids, np.zeros((3,), np.int32), 0)



def test_batches_pad_with_the_splits_own_pad_id(tmp_path):
    """A BERT-vocabulary split (its [PAD] is id 0) records its pad id, and the batcher pads with it: the fill row of
    a last partial batch, and a seed stack's widening (`data.batch_sources` with train.seeds and buckets); never
    GPT-2's 50256, an id past a small vocabulary (an embedding lookup beyond the table reads NaN)."""
    from transformers import BertTokenizerFast

    from lora_kd_jax.core.config import load_config
    from lora_kd_jax.data import batch_sources

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat",
                                                   "on", "a", "mat"]) + "\n")
    bert = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    split = encode(["the cat sat on a mat", "a cat", "the mat"], np.array([1, 0, 1]), bert, 10)
    assert split.pad_id == bert.pad_token_id == 0
    assert encode(["A cat."], np.array([1]), load_tokenizer(""), 4).pad_id == PAD_ID  # GPT-2's: its eos
    (batch,) = batch_iterator(split, 4, shuffle=False)
    assert batch["weights"].tolist() == [1, 1, 1, 0]
    assert batch["input_ids"][3].tolist() == [0] * 10 and batch["attention_mask"][3].tolist() == [1] + [0] * 9
    assert batch["input_ids"][:3].tolist() == split.input_ids.tolist()
    cfg = load_config(None, ["train.batch_size=1", "train.eval_batch_size=1", "data.buckets=4,10",
                             "train.seeds=[0,1,2,3]"])
    stacked = list(batch_sources({"train": split, "validation": split}, cfg).train(0, 0))  # [seed, 1, length]
    widened = [b for b in stacked if len({int(m.sum()) > 4 for m in b["attention_mask"][:, 0]}) == 2]
    assert widened, "no step where one seed's row is cut to 4 tokens and another's to 10"
    for b in widened:
        assert b["input_ids"].shape[-1] == 10 and (b["input_ids"][b["attention_mask"] == 0] == 0).all()
