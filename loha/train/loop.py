"""The training loop: noise-prediction loss on cached latents, AdamW, a learning-rate
schedule, gradient clipping, checkpointing, mixed precision, data parallelism.

Everything random is a function of (seed, step): the batch order (see `data`), the
noise and the timesteps of each global batch. So a resumed run continues exactly
where it stopped, and N processes that each take 1/N of every global batch and
average their gradients compute what one process computes with the whole batch.
Processes come from ``accelerate launch`` / ``torchrun`` (the usual environment
variables); CPU processes talk over gloo, GPUs over NCCL.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..errors import LohaError
from ..files.safetensors_io import DTYPE_NAMES
from .data import Dataset
from .models import BaseModel, _quiet, load_base, take, to_device
from .modules import LohaNetwork, NetworkSpec
from .save import network_metadata, write_network

#: --mixed-precision values: the dtype the frozen model runs in ("no": its own, trained in fp32).
MIXED_PRECISION = {"no": None, **DTYPE_NAMES}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Every setting of a run (the CLI, the UI tab and the ComfyUI node fill this)."""

    data: str
    output: str  # the final .safetensors file; intermediate saves go next to it
    model: str = "demo"  # "demo", a diffusers folder or an SD1.x/SD2.x/SDXL checkpoint file
    tokenizer: str | None = None
    vae: str | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)
    resolution: int = 512
    bucket_step: int = 64
    batch_size: int = 1  # global: split over the processes of a data-parallel run
    steps: int = 1000
    learning_rate: float = 1e-3
    text_encoder_lr: float | None = None  # default: learning_rate
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = no clipping
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # base model weights and activations in fp16/bf16; LoHa factors fp32
    prediction_type: str | None = None  # default: the model's
    clip_skip: int = 1
    seed: int = 0
    save_every: int = 0  # intermediate file (and resume state) every N steps
    sample_every: int = 0
    sample_prompt: str = ""
    sample_steps: int = 20
    save_dtype: str = "fp32"
    resume: str | None = None  # a state folder written by an earlier run
    device: str | None = None  # default: cuda if available, else cpu

    def check(self) -> None:
        for name, value, allowed in (("lr_scheduler", self.lr_scheduler, SCHEDULES),
                                     ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
                                     ("save_dtype", self.save_dtype, tuple(DTYPE_NAMES)),
                                     ("prediction_type", self.prediction_type, (None, *PREDICTION_TYPES))):
            if value not in allowed:
                raise LohaError(f"{name} {value!r} is not one of {', '.join(map(str, allowed))}")
        if self.steps < 1 or self.batch_size < 1:
            raise LohaError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be ≥ 1")
        if not self.output.endswith(".safetensors"):
            raise LohaError(f"{self.output}: the output must be a .safetensors file")


