"""Loss and learning rate per step to TensorBoard or Weights & Biases (sd-scripts' ``log_with``).

TensorBoard through `torch.utils.tensorboard` (needs the tensorboard package), wandb
through its own client; both are optional and a missing one is one line saying what to install.
"""

from __future__ import annotations

import os
import time

from ..errors import LohaError


class _TensorBoard:
    def __init__(self, folder: str, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LohaError("log_with tensorboard needs the tensorboard package: pip install tensorboard",
                            option="log_with") from None
        self.folder = os.path.join(folder, time.strftime("%Y%m%d-%H%M%S"))
        self.writer = SummaryWriter(self.folder)
        self.writer.add_text("config", f"```\n{config}\n```")

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, folder: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise LohaError("log_with wandb needs the wandb package: pip install wandb", option="log_with") from None
        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(project="loha", dir=folder, config=config)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, folder: str, config: dict):
    return {"tensorboard": _TensorBoard, "wandb": _Wandb}[kind](folder, config)
