"""BERT, RoBERTa, Llama, Qwen3 and ModernBERT: parity with PyTorch / PEFT on tiny random checkpoints the tests save
themselves.

Per family (a 2-layer, 64-wide *ForSequenceClassification and a tokenizer trained on CoLA, `tiny_families`; Qwen3 with
head_dim 32 != 64 / 4 heads and 2 key/value heads, ModernBERT with a local block whose window rows outgrow):
the JAX logits against transformers' PyTorch classifier (with and without LoRA), the gradients of every trainable
leaf against PEFT, a 30-step Adam trajectory, and the three round trips (export-peft -> PeftModel.from_pretrained,
a PEFT adapter -> import-peft, merge -> AutoModelForSequenceClassification / Flax). Tolerances are the GPT-2
parity tests' (test_parity_lora, test_parity_train).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import torch_reference as ref_lib  # noqa: E402
from tiny import NO_PLOTS, XLA_CACHE, assert_resumed, core_install_env, log_messages  # noqa: E402
from tiny_families import cola_sentences, save_checkpoint  # noqa: E402

from lora_kd_jax.training.restore import open_run
from lora_kd_jax.core.config import load_config  # noqa: E402
from lora_kd_jax.models.families import FAMILIES  # noqa: E402
from lora_kd_jax.data import PAD_ID, EncodedSplit, batch_iterator, encode, encode_pairs, num_batches  # noqa: E402
from tiny_families import family_tokenizer as load_family_tokenizer  # noqa: E402
from lora_kd_jax.interop import export  # noqa: E402
from lora_kd_jax.models import hf_names  # noqa: E402
from lora_kd_jax.models.build import build_classifier  # noqa: E402
from lora_kd_jax.models.resolve import resolve  # noqa: E402
from lora_kd_jax.models.interface import token_inputs  # noqa: E402
from lora_kd_jax.training.state import combine, partition, train_state  # noqa: E402
from lora_kd_jax.training.steps import cross_entropy_objective, loss_and_sums, make_train_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

OUTPUT_RTOL = GRAD_RTOL = 5e-6  # test_parity_lora's: relative to each leaf's largest entry
LOSS_RTOL, PARAM_ATOL, FORWARD_ATOL = 1e-4, 1e-5, 5e-6  # test_parity_train's
ROUND_TRIP_ATOL = 1e-4  # logits after a trip through files and PyTorch
RANK, ALPHA = 4, 8.0  # alpha != rank: a missing alpha / r scale cannot pass
STEPS, LR, BATCH, N_EXAMPLES = 30, 1e-3, 8, 20


def _config(path, *overrides):
    cfg = load_config(None, [f"model.path={path}", "lora.init=standard", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
                             "lora.dropout=0.0", "data.max_length=20", f"train.batch_size={BATCH}", f"train.lr={LR}",
                             XLA_CACHE, NO_PLOTS, *overrides])
    return resolve(cfg)


def _peft(torch_model, seed: int):
    """PEFT LoRA on query/value with random (non-zero) B and a head moved off the checkpoint's, so that the B path,
    the alpha/r scale and the saved head all show."""
    family = FAMILIES[torch_model.config.model_type]
    model = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(  # ModernBERT's head: what export writes
        task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(family.default_targets),
        modules_to_save=list(family.trained_modules) or None))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or (".modules_to_save." in name and name.endswith("weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _head_of(named: dict, like: dict, family) -> dict:
    """The flax head from PEFT's trained copy of it (`classifier.modules_to_save.default.*`)."""
    sd = {n.split("base_model.model.", 1)[1].replace("modules_to_save.default.", ""): v for n, v in named.items()
          if ".modules_to_save." in n}
    return hf_names.head_from_torch(family, sd, like, "PEFT")


def _from_peft(peft_model, like: dict, *, grads: bool = False) -> dict:
    """The trainable leaves of a PEFT model (values or gradients) as our {'lora', 'head'} tree."""
    named = {n: (p.grad if grads else p).detach().numpy() for n, p in peft_model.named_parameters()
             if p.requires_grad}
    family = like["family"]
    return {"lora": hf_names.lora_from_peft(family, named), "head": _head_of(named, like["head"], family)}


_SAVED: dict = {}  # family -> (dir, torch model, tokenizer): each tiny checkpoint saved once per session


def saved(family: str, tmp_path_factory) -> tuple:
    if family not in _SAVED:
        d = tmp_path_factory.mktemp(family)
        _SAVED[family] = (d, *save_checkpoint(family, d))
    return _SAVED[family]


@pytest.fixture(scope="module", params=["bert", "roberta", "llama", "qwen3", "modernbert"])
def fam(request, tmp_path_factory):
    """One family's saved checkpoint, its tokenizer, the JAX model over it and a PEFT twin with the same weights."""
    d, torch_model, saved_tok = saved(request.param, tmp_path_factory)
    tok = load_family_tokenizer(str(d), request.param)  # as a run loads it (data.tokenizer="" -> model.path)
    cfg = _config(d)
    assert cfg.model.type == request.param and cfg.model.n_layer == 2 and cfg.model.n_embd == 64
    model, params = build_classifier(cfg, jax.random.key(0))
    twin = _peft(torch_model, seed=1)
    from_twin = _from_peft(twin, {"family": model.family, "head": params["head"]})
    params = {**params, **jax.tree.map(jnp.asarray, from_twin)}
    sentences = cola_sentences()[:12]
    split = encode(sentences, np.arange(12) % 2, tok, 20)
    return types.SimpleNamespace(name=request.param, dir=d, tok=tok, saved_tok=saved_tok, torch=torch_model, cfg=cfg,
                                 model=model,
                                 params=params, twin=twin, split=split, sentences=sentences)


