"""Where training metrics go: TensorBoard event files (tensorboardX: no TensorFlow needed) and, when asked
and installed, Weights & Biases. Only process 0 logs; the other processes of a launch get a logger that
writes nothing."""

from __future__ import annotations

import os


class MetricsLogger:
    """Scalar metrics by step to TensorBoard and wandb; the console line is the training loop's."""

    def __init__(self, tensorboard_dir: str | os.PathLike = "", wandb_project: str = "", config: dict | None = None,
                 enabled: bool = True):
        self.tb = self.wandb = None
        if wandb_project:
            from importlib.util import find_spec

            if find_spec("wandb") is None:  # checked on every process, so they all stop
                raise ImportError(f"wandb_project={wandb_project!r} is set but wandb is not installed: "
                                  "pip install wandb, or remove wandb_project")
        if not enabled:
            return
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir), flush_secs=10)
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, step: int, values: dict[str, float]):
        if self.tb:
            for tag, value in values.items():
                self.tb.add_scalar(tag, float(value), step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
