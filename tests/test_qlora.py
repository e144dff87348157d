"""QLoRA (`lora.quantize`): the quantized kernels against bitsandbytes, a QLoRA model against PyTorch + PEFT on the
weights bitsandbytes dequantizes, a tiny run that trains, resumes, exports and merges, a load that never puts the
float32 block kernels on the device together, and BERT, Llama and ModernBERT on their dequantized weights
(docs/qlora.md)."""
from __future__ import annotations

import gc
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("peft")
import torch_reference as ref_lib  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from test_parity_lora import GRAD_RTOL, OUTPUT_RTOL, jax_logits_loss_grads, torch_logits_loss_grads  # noqa: E402
from tiny import TINY, assert_resumed, log_messages, make_mixed_length_batch, parity_config  # noqa: E402

from lora_kd_jax.lora import quantize as Q  # noqa: E402
from lora_kd_jax.models import hf_names as convert  # noqa: E402
from lora_kd_jax.models.build import build_classifier  # noqa: E402
from lora_kd_jax.models.families import GPT2  # noqa: E402

DEQUANTIZE = jax.jit(lambda q: q.dequantize())  # as the step computes it (XLA fuses what eager ops would not)
SHAPES = [(192, 64), (37, 50), (256, 768)]  # GPT-2 tiny's c_attn; partial blocks and odd rows; GPT-2's c_attn


def _bnb_pytorch_quantize_blockwise():
    """bitsandbytes' own PyTorch quantize_blockwise kernel (the rule its CUDA kernel follows). On CPU float32 its
    native kernel is registered over it, and that kernel rounds some values near a midpoint the other way."""
    found = [o for o in gc.get_objects() if inspect.isfunction(o)
             and o.__module__ == "bitsandbytes.backends.default.ops"
             and list(inspect.signature(o).parameters) == ["A", "code", "blocksize"]]
    assert len(found) == 1, found
    return found[0]


def _weights(shape, seed):
    w = (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)
    w[0, :5] = 0.0  # zeros (and an all-zero stretch) quantize to NF4's 0
    return w


def test_code_tables_are_bitsandbytes():
    assert np.array_equal(Q.NF4, bnb.get_4bit_type("nf4", "cpu").numpy())
    assert np.array_equal(Q.DYNAMIC, bnb.create_dynamic_map().numpy())


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_dequantizes_bit_for_bit_as_bitsandbytes(double_quant):
    """dequantize_4bit(quantize_4bit(W, blocksize=64, quant_type="nf4"[, compress_statistics])) exactly, in both
    kernel layouts; ties on NF4's midpoints go to the lower code, as bitsandbytes' bucketize."""
    cases = [_weights(s, i) for i, s in enumerate(SHAPES)]
    ties = np.zeros((2, 64), np.float32)
    ties[0, :15], ties[0, 15], ties[1, :15], ties[1, 15] = (Q.NF4[:-1] + Q.NF4[1:]) / 2, 1.0, -Q.NF4[1:] / 3, -3.0
    for w in cases + [ties]:
        packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
        offset = None
        if double_quant:  # bitsandbytes' compress_statistics, with its PyTorch blockwise kernel
            offset = state.absmax.mean()
            code = bnb.create_dynamic_map()
            qabs, absmax2 = _bnb_pytorch_quantize_blockwise()(state.absmax - offset, code, 256)
            state = bnb.QuantState(absmax=qabs, shape=state.shape, dtype=state.dtype, blocksize=64, code=state.code,
                                   quant_type="nf4", offset=offset, state2=bnb.QuantState(
                                       absmax=absmax2, code=code, blocksize=256, dtype=torch.float32))
            offset = offset.item()
        want = bnb.dequantize_4bit(packed, state).numpy()
        for layout, kernel in (("out_in", w), ("in_out", w.T))[:2 if w.shape == SHAPES[0] else 1]:
            q = Q.quantize_nf4(jnp.asarray(kernel), layout=layout, double_quant=double_quant, offset=offset)
            got = np.asarray(DEQUANTIZE(q))
            assert np.array_equal(got, want.T if layout == "in_out" else want), (w.shape, layout)
            assert np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert not np.array_equal(got, w)  # quantization changed the weights
    if double_quant:  # our own offset (the float64 mean, rounded) against bitsandbytes' CPU compress_statistics
        w = cases[-1]
        packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
        q = Q.quantize_nf4(jnp.asarray(w), double_quant=True)
        ulps = abs(int(np.float32(q.offset).view(np.int32)) - int(np.float32(state.offset.item()).view(np.int32)))
        got, want = np.asarray(q.dequantize()), bnb.dequantize_4bit(packed, state).numpy()
        err = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"own offset {ulps} ulp from torch's mean; weights vs bitsandbytes' CPU path: max rel err {err:.2e}")
        assert ulps <= 1 and err <= 1e-2  # measured 4-5e-3 (docs/qlora.md), far below the quantization error:
        assert np.abs(got - w).max() > 10 * np.abs(got - want).max()


