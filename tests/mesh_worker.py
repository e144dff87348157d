"""Runs inside a subprocess that has several CPU devices (XLA_FLAGS set by the parent test).

usage: mesh_worker.py both DIR            steps (DIR/losses.json), resume (DIR/resume, DIR/resume.json) and
                                           loopback (DIR/loopback) in one process: one start-up and one JAX for the
                                           three tests that read them
       mesh_worker.py steps OUT.json      per-step LoRA losses on meshes of 1, 8 and 2x4 devices (GPT-2 and BERT,
                                           the sharding of the frozen base recorded), and on 1 and 2x4 for Qwen3
                                           with NF4 kernels (their codes' sharding recorded); distillation and
                                           2-seed distillation (no frozen base for fsdp to split) on 1 and 8;
                                           the teacher labelling a split (`teacher_logits_for`) on 1, 8 and 2x4
       mesh_worker.py resume DIR OUT.json  1 epoch on 8 devices resumed on 1; vs 1 device throughout
       mesh_worker.py loopback DIR        the loopback test's reference: `train-lora` of configs/smoke.yaml on 4 of
                                           the 8 devices (mesh.data=4), as one process of 4 devices would
       mesh_worker.py load CKPT OUT.json   a checkpoint read straight onto a 2x4 mesh: each FSDP-split leaf's shards
"""
import json
import sys
from pathlib import Path

import jax
from flax import traverse_util

from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.training import finetune
from lora_kd_jax.core.config import MeshConfig
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.distill.losses import teacher_objective
from lora_kd_jax.training.state import stored_frozen, train_state
from lora_kd_jax.training.steps import Seeded, cross_entropy_objective, make_train_step
from tiny import LOOPBACK, log_messages, random_batch, tiny_config


COMPILES: dict[str, int] = {}  # per LoRA run: how many programs its train step compiled (1: state stays in place)
FAMILY_VOCAB = 1000  # a random-init encoder's vocabulary: the batch's ids are drawn below it


def per_step_losses(mesh_cfg: MeshConfig, steps: int = 6, family: str = "gpt2",
                    shardings: dict | None = None, quantize: str = "none") -> list[float]:
    """Per-step losses of the LoRA step (GPT-2, or a 2-layer 64-wide random BERT / RoBERTa / Llama / Qwen3 /
    ModernBERT with LoRA dropout 0.1, so the dropout masks must match across meshes too) on `mesh_cfg`, the block
    kernels stored as `lora.quantize` says; `shardings` gets {leaf path: [spec, shape, first shard's shape]} of the
    placed frozen base's largest leaves, or of every quantized kernel's arrays (codes, absmax) with `quantize`."""
    if family == "gpt2":
        cfg = tiny_config("train.batch_size=16", f"lora.quantize={quantize}")
        model, params = build_classifier(cfg, jax.random.key(0))
        vocab = 50257
    else:
        cfg = tiny_config("train.batch_size=16", f"model.type={family}", f"model.vocab_size={FAMILY_VOCAB}",
                          "model.n_positions=64", "lora.dropout=0.1", f"lora.quantize={quantize}")
        model, params = build_classifier(cfg, jax.random.key(0))
        vocab = FAMILY_VOCAB
    place = mesh_lib.Placement(mesh_lib.make_mesh(mesh_cfg))
    setup = train_state(model, params, 1e-3, jax.random.key(1))
    state = place.state(setup.state)
    consts = {"frozen": place.frozen(stored_frozen(setup.frozen, cfg, model))}  # as the trainer: NF4 kernels, say
    if shardings is not None and quantize != "none":  # every array of every quantized kernel: NF4's codes, absmax
        for path, leaf in jax.tree_util.tree_leaves_with_path(consts["frozen"]):
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            if name.endswith(("/packed", "/absmax")):
                shardings[name] = [str(leaf.sharding.spec), leaf.shape, leaf.addressable_shards[0].data.shape]
    elif shardings is not None:
        flat = traverse_util.flatten_dict(consts["frozen"])
        for path, leaf in sorted(flat.items(), key=lambda kv: -kv[1].size)[:3]:
            shardings["/".join(path)] = [str(leaf.sharding.spec), leaf.shape, leaf.addressable_shards[0].data.shape]
    step = make_train_step(model, setup.tx, cross_entropy_objective, state_sharding=place.state_sharding)  # as trainers
    losses = []
    for i in range(steps):
        batch = random_batch(i, batch=16, vocab=vocab)
        batch["weights"][-3:] = 0.0  # padding rows must not count, whatever device they land on
        state, sums = step(state, consts, place.put_batch(batch))
        losses.append(float(sums["loss_sum"]) / float(sums["count"]))
    COMPILES[f"{family}{'_' + quantize if quantize != 'none' else ''} {dict(place.mesh.shape)}"] = step._cache_size()
    return losses


