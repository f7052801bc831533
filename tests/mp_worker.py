"""One process of a multi-process test: runs `neox-jax ARGS...` and records which training samples it read
(into OUT.<process id>.json), so the test can check that each process reads only its own rows."""

import json
import os
import sys

from neox_jax.data import dataset


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    read: list[int] = []
    init, getitem = dataset.GPTDataset.__init__, dataset.GPTDataset.__getitem__

    def named_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.split_name = args[5] if len(args) > 5 else kwargs.get("name", "train")

    def counting_getitem(self, i):
        if self.split_name == "train":
            read.append(int(i))
        return getitem(self, i)

    dataset.GPTDataset.__init__, dataset.GPTDataset.__getitem__ = named_init, counting_getitem
    from neox_jax.cli import main as cli

    sys.argv = ["neox-jax", *argv]
    code = cli()  # as the command itself: signals handled as `neox-jax` handles them (neox_jax/interrupts.py)
    with open(f"{out}.{os.environ.get('NEOX_PROCESS_ID', 0)}.json", "w") as f:
        json.dump(read, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
