"""student.arch=transformer: the teacher's own architecture with fewer blocks, started from its merged layers
(DistilBERT's init). The start (block i = the teacher's merged block teacher_layers[i], embeddings and final norm
the teacher's, a fresh head per seed) through the real distillation task; the sliced student's logits and one
distillation Adam step against transformers' PyTorch GPT2ForSequenceClassification built from the teacher's own
weights by renaming its layers (and BERT's, RoBERTa's and Llama's forward the same way); a two-seed distillation,
resumed to a second epoch and evaluated; the keys' errors."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_kd_jax.core.config import ConfigError, load_config
from lora_kd_jax.models import hf_names
from lora_kd_jax.models.families import FAMILIES
from lora_kd_jax.distill import trainer as distill
from lora_kd_jax.distill.losses import teacher_objective
from lora_kd_jax.distill.teacher import restore_teacher
from lora_kd_jax.models.students import transformer as st
from lora_kd_jax.models.students.build import build_student
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.runs import rundir
from lora_kd_jax.training.state import seed_states, train_state
from lora_kd_jax.training.steps import make_train_step

from shared_runs import TEACHER_LAYERS, teacher_run
from tiny import PAD_ID, assert_resumed, log_messages, make_mixed_length_batch, tiny_config

torch = pytest.importorskip("torch")
import torch_reference as ref_lib  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

DEPTH = TEACHER_LAYERS  # the teacher's blocks (3): the default student takes 0 and 2 (half of 3, rounded up)
HF_CLASSIFIER_ATOL = 5e-6  # tests/test_parity_convert.py: our logits vs GPT2ForSequenceClassification's
OUTPUT_RTOL = 5e-6  # tests/test_families.py: BERT's forward, relative to the largest logit
TOL = 1e-5  # tests/test_student_zoo.py: parameters after one Adam step
GRAD_RTOL = 5e-6  # tests/test_families.py, tests/test_parity_lora.py: gradients, relative to a leaf's largest entry
EPS = 1e-8  # Adam's epsilon (torch's and optax's default)
LR, T = 1e-2, 2.0
STUDENT = ("student.arch=transformer", "data.limit=32", "train.batch_size=16", "train.epochs=1")


@pytest.fixture(scope="module")
def teacher():
    """The session's shared teacher (tests/shared_runs.py: a one-step LoRA run of a 3-layer, 64-wide random GPT-2 on
    CoLA, seed-init factors, so the merged kernels differ from the base's), restored as a Teacher (LoRA merged)."""
    run_dir = teacher_run()
    return run_dir, restore_teacher(str(run_dir), tiny_config(f"distill.teacher={run_dir}"))


def resolved(teacher_dir, *extra: str):
    cfg = tiny_config(*STUDENT, f"distill.teacher={teacher_dir}", *extra)
    return distill.transformer_student_config(cfg, {0: runs.inspect_run(str(teacher_dir), kind="lora")})


def host(tree) -> dict:
    return jax.tree.map(np.array, tree)


