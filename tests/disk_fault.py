"""A real file-system failure in the middle of a run: `python disk_fault.py MOUNT WHEN HOW -- lora-kd-jax args...`
runs the command line in this process and, just before the chosen write, fills the file system mounted at MOUNT (or
makes it read-only), so that the write fails the way it fails for a user: Orbax and tensorstore meet ENOSPC (EROFS)
themselves, nothing is raised by hand.

WHEN: `best:STEP` or `latest:STEP` (that checkpoint manager's write of that step: Orbax's save, or latest's copy of
the step best has just written) or `metrics:N` (the N-th write of
metrics.json). HOW: `fill:BYTES` (fill MOUNT/filler, then leave BYTES free: 0 fails the first file a save creates,
a few pages fail tensorstore's array writes) or `readonly` (MOUNT/run/checkpoints becomes read-only).
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path


def fill(mount: Path, leave: int) -> None:
    """Fill the file system with MOUNT/filler until it refuses a byte, then give back `leave` bytes."""
    filler = mount / "filler"
    with open(filler, "ab", buffering=0) as f:
        chunk = 1 << 20
        while chunk:
            try:
                f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                chunk //= 2
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def main(argv: list[str]) -> None:
    mount, when, how = Path(argv[0]), argv[1], argv[2]
    assert argv[3] == "--"
    target, _, number = when.partition(":")
    number = int(number)

    def fault() -> None:
        if how == "readonly":  # the checkpoints dir becomes a read-only bind mount (log.txt stays open for writing)
            checkpoints = mount / "run" / "checkpoints"
            subprocess.run(["mount", "--bind", str(checkpoints), str(checkpoints)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(checkpoints)], check=True)
        else:
            fill(mount, int(how.split(":")[1]))
        print(f"disk_fault: {how} before {when}", file=sys.stderr, flush=True)

    if target == "metrics":
        from lora_kd_jax.runs import rundir

        real_write, calls = rundir.write_metrics, {"n": 0}

        def write_metrics(run_dir, record):
            calls["n"] += 1
            if calls["n"] == number:
                fault()
            return real_write(run_dir, record)

        rundir.write_metrics = write_metrics
    else:  # that manager's write of that step, whether an Orbax save or the copy of a step best has just written
        from lora_kd_jax.runs.checkpoint import CheckpointStore

        real_write, real_copy = CheckpointStore._write, CheckpointStore._copy

        def due(manager, step) -> None:
            if Path(manager.directory).name == target and step == number:
                fault()

        def write(self, manager, step, *args):
            due(manager, step)
            return real_write(self, manager, step, *args)

        def copy(self, source, manager, step):
            due(manager, step)
            return real_copy(self, source, manager, step)

        CheckpointStore._write, CheckpointStore._copy = write, copy
    from lora_kd_jax.commands import cli

    cli.main(argv[4:])


if __name__ == "__main__":
    main(sys.argv[1:])