def distill_losses(mesh_cfg: MeshConfig, steps: int = 6) -> list[float]:
    """The distillation step (tiny student, cached teacher logits) on a mesh; same batches as per_step_losses."""
    from lora_kd_jax.models.students.build import build_student

    cfg = tiny_config("student.embed_dim=32", "student.hidden_dim=32")
    place = mesh_lib.Placement(mesh_lib.make_mesh(mesh_cfg))
    student, params = build_student(cfg.student, jax.random.key(0))
    setup = train_state(student, params, 1e-3, jax.random.key(1))
    state = place.state(setup.state)
    teacher_logits = jax.random.normal(jax.random.key(2), (16, 2))
    consts = place.state({"frozen": {}, "teacher_logits": teacher_logits})
    step = make_train_step(student, setup.tx, teacher_objective(2.0, 0.5),
                           state_sharding=place.state_sharding)
    losses = []
    for i in range(steps):
        batch = random_batch(i, batch=16)
        batch["weights"][-3:] = 0.0
        state, sums = step(state, consts, place.put_batch(batch))
        losses.append(float(sums["loss_sum"]) / float(sums["count"]))
    return losses


def seeded_distill_losses(mesh_cfg: MeshConfig, steps: int = 4) -> list[list[float]]:
    """Two seeds at once (train.seeds): stacked states, per-seed teacher logits, stacked batches placed with
    `put_seeded_batch` (rows split over the mesh, the seed axis not); per-step loss of each seed."""
    from lora_kd_jax.data import stack_batches
    from lora_kd_jax.training.state import stack
    from lora_kd_jax.models.students.build import build_student

    cfg = tiny_config("student.embed_dim=32", "student.hidden_dim=32")
    place = mesh_lib.Placement(mesh_lib.make_mesh(mesh_cfg))
    states = []
    for k in (0, 1):
        student, params = build_student(cfg.student, jax.random.key(k))
        setup = train_state(student, params, 1e-3, jax.random.key(10 + k))
        states.append(setup.state)
    state = place.state(stack(states))
    consts = place.state({"frozen": {}, "teacher_logits": jax.random.normal(jax.random.key(2), (2, 32, 2))})
    step = make_train_step(student, setup.tx, teacher_objective(2.0, 0.5),
                           Seeded({"frozen": None, "teacher_logits": 0}), state_sharding=place.state_sharding)
    losses = []
    for i in range(steps):
        pair = [random_batch(2 * i + k, batch=16) for k in (0, 1)]
        pair[1]["index"] += 16  # seed 1 reads other rows of its teacher's logits
        for b in pair:
            b["weights"][-3:] = 0.0
        state, sums = step(state, consts, place.put_seeded_batch(stack_batches(pair)))
        losses.append([float(x) for x in sums["loss_sum"] / sums["count"]])
    return losses


def teacher_labels(mesh_cfg: MeshConfig, rows: int = 40) -> dict:
    """A merged tiny GPT-2 teacher labelling `rows` rows (batches of 16, so a partial last one) with
    `teacher_logits_for`, as a transfer set is labelled: its logits, and how its batches and its result are placed."""
    import dataclasses
    from pathlib import Path

    import numpy as np
    from lora_kd_jax.data import EncodedSplit
    from lora_kd_jax.distill.teacher import Teacher, teacher_logits_for

    cfg = tiny_config()
    model, params = build_classifier(cfg, jax.random.key(0))
    place = mesh_lib.Placement(mesh_lib.make_mesh(mesh_cfg))
    teacher = Teacher(model=dataclasses.replace(model, spec=None, base=None), params=place.frozen(model.merged(params)),
                      config=cfg, run_dir=Path("."), total_params=0, trainable_params=0, best_epoch=0,
                      val_accuracy=0.0, placement=place)
    seen = []  # the input ids every labelling batch reaches the teacher's program with
    forward = teacher._forward
    teacher._forward = lambda p, ids, *rest: seen.append(ids) or forward(p, ids, *rest)
    batch = random_batch(7, batch=rows)
    split = EncodedSplit(batch["input_ids"], batch["attention_mask"], batch["labels"], 0)
    logits = teacher_logits_for(teacher, split, 16)
    return {"logits": np.asarray(logits).tolist(), "batch_devices": sorted({len(x.sharding.device_set) for x in seen}),
            "batch_shard_rows": sorted({x.addressable_shards[0].data.shape[0] for x in seen}),
            "replicated": bool(logits.sharding.is_fully_replicated), "devices": len(logits.sharding.device_set)}