def test_every_seed_starts_from_every_other_merged_teacher_layer(teacher):
    """The trainer's state recipe for two seeds (`seed_states`, stacked): block i of each seed is the teacher's
    merged block 0, 2 (DistilBERT's default: every other layer, half of 3 rounded up) bit for bit; wte, wpe and ln_f
    are the teacher's; the head is each seed's own draw. Named layers are taken in their order; 12 layers give
    DistilBERT's [0, 2, 4, 6, 8, 10]."""
    run_dir, restored = teacher
    cfg = resolved(run_dir, "train.seeds=[0,1]")
    assert cfg.student.teacher_layers == [0, 2] and cfg.student.layers == 2 and cfg.student.embed_dim == 64
    assert cfg.model == restored.config.model and cfg.student.embeddings == "teacher"
    student, _ = build_student(cfg, jax.random.key(0), shapes_only=True, teacher_base=restored.params["gpt2"])
    setup = seed_states(student, cfg.train, [0, 1], stacked=True)
    start, t = host(setup.state.trainable), host(restored.params["gpt2"])
    assert sorted(start["gpt2"]["h"]) == ["0", "1"]
    for k in (0, 1):
        seed = jax.tree.map(lambda x: x[k], start["gpt2"])
        for i, j in enumerate([0, 2]):
            jax.tree.map(np.testing.assert_array_equal, seed["h"][str(i)], t["h"][str(j)])
        for leaf in ("wte", "wpe", "ln_f"):
            jax.tree.map(np.testing.assert_array_equal, seed[leaf], t[leaf])
    assert not np.array_equal(start["head"]["kernel"][0], start["head"]["kernel"][1])
    # the teacher's blocks differ from one another, so a wrong index could not pass
    assert not np.array_equal(t["h"]["1"]["attn"]["c_attn"]["kernel"], t["h"]["2"]["attn"]["c_attn"]["kernel"])

    named = resolved(run_dir, "student.teacher_layers=[2,0,1]")
    student, params = build_student(named, jax.random.key(0), teacher_base=restored.params["gpt2"])
    for i, j in enumerate([2, 0, 1]):
        jax.tree.map(np.testing.assert_array_equal, host(params["gpt2"]["h"][str(i)]), t["h"][str(j)])
    assert "teacher layers [2, 0, 1]" in student.describe()
    jax.tree.map(lambda x: x.delete(), params)  # a student's start is its own copy: the teacher's stay
    np.testing.assert_array_equal(np.asarray(restored.params["gpt2"]["h"]["2"]["ln_1"]["scale"]),
                                  t["h"]["2"]["ln_1"]["scale"])
    twelve = st.with_teacher(tiny_config(*STUDENT), tiny_config("model.n_layer=12"))
    assert twelve.student.teacher_layers == [0, 2, 4, 6, 8, 10]


def test_the_keys_fail_in_one_line_naming_what_is_wrong(teacher):
    run_dir, _ = teacher
    with pytest.raises(ConfigError, match=r"student.teacher_layers=\[0, 3\]: \[3\] beyond the 3 layers"):
        resolved(run_dir, "student.teacher_layers=[0,3]")
    with pytest.raises(ConfigError, match="student.layers=3: every other layer of the teacher's 3 gives at most 2"):
        resolved(run_dir, "student.layers=3")
    assert resolved(run_dir, "student.layers=1").student.teacher_layers == [0]
    with pytest.raises(ConfigError, match="student.heads=2 with a teacher"):
        resolved(run_dir, "student.heads=2")
    with pytest.raises(ConfigError, match=r"student.layers=3 with student.teacher_layers=\[0, 1\]"):
        load_config(None, ["student.arch=transformer", "student.layers=3", "student.teacher_layers=[0,1]"])
    with pytest.raises(ConfigError, match="student.layers=2 with student.arch=cnn: only the transformer"):
        load_config(None, ["student.arch=cnn", "student.layers=2"])
    with pytest.raises(ConfigError, match="student.heads=5 does not divide student.embed_dim=64"):
        load_config(None, ["student.arch=transformer", "student.embed_dim=64", "student.heads=5"])
    with pytest.raises(ConfigError, match="student.teacher_layers=.* with train-student"):
        distill.train_rnn(tiny_config(*STUDENT, "student.teacher_layers=[0]"), progress=False)


def torch_student(restored, layers: list[int], head: dict):
    """transformers' GPT2ForSequenceClassification with len(layers) blocks, built from the teacher's own merged
    weights on the PyTorch side: its transformer.h.{j} renamed transformer.h.{i}, every other tensor kept, and
    the head's score.weight."""
    from transformers import GPT2ForSequenceClassification

    full = ref_lib.flax_classifier_to_torch({"gpt2": host(restored.params["gpt2"]), "head": head})
    sd = {}
    for key, value in full.items():
        parts = key.split(".")
        if parts[:2] == ["transformer", "h"]:
            if int(parts[2]) not in layers:
                continue
            parts[2] = str(layers.index(int(parts[2])))
        sd[".".join(parts)] = torch.from_numpy(np.array(value, np.float32))
    config = ref_lib.torch_config(restored.model.arch)  # the teacher's GPT2Config, eager, no dropout
    config.n_layer, config.num_labels, config.pad_token_id = len(layers), 2, PAD_ID
    model = GPT2ForSequenceClassification(config).eval()
    model.load_state_dict(sd, strict=True)
    assert ref_lib.SCORE_KEY in sd
    return model