def _jax_batch(split: EncodedSplit) -> dict:
    """The batcher's layout: padding positions hold GPT-2's PAD_ID, not the family's pad id (the model must not
    care)."""
    ids = np.where(split.attention_mask == 1, split.input_ids, PAD_ID).astype(np.int32)
    return {"input_ids": ids, "attention_mask": split.attention_mask, "labels": split.labels,
            "weights": np.ones(len(split), np.float32)}


def _torch_logits(model, split: EncodedSplit) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(split.input_ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(split.attention_mask.astype(np.int64))).logits.numpy()


def _jax_logits(model, params, split: EncodedSplit) -> np.ndarray:
    b = _jax_batch(split)
    return np.asarray(jax.jit(model.logits)(params, b["input_ids"], b["attention_mask"]))


def test_tokenizer_encodes_as_pytorch(fam):
    """Special tokens, right padding with the family's pad id: what the PyTorch tokenizer call gives."""
    fam.saved_tok.padding_side = "right"  # Llama's tokenizer pads left by default; its classifier reads either way
    want = fam.saved_tok(fam.sentences, padding="max_length", truncation=True, max_length=20)
    np.testing.assert_array_equal(fam.split.input_ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(fam.split.attention_mask, np.asarray(want["attention_mask"]))
    if fam.name == "qwen3":  # Qwen's template adds no token: a padded row is its sentence's own ids, whole
        i = int(fam.split.attention_mask.sum(axis=1).argmin())
        n = int(fam.split.attention_mask[i].sum())
        assert fam.split.input_ids[i, :n].tolist() == fam.tok(fam.sentences[i], add_special_tokens=False)["input_ids"]
    else:
        first = fam.tok.cls_token_id if fam.name in ("bert", "modernbert") else fam.tok.bos_token_id  # [CLS] or <s>
        assert (fam.split.input_ids[:, 0] == first).all()
    assert fam.tok.pad_token_id == fam.model.pad_id
    assert (fam.split.attention_mask[:, -1] == 0).any()  # some rows are padded


def _plain_params(fam) -> dict:
    """The checkpoint's own classifier (no LoRA, the PyTorch head): what AutoModelForSequenceClassification holds."""
    plain = {k: v for k, v in fam.params.items() if k != "lora"}
    family = fam.model.family
    plain["head"] = hf_names.head_from_torch(
        family, {k: v.numpy() for k, v in fam.torch.state_dict().items() if hf_names.is_head_key(family, k)},
        plain["head"], "torch")
    return plain


def test_forward_matches_pytorch(fam):
    """Logits of the plain classifier (head included) vs AutoModelForSequenceClassification, and with LoRA vs PEFT."""
    plain = _plain_params(fam)
    torch_plain = _torch_logits(fam.torch, fam.split)
    err_plain = ref_lib.max_rel_err(_jax_logits(fam.model, plain, fam.split), torch_plain)
    err_lora = ref_lib.max_rel_err(_jax_logits(fam.model, fam.params, fam.split), _torch_logits(fam.twin, fam.split))
    assert err_plain <= OUTPUT_RTOL and err_lora <= OUTPUT_RTOL, (err_plain, err_lora)
    if fam.name == "modernbert":  # rows of 20 tokens, padded ones too, outgrow the local block's |q - k| <= 4:
        arch = fam.model.arch  # without the window the logits differ; with classifier_pooling=cls they are PyTorch's
        assert arch.layer_types == ("full_attention", "sliding_attention") and arch.sliding_window == 4
        wide = dataclasses.replace(fam.model, arch=dataclasses.replace(arch, sliding_window=64))
        assert np.abs(_jax_logits(wide, plain, fam.split) - torch_plain).max() > 100 * FORWARD_ATOL
        fam.torch.config.classifier_pooling = "cls"
        try:
            cls = dataclasses.replace(fam.model, arch=dataclasses.replace(arch, pooling="cls"))
            err_cls = ref_lib.max_rel_err(_jax_logits(cls, plain, fam.split), _torch_logits(fam.torch, fam.split))
        finally:
            fam.torch.config.classifier_pooling = "mean"
        assert err_cls <= OUTPUT_RTOL, err_cls


def test_pairs_encode_and_classify_as_pytorch(fam):
    """Sentence pairs: the ids, mask (and BERT's token types) the PyTorch tokenizer gives for (text, text_pair) with
    truncation="longest_first", cut pairs counted; the logits through the batcher equal PyTorch's classifier's."""
    fam.saved_tok.padding_side = "right"  # Llama's pads left by default; the library's pads right
    s = cola_sentences()
    longest = sorted(s[:300], key=len)[-2:]
    first, second = [s[0], s[2], longest[0], longest[1]], [s[1], s[3], longest[1], "Yes."]
    width = {"bert": 48}.get(fam.name, 60)  # cuts rows 0, 2, 3 (3: only its long first text), not row 1
    split = encode_pairs(first, second, np.array([0, 1, 1, 0]), fam.tok, width)
    if fam.name == "qwen3":  # no pair template (PyTorch's call concatenates): its eos between, as GPT-2's pairs
        a, b = (fam.tok(texts, add_special_tokens=False)["input_ids"] for texts in (first, second))
        full = [len(x) + 1 + len(y) for x, y in zip(a, b)]
        assert split.input_ids[1, :full[1]].tolist() == [*a[1], fam.tok.eos_token_id, *b[1]]
        want = {"input_ids": split.input_ids, "attention_mask": split.attention_mask}  # PyTorch's logits on them
    else:
        want = fam.saved_tok(first, second, padding="max_length", truncation="longest_first", max_length=width)
        np.testing.assert_array_equal(split.input_ids, np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(split.attention_mask, np.asarray(want["attention_mask"]))
        full = [len(ids) for ids in fam.saved_tok(first, second)["input_ids"]]
    assert split.truncated_rows.tolist() == [n > width for n in full] == [True, False, True, True], full
    seps = {"bert": (fam.tok.sep_token_id, 2), "roberta": (fam.tok.sep_token_id, 3), "llama": (fam.tok.bos_token_id, 2),
            "modernbert": (fam.tok.sep_token_id, 2), "qwen3": (fam.tok.eos_token_id, 1)}
    sep, count = seps[fam.name]  # [CLS] a [SEP] b [SEP]; <s> a </s></s> b </s>; this tokenizer's <s> a <s> b; a eos b
    assert ((split.input_ids == sep).sum(axis=1) == count).all()
    if fam.name == "bert":
        np.testing.assert_array_equal(split.token_type_ids, np.asarray(want["token_type_ids"]))
        assert (split.token_type_ids == 1).any(axis=1).all()
    else:
        assert split.token_type_ids is None
    batch = next(batch_iterator(split, 6, shuffle=False))  # two weight-0 fill rows, as a last partial batch
    assert ("token_type_ids" in batch) == (fam.name == "bert")
    got = np.asarray(jax.jit(fam.model.logits)(_plain_params(fam), batch["input_ids"], batch["attention_mask"],
                                               **token_inputs(batch)))[:4]
    with torch.no_grad():
        want_logits = fam.torch(**{k: torch.tensor(np.asarray(v), dtype=torch.int64) for k, v in want.items()}).logits
    err = ref_lib.max_rel_err(got, want_logits.numpy())
    assert err <= OUTPUT_RTOL, err


def grad_errs_vs_peft(model, params: dict, twin, split: EncodedSplit) -> dict[str, float]:
    """Relative error of d(mean CE)/d(each trainable leaf) against PEFT's autograd on `twin` (the same leaves on
    both sides, or it fails); the losses must agree first."""
    batch = _jax_batch(split)
    trainable, frozen = partition(params, model.param_labels(params))

    def loss(t):
        return loss_and_sums(model, combine(t, frozen), {}, batch, cross_entropy_objective, deterministic=True,
                             rng=None)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    twin = copy.deepcopy(twin)
    logits = twin(input_ids=torch.from_numpy(split.input_ids.astype(np.int64)),
                  attention_mask=torch.from_numpy(split.attention_mask.astype(np.int64))).logits
    t_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(split.labels.astype(np.int64)))
    t_loss.backward()
    want = _from_peft(twin, {"family": model.family, "head": params["head"]}, grads=True)
    assert abs(float(value) - t_loss.item()) <= OUTPUT_RTOL * t_loss.item()
    return ref_lib.tree_rel_errs(jax.tree.map(np.asarray, grads), want)


def test_gradients_match_peft(fam):
    """d(mean CE)/d(every trainable leaf): the LoRA factors and the head, and only those, as PEFT's autograd."""
    errs = grad_errs_vs_peft(fam.model, fam.params, fam.twin, fam.split)
    n_targets = len(fam.model.family.default_targets)  # query, value; ModernBERT's one Wqkv
    assert sum(k.startswith("lora/") for k in errs) == 2 * n_targets * 2  # 2 layers x targets x (a, b)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{worst}: gradient rel err {errs[worst]:.3g} > {GRAD_RTOL}"


def test_thirty_adam_steps_match_peft(fam):
    """The project's train step and state recipe for 30 steps against torch.optim.Adam on the PEFT twin."""
    model = fam.model
    twin = copy.deepcopy(fam.twin).train()  # dropout is 0 everywhere: train mode changes nothing but the mode
    setup = train_state(model, jax.tree.map(jnp.array, fam.params), LR, jax.random.key(14))  # a copy: the step donates
    state, frozen = setup.state, setup.frozen
    step = make_train_step(model, setup.tx, cross_entropy_objective)
    opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=LR)
    sentences = cola_sentences()[100:100 + N_EXAMPLES]
    split = encode(sentences, np.random.default_rng(3).integers(0, 2, N_EXAMPLES), fam.tok, 20)
    jl, tl = [], []
    for epoch in range(STEPS // num_batches(len(split), BATCH)):
        for batch in batch_iterator(split, BATCH, shuffle=True, seed=0, epoch=epoch):
            jax_batch = {**batch, "input_ids": np.where(batch["attention_mask"] == 1, batch["input_ids"], PAD_ID)}
            state, sums = step(state, {"frozen": frozen}, jax_batch)
            jl.append(float(sums["loss_sum"] / sums["count"]))
            keep = batch["weights"] > 0
            opt.zero_grad(set_to_none=True)
            logits = twin(input_ids=torch.from_numpy(batch["input_ids"][keep].astype(np.int64)),
                          attention_mask=torch.from_numpy(batch["attention_mask"][keep].astype(np.int64))).logits
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"][keep].astype(np.int64)))
            loss.backward()
            opt.step()
            tl.append(loss.item())
    assert len(jl) == STEPS
    loss_err = np.abs(np.array(jl) - np.array(tl)) / np.abs(np.array(tl))
    assert loss_err.max() <= LOSS_RTOL, (int(loss_err.argmax()), loss_err.max())
    assert np.mean(tl[-3:]) < np.mean(tl[:3])  # it trained
    want = _from_peft(twin, {"family": model.family, "head": fam.params["head"]})
    errs = ref_lib.tree_abs_errs(jax.tree.map(np.asarray, state.trainable), want)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= PARAM_ATOL, f"{worst}: |dparam| {errs[worst]:.3g} > {PARAM_ATOL}"
    # the forward on PyTorch's final weights agrees too: the gaps above are drift, not a forward error
    final = {**combine(state.trainable, frozen), **jax.tree.map(jnp.asarray, want)}
    fwd = float(np.abs(_jax_logits(model, final, split) - _torch_logits(twin.eval(), split)).max())
    assert fwd <= FORWARD_ATOL, fwd
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(frozen), jax.tree.leaves(partition(fam.params, setup.labels)[1])))


