"""Data parallel and FSDP over a device mesh: same numbers as one device; clear errors; cross-mesh restore."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.core.config import MeshConfig
from shared_runs import shared_run
from tiny import LOOPBACK, assert_resumed, core_install_env

TESTS = Path(__file__).resolve().parent
REL = 1e-5  # fp32: only the order of the cross-device reductions differs
# XLA:CPU aborts a collective whose participants arrive far apart; on a loaded 2-core CI machine 8 simulated devices
# can, so the timeouts are raised (they only matter when something is genuinely stuck).
PATIENT_COLLECTIVES = "--xla_cpu_collective_timeout_seconds=600 --xla_cpu_collective_call_terminate_timeout_seconds=600"


def host_devices(devices: int) -> str:
    """XLA_FLAGS for a process with `devices` CPU devices, on top of the suite's own (tests/conftest.py)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} {PATIENT_COLLECTIVES}"


def run_worker(*args: str, devices: int = 8, timeout: int = 300) -> None:
    env = core_install_env({**os.environ, "XLA_FLAGS": host_devices(devices), "JAX_PLATFORMS": "cpu",
                            "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])})
    # the tests' helpers, then the caller's path (a worktree's package); no PyTorch (tests/tiny.py core_install_env)
    proc = subprocess.run([sys.executable, str(TESTS / "mesh_worker.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def on_8_devices() -> Path:
    """One 8-device worker process for the three tests below (its steps, its resume, the loopback test's reference):
    built once per session whichever xdist worker asks first (tests/shared_runs.py)."""
    return shared_run("mesh_worker", lambda out: (out.mkdir(parents=True), run_worker("both", str(out), timeout=600)))


def test_lora_and_distillation_steps_on_8_devices_match_1_device(on_8_devices):
    """GPT-2's and BERT's LoRA steps on 8 devices (data parallel) and 2x4 (FSDP: the frozen base split 4 ways) equal
    one device's, step for step; so do a QLoRA Qwen3's (NF4 block kernels, their codes split over fsdp) on 2x4, and
    the distillation steps on 8."""
    losses = json.loads((on_8_devices / "losses.json").read_text())
    meshes = {"": ("8", "2x4"), "bert_": ("8", "2x4"), "qwen3_nf4_": ("2x4",)}
    for prefix in ("", "bert_", "qwen3_nf4_", "distill_", "seeded_"):  # seeded_: two seeds, the seed axis whole
        one = np.array(losses[prefix + "1"])
        for name in meshes.get(prefix, ("8",)):
            np.testing.assert_allclose(np.array(losses[prefix + name]), one, rtol=REL, atol=0, err_msg=prefix + name)
        assert len(set(np.round(np.ravel(one), 6))) > 1  # the steps really train (losses change)
    assert len(losses["qwen3_nf4_1"]) == 4
    # QLoRA under FSDP: each NF4 kernel's codes (two a byte) are split over fsdp as any frozen leaf of that size, a
    # quarter on each device: the MLP's (64 x 192: 6,144 bytes). fsdp_spec replicates a leaf under 4,096 elements,
    # so the attention kernels' codes (64 x 64: 2,048 bytes) and every kernel's absmax (one float32 per 64 weights)
    # stay whole on every device
    quantized, fsdp, whole = losses["qwen3_nf4_shardings"], str(P("fsdp")), str(P())
    codes = {p: v for p, v in quantized.items() if p.endswith("/packed")}
    assert len(codes) == len(quantized) // 2 == 2 * 7, sorted(quantized)  # 2 blocks x (q, k, v, o, gate, up, down)
    for path, (spec, shape, shard) in quantized.items():
        split = path.endswith("/packed") and shape[0] >= 4096
        assert spec == (fsdp if split else whole), (path, spec, shape)
        assert shard[0] * (4 if split else 1) == shape[0], (path, shape, shard)
    assert sorted(p for p, (s, _, _) in codes.items() if s == fsdp) == [
        f"model/layers/{i}/mlp/{m}/kernel/packed" for i in (0, 1) for m in ("down_proj", "gate_proj", "up_proj")]
    # the step hands the state back where it was placed, so every run compiled its train step once (on 2x4 the
    # split frozen base used to hand back an fsdp-split state: two more compiles)
    compiles = losses["train_step_compiles"]
    assert len(compiles) == 8 and set(compiles.values()) == {1}, compiles
    # FSDP really splits BERT's frozen base: its largest leaves, a quarter of each on every device of the 'fsdp' axis
    shardings = losses["bert_shardings"]
    assert "bert/embeddings/word_embeddings/embedding" in shardings, shardings
    for path, (spec, shape, shard) in shardings.items():
        assert "fsdp" in spec and int(np.prod(shard)) * 4 == int(np.prod(shape)), (path, spec, shape, shard)
    seeded = np.array(losses["seeded_1"])
    assert seeded.shape == (4, 2) and not np.allclose(seeded[:, 0], seeded[:, 1])  # two different seeds
    # the teacher labels a transfer set data-parallel: each batch split over every device (2 of its 16 rows on each of
    # 8), the logits of all 40 rows (a partial last batch) as one device's, kept replicated on every device
    labels = losses["labels"]
    one = np.array(labels["1"]["logits"])
    assert one.shape == (40, 2) and np.ptp(one) > 0
    for name in ("8", "2x4"):
        got = labels[name]
        # atol: logits of about 0.2 from fp32 matmuls cut into other row blocks differ by ~1e-7 where they near 0
        np.testing.assert_allclose(np.array(got["logits"]), one, rtol=REL, atol=1e-6, err_msg=name)
        assert got["replicated"] and got["devices"] == 8, got
    assert (labels["8"]["batch_devices"], labels["8"]["batch_shard_rows"]) == ([8], [2]), labels["8"]


def test_checkpoints_restore_across_meshes_8_to_1(on_8_devices):
    r = json.loads((on_8_devices / "resume.json").read_text())
    assert_resumed(r["resumed_log"], from_step=3, to_step=6)  # 48 rows / 16: epoch 2 on 1 device
    for other in ("split",):  # 8 devices then 1, against 1 device throughout
        assert len(r["one"]) == len(r[other]) == 2
        for a, b in zip(r["one"], r[other]):
            for split in ("train", "val"):
                for k in ("loss", "accuracy"):
                    np.testing.assert_allclose(b[split][k], a[split][k], rtol=REL, atol=1e-7,
                                               err_msg=f"{other} {split} {k}")
                assert a[split]["count"] == b[split]["count"] == 48


def test_indivisible_batch_and_oversized_mesh_fail_with_the_numbers():
    mesh = mesh_lib.make_mesh(MeshConfig(), devices=jax.devices() * 1)
    assert mesh_lib.check_batch_size(mesh, 8) == 8 // mesh.size
    single = mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    assert single.shape == {"data": 1, "fsdp": 1}
    with pytest.raises(mesh_lib.MeshError, match=r"mesh.data=4 x mesh.fsdp=1 = 4 devices, but only 1"):
        mesh_lib.make_mesh(MeshConfig(data=4), devices=jax.devices()[:1])
    with pytest.raises(mesh_lib.MeshError, match=r"mesh.fsdp=2 does not divide the 1 available"):
        mesh_lib.make_mesh(MeshConfig(fsdp=2), devices=jax.devices()[:1])


def test_indivisible_batch_names_both_numbers():
    class FakeMesh:
        shape = {"data": 4, "fsdp": 2}
    with pytest.raises(mesh_lib.MeshError, match=r"train.batch_size=12 is not divisible by the mesh's 8 "):
        mesh_lib.check_batch_size(FakeMesh(), 12)
    assert mesh_lib.check_batch_size(FakeMesh(), 16) == 2


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert mesh_lib.fsdp_spec((50257, 64), 4) == P(None, "fsdp")  # 50257 is odd: split the width
    assert mesh_lib.fsdp_spec((192, 64), 4) == P("fsdp", None)
    assert mesh_lib.fsdp_spec((64,), 4) == P()  # small leaves stay replicated
    assert mesh_lib.fsdp_spec((4096, 3), 1) == P()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_loopback_match_one_process(tmp_path, on_8_devices):
    """jax.distributed with gloo CPU collectives, 2 processes x 2 devices, vs one process on 4 devices (the mesh
    worker's run of the same command with mesh.data=4)."""
    repo = TESTS.parent
    common = [sys.executable, str(repo / "scripts" / "train_lora.py"), *LOOPBACK]

    def env(devices):
        return core_install_env({**os.environ, "XLA_FLAGS": host_devices(devices), "JAX_PLATFORMS": "cpu"})

    port = _free_port()
    procs = [subprocess.Popen([*common, f"run.dir={tmp_path / 'multi'}", "distributed.enabled=true",
                               f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}"], env=env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # never leave a worker behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "process 1 of 2" in outs[1][1]
    assert "over 4 device(s), 2 process(es)" in outs[0][1]
    assert "over 4 device(s), 1 process(es)" in (on_8_devices / "loopback" / "log.txt").read_text()
    a = json.loads((on_8_devices / "loopback" / "metrics.json").read_text())["epochs"]
    b = json.loads((tmp_path / "multi" / "metrics.json").read_text())["epochs"]
    assert len(a) == len(b) == 1
    for x, y in zip(a, b):
        for split in ("train", "val"):
            np.testing.assert_allclose(y[split]["loss"], x[split]["loss"], rtol=REL, err_msg=split)
            assert y[split]["accuracy"] == x[split]["accuracy"] and y[split]["count"] == x[split]["count"] == 48