def test_logits_and_one_distillation_adam_step_match_pytorch(teacher):
    """The sliced student (layers 0 and 2) vs GPT2ForSequenceClassification(n_layer=2) holding the teacher's blocks
    0 and 2: logits (HF classifier tolerance); T²·KL against given teacher logits: its gradient on every leaf
    (embeddings included: all of it trains); one Adam step (lr 1e-2) of the real train step vs torch.optim.Adam.

    The step is compared on every entry whose gradient exceeds 100·eps (1e-6): Adam's first step is
    lr·g/(|g| + eps), whose slope at g ≈ 0 is lr/eps = 1e6, so below that an entry's step is its gradient's rounding
    (~1e-13 here) magnified, in any two fp32 implementations. Those entries are the attention key biases (their
    exact gradient is 0: softmax ignores a shift shared by every key) and a few dozen kernel entries; their
    gradients agree with the rest (the gradient check covers every entry), and entries with no gradient (wte rows
    of tokens not in the batch) stay put on both sides."""
    from lora_kd_jax.distill.losses import kd_loss

    _, restored = teacher
    cfg = resolved(restored.run_dir)
    student, params = build_student(cfg, jax.random.key(3), teacher_base=restored.params["gpt2"])
    b = make_mixed_length_batch([9, 1, 4, 12, 6, 2], 12, seed=4)
    b["index"] = np.arange(6, dtype=np.int32)
    teacher_logits = np.random.default_rng(5).normal(size=(6, 2)).astype(np.float32) * 3
    tm = torch_student(restored, [0, 2], host(params["head"]))
    ids, mask = ref_lib.tensors(b)
    t_logits = tm(input_ids=ids, attention_mask=mask).logits

    def loss(p):
        logits = student.logits(p, b["input_ids"], b["attention_mask"])
        return kd_loss(logits, jnp.asarray(teacher_logits), T)[0], logits

    (_, ours), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    err_logits = float(np.abs(np.asarray(ours) - t_logits.detach().numpy()).max())
    assert err_logits <= HF_CLASSIFIER_ATOL

    tt = torch.from_numpy(teacher_logits)
    kl = torch.nn.functional.kl_div(torch.log_softmax(t_logits / T, -1), torch.softmax(tt / T, -1),
                                    reduction="batchmean") * T * T
    kl.backward()
    torch_grads = ref_lib.convert.flatten(ref_lib.as_flax(tm, grads=True), "/")
    grad_errs = ref_lib.tree_rel_errs(host(grads), ref_lib.as_flax(tm, grads=True))
    worst_grad = max(grad_errs, key=grad_errs.get)
    assert grad_errs[worst_grad] <= GRAD_RTOL, f"{worst_grad}: gradient rel err {grad_errs[worst_grad]:.3g}"

    torch.optim.Adam(tm.parameters(), lr=LR).step()
    setup = train_state(student, jax.tree.map(jnp.array, params), LR, jax.random.key(1))
    step = make_train_step(student, setup.tx, teacher_objective(T, 0.0))
    state, sums = step(setup.state, {"frozen": {}, "teacher_logits": jnp.asarray(teacher_logits)}, b)
    assert abs(float(sums["loss_sum"] / sums["count"]) - kl.item()) <= 1e-5 * kl.item()
    got = ref_lib.convert.flatten(host(state.trainable), "/")
    want = ref_lib.convert.flatten(ref_lib.as_flax(tm), "/")
    before = ref_lib.convert.flatten(host(params), "/")
    assert set(got) == set(want) == set(torch_grads)
    step_err, noise = 0.0, {}
    for k, g in torch_grads.items():
        g = np.abs(g)
        diff = np.abs(got[k] - want[k])
        conditioned = g > 100 * EPS
        step_err = max(step_err, float(diff[conditioned].max(initial=0.0)))
        if k.endswith(("wte/embedding", "wpe/embedding")):  # rows of tokens / positions not in the batch stay put
            unused = ~g.any(axis=1)
            assert unused.sum() > 0 and np.array_equal(got[k][unused], before[k][unused])
            assert np.array_equal(want[k][unused], before[k][unused])
            conditioned |= unused[:, None]
        if not conditioned.all():
            noise[k] = int((~conditioned).sum())
    n = sum(v.size for v in got.values())
    print(f"logits max err {err_logits:.1e}; worst gradient {worst_grad} {grad_errs[worst_grad]:.1e}; one Adam step "
          f"max err {step_err:.1e} on entries with |g| > 1e-6; {sum(noise.values())} of {n} entries below: {noise}")
    assert step_err <= TOL
    for layer in ("0", "1"):  # the key biases' exact gradient is 0: what is there is rounding
        key_bias = torch_grads[f"gpt2/h/{layer}/attn/c_attn/bias"][64:128]
        assert np.abs(key_bias).max() <= 100 * EPS
    assert sum(noise.values()) <= 1e-4 * n
    moved = ref_lib.tree_abs_errs(state.trainable, host(params))
    assert min(moved[k] for k in ("gpt2/wte/embedding", "gpt2/h/1/mlp/c_fc/kernel", "gpt2/ln_f/scale",
                                  "head/kernel")) > 0.5 * LR  # every part trained