def test_export_peft_loads_in_pytorch(fam, tmp_path):
    """export-peft -> PeftModel.from_pretrained on the family's AutoModelForSequenceClassification: same logits,
    the head coming from the adapter (modules_to_save), not from the checkpoint."""
    from transformers import AutoModelForSequenceClassification

    out = export.write_peft_adapter(fam.cfg, fam.model, fam.params, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(fam.dir).eval()
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    err = np.abs(_torch_logits(loaded, fam.split) - _jax_logits(fam.model, fam.params, fam.split)).max()
    assert err <= ROUND_TRIP_ATOL, err
    before = np.abs(_torch_logits(fam.torch, fam.split) - _jax_logits(fam.model, fam.params, fam.split)).max()
    assert before > 100 * ROUND_TRIP_ATOL  # without the adapter's factors and head the logits differ


def test_peft_adapter_imports(fam, tmp_path):
    """A PEFT adapter (non-zero B, a trained head) -> import-peft -> the logits PyTorch gives with it."""
    fam.twin.save_pretrained(tmp_path / "peft")
    cfg, model, params = export.import_peft(tmp_path / "peft", _config(fam.dir))
    assert list(cfg.lora.targets) == list(model.family.default_targets) and cfg.lora.rank == RANK
    assert model.spec.scale == ALPHA / RANK
    err = np.abs(_jax_logits(model, params, fam.split) - _torch_logits(fam.twin, fam.split)).max()
    assert err <= ROUND_TRIP_ATOL, err


def test_merge_loads_in_pytorch_and_flax(fam, tmp_path):
    """merge -> a plain checkpoint: AutoModelForSequenceClassification, and this library reading it back as model.path
    (base and head from model.safetensors), give our logits; with the files `merge` adds (the run's label names, its
    tokenizer), `pipeline("text-classification", model=DIR)` alone answers with the run's label names and the
    softmax of our logits."""
    from transformers import AutoModelForSequenceClassification, pipeline

    from lora_kd_jax.interop import files

    # 12 sentences that fit data.max_length whole (the pipeline cuts none), some rows padded
    texts = [t for t in cola_sentences()[:100] if len(fam.tok(t)["input_ids"]) <= 20][:12]
    split = encode(texts, np.arange(12) % 2, fam.tok, 20)
    assert len(texts) == 12 and not split.truncated_rows.any() and (split.attention_mask[:, -1] == 0).any()
    out = export.save_merged(fam.cfg, fam.model, fam.params, tmp_path / "merged")
    want = _jax_logits(fam.model, fam.params, split)
    torch_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert np.abs(_torch_logits(torch_model, split) - want).max() <= ROUND_TRIP_ATOL
    files.add_run_files(out, fam.cfg)  # what `lora-kd-jax merge` (export.merge_and_save) adds after save_merged
    answers = pipeline("text-classification", model=str(out), device="cpu", top_k=None)(texts)
    names = ["unacceptable", "acceptable"]  # CoLA's, by id
    probs = np.exp(want - want.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    got = np.array([[{a["label"]: a["score"] for a in row}.get(n, np.nan) for n in names] for row in answers])
    assert [row[0]["label"] for row in answers] == [names[i] for i in probs.argmax(axis=1)]
    assert [len(row) for row in answers] == [2] * len(texts)
    print(f"{fam.name}: pipeline probabilities vs softmax of our logits: max abs err {np.abs(got - probs).max():.2e}")
    np.testing.assert_allclose(got, probs, rtol=0, atol=1e-4)
    back, back_params = build_classifier(_config(out, f"data.tokenizer={fam.dir}"), jax.random.key(0),
                                         with_lora=False)
    from safetensors.numpy import load_file

    family = back.family
    head = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if hf_names.is_head_key(family, k)}
    back_params["head"] = hf_names.head_from_torch(family, head, back_params["head"], "merged")
    assert np.abs(_jax_logits(back, back_params, split) - want).max() <= ROUND_TRIP_ATOL


@pytest.mark.parametrize("fam", ["roberta"], indirect=True)
def test_train_lora_resumes_with_seeds_and_a_bf16_base(fam, tmp_path):
    """train-lora on a checkpoint dir (family from its config.json): two seeds over one bf16 base, dropout on in
    the base, the adapters and the head; 1 epoch + --resume equals 2 epochs, metric for metric; the run reads back
    (evaluation's model) and exports; distillation accepts it as a teacher."""
    import json

    from lora_kd_jax.training import finetune
    from lora_kd_jax.runs.seed_dirs import seed_dir

    def cfg(run, *extra):
        return _config(fam.dir, "data.limit=48", "train.batch_size=16", "train.epochs=2", "train.seeds=[0,1]",
                       "lora.dropout=0.1", "model.dropout=0.1", "model.base_dtype=bfloat16",
                       "lora.modules_to_save=LayerNorm", f"run.dir={run}", *extra)

    finetune.train_lora(cfg(tmp_path / "a"), progress=False)
    finetune.train_lora(cfg(tmp_path / "b", "train.epochs=1"), progress=False)
    since = (tmp_path / "b" / "log.txt").stat().st_size
    finetune.train_lora(cfg(tmp_path / "b"), resume=True, progress=False)
    assert_resumed(log_messages(tmp_path / "b", since), from_step=3, to_step=6)  # 48 rows / 16 a epoch
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text())["epochs"] for r in "ab")
    assert len(a) == 2 and a == b
    run = open_run(seed_dir(tmp_path / "b", 1), kind="lora")
    assert run.config.model.type == "roberta" and run.model.describe() == f"{fam.dir}, LoRA rank {RANK}"
    logits = _jax_logits(run.model, run.params, fam.split)
    # lora.modules_to_save=LayerNorm: every LayerNorm trained in full (moved off the checkpoint's values) ...
    original = fam.torch.state_dict()
    for path, torch_name in [(("embeddings", "LayerNorm", "scale"), "roberta.embeddings.LayerNorm.weight"),
                             (("encoder", "layer", "1", "output", "LayerNorm", "bias"),
                              "roberta.encoder.layer.1.output.LayerNorm.bias")]:
        trained = functools.reduce(lambda t, k: t[k], path, run.params["roberta"])
        assert np.abs(np.asarray(trained, np.float32) - original[torch_name].numpy()).max() > 1e-5, path
    out = export.write_peft_adapter(run.config, run.model, run.params, tmp_path / "adapter")
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert "LayerNorm" in saved, saved
    from transformers import AutoModelForSequenceClassification

    # ... exported in the adapter, which PEFT loads to the same logits (its LayerNorms the trained ones)
    loaded = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(fam.dir), out).eval()
    assert np.abs(_torch_logits(loaded, fam.split) - logits).max() <= ROUND_TRIP_ATOL
    from lora_kd_jax.distill.teacher import check_teacher  # a teacher (tests/test_distill_families.py distils)

    assert check_teacher(str(seed_dir(tmp_path / "b", 1)), load_config(None, [])).config.model.type == "roberta"


