"""The dataset, kohya style: images with same-name .txt captions, ``N_name/`` repeats,
aspect-ratio buckets, latents encoded once.

Captions can change every step as sd-scripts changes them (`CaptionOptions`: shuffle the
comma-separated tags after the first ``keep_tokens``, drop tags or the whole caption),
and images can be mirrored (``flip_aug``: both sides are encoded once); each draw is a
function of (seed, step, place in the batch).

A folder ``5_shapes/`` contributes each of its images 5 times per epoch; images
directly in the root count once. An image without a .txt takes its folder's name
(after ``N_``) as caption, as kohya's DreamBooth folders do. Each image goes to the
bucket (width, height ≤ resolution², multiples of ``step``) whose aspect ratio is
nearest its own, is scaled to cover it and centre-cropped. Batches come from one
bucket; the order is a function of (seed, epoch) only, so a resumed run and every
process of a data-parallel run see the same global batches.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import LohaError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class Item:
    path: str
    caption: str
    folder: str  # the folder's name as the dataset metadata records it
    repeats: int
    size: tuple[int, int]  # (width, height) of the image file


@dataclass(frozen=True)
class CaptionOptions:
    """sd-scripts' caption handling: ``shuffle_caption``, ``keep_tokens``, ``caption_dropout_rate``,
    ``caption_tag_dropout_rate`` (tags are the comma-separated parts; the kept ones are never
    shuffled or dropped)."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0

    def apply(self, caption: str, generator: torch.Generator) -> str:
        """One draw of `caption` (the same number of draws whatever the caption, so later draws
        of a batch do not depend on earlier captions' lengths)."""
        drop_all = torch.rand((), generator=generator).item() < self.dropout_rate
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens:]
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        local = torch.Generator().manual_seed(seed)
        if self.tag_dropout_rate:
            rest = [t for t, r in zip(rest, torch.rand(len(rest), generator=local).tolist())
                    if r >= self.tag_dropout_rate]
        if self.shuffle:
            rest = [rest[i] for i in torch.randperm(len(rest), generator=local).tolist()]
        return "" if drop_all else ", ".join(kept + rest)


def scan(root: str) -> list[Item]:
    """Every image under `root` (one level of ``N_name`` folders), sorted by path."""
    from PIL import Image

    if not os.path.isdir(root):
        raise LohaError(f"{root}: no such dataset folder")
    folders = [(root, os.path.basename(os.path.normpath(root)), 1)]
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        match = _REPEATS.match(entry.name)
        if entry.is_dir() and match:
            folders.append((entry.path, entry.name, int(match.group(1))))
    items = []
    for folder, name, repeats in folders:
        fallback = _REPEATS.sub(r"\2", name).replace("_", " ")
        for file in sorted(os.listdir(folder)):
            path = os.path.join(folder, file)
            if not file.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
                continue
            caption_path = os.path.splitext(path)[0] + ".txt"
            caption = fallback
            if os.path.isfile(caption_path):
                with open(caption_path, encoding="utf-8") as f:
                    caption = f.read().strip()
            with Image.open(path) as image:
                size = image.size
            items.append(Item(path, caption, name, repeats, size))
    if not items:
        raise LohaError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its N_name/ folders")
    return items


def dataset_metadata(items: list[Item]) -> tuple[dict, dict]:
    """(ss_tag_frequency, ss_dataset_dirs) as kohya records them."""
    tags: dict[str, Counter] = {}
    dirs: dict[str, dict] = {}
    for item in items:
        tags.setdefault(item.folder, Counter()).update(t.strip() for t in item.caption.split(",") if t.strip())
        entry = dirs.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return {k: dict(v) for k, v in tags.items()}, dirs


def buckets(resolution: int, step: int = 64, min_size: int | None = None, max_size: int | None = None) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with area ≤ resolution²."""
    min_size = min_size or max(step, resolution // 2 // step * step)
    max_size = max_size or resolution * 2
    area = resolution * resolution
    out = {(resolution // step * step,) * 2}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, area // width // step * step)
        if height >= min_size:
            out.update({(width, height), (height, width)})
    return sorted(out)


def nearest_bucket(size: tuple[int, int], options: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(options, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_pixels(path: str, bucket: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: scaled to cover the bucket, centre-cropped."""
    import numpy as np
    from PIL import Image

    width, height = bucket
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


class Dataset:
    """Items, their buckets, and latents encoded once by the VAE."""

    def __init__(self, root: str, resolution: int, step: int = 64, flip: bool = False):
        self.root = root
        self.items = scan(root)
        options = buckets(resolution, step)
        self.buckets = [nearest_bucket(item.size, options) for item in self.items]
        self.flip = flip
        self.latents: list[torch.Tensor] | None = None
        self.flipped: list[torch.Tensor] | None = None  # latents of the mirrored images (flip_aug)
        self.tag_frequency, self.dirs = dataset_metadata(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    @torch.no_grad()
    def encode(self, encode_pixels, progress=None) -> None:
        """Encode every image once: `encode_pixels` maps (1, 3, H, W) in [-1, 1] to latents."""
        if self.latents is not None:
            return
        self.latents, self.flipped = [], [] if self.flip else None
        for index, (item, bucket) in enumerate(zip(self.items, self.buckets)):
            pixels = load_pixels(item.path, bucket)[None]
            self.latents.append(encode_pixels(pixels)[0].float().cpu())
            if self.flip:
                self.flipped.append(encode_pixels(pixels.flip(-1))[0].float().cpu())
            if progress:
                progress(index + 1, len(self.items))

    def latent(self, index: int, flipped: bool) -> torch.Tensor:
        return (self.flipped if flipped and self.flipped is not None else self.latents)[index]

    def epoch(self, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
        """The global batches of one epoch: item indices, each batch from one bucket.

        Every item appears `repeats` times; the order is shuffled by (seed, epoch);
        leftovers that do not fill a batch in their bucket are dropped for this epoch.
        """
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        indices = [i for i, item in enumerate(self.items) for _ in range(item.repeats)]
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        batches = []
        for index in order:
            group = by_bucket.setdefault(self.buckets[index], [])
            group.append(index)
            if len(group) == batch_size:
                batches.append(list(group))
                group.clear()
        if not batches:
            raise LohaError(f"{self.root}: batch size {batch_size} is larger than every bucket "
                            f"(images per bucket × repeats: {Counter(self.buckets[i] for i in indices)})")
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]