def test_int8_is_bitsandbytes_int8_vectorwise():
    """LLM.int8()'s weights: int8_vectorwise_quant's codes and row absmax, int8_vectorwise_dequant's values."""
    for i, shape in enumerate(SHAPES):
        w = _weights(shape, 10 + i)
        w[1, :3] = [127.0 * 0.02, 0.5 * 0.02, 1.5 * 0.02]  # round half to even on both sides
        cb, scb, _ = bnb.int8_vectorwise_quant(torch.from_numpy(w.copy()))
        want = bnb.int8_vectorwise_dequant(cb, scb).numpy()
        for layout, kernel in (("out_in", w), ("in_out", w.T))[:2 if shape == SHAPES[0] else 1]:
            q = Q.quantize_int8(jnp.asarray(kernel), layout=layout)
            assert np.array_equal(np.asarray(q.data), cb.numpy()) and np.array_equal(np.asarray(q.scale), scb.numpy())
            got = np.asarray(DEQUANTIZE(q))
            assert np.array_equal(got, want.T if layout == "in_out" else want), (shape, layout)


def _dequantized_by_bnb(base: dict, scheme: str) -> dict:
    """GPT-2's base with every block kernel replaced by bitsandbytes' dequantized weights (PyTorch's side)."""
    flat = dict(convert.flatten(base))
    for path, v in flat.items():
        if Q.block_kernel(path, v, GPT2.blocks):
            w = torch.from_numpy(np.array(v, np.float32))  # GPT-2's kernel is W (out, in)
            if scheme == "nf4":
                packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
                flat[path] = bnb.dequantize_4bit(packed, state).numpy()
            else:
                cb, scb, _ = bnb.int8_vectorwise_quant(w.clone())
                flat[path] = bnb.int8_vectorwise_dequant(cb, scb).numpy()
    return convert.unflatten(flat)


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("scheme,variant", [("nf4", "dora")])
def test_qlora_logits_and_gradients_match_peft_on_dequantized_weights(scheme, variant):
    """Our QLoRA model (quantized kernels, dequantized in the step) against PyTorch + PEFT on a GPT-2 whose block
    weights are bitsandbytes' dequantized ones: logits and every trainable gradient within the LoRA parity
    tolerances (B non-zero; DoRA's norm over the dequantized weight, magnitudes moved off it)."""
    cfg = parity_config("lora.init=standard", "lora.dropout=0.0", "lora.rank=4", "lora.alpha=8.0",
                        f"lora.variant={variant}")
    model, params = build_classifier(cfg, jax.random.key(0))
    params = ref_lib.randomize_layernorms(params, seed=3)
    ref = ref_lib.build_reference(model.arch, _dequantized_by_bnb(params["gpt2"], scheme), params["head"])
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8.0, target_modules=ref_lib.PEFT_TARGET_MODULES,
                                                fan_in_fan_out=True, lora_dropout=0.0, bias="none",
                                                use_dora=variant == "dora"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.rand_like(p))
    ref_lib.set_trainable(ref)
    lora = convert.lora_from_peft(GPT2, {k: v.detach().numpy() for k, v in peft_model.state_dict().items()},
                                  spec=model.spec)
    quantized = Q.quantize_base(params["gpt2"], scheme, blocks=GPT2.blocks, layout=GPT2.kernel_layout)
    assert sum(Q.is_quantized(v) for v in convert.flatten(quantized).values()) == 8
    params = {**params, "gpt2": quantized, "lora": jax.tree.map(jnp.asarray, lora)}
    batch = make_mixed_length_batch((20, 9, 1, 14, 5, 17), 20, seed=4)
    _, j_logits, j_loss, j_grads = jax_logits_loss_grads(model, params, batch)
    _, t_logits, t_loss, t_grads = torch_logits_loss_grads(ref, batch)
    err_l = ref_lib.max_rel_err(j_logits, t_logits)
    errs = ref_lib.tree_rel_errs(j_grads, t_grads)
    worst = max(errs, key=errs.get)
    print(f"{scheme} {variant}: logits rel {err_l:.2e} (abs {np.abs(j_logits - t_logits).max():.2e}), worst grad "
          f"{worst} {errs[worst]:.2e}")
    assert err_l <= OUTPUT_RTOL and abs(j_loss - t_loss) <= OUTPUT_RTOL * abs(t_loss)
    assert sum(k.startswith("lora/") for k in errs) == 2 * 4 * (3 if variant == "dora" else 2)
    assert errs[worst] <= GRAD_RTOL, f"{worst}: gradient rel err {errs[worst]:.3g}"