# ----------------------------------------------------------------------------------------------- targets


def _torch_targeted(family: str, targets, to_save=None, device: str = "cpu", **sizes):
    """(PEFT's adapted module names without the family prefix, get_nb_trainable_parameters) on the family's
    PyTorch classifier of these sizes, built on `device` ('meta': shapes only, no weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(family, **sizes))
        wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=RANK, target_modules=targets,
                                                             modules_to_save=to_save))
    prefix = f"base_model.model.{FAMILIES[family].torch_prefix}."
    names = sorted({n[len(prefix):].split(".lora_A")[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n})
    n_lora = sum(p.numel() for n, p in wrapped.named_parameters() if ".lora_" in n)
    return names, (*wrapped.get_nb_trainable_parameters(), n_lora)


TARGET_FORMS = {  # form -> family -> (lora.targets, PEFT's target_modules)
    "names": {"llama": ("q_proj,mlp.down_proj", ["q_proj", "mlp.down_proj"]),
              "qwen3": ("q_proj,mlp.down_proj", ["q_proj", "mlp.down_proj"]),
              "modernbert": ("Wqkv,mlp.Wo", ["Wqkv", "mlp.Wo"]),
              None: ("query,attention.output.dense", ["query", "attention.output.dense"])},
    "regex": {"llama": (r"re:.*layers\.1\..*(k_proj|gate_proj)", r".*layers\.1\..*(k_proj|gate_proj)"),
              "qwen3": (r"re:.*layers\.1\..*(k_proj|gate_proj)", r".*layers\.1\..*(k_proj|gate_proj)"),
              "modernbert": (r"re:.*layers\.1\..*(Wi|attn\.Wo)", r".*layers\.1\..*(Wi|attn\.Wo)"),
              None: (r"re:.*layer\.1\..*(key|intermediate\.dense)", r".*layer\.1\..*(key|intermediate\.dense)")},
    "all-linear": {None: ("all-linear", "all-linear")},
}


GPT2_TARGET_FORMS = {  # form -> (lora.targets, PEFT's target_modules selecting the same modules)
    "names": ("attn.c_attn,mlp.c_proj", ["attn.c_attn", "mlp.c_proj"]),
    "glob": ("h.1.*.c_*", r".*h\.1\..*\.c_[a-z]+"),  # globs are ours: PEFT's equivalent is the regex
    "regex": (r"re:.*h\.0\..*c_(attn|fc)", r".*h\.0\..*c_(attn|fc)"),
    "all-linear": ("all-linear", "all-linear"),
}


@pytest.mark.parametrize("form", list(GPT2_TARGET_FORMS))
def test_gpt2_targets_adapt_what_peft_adapts(form):
    """GPT-2's target forms (names, globs, re:, all-linear) adapt exactly the Conv1D modules PEFT adapts."""
    from tiny import tiny_config

    ours, theirs = GPT2_TARGET_FORMS[form]
    model, _ = build_classifier(tiny_config(f"lora.targets={ours}"), jax.random.key(0), shapes_only=True)
    got = sorted(".".join(p) for p in model.spec.paths)
    want, _ = _torch_targeted("gpt2", theirs, device="meta", n_layer=2, n_embd=64, n_head=4)
    assert got == want and got, (got, want)