@dataclass
class Callbacks:
    """How a UI follows a run; each is optional. `stop` ends the run after the current
    step, and the run still writes what it has."""

    progress: Callable[[int, int, float, float], None] | None = None  # step, total, loss, lr
    sample: Callable[[int, list, str], None] | None = None  # step, PIL images, saved path
    saved: Callable[[int, str], None] | None = None  # step, file
    log: Callable[[str], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class TrainResult:
    path: str
    steps: int
    losses: list[float]
    seconds: float
    stopped: bool
    modules: dict[str, int]
    main: bool = True  # False on the other processes of a data-parallel run (which write nothing)


# --------------------------------------------------------------------------- pieces


def noise_schedule(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """alphas_cumprod of SD's scaled-linear DDPM schedule."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]
    return factor


class _Processes:
    """Rank and world size, and gradient averaging across processes."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce in one flat buffer, so each step costs one collective."""
        if self.world == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def flag(self, value: bool) -> bool:
        """True on every process if it is true on any (so a Stop ends them all)."""
        if self.world == 1:
            return value
        flag = torch.tensor([float(value)])
        self.dist.all_reduce(flag)
        return bool(flag.item())

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------- the run


class Trainer:
    """One run; `run()` trains, saves and returns a TrainResult."""

    def __init__(self, config: TrainConfig, callbacks: Callbacks | None = None, base: BaseModel | None = None):
        config.check()
        self.config = config
        self.callbacks = callbacks or Callbacks()
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processes = _Processes(self.device)
        if config.batch_size % self.processes.world:
            raise LohaError(f"batch size {config.batch_size} does not split over {self.processes.world} processes")
        self.base = base
        self.started_at = time.time()

    def _log(self, message: str) -> None:
        if self.callbacks.log and self.processes.main:
            self.callbacks.log(message)

    def _prepare(self) -> None:
        """Everything before the first step, in order."""
        torch.manual_seed(self.config.seed)
        self._load_base()
        self._encode_data()
        self._attach_network()
        self._make_optimizer()
        self.step = 0
        self.losses: list[float] = []
        if self.config.resume:
            self._load_state(self.config.resume)

    def _load_base(self) -> None:
        config = self.config
        if self.base is None:
            self._log(f"loading {config.model}")
            self.base = load_base(config.model, config.tokenizer, config.vae, config.seed)
        _quiet()
        self.dtype = MIXED_PRECISION[config.mixed_precision] or torch.float32
        self.base.to(self.device, self.dtype)  # an fp16 checkpoint trains in fp32 unless mixed precision says otherwise
        self.prediction = config.prediction_type or self.base.prediction_type
        self.alphas = noise_schedule().to(self.device)

    def _encode_data(self) -> None:
        """Latents once; captions once too while the text encoder is frozen."""
        config, base = self.config, self.base
        self.dataset = Dataset(config.data, config.resolution, config.bucket_step)
        self._log(f"encoding {len(self.dataset)} images once ({len(set(self.dataset.buckets))} buckets)")
        self.dataset.encode(base.encode_pixels)
        self.per_epoch, self._epoch = len(self.dataset.epoch(config.seed, 0, config.batch_size)), None
        self.ids = self.embeddings = None
        if config.network.text_encoder:
            self.ids = base.tokenize(self.dataset.captions)
        else:
            with torch.no_grad():
                self.embeddings = base.encode_captions(self.dataset.captions, config.clip_skip)

    def _attach_network(self) -> None:
        config = self.config
        self.network = LohaNetwork(self.base.parts(), config.network, seed=config.seed).attach()
        self.base.modes(config.gradient_checkpointing, config.network.text_encoder)
        # Every factor gets a gradient tensor now: layers that cannot reach the loss (the last
        # text-encoder layer when the context is a penultimate layer, as SDXL's is) keep a
        # zero one, so processes average one same-sized buffer and every run steps alike.
        for param in self.network.parameters():
            param.grad = torch.zeros_like(param)

    def _make_optimizer(self) -> None:
        """AdamW over the UNet's and the text encoders' factors (two learning rates), its
        schedule, and the fp16 gradient scaler."""
        config = self.config
        groups = {"unet": [], "te": []}
        components = {self.network.names.names(t)[0]: t.component for t in self.network.names.targets}
        for name, module in self.network.loha.items():
            groups["unet" if components[name] == "unet" else "te"] += list(module.parameters())
        te_lr = config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
        self.params = groups["unet"] + groups["te"]
        self.optimizer = torch.optim.AdamW(
            [g for g in ({"params": groups["unet"], "lr": config.learning_rate},
                         {"params": groups["te"], "lr": te_lr}) if g["params"]],
            weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.lr_scheduler, config.warmup_steps, config.steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16
                                           and self.device.type == "cuda")

    # ----------------------------------------------------------------- one step

    def _batch(self, step: int) -> list[int]:
        """The global batch of a step (every epoch has the same number of batches)."""
        epoch, index = divmod(step, self.per_epoch)
        if self._epoch != epoch:
            self._epoch, self._batches = epoch, self.dataset.epoch(self.config.seed, epoch, self.config.batch_size)
        return self._batches[index]

    def _loss(self, step: int) -> torch.Tensor:
        config, processes = self.config, self.processes
        batch = self._batch(step)
        latents = torch.stack([self.dataset.latents[i] for i in batch]).to(self.device)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, len(self.alphas), (len(batch),), generator=generator).to(self.device)
        share = len(batch) // processes.world
        mine = slice(processes.rank * share, (processes.rank + 1) * share)
        latents, noise, timesteps = latents[mine], noise[mine], timesteps[mine]
        batch = batch[mine]

        a = self.alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = noise if self.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        if self.embeddings is not None:
            context = take(self.embeddings, batch)  # a tensor, or SDXL's (context, pooled)
        else:
            context = self.base.encode_text(to_device(take(self.ids, batch), self.device), config.clip_skip)
        pred = self.base.predict(noisy, timesteps, context)
        return torch.nn.functional.mse_loss(pred.float(), target)

    def _train_step(self) -> float:
        self.optimizer.zero_grad(set_to_none=False)
        loss = self._loss(self.step)
        self.scaler.scale(loss).backward()
        grads = [p.grad for p in self.params]
        reported = loss.detach().reshape(1).clone()
        self.processes.average(grads + [reported])
        self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return reported.item()

    # ----------------------------------------------------------------- files

    def _paths(self) -> dict[str, str]:
        stem = self.config.output.removesuffix(".safetensors")
        return {"state": f"{stem}-state", "samples": f"{stem}-samples"}

    def save(self, path: str) -> str:
        config = self.config
        settings = {
            "learning_rate": config.learning_rate, "unet_lr": config.learning_rate,
            "text_encoder_lr": config.text_encoder_lr if config.network.text_encoder else None,
            "lr_scheduler": config.lr_scheduler, "lr_warmup_steps": config.warmup_steps,
            "max_grad_norm": config.max_grad_norm, "mixed_precision": config.mixed_precision,
            "seed": config.seed, "resolution": f"({config.resolution}, {config.resolution})",
            "total_batch_size": config.batch_size,
            "batch_size_per_device": config.batch_size // self.processes.world,
            "gradient_checkpointing": config.gradient_checkpointing, "clip_skip": config.clip_skip,
            "max_train_steps": config.steps, "optimizer": f"torch.optim.AdamW(weight_decay={config.weight_decay})",
            "v_parameterization": self.prediction == "v_prediction", "sd_model_name": self.base.name,
            "num_batches_per_epoch": self.per_epoch, "epoch": self.step // self.per_epoch,
        }
        name = os.path.splitext(os.path.basename(config.output))[0]
        meta = network_metadata(config.network, self.network.family, name=name, started_at=self.started_at,
                                steps=self.step, settings=settings, tag_frequency=self.dataset.tag_frequency,
                                dataset=self.dataset.dirs)
        tensors = self.network.file_tensors(DTYPE_NAMES[config.save_dtype])
        return write_network(tensors, path, meta)

    def _save_state(self) -> None:
        folder = self._paths()["state"]
        os.makedirs(folder, exist_ok=True)
        write_network(self.network.file_tensors(torch.float32), os.path.join(folder, "network.safetensors"), {})
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}, os.path.join(folder, "optimizer.pt"))
        with open(os.path.join(folder, "trainer.json"), "w", encoding="utf-8") as f:
            json.dump({"step": self.step, "losses": self.losses, "config": _jsonable(self.config)}, f)

    def _load_state(self, folder: str) -> None:
        from safetensors.torch import load_file

        path = os.path.join(folder, "trainer.json")
        if not os.path.isfile(path):
            raise LohaError(f"{folder}: not a training state folder (no trainer.json)")
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        network_file = os.path.join(folder, "network.safetensors")
        self.network.load_file_tensors(load_file(network_file), network_file)
        state = torch.load(os.path.join(folder, "optimizer.pt"), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.losses = info["step"], info["losses"]
        self._log(f"resumed from {folder} at step {self.step}")

    # ----------------------------------------------------------------- samples

    @torch.no_grad()
    def sample(self, prompt: str, steps: int, seed: int, count: int = 1) -> list:
        """DDIM (η = 0) images from the model with the network as trained so far."""
        from PIL import Image

        base, config = self.base, self.config
        context = base.encode_captions([prompt] * count, config.clip_skip)
        size = config.resolution // base.vae_factor
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((count, base.latent_channels, size, size), generator=generator).to(self.device)
        times = torch.linspace(len(self.alphas) - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(times):
            a = self.alphas[t]
            a_next = self.alphas[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0)
            out = base.predict(x, torch.tensor([t] * count, device=self.device), context).float()
            if self.prediction == "epsilon":
                eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
            else:
                x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        pixels = base.decode_latents(x).float()
        arrays = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]

    def _samples(self) -> None:
        config = self.config
        images = self.sample(config.sample_prompt or self.dataset.captions[0], config.sample_steps, config.seed, 2)
        folder = self._paths()["samples"]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step{self.step:06d}.png")
        strip = _side_by_side(images)
        strip.save(path)
        if self.callbacks.sample:
            self.callbacks.sample(self.step, images, path)

    # ----------------------------------------------------------------- run

    def run(self) -> TrainResult:
        config, callbacks, processes = self.config, self.callbacks, self.processes
        clock = time.perf_counter()
        try:
            self._prepare()
            counts = self.network.counts()
            self._log(f"training {sum(counts.values())} LoHa modules ({counts}) for {config.steps} steps, "
                      f"global batch {config.batch_size} on {processes.world} process(es), {self.device}")
            stopped = False
            while self.step < config.steps:
                if processes.flag(callbacks.stop.is_set()):
                    stopped = True
                    self._log(f"stopped at step {self.step}; saving what it has")
                    break
                loss = self._train_step()
                if not math.isfinite(loss):
                    raise LohaError(f"loss became {loss} at step {self.step}; lower the learning rate")
                self.losses.append(loss)
                if callbacks.progress and processes.main:
                    callbacks.progress(self.step, config.steps, loss, self.scheduler.get_last_lr()[0])
                last = self.step == config.steps
                if config.save_every and self.step % config.save_every == 0 and not last and processes.main:
                    stem = config.output.removesuffix(".safetensors")
                    path = self.save(f"{stem}-step{self.step:06d}.safetensors")
                    self._save_state()
                    if callbacks.saved:
                        callbacks.saved(self.step, path)
                if config.sample_every and self.step % config.sample_every == 0 and processes.main:
                    self._samples()
            path = config.output
            if processes.main:
                self.save(path)
                self._save_state()
                if callbacks.saved:
                    callbacks.saved(self.step, path)
            return TrainResult(path, self.step, list(self.losses), time.perf_counter() - clock, stopped, counts,
                               processes.main)
        finally:
            if getattr(self, "network", None) is not None:
                self.network.detach()
            processes.close()


def train(config: TrainConfig, callbacks: Callbacks | None = None, base: BaseModel | None = None) -> TrainResult:
    """Train a LoHa as `config` says; the file is at `result.path`."""
    return Trainer(config, callbacks, base).run()


def _side_by_side(images: list):
    from PIL import Image

    strip = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    return strip


def _jsonable(config: TrainConfig) -> dict:
    return asdict(config)