def loaded_shards(ckpt: str) -> dict:
    """The checkpoint in `ckpt` read as training reads it onto a 2 x 4 mesh (`sharding_for=place.leaf`), and once
    onto the default device: for each leaf the loader split over fsdp, its spec, global shape, each device's shard
    shape, and whether every shard is that slice of the whole tensor."""
    import numpy as np

    cfg = tiny_config("model.init=pretrained", f"model.path={ckpt}", "model.n_positions=64")
    place = mesh_lib.Placement(mesh_lib.make_mesh(MeshConfig(data=2, fsdp=4)))
    model, _ = build_classifier(cfg, jax.random.key(0), with_lora=False, sharding_for=place.leaf)
    whole, _ = build_classifier(cfg, jax.random.key(0), with_lora=False)
    out = {}
    flat, ref = traverse_util.flatten_dict(model.base), traverse_util.flatten_dict(whole.base)
    for path, leaf in flat.items():
        if "fsdp" not in str(leaf.sharding.spec):
            continue
        host = np.asarray(ref[path])
        exact = all(np.array_equal(np.asarray(s.data), host[s.index]) for s in leaf.addressable_shards)
        out["/".join(path)] = {"spec": str(leaf.sharding.spec), "shape": list(leaf.shape),
                               "shards": sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
                               "devices": len(leaf.addressable_shards), "exact": exact}
    return out


def main() -> None:
    mode = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    if mode == "both":
        out = Path(sys.argv[2])
        sys.argv = [sys.argv[0], "steps", str(out / "losses.json")]
        main()
        sys.argv = [sys.argv[0], "resume", str(out / "resume"), str(out / "resume.json")]
        main()
        sys.argv = [sys.argv[0], "loopback", str(out / "loopback")]
        main()
    elif mode == "steps":
        meshes = {"1": MeshConfig(data=1), "8": MeshConfig(data=8), "2x4": MeshConfig(data=2, fsdp=4)}
        out = {name: per_step_losses(m) for name, m in meshes.items()}
        # an encoder tree (BERT: the families share the placement code; Llama's run costs as much again)
        shardings: dict = {}
        out.update({f"bert_{name}": per_step_losses(m, 4, "bert", shardings if name == "2x4" else None)
                    for name, m in meshes.items()})
        out["bert_shardings"] = shardings
        # a new family and QLoRA in one run (each compile here costs seconds): Qwen3 (q/k norms, last-token pooling)
        # with NF4 block kernels, their codes split over fsdp; 1 device against 2x4 only, 4 steps
        quantized: dict = {}
        out.update({f"qwen3_nf4_{name}": per_step_losses(meshes[name], 4, "qwen3", quantized if name == "2x4" else None,
                                                         quantize="nf4") for name in ("1", "2x4")})
        out["qwen3_nf4_shardings"] = quantized
        out.update({f"distill_{name}": distill_losses(meshes[name]) for name in ("1", "8")})  # no frozen base to split
        out.update({f"seeded_{name}": seeded_distill_losses(meshes[name]) for name in ("1", "8")})
        out["labels"] = {name: teacher_labels(m) for name, m in meshes.items()}
        out["train_step_compiles"] = COMPILES
        json.dump(out, open(sys.argv[2], "w"))
    elif mode == "resume":
        root = sys.argv[2]
        common = ["data.limit=48", "train.batch_size=16", "lora.dropout=0.1", "train.epochs=2"]
        one = finetune.train_lora(tiny_config(*common, "mesh.data=1", f"run.dir={root}/one"), progress=False)
        finetune.train_lora(tiny_config(*common, "mesh.data=8", "train.epochs=1", f"run.dir={root}/split"),
                                 progress=False)
        since = Path(f"{root}/split/log.txt").stat().st_size
        finetune.train_lora(tiny_config(*common, "mesh.data=1", f"run.dir={root}/split"), resume=True,
                                 progress=False)
        resumed_log = log_messages(Path(f"{root}/split"), since)
        a = json.load(open(f"{root}/one/metrics.json"))["epochs"]
        b = json.load(open(f"{root}/split/metrics.json"))["epochs"]
        json.dump({"one": a, "split": b, "summary_one": one, "resumed_log": resumed_log}, open(sys.argv[3], "w"))
    elif mode == "loopback":
        from lora_kd_jax.commands import cli

        cli.main(["train-lora", *LOOPBACK, "mesh.data=4", f"run.dir={sys.argv[2]}", "--no-progress"])
    elif mode == "load":
        json.dump(loaded_shards(sys.argv[2]), open(sys.argv[3], "w"))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
