"""The LoHa trainer: LoHa modules with a memory-saving ΔW autograd, a kohya-style
dataset, a noise-prediction training loop, and LyCORIS/kohya files as output.

    from loha.train import TrainConfig, NetworkSpec, train, SAMPLE_DATA
    result = train(TrainConfig(data=SAMPLE_DATA, output="out/shapes.safetensors",
                               model="demo", resolution=128, steps=200))
"""

import os

from .loop import Callbacks, TrainConfig, TrainResult, Trainer, train
from .modules import PRESETS, LohaNetwork, NetworkSpec

#: A dozen generated images with captions (two folders, two aspect buckets) that ship
#: with the package, so the trainer runs out of the box on the demo model.
SAMPLE_DATA = os.path.join(os.path.dirname(__file__), "sample_data")

__all__ = ["Callbacks", "LohaNetwork", "NetworkSpec", "PRESETS", "SAMPLE_DATA", "TrainConfig", "TrainResult",
           "Trainer", "train"]