@pytest.mark.parametrize("form", list(TARGET_FORMS))
def test_targets_adapt_what_peft_adapts(fam, form):
    """Each target form adapts exactly the modules PEFT adapts with the same target_modules on the same model."""
    ours, theirs = TARGET_FORMS[form].get(fam.name, TARGET_FORMS[form][None])
    cfg = _config(fam.dir, f"lora.targets={ours}")
    model, _ = build_classifier(cfg, jax.random.key(0), shapes_only=True)
    got = sorted(".".join(p) for p in model.spec.paths)
    want, _ = _torch_targeted(fam.name, theirs, list(fam.model.family.trained_modules) or None,  # ModernBERT's head
                              vocab_size=len(fam.tok), **{
        k: v for k, v in fam.torch.config.to_dict().items() if k in ("hidden_size", "num_hidden_layers",
                                                                       "num_attention_heads", "intermediate_size",
                                                                       "num_key_value_heads", "head_dim",
                                                                       "pad_token_id")})
    assert got == want and got, (got, want)
    if form == "all-linear":
        assert ("pooler.dense" in got) == (fam.name == "bert")  # RoBERTa's classifier has no pooler


def test_target_matching_nothing_names_the_module_paths(fam):
    from lora_kd_jax.lora.transform import LoraTargetError

    decoder = r"layers\.\{i\}\.self_attn\.k_proj"
    named = {"llama": decoder, "qwen3": decoder, "modernbert": r"layers\.\{i\}\.attn\.Wqkv"}.get(
        fam.name, r"encoder\.layer\.\{i\}\.attention\.self\.query")
    for bad in ("c_attn", r"re:.*\.c_attn"):
        with pytest.raises(LoraTargetError, match=rf"matches no linear layer.*{named}, .*\(or write all-linear\)"):
            build_classifier(_config(fam.dir, f"lora.targets={bad}"), jax.random.key(0), shapes_only=True)