# where each family's *ForSequenceClassification keeps its blocks (the state dict's prefix before the index), and
# a block's query kernel
TORCH_BLOCKS = {"bert": ("bert.encoder.layer.", "attention.self.query.weight"),
                "roberta": ("roberta.encoder.layer.", "attention.self.query.weight"),
                "llama": ("model.layers.", "self_attn.q_proj.weight")}


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_an_encoder_or_llama_student_computes_what_pytorch_computes_on_the_teachers_layer(family, tmp_path):
    """A 2-layer teacher of each family (a PyTorch checkpoint, `tiny_families`: Llama with grouped-query attention,
    2 key/value heads for 4 query heads) and a 1-layer student from its layer 1: our logits vs the family's
    *ForSequenceClassification(num_hidden_layers=1) holding the checkpoint's block 1 as block 0, every other tensor
    of the checkpoint (embeddings, BERT's pooler, Llama's final norm), and our head (test_families' tolerance), on
    rows padded as the batcher pads them. The checkpoint's two blocks differ, so a student holding block 0 could
    not pass."""
    from transformers import AutoModelForSequenceClassification

    import tiny_families

    from lora_kd_jax.models.build import build_classifier
    from lora_kd_jax.models.resolve import resolve

    ckpt = tmp_path / family
    model, tok = tiny_families.save_checkpoint(family, ckpt)
    t_cfg = resolve(tiny_config(f"model.type={family}", "model.init=pretrained", f"model.path={ckpt}",
                                        f"data.tokenizer={ckpt}"))
    _, t_params = build_classifier(t_cfg, jax.random.key(0), with_lora=False)
    cfg = st.with_teacher(tiny_config(*STUDENT, "student.teacher_layers=[1]"), t_cfg)
    prefix = FAMILIES[family].prefix
    student, params = build_student(cfg, jax.random.key(2), teacher_base=t_params[prefix])
    student_blocks = functools.reduce(dict.__getitem__, FAMILIES[family].blocks, params[prefix])
    assert student.family.name == family and student.family.prefix == prefix and sorted(student_blocks) == ["0"]

    blocks, query = TORCH_BLOCKS[family]
    sd = {}
    for key, value in model.state_dict().items():
        if key.startswith(blocks + "0.") or hf_names.is_head_key(FAMILIES[family], key):
            continue
        sd[key.replace(blocks + "1.", blocks + "0.")] = value
    assert not torch.equal(model.state_dict()[blocks + "0." + query], model.state_dict()[blocks + "1." + query])
    sd.update({k: torch.from_numpy(np.array(v)) for k, v in hf_names.head_to_torch(FAMILIES[family], host(params["head"])).items()})
    config = model.config.__class__.from_dict({**model.config.to_dict(), "num_hidden_layers": 1})
    ref = AutoModelForSequenceClassification.from_config(config).eval()
    ref.load_state_dict(sd, strict=True)
    tok.padding_side = "right"  # Llama's tokenizer pads left by default; the library's batches pad right
    enc = tok(["the cat sat .", "a b", "colorless green ideas sleep furiously ."], padding="max_length",
              max_length=12, truncation=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    assert (mask[:, -1] == 0).any() and mask.all(axis=1).any()  # padded rows and a full one
    want = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    batch_ids = np.where(mask == 1, ids, PAD_ID).astype(np.int32)  # the batcher's layout: GPT-2's pad id in padding
    got = np.asarray(student.logits(params, batch_ids, mask))
    err = ref_lib.max_rel_err(got, want.detach().numpy())
    print(f"{family} student: logits max rel err {err:.1e}")
    assert err <= OUTPUT_RTOL


def history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["epochs"]


def test_two_seeds_distil_resume_to_a_second_epoch_and_evaluate(teacher, tmp_path):
    """`distill` with student.arch=transformer (one block, the teacher's block 0: one block compiles faster) and
    two seeds for one epoch, then --resume to two: the first epoch's record kept, the second trained from the
    checkpoint; `Predictor` rebuilds the student from the run dir alone, evaluates and predicts."""
    from lora_kd_jax.commands.evaluation import Predictor

    run_dir, _ = teacher
    args = (*STUDENT, "data.limit=16", "student.layers=1", "train.seeds=[0,1]", f"distill.teacher={run_dir}",
            f"run.dir={tmp_path / 's'}")
    distill.distill(tiny_config(*args), progress=False)
    first = [history(tmp_path / "s" / f"seed_{k}") for k in (0, 1)]
    since = (tmp_path / "s" / "log.txt").stat().st_size
    distill.distill(tiny_config(*args[:-1], "train.epochs=2", args[-1]), resume=True, progress=False)
    assert_resumed(log_messages(tmp_path / "s", since), from_step=1, to_step=2)  # 16 rows in batches of 16
    for k in (0, 1):
        h = history(tmp_path / "s" / f"seed_{k}")
        assert len(h) == 2 and h[0] == first[k][0] and np.isfinite(h[1]["train"]["loss"])
    assert first[0][0]["train"]["loss"] != first[1][0]["train"]["loss"]  # each seed its own head
    saved = rundir.read_config(tmp_path / "s")
    assert saved["student"]["teacher_layers"] == [0] and saved["model"]["n_layer"] == DEPTH
    clf = Predictor.from_run(tmp_path / "s" / "seed_1")
    assert "transformer (gpt2) 1 layers from teacher layers [0]" in clf.describe()
    report = clf.evaluate("in_domain", limit=8)
    assert report.rows == 8 and np.isfinite(report.loss)
    (p,) = clf.predict("The cat sat on the mat.")
    assert p.label in ("acceptable", "unacceptable")


def test_without_a_teacher_it_is_a_small_random_gpt2():
    """train-rnn / bench: GPT-2's initialisers at the student's sizes (2 blocks by default, embed_dim // 64 heads);
    student.embeddings=teacher hands it a token table that replaces the drawn wte, for every seed."""
    cfg = tiny_config("student.arch=transformer", "student.embed_dim=128")
    student, params = build_student(cfg, jax.random.key(0), shapes_only=True)
    assert sorted(params["gpt2"]["h"]) == ["0", "1"] and params["gpt2"]["wte"]["embedding"].shape == (50257, 128)
    assert student.classifier.arch.num_heads == 2 and "random init" in student.describe()
    table = np.random.default_rng(0).normal(size=(50257, 128)).astype(np.float32)
    student, params = build_student(cfg, jax.random.key(0), embedding=table)
    np.testing.assert_array_equal(np.asarray(params["gpt2"]["wte"]["embedding"]), table)
    other = student.init(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(other["gpt2"]["wte"]["embedding"]), table)
    wpe = [np.asarray(p["gpt2"]["wpe"]["embedding"]) for p in (params, other)]
    assert not np.array_equal(*wpe)  # the rest is each seed's own draw
