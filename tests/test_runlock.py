"""One run per save folder (neox_jax/runlock.py): a second run is refused naming the holder, before anything is
built; a crashed holder leaves no lock behind. (Two real training processes: tests/test_loop.py.)"""

import os
import signal
import socket
import subprocess
import sys

import pytest

from neox_jax.config import TrainConfig
from neox_jax.errors import ConfigError
from neox_jax.loop import train
from neox_jax.runlock import LOCK_FILE, SaveLock

from .conftest import TINY_MODEL


def test_a_run_on_a_held_save_folder_is_refused_naming_the_holder(tmp_path, corpus):
    folder = tmp_path / "ckpt"
    held = SaveLock(folder)
    assert held.acquire() is None
    cfg = TrainConfig.from_dict({"model": TINY_MODEL, "seq_length": 16, "micro_batch_size": 2, "mesh": {"data": 8},
                                 "data_paths": [corpus], "save": str(folder), "train_iters": 1})
    try:
        with pytest.raises(ConfigError, match=f"save={folder} belongs to a run that is still going: process "
                                              f"{os.getpid()} on {socket.gethostname()}, since "):
            train(cfg, show_progress=False)
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]  # nothing of the refused run was written
    finally:
        held.release()
    assert not list(folder.iterdir())  # the holder removed its file as it released
    lock = SaveLock(folder)
    assert lock.acquire() is None  # the next run takes it
    lock.release()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    code = ("import sys, time; from neox_jax.runlock import SaveLock; lock = SaveLock(sys.argv[1]); "
            "assert lock.acquire() is None; print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert SaveLock(tmp_path).acquire() == (f"process {holder.pid} on {socket.gethostname()}, since "
                                                f"{(tmp_path / LOCK_FILE).read_text().split('since')[1][4:23]}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = SaveLock(tmp_path)
    assert lock.acquire() is None  # the kernel dropped the dead process's lock
    lock.release()
