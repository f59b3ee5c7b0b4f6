"""The training loop: noise-prediction loss on cached latents, kohya's optimizers and
diffusers' schedules, gradient accumulation, clipping, checkpointing, mixed precision,
data parallelism, noise offset and min-SNR weighting, sample images.

Everything random is a function of (seed, step): the batch order (see `data`), the
noise, the timesteps, the captions' shuffles and dropouts, the flips and LyCORIS's
dropouts of each global batch. Accumulating G micro-batches of B takes the halves of
one global batch of G·B, so it trains what batch G·B trains. So a resumed run continues exactly
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
from .data import CaptionOptions, Dataset
from .models import BaseModel, _quiet, load_base, take, to_device
from .modules import LohaNetwork, NetworkSpec
from .optim import SCHEDULERS, canonical_optimizer, describe, make_optimizer, make_scheduler
from .prompts import SamplePrompt, label_image, parse_prompts
from .save import network_metadata, write_network

#: --mixed-precision values: the dtype the frozen model runs in ("no": its own, trained in fp32).
MIXED_PRECISION = {"no": None, **DTYPE_NAMES}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULES = SCHEDULERS
TRACKERS = ("", "tensorboard", "wandb")
#: Steps whose times the s/step estimate averages.
_TIMING_WINDOW = 20


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
    batch_size: int = 1  # global, per micro-step: split over the processes of a data-parallel run
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    steps: int = 1000  # optimizer steps (unless epochs says otherwise)
    epochs: int = 0  # > 0: train this many passes over the data instead of `steps`
    learning_rate: float = 1e-3
    text_encoder_lr: float | None = None  # default: learning_rate
    optimizer: str = "AdamW"  # one of optim.OPTIMIZERS (all but AdamW are optional packages)
    optimizer_args: dict = field(default_factory=dict)
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler's names
    warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = no clipping
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # base model weights and activations in fp16/bf16; LoHa factors fp32
    prediction_type: str | None = None  # default: the model's
    clip_skip: int = 1
    seed: int = 0
    noise_offset: float = 0.0  # sd-scripts' --noise_offset: noise += offset · N(0, 1) per sample and channel
    min_snr_gamma: float = 0.0  # > 0: loss weighted by min(SNR, γ)/SNR (v: /(SNR + 1)), Hang et al. 2023
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    save_every: int = 0  # intermediate file (and resume state) every N steps
    sample_every: int = 0
    sample_prompts: str = ""  # a prompt file (sd-scripts' syntax) or its lines; empty: the first caption
    sample_steps: int = 20
    save_dtype: str = "fp32"
    resume: str | None = None  # a state folder written by an earlier run
    device: str | None = None  # default: cuda if available, else cpu
    log_with: str = ""  # "tensorboard" or "wandb": loss and learning rate per step
    logging_dir: str | None = None  # default: OUT-logs
    # What the file says about itself (modelspec.* and ss_* metadata).
    title: str = ""
    author: str = ""
    description: str = ""
    license: str = ""
    tags: str = ""
    trigger_words: str = ""
    comment: str = ""

    def check(self) -> None:
        for name, value, allowed in (("lr_scheduler", self.lr_scheduler, SCHEDULES),
                                     ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
                                     ("save_dtype", self.save_dtype, tuple(DTYPE_NAMES)),
                                     ("prediction_type", self.prediction_type, (None, *PREDICTION_TYPES)),
                                     ("log_with", self.log_with, TRACKERS)):
            if value not in allowed:
                raise LohaError(f"{name} {value!r} is not one of {', '.join(map(str, allowed))}", option=name)
        canonical_optimizer(self.optimizer)
        if self.steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1 or self.epochs < 0:
            raise LohaError(f"steps ({self.steps}), batch_size ({self.batch_size}) and gradient_accumulation_steps "
                            f"({self.gradient_accumulation_steps}) must be ≥ 1, epochs ({self.epochs}) ≥ 0")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LohaError(f"{name} {getattr(self, name)} must be in [0, 1]", option=name)
        if not self.output.endswith(".safetensors"):
            raise LohaError(f"{self.output}: the output must be a .safetensors file")

    @property
    def captions(self) -> CaptionOptions:
        return CaptionOptions(self.shuffle_caption, self.keep_tokens, self.caption_dropout_rate,
                              self.caption_tag_dropout_rate)


@dataclass
class Callbacks:
    """How a UI follows a run; each is optional. `stop` ends the run after the current
    step, and the run still writes what it has."""

    progress: Callable[[int, int, float, float], None] | None = None  # step, total, loss, lr
    timing: Callable[["StepInfo"], None] | None = None  # the same step with its times
    sample: Callable[[int, list, str], None] | None = None  # step, PIL images, saved path (all side by side)
    saved: Callable[[int, str], None] | None = None  # step, file
    log: Callable[[str], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class StepInfo:
    """One finished step and how long the run takes: s/step is the mean of the last
    steps (this run's: a resumed run times only its own), ETA = s/step × steps left."""

    step: int
    total: int
    loss: float
    lr: float
    epoch: int
    elapsed: float  # seconds since this run's first step began
    seconds_per_step: float
    eta: float


@dataclass
class TrainResult:
    path: str
    steps: int
    losses: list[float]
    seconds: float
    stopped: bool
    modules: dict[str, int]
    main: bool = True  # False on the other processes of a data-parallel run (which write nothing)
    total: int = 0  # the steps the run was to take (a stopped run took fewer)


# --------------------------------------------------------------------------- pieces


def noise_schedule(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """alphas_cumprod of SD's scaled-linear DDPM schedule."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


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
        self.tracker = None

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
            self.base = load_base(config.model, config.tokenizer, config.vae, config.seed, config.prediction_type)
        _quiet()
        self.dtype = MIXED_PRECISION[config.mixed_precision] or torch.float32
        self.base.to(self.device, self.dtype)  # an fp16 checkpoint trains in fp32 unless mixed precision says otherwise
        self.prediction = config.prediction_type or self.base.prediction_type
        self.alphas = noise_schedule().to(self.device)

    @property
    def step_batch(self) -> int:
        """Images per optimizer step (all processes, all accumulated micro-batches)."""
        return self.config.batch_size * self.config.gradient_accumulation_steps

    def _encode_data(self) -> None:
        """Latents once; captions once too while the text encoder is frozen and captions do not change."""
        config, base = self.config, self.base
        self.dataset = Dataset(config.data, config.resolution, config.bucket_step, flip=config.flip_aug)
        self._log(f"encoding {len(self.dataset)} images once ({len(set(self.dataset.buckets))} buckets"
                  f"{', and mirrored' if config.flip_aug else ''})")
        self.dataset.encode(base.encode_pixels)
        self.per_epoch, self._epoch = len(self.dataset.epoch(config.seed, 0, self.step_batch)), None
        self.total = config.epochs * self.per_epoch if config.epochs else config.steps
        self.ids = self.embeddings = None
        if config.captions.active:
            return  # encoded per step
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
        """The optimizer over the UNet's and the text encoders' factors (two learning rates),
        its schedule, and the fp16 gradient scaler."""
        config = self.config
        groups = {"unet": [], "te": []}
        components = {self.network.names.names(t)[0]: t.component for t in self.network.names.targets}
        for name, module in self.network.loha.items():
            groups["unet" if components[name] == "unet" else "te"] += list(module.parameters())
        groups["unet"] += list(self.network.norms.parameters())  # train_norm: the UNet's norm layers
        te_lr = config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
        self.params = groups["unet"] + groups["te"]
        self.optimizer = make_optimizer(
            config.optimizer, [g for g in ({"params": groups["unet"], "lr": config.learning_rate},
                                           {"params": groups["te"], "lr": te_lr}) if g["params"]],
            config.weight_decay, config.optimizer_args)
        self.scheduler = make_scheduler(config.lr_scheduler, self.optimizer, config.warmup_steps, self.total,
                                        config.lr_scheduler_num_cycles, config.lr_scheduler_power)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16
                                           and self.device.type == "cuda")

    # ----------------------------------------------------------------- one step

    def _batch(self, step: int) -> list[int]:
        """The global batch of an optimizer step (every epoch has the same number of batches)."""
        epoch, index = divmod(step, self.per_epoch)
        if self._epoch != epoch:
            self._epoch, self._batches = epoch, self.dataset.epoch(self.config.seed, epoch, self.step_batch)
        return self._batches[index]

    def _draws(self, step: int, batch: list[int]) -> dict:
        """The random choices of a step's global batch (one bucket): noise, timesteps, then (only
        when asked for, so runs without them draw what they always drew) noise offsets, flips, captions."""
        config, count = self.config, len(batch)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        shape = (count, *self.dataset.latents[batch[0]].shape)
        out = {"noise": torch.randn(shape, generator=generator),
               "timesteps": torch.randint(0, len(self.alphas), (count,), generator=generator)}
        if config.noise_offset:
            out["noise"] += config.noise_offset * torch.randn((count, shape[1], 1, 1), generator=generator)
        extra = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 7_919 * 1_000_003)
        out["flips"] = (torch.rand(count, generator=extra) < 0.5).tolist() if config.flip_aug else [False] * count
        out["extra"] = extra
        return out

    def _loss(self, step: int, micro: int = 0) -> torch.Tensor:
        """The loss of this process's share of micro-batch `micro` of a step's global batch."""
        config, processes = self.config, self.processes
        batch = self._batch(step)
        draws = self._draws(step, batch)
        captions = None
        if config.captions.active:
            captions = [config.captions.apply(self.dataset.captions[i], draws["extra"]) for i in batch]
        share = config.batch_size // processes.world
        start = micro * config.batch_size + processes.rank * share
        mine = slice(start, start + share)
        batch, flips = batch[mine], draws["flips"][mine]
        noise, timesteps = draws["noise"][mine].to(self.device), draws["timesteps"][mine].to(self.device)
        latents = torch.stack([self.dataset.latent(i, f) for i, f in zip(batch, flips)]).to(self.device)

        a = self.alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = noise if self.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        pred = self.base.predict(noisy, timesteps, self._context(batch, captions and captions[mine]))
        loss = torch.nn.functional.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            snr = (a / (1 - a)).view(-1)
            divisor = snr + 1 if self.prediction == "v_prediction" else snr
            weight = torch.clamp(snr, max=config.min_snr_gamma) / divisor
            loss = loss * weight
        return loss.mean()

    def _context(self, batch: list[int], captions: list[str] | None):
        """The UNet's conditioning for a batch: cached, or encoded now (changed captions, or a
        text encoder in training)."""
        config, base = self.config, self.base
        if captions is None and self.embeddings is not None:
            return take(self.embeddings, batch)  # a tensor, or SDXL's (context, pooled)
        ids = base.tokenize(captions) if captions is not None else take(self.ids, batch)
        ids = to_device(ids, self.device)
        if config.network.text_encoder:
            return base.encode_text(ids, config.clip_skip)
        with torch.no_grad():
            return base.encode_text(ids, config.clip_skip)

    def _train_step(self) -> float:
        config = self.config
        self.optimizer.zero_grad(set_to_none=False)
        accumulate = config.gradient_accumulation_steps
        reported = torch.zeros(1, device=self.device)
        for micro in range(accumulate):
            dropout = config.network.rank_dropout or config.network.module_dropout
            self.network.draw_dropout(torch.Generator().manual_seed(
                (config.seed * 1_000_003 + self.step) * 31 + micro) if dropout else None)
            loss = self._loss(self.step, micro) / accumulate
            self.scaler.scale(loss).backward()
            reported += loss.detach().reshape(1)
        self.network.draw_dropout(None)
        grads = [p.grad for p in self.params]
        self.processes.average(grads + [reported])
        self.scaler.unscale_(self.optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return reported.item()

    # ----------------------------------------------------------------- files

    def _paths(self) -> dict[str, str]:
        stem = self.config.output.removesuffix(".safetensors")
        return {"state": f"{stem}-state", "samples": f"{stem}-samples",
                "logs": self.config.logging_dir or f"{stem}-logs"}

    def save(self, path: str) -> str:
        config = self.config
        settings = {
            "learning_rate": config.learning_rate, "unet_lr": config.learning_rate,
            "text_encoder_lr": config.text_encoder_lr if config.network.text_encoder else None,
            "lr_scheduler": config.lr_scheduler, "lr_warmup_steps": config.warmup_steps,
            "max_grad_norm": config.max_grad_norm, "mixed_precision": config.mixed_precision,
            "seed": config.seed, "resolution": f"({config.resolution}, {config.resolution})",
            "total_batch_size": self.step_batch,
            "batch_size_per_device": config.batch_size // self.processes.world,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "gradient_checkpointing": config.gradient_checkpointing, "clip_skip": config.clip_skip,
            "max_train_steps": self.total,
            "optimizer": describe(self.optimizer, config.weight_decay, config.optimizer_args),
            "v_parameterization": self.prediction == "v_prediction", "sd_model_name": self.base.name,
            "num_batches_per_epoch": self.per_epoch, "epoch": self.step // self.per_epoch,
            "num_epochs": math.ceil(self.total / self.per_epoch),
            "noise_offset": config.noise_offset or None, "min_snr_gamma": config.min_snr_gamma or None,
            "shuffle_caption": config.shuffle_caption, "keep_tokens": config.keep_tokens,
            "caption_dropout_rate": config.caption_dropout_rate,
            "caption_tag_dropout_rate": config.caption_tag_dropout_rate, "flip_aug": config.flip_aug,
            "training_comment": config.comment or None,
        }
        name = os.path.splitext(os.path.basename(config.output))[0]
        about = {"title": config.title or name, "author": config.author, "description": config.description,
                 "license": config.license, "tags": config.tags, "trigger_phrase": config.trigger_words,
                 "prediction_type": self.prediction}
        meta = network_metadata(config.network, self.network.family, name=name, started_at=self.started_at,
                                steps=self.step, settings=settings, tag_frequency=self.dataset.tag_frequency,
                                dataset=self.dataset.dirs, about=about, resolution=config.resolution)
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

        from .settings import differences

        path = os.path.join(folder, "trainer.json")
        if not os.path.isfile(path):
            raise LohaError(f"{folder}: not a training state folder (no trainer.json)")
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        blocking, notes = differences(info.get("config", {}), _jsonable(self.config))
        if blocking:
            raise LohaError(f"{folder}: the saved run differs where a resume cannot follow: " + "; ".join(blocking)
                            + " (set them as saved, or start a new run)", option="resume")
        for note in notes:
            self._log(f"resume: {note}")
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
    def sample(self, prompt: str | SamplePrompt, steps: int | None = None, seed: int | None = None,
               count: int = 1) -> list:
        """DDIM (η = 0) images from the model with the network as trained so far; a `SamplePrompt`
        brings its own negative prompt, size, steps, guidance scale and seed."""
        from PIL import Image

        base, config = self.base, self.config
        if not isinstance(prompt, SamplePrompt):
            prompt = SamplePrompt(prompt, steps=steps, seed=seed)
        width, height = prompt.width or config.resolution, prompt.height or config.resolution
        steps, seed = prompt.steps or config.sample_steps, config.seed if prompt.seed is None else prompt.seed
        guided = prompt.scale is not None and prompt.scale != 1.0
        context = base.encode_captions([prompt.prompt] * count, config.clip_skip)
        if guided:
            negative = base.encode_captions([prompt.negative] * count, config.clip_skip)
        generator = torch.Generator().manual_seed(seed)
        shape = (count, base.latent_channels, height // base.vae_factor, width // base.vae_factor)
        x = torch.randn(shape, generator=generator).to(self.device)
        times = torch.linspace(len(self.alphas) - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(times):
            a = self.alphas[t]
            a_next = self.alphas[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0)
            ts = torch.tensor([t] * count, device=self.device)
            out = base.predict(x, ts, context).float()
            if guided:
                out = base.predict(x, ts, negative).float() * (1 - prompt.scale) + out * prompt.scale
            if self.prediction == "epsilon":
                eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
            else:
                x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        pixels = base.decode_latents(x).float()
        arrays = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]

    def _samples(self) -> None:
        """One image per prompt (two of the first caption when there are none), each labelled
        with the step, saved alone and side by side in OUT-samples/."""
        config = self.config
        prompts = parse_prompts(config.sample_prompts)
        if prompts:
            images = [image for p in prompts for image in self.sample(p)]
        else:
            images = self.sample(self.dataset.captions[0], config.sample_steps, config.seed, 2)
        images = [label_image(image, f"step {self.step}") for image in images]
        folder = self._paths()["samples"]
        os.makedirs(folder, exist_ok=True)
        for index, image in enumerate(images):
            image.save(os.path.join(folder, f"step{self.step:06d}-{index:02d}.png"))
        path = os.path.join(folder, f"step{self.step:06d}.png")
        _side_by_side(images).save(path)
        if self.callbacks.sample:
            self.callbacks.sample(self.step, images, path)

    # ----------------------------------------------------------------- run

    def run(self) -> TrainResult:
        config, callbacks, processes = self.config, self.callbacks, self.processes
        clock = time.perf_counter()
        try:
            self._prepare()
            counts = self.network.counts()
            norms = f" and {counts['norms']} norm layers (train_norm)" if "norms" in counts else ""
            loha = {k: v for k, v in counts.items() if k != "norms"}
            self._log(f"training {sum(loha.values())} LoHa modules ({loha}){norms} for {self.total} steps "
                      f"({self.total / self.per_epoch:.3g} epochs of {self.per_epoch}), {self.step_batch} images a "
                      f"step on {processes.world} process(es), {self.device}, {canonical_optimizer(config.optimizer)}")
            if config.log_with and processes.main:
                from .trackers import open_tracker

                self.tracker = open_tracker(config.log_with, self._paths()["logs"], _jsonable(config))
            stopped = False
            first, times = self.step, []
            begun = time.perf_counter()
            while self.step < self.total:
                if processes.flag(callbacks.stop.is_set()):
                    stopped = True
                    self._log(f"stopped at step {self.step} of {self.total}; saving what it has")
                    break
                started = time.perf_counter()
                loss = self._train_step()
                if not math.isfinite(loss):
                    raise LohaError(f"loss became {loss} at step {self.step}; lower the learning rate")
                self.losses.append(loss)
                times = (times + [time.perf_counter() - started])[-_TIMING_WINDOW:]
                lr = self.scheduler.get_last_lr()[0]
                if processes.main:
                    self._report(loss, lr, begun, times, first)
                last = self.step == self.total
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
                               processes.main, self.total)
        finally:
            if self.tracker is not None:
                self.tracker.close()
            if getattr(self, "network", None) is not None:
                self.network.detach()
            processes.close()

    def _report(self, loss: float, lr: float, begun: float, times: list[float], first: int) -> None:
        callbacks = self.callbacks
        if callbacks.progress:
            callbacks.progress(self.step, self.total, loss, lr)
        if callbacks.timing:
            per_step = sum(times) / len(times)
            callbacks.timing(StepInfo(self.step, self.total, loss, lr, self.step // self.per_epoch,
                                      time.perf_counter() - begun, per_step, per_step * (self.total - self.step)))
        if self.tracker is not None:
            self.tracker.log({"loss": loss, "lr": lr}, self.step)


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