def test_qlora_run_trains_exports_and_merges(tmp_path, caplog):
    """A tiny `train-lora lora.quantize=nf4` run from the command line: it trains on the quantized base (recorded
    in config.yaml and metrics.json) and resumes exactly; the export-peft writer gives an ordinary adapter that PEFT loads onto the
    unquantized base (the difference is the quantization's, measured), and onto our dequantized weights it gives our
    logits; merge merges into the dequantized weights and says so."""
    from transformers import GPT2ForSequenceClassification

    from lora_kd_jax.commands import cli
    from lora_kd_jax.interop import export
    from lora_kd_jax.training.restore import open_run

    run, out, merged = tmp_path / "run", tmp_path / "adapter", tmp_path / "merged"
    common = ["train-lora", "smoke", *TINY, "--no-progress", "lora.quantize=nf4", "lora.init=standard",
              "train.batch_size=16", "data.limit=32"]  # 2 steps an epoch
    cli.main([*common, "train.epochs=1", f"run.dir={run}"])
    # resumed for a second epoch on the base quantized again from the source weights: it resumed (the log), and
    # it ends as the uninterrupted 2-epoch run does, every epoch's metrics bit for bit
    since = (run / "log.txt").stat().st_size
    cli.main([*common, "--resume", "train.epochs=2", f"run.dir={run}"])
    assert_resumed(log_messages(run, since), from_step=2, to_step=4)
    cli.main([*common, "train.epochs=2", f"run.dir={tmp_path / 'straight'}"])
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["epochs"] == json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"]
    assert summary["summary"]["quantize"] == "nf4" and "quantize: nf4" in (run / "config.yaml").read_text()
    trained = open_run(run)
    export.write_peft_adapter(trained.config, trained.model, trained.params, out, save_base=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert "quantization_config" not in config and config["r"] == 4
    kernels = {p: v for p, v in convert.flatten(trained.params["gpt2"]).items() if Q.is_quantized(v)}
    assert len(kernels) == 8 and all(isinstance(v, Q.NF4Kernel) for v in kernels.values())
    batch = make_mixed_length_batch((12, 7, 3, 10), 12, seed=1)
    ours = np.asarray(jax.jit(trained.model.logits)(trained.params, batch["input_ids"], batch["attention_mask"]))
    ids, mask = (torch.from_numpy(batch[k].astype(np.int64)) for k in ("input_ids", "attention_mask"))

    def peft_logits(dequantized: bool) -> np.ndarray:
        hf = GPT2ForSequenceClassification.from_pretrained(out / "base")
        if dequantized:  # the block weights our run computed with (Conv1D holds Wᵀ)
            sd = {f"transformer.{'.'.join(p[:-1])}.weight": torch.from_numpy(np.asarray(v.dequantize()).T.copy())
                  for p, v in kernels.items()}
            hf.load_state_dict(sd, strict=False)
        with torch.no_grad():
            return PeftModel.from_pretrained(hf, str(out)).eval()(input_ids=ids, attention_mask=mask).logits.numpy()

    on_dequantized, on_original = peft_logits(True), peft_logits(False)
    exact, quant = float(np.abs(on_dequantized - ours).max()), float(np.abs(on_original - ours).max())
    print(f"PEFT on our dequantized weights: {exact:.2e}; on the unquantized base: {quant:.2e} "
          f"(logits up to {np.abs(ours).max():.3f})")
    assert exact <= 1e-4 and 10 * exact < quant
    export.save_merged(trained.config, trained.model, trained.params, merged)
    assert any("dequantized weights of 8 quantized kernels" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        plain = GPT2ForSequenceClassification.from_pretrained(merged)(input_ids=ids, attention_mask=mask).logits
    assert float(np.abs(plain.numpy() - ours).max()) <= 1e-4


def test_a_qlora_base_reaches_the_device_quantized_one_kernel_at_a_time(tmp_path, monkeypatch):
    """What lets a model four times larger fit: a QLoRA run reads its block kernels to the host, and each is on the
    device in float32 only while it is quantized (the rest of the base is placed as read). DoRA's magnitudes
    start as the norms of the dequantized kernels (PEFT's init on bitsandbytes layers), so the adapted model starts
    as the quantized base; PiSSA decomposes the dequantized weight and its residual is quantized again, as PEFT
    does."""
    from tiny import save_torch_gpt2, tiny_config

    from lora_kd_jax.data.encoding import EncodedSplit
    from lora_kd_jax.models.hf_names import flatten
    from lora_kd_jax.training import finetune

    save_torch_gpt2(tmp_path / "gpt2", seed=3, n_positions=32)  # wpe (32, 64): no block kernel's shape
    kernel_shapes = {(192, 64), (64, 64), (256, 64), (64, 256)}  # GPT-2's (out, in) kernels
    on_device: list[int] = []
    original = Q.quantize_nf4
    before = jax.live_arrays()  # what earlier tests in this process hold (kept alive here, so no id is reused)
    held = {id(a) for a in before}

    def spy(kernel, **kw):  # the float32 block kernels this build put on the device, as each one is quantized
        on_device.append(sum(a.dtype == jnp.float32 and a.shape in kernel_shapes and id(a) not in held
                             for a in jax.live_arrays()))
        return original(kernel, **kw)

    monkeypatch.setattr(Q, "quantize_nf4", spy)
    rng = np.random.default_rng(0)
    split = EncodedSplit(rng.integers(0, 50000, (16, 8)).astype(np.int32), np.ones((16, 8), np.int32),
                         rng.integers(0, 2, 16).astype(np.int32), 0)
    cfg = tiny_config("model.init=pretrained", f"model.path={tmp_path / 'gpt2'}", "model.n_positions=32",
                      "lora.quantize=nf4", "lora.variant=dora", "lora.init=standard", "train.batch_size=8",
                      f"run.dir={tmp_path / 'run'}")
    task = finetune.build_task(cfg, {"train": split, "validation": split})
    # every quantization (the 8 stored kernels, DoRA's init) found no float32 block kernel on the device
    assert len(on_device) >= 8 and max(on_device) == 0, on_device
    frozen = flatten(task.consts["frozen"]["gpt2"])
    assert sum(Q.is_quantized(v) for v in frozen.values()) == 8
    assert not any(isinstance(v, jax.Array) and v.shape in kernel_shapes for v in frozen.values())
    lora = flatten(task.state.trainable["lora"])
    for path, m in ((p, v) for p, v in lora.items() if p[-1] == "m"):
        w = np.asarray(frozen[path[:-1] + ("kernel",)].dequantize(), np.float64)  # GPT-2's (out, in) kernel
        np.testing.assert_allclose(np.asarray(m), np.linalg.norm(w, axis=1), rtol=1e-6, err_msg=str(path))
    # PiSSA: the residual of the dequantized weight, quantized again (PEFT's pissa_init on a 4-bit layer)
    cfg = tiny_config("model.init=pretrained", f"model.path={tmp_path / 'gpt2'}", "model.n_positions=32",
                      "lora.quantize=nf4", "lora.init=pissa", "train.batch_size=8", f"run.dir={tmp_path / 'pissa'}")
    task = finetune.build_task(cfg, {"train": split, "validation": split})
    frozen, lora = flatten(task.consts["frozen"]["gpt2"]), flatten(task.state.trainable["lora"])
    plain = tiny_config("model.init=pretrained", f"model.path={tmp_path / 'gpt2'}", "model.n_positions=32")
    plain = flatten(build_classifier(plain, jax.random.key(0), with_lora=False)[1]["gpt2"])
    path = ("h", "0", "attn", "c_attn")
    w = np.asarray(Q.quantize_nf4(jnp.asarray(plain[path + ("kernel",)])).dequantize())
    a, b = (np.asarray(lora[path + (k,)]) for k in ("a", "b"))
    scale = build_classifier(cfg, jax.random.key(0), shapes_only=True)[0].spec.scale
    residual = w - scale * (a @ b).T
    got = np.asarray(frozen[path + ("kernel",)].dequantize())
    want = np.asarray(Q.quantize_nf4(jnp.asarray(residual)).dequantize())
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_each_family_quantizes_every_block_kernel_and_computes_on_its_dequantized_weights(tmp_path):
    """QLoRA on the families beyond GPT-2 (random tiny BERT with int8, Llama with NF4 and double quantization,
    ModernBERT with NF4; two seeds at once; RoBERTa is BERT's module, Qwen3 runs NF4 in the mesh test): the run's
    frozen base holds every 2-D kernel of the blocks quantized (1-D leaves, embeddings and the head as they were),
    each kernel's dequantized weights within half a code step of the float32 ones in its own layout, and each
    seed's logits equal those of the same model on the dequantized weights."""
    from tiny import tiny_config

    from lora_kd_jax.core.keys import classifier_base_key
    from lora_kd_jax.data.encoding import EncodedSplit
    from lora_kd_jax.models.families import FAMILIES
    from lora_kd_jax.models.hf_names import flatten
    from lora_kd_jax.training import finetune
    from lora_kd_jax.training.state import combine

    rng = np.random.default_rng(0)
    split = EncodedSplit(rng.integers(1, 300, (8, 12)).astype(np.int32), np.ones((8, 12), np.int32),
                         rng.integers(0, 2, 8).astype(np.int32), 0)
    schemes = {"bert": ("int8", False), "llama": ("nf4", True), "modernbert": ("nf4", False)}
    for family, (scheme, dq) in schemes.items():
        fam = FAMILIES[family]
        cfg = tiny_config(f"model.type={family}", "model.vocab_size=320", "model.n_positions=64", "train.seeds=[0,1]",
                          f"lora.quantize={scheme}", f"lora.double_quant={str(dq).lower()}", "lora.init=standard",
                          "train.batch_size=8", f"run.dir={tmp_path / family}")
        task = finetune.build_task(cfg, {"train": split, "validation": split})
        held = flatten(task.consts["frozen"][fam.prefix])
        plain = flatten(build_classifier(cfg, jax.random.key(0), base_key=classifier_base_key(cfg),
                                         with_lora=False)[1][fam.prefix])  # the run's random base
        kernels = {p for p, v in plain.items() if p[:len(fam.blocks)] == fam.blocks and np.ndim(v) == 2}
        assert kernels and {p for p, v in held.items() if Q.is_quantized(v)} == kernels, family
        for path in kernels:
            w, q = np.asarray(plain[path]), held[path]
            assert q.shape == w.shape and isinstance(q, Q.NF4Kernel if scheme == "nf4" else Q.Int8Kernel)
            # within half the widest gap of the code (NF4: (1 - 0.723) / 2 of a block's absmax; int8: 1/254 of a row's)
            bound = (0.1385 if scheme == "nf4" else 0.5 / 127 * 1.0001) * np.abs(w).max()
            assert np.abs(np.asarray(DEQUANTIZE(q)) - w).max() <= bound, (family, path)
        assert all(np.array_equal(np.asarray(held[p]), np.asarray(plain[p])) for p in plain if p not in kernels)
        logits = jax.jit(build_classifier(cfg, jax.random.key(0), shapes_only=True)[0].logits)
        ids, mask = split.input_ids, split.attention_mask
        dequantized = {fam.prefix: jax.jit(lambda t: Q.dequantize_tree(t)[0])(task.consts["frozen"][fam.prefix])}
        for seed in range(2):
            trainable = jax.tree.map(lambda x: x[seed], task.state.trainable)
            quantized = np.asarray(logits(combine(trainable, task.consts["frozen"]), ids, mask))
            want = np.asarray(logits(combine(trainable, dequantized), ids, mask))
            np.testing.assert_allclose(quantized, want, rtol=1e-6, atol=1e-6, err_msg=family)