def _counts(line: str) -> tuple[int, int]:
    """(total, trainable) from --dry-run's first line ('params: total 82.21M (82,209,024), trainable ...')."""
    return tuple(int(line.split(f"{w} ")[1].split("(")[1].split(")")[0].replace(",", ""))  # type: ignore
                 for w in ("total", "trainable"))


BASE_SIZES = {"bert": dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
              "roberta": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)}


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("targets,to_save", [("query,value", None), ("all-linear", ["LayerNorm"])])
def test_dry_run_counts_equal_peft_for_base_sizes(family, targets, to_save):
    """bert-base / roberta-base shapes (jax.eval_shape here, torch's meta device there: no weights): --dry-run's
    trainable and total counts are PEFT's get_nb_trainable_parameters (whose total counts each modules_to_save
    module twice, the original and the trained copy)."""
    from lora_kd_jax.training.finetune import dry_run_plan  # what train-lora --dry-run prints

    sizes = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    overrides = [f"model.type={family}", "model.name=custom", "model.init=random", "model.n_layer=12",
                 "model.n_embd=768", "model.n_head=12", "model.n_positions=512",
                 f"model.vocab_size={BASE_SIZES[family]['vocab_size']}", f"lora.targets={targets}", f"lora.rank={RANK}",
                 *([f"lora.modules_to_save={','.join(to_save)}"] if to_save else [])]
    line = dry_run_plan(load_config(None, overrides)).splitlines()[0]
    total, trainable = _counts(line)
    _, (peft_trainable, peft_all, peft_lora) = _torch_targeted(family, "all-linear" if targets == "all-linear"
                                                    else targets.split(","), to_save, device="meta",
                                                    **sizes, **BASE_SIZES[family])
    copies = peft_trainable - peft_lora  # the head and every modules_to_save module, counted twice by PEFT
    assert (trainable, total) == (peft_trainable, peft_all - copies), line


