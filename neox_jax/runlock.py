"""One run per save folder.

Two runs writing checkpoints into one `save` folder would overwrite each other's steps. A run's process 0 holds an
exclusive `flock` on `SAVE/.neox-jax.lock` for as long as it trains and removes the file as it ends; the kernel drops
the lock when the process ends however it ends, so a crashed run never leaves it stuck (its file stays, and the next
run takes it over). The file says who holds it (host, process id, start time), so a refused run can say by whom.
Every process of a run learns process 0's verdict through one collective, so all of them refuse together.
`flock` holds across hosts where the save folder's filesystem supports it (local disks; NFS v4 and Lustre with
locking enabled).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from neox_jax.errors import ConfigError

LOCK_FILE = ".neox-jax.lock"


class SaveLock:
    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self.file = None

    def acquire(self) -> str | None:
        """Take the lock; None when taken, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            file = open(self.path, "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip()
                file.close()
                try:
                    h = json.loads(holder)
                    return f"process {h['pid']} on {h['host']}, since {h['since']}"
                except (ValueError, KeyError, TypeError):
                    return "another process (its lock file names no holder yet)"
            try:  # the file we locked is still the one at the path (a holder removes it as it releases)
                if os.stat(self.path).st_ino == os.fstat(file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            file.close()
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "since": datetime.datetime.now().isoformat(timespec="seconds")}))
        file.flush()
        self.file = file
        return None

    def release(self):
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a newcomer then locks a file of its own
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def lock_save_folder(folder: str) -> SaveLock:
    """Process 0 takes the folder's lock and every process raises the same ConfigError when another run holds it.
    Call with a backend started (the verdict is one collective across processes)."""
    import jax
    import numpy as np

    lock = SaveLock(folder)
    holder = lock.acquire() if jax.process_index() == 0 else None
    refused = holder is not None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refused:
        raise ConfigError(f"save={folder} belongs to a run that is still going: {holder or 'process 0 says so'}; "
                          "wait for it to end, or give this run another `save` folder")
    return lock