RELEASED = {  # the sizes in the config.json of Qwen/Qwen3-0.6B and of answerdotai/ModernBERT-base
    "qwen3": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "modernbert": dict(vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                       num_attention_heads=12, max_position_embeddings=8192, classifier_pooling="mean"),
}


@pytest.mark.parametrize("family,targets,to_save", [
    ("qwen3", "", None), ("qwen3", "all-linear", ["input_layernorm"]),
    ("modernbert", "", None), ("modernbert", "all-linear", ["mlp_norm"])])
def test_dry_run_counts_equal_peft_for_qwen3_and_modernbert_sizes(family, targets, to_save, tmp_path):
    """Qwen3-0.6B's and ModernBERT-base's config.json as model.path (a config alone: --dry-run reads no weights;
    grouped-query heads and head_dim 128 are the checkpoint's, which model.init=random cannot say): --dry-run's
    counts are PEFT's get_nb_trainable_parameters on the same classifier on torch's meta device, with the family's
    default targets or all-linear, and what export-peft writes as modules_to_save (ModernBERT's `head` too)."""
    from transformers import AutoConfig

    from lora_kd_jax.training.finetune import dry_run_plan

    AutoConfig.for_model(family, **RELEASED[family]).save_pretrained(tmp_path)
    overrides = [f"model.path={tmp_path}", f"lora.rank={RANK}", *([f"lora.targets={targets}"] if targets else []),
                 *([f"lora.modules_to_save={','.join(to_save)}"] if to_save else [])]
    line = dry_run_plan(load_config(None, overrides)).splitlines()[0]
    total, trainable = _counts(line)
    fam = FAMILIES[family]
    saved = [*fam.trained_modules, *(to_save or [])] or None
    _, (peft_trainable, peft_all, peft_lora) = _torch_targeted(family, targets or list(fam.default_targets), saved,
                                                               device="meta", **RELEASED[family])
    copies = peft_trainable - peft_lora  # the head and every modules_to_save module, counted twice by PEFT
    assert (trainable, total) == (peft_trainable, peft_all - copies), line


@pytest.mark.parametrize("family", ["qwen3", "modernbert"])
def test_random_init_qwen3_and_modernbert_are_their_config_classes_at_the_model_sizes(family):
    """model.init=random with model.type and sizes: --dry-run's counts are PEFT's on the transformers classifier built
    from the family's config_kwargs at those sizes (Qwen3: head_dim = width / heads, not its config class's 128)."""
    from lora_kd_jax.training.finetune import dry_run_plan

    line = dry_run_plan(load_config(None, [f"model.type={family}", "model.name=custom", "model.init=random",
                                           "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
                                           "model.vocab_size=300", "model.n_positions=128", f"lora.rank={RANK}"]))
    total, trainable = _counts(line.splitlines()[0])
    fam = FAMILIES[family]
    _, (peft_trainable, peft_all, peft_lora) = _torch_targeted(
        family, list(fam.default_targets), list(fam.trained_modules) or None, device="meta",
        **fam.config_kwargs(2, 64, 4, 300, 128))
    assert (trainable, total) == (peft_trainable, peft_all - (peft_trainable - peft_lora)), line
    assert "(64 -> 64)" in line if family == "qwen3" else "(64 -> 192)" in line


@pytest.mark.parametrize("family,keys,message", [
    ("qwen3", dict(use_sliding_window=True), "use_sliding_window=true (Qwen3's sliding-window layers) is not computed"),
    ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "rope_type='yarn'"),
    ("modernbert", dict(classifier_bias=True), "classifier_bias=True is not computed here"),
    ("modernbert", dict(norm_bias=True), "norm_bias=True is not computed here"),
    ("modernbert", dict(classifier_activation="silu"), "classifier_activation='silu' is not computed here"),
])
def test_what_qwen3_and_modernbert_do_not_compute_is_refused_by_name(family, keys, message):
    """A config.json asking for what the modules do not compute (Qwen3's sliding window or yarn rope; another
    ModernBERT head) is an error naming the key, not a model that computes something else."""
    base = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 32}
    with pytest.raises(ValueError, match=re.escape(message)):
        FAMILIES[family].arch({**base, **keys})
    assert FAMILIES[family].arch(base).num_layers == 2


# ----------------------------------------------------------------------------------------------- hub ids


def hub_cache(root, repo_id: str, files_from) -> None:
    """The hub cache's own layout for `repo_id` under `root` (what HF_HUB_CACHE points at): blobs named by their
    hash, refs/main naming a commit, snapshots/<commit>/<file> linking to the blobs."""
    import hashlib
    import os

    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(files_from.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)


HUB_CHECK = """
import json, sys
import jax, numpy as np
from lora_kd_jax.core.config import load_config
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.models.hf_checkpoint import ModelLoadError
from lora_kd_jax.models.resolve import resolve
from lora_kd_jax.models.tokenizers import tokenizer_for

out = {}
sentences = ["the cat sat on the mat .", "colorless green ideas sleep furiously"]
for family, local in json.loads(sys.argv[1]).items():
    common = ["data.max_length=20", "lora.init=standard"]
    cfg = resolve(load_config(None, [f"model.name=tiny-org/{family}-tiny", *common]))
    ref = resolve(load_config(None, [f"model.path={local}", *common]))
    _, hub_params = build_classifier(cfg, jax.random.key(0))
    _, ref_params = build_classifier(ref, jax.random.key(0))
    same = jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), hub_params,
                                     ref_params))
    ids = tokenizer_for(cfg)(sentences)["input_ids"]
    out[family] = {"type": cfg.model.type, "sizes": [cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head],
                   "name": cfg.model.name, "path": cfg.model.path, "tokenizer": cfg.data.tokenizer,
                   "params_equal": same, "ids_equal": ids == tokenizer_for(ref)(sentences)["input_ids"]}
try:
    resolve(load_config(None, ["model.name=nobody/not-cached"]))
except ModelLoadError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_hub_ids_load_model_and_tokenizer_from_the_hub_cache_offline(tmp_path, tmp_path_factory):
    """model.name=ORG/NAME for BERT, RoBERTa and Llama, in a fresh process with HF_HUB_CACHE at a hub cache built here
    (the tiny checkpoints and tokenizers, save_pretrained) and HF_HUB_OFFLINE=1: the family and sizes come from the
    cached config.json, the base weights equal those read from the same checkpoint as model.path, the tokenizer
    (data.tokenizer defaults to the id) encodes as the saved one; an id not in the cache fails naming it and what to
    do."""
    import json
    import os
    import subprocess
    import sys

    local = {}
    for family in ("bert", "roberta", "llama"):
        d = saved(family, tmp_path_factory)[0]
        hub_cache(tmp_path / "hub", f"tiny-org/{family}-tiny", d)
        local[family] = str(d)
    env = core_install_env({**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
                            "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"})  # no PyTorch: the hub files alone
    done = subprocess.run([sys.executable, "-c", HUB_CHECK, json.dumps(local)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for family in local:
        got = out[family]
        assert (got["type"], got["sizes"], got["name"], got["path"], got["tokenizer"]) == (
            family, [2, 64, 4], f"tiny-org/{family}-tiny", "", f"tiny-org/{family}-tiny"), got
        assert got["params_equal"] and got["ids_equal"], got
    error = out["error"]
    assert error.startswith("model.name=nobody/not-cached: the checkpoint could not be loaded from the Hugging Face "
                            "hub (HF_HUB_OFFLINE=1 and it is not in the hub cache"), error
    assert "hf download nobody/not-cached" in error and "model.path=DIR" in error, error


@pytest.mark.parametrize("size, shape", [("gpt2-xl", (48, 1600, 25)), ("distilgpt2", (6, 768, 12))])
def test_dry_run_counts_equal_peft_for_gpt2_sizes(size, shape):
    """GPT-2 sizes by name, from the size table alone (jax.eval_shape here, torch's meta device there: no weights):
    --dry-run's counts are PEFT's on GPT2ForSequenceClassification with the same LoRA (every Conv1D, rank 4) and the
    same fully trained modules (the LayerNorms; the score head, which SEQ_CLS saves)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from lora_kd_jax.training.finetune import dry_run_plan

    line = dry_run_plan(load_config(None, [f"model.name={size}", "model.init=random", f"lora.rank={RANK}"]))
    total, trainable = _counts(line.splitlines()[0])
    n_layer, n_embd, n_head = shape  # the released checkpoints' config.json: n_layer, n_embd, n_head
    assert FAMILIES["gpt2"].named_sizes[size] == shape
    with torch.device("meta"):
        model = GPT2ForSequenceClassification(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, num_labels=2))
        wrapped = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=RANK, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
            modules_to_save=["ln_1", "ln_2", "ln_f"]))
    peft_trainable, peft_all = wrapped.get_nb_trainable_parameters()
    n_lora = sum(p.numel() for n, p in wrapped.named_parameters() if ".lora_" in n)
    copies = peft_trainable - n_lora  # each saved module counted twice in PEFT's total (original and copy)
    assert (trainable, total) == (peft_trainable, peft_all - copies), line
    # r (in + out) for c_attn (n, 3n), attn.c_proj (n, n), c_fc (n, 4n), mlp.c_proj (4n, n): the sizes are the table's
    assert n_lora == n_layer * RANK * (4 + 2 + 5 + 5) * n_embd


@pytest.mark.parametrize("overrides, message", [
    (["model.name=bert-base"], "model.name: 'bert-base' is not one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                               "distilgpt2, custom, nor a hub id ORG/NAME"),
    (["model.name=google-bert/bert-base-uncased", "model.init=random"],
     "model.name=google-bert/bert-base-uncased with model.init=random: a hub id names pretrained weights"),
])
def test_model_name_is_a_size_or_a_hub_id(overrides, message):
    from lora_kd_jax.core.config import ConfigError

    with pytest.raises(ConfigError) as e:
        resolve(load_config(None, overrides))  # a released size is checked against the family table
    assert message in str(e.value)
    assert load_config(None, ["model.name=FacebookAI/roberta-base"]).model.name == "FacebookAI/roberta-base"
