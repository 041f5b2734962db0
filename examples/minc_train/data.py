"""Datasets and self-supervised augmentations.

Two ways to feed the trainer:

* **memory** (:class:`TensorDataset`): the whole dataset as one uint8 tensor (N, C, H, W);
  views are augmented *in batch* on tensors by :class:`BatchAugment` (one ``grid_sample``
  for crop+flip, vectorised jitter/grey/blur/solarise).  Used for Fashion-MNIST and small
  image folders; fast on the CPU, and every random draw comes from an explicit
  ``torch.Generator`` so an epoch is reproducible from ``(seed, epoch)`` alone.
* **stream** (:func:`folder_stream`): ``torchvision.datasets.ImageFolder`` with per-image
  ``torchvision.transforms.v2`` pipelines in DataLoader workers (ImageNet-style).
"""
from __future__ import annotations

import gzip
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class TensorDataset:
    """Images as uint8 (N, C, H, W) plus int64 labels; ``mean``/``std`` per channel in [0, 1]."""
    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple
    classes: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def normalize(self, x_uint8: torch.Tensor, device=None) -> torch.Tensor:
        x = x_uint8.to(device, non_blocking=True).float().div_(255.0)
        return normalize(x, self.mean, self.std)

    def subset(self, n: int, seed: int = 0) -> "TensorDataset":
        """A fixed random subset of ``n`` items (all if n >= len or n <= 0)."""
        if n <= 0 or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return TensorDataset(self.images[idx], self.labels[idx], self.mean, self.std, self.classes)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} bytes of data, got {arr.size}")
    return arr.reshape(dims)


def find_fashion_mnist(root: str | None) -> str | None:
    """The first directory holding the four idx .gz files (``root`` or FashionMNIST/raw under it, then Debian's)."""
    cands = []
    if root:
        cands += [root, os.path.join(root, "FashionMNIST", "raw")]
    cands += list(FASHION_MNIST_DIRS)
    for d in cands:
        if all(os.path.exists(os.path.join(d, f)) for pair in FASHION_MNIST_FILES.values() for f in pair):
            return d
    return None


def load_fashion_mnist(root: str | None = None, download: bool = True) -> tuple[TensorDataset, TensorDataset]:
    """(train 60k, test 10k) Fashion-MNIST as :class:`TensorDataset` (1×28×28 uint8).

    Reads the idx ``.gz`` files from ``root`` or /usr/share/datasets/fashion-mnist (Debian
    package ``dataset-fashion-mnist``); else downloads with torchvision into ``root``
    (default ``./data``) when ``download`` is true.
    """
    d = find_fashion_mnist(root)
    if d is None:
        if not download:
            raise FileNotFoundError("Fashion-MNIST not found (looked in --data-dir and "
                                    f"{', '.join(FASHION_MNIST_DIRS)}); install the Debian package "
                                    "dataset-fashion-mnist or allow the download")
        from torchvision.datasets import FashionMNIST
        root = root or "data"
        try:
            FashionMNIST(root, train=True, download=True)
            FashionMNIST(root, train=False, download=True)
        except (RuntimeError, OSError) as exc:  # no network, a proxy, a full disk: one line
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
            raise FileNotFoundError(
                f"Fashion-MNIST not found (looked in --data-dir and {', '.join(FASHION_MNIST_DIRS)}) "
                f"and its download into {root!r} failed ({why}); install the Debian package "
                "dataset-fashion-mnist (make data) or pass --data-dir with the idx .gz files") from None
        d = find_fashion_mnist(root)
        if d is None:
            raise FileNotFoundError(f"Fashion-MNIST download into {root!r} did not produce the idx files")
    out = []
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    for split in ("train", "test"):
        img_f, lab_f = FASHION_MNIST_FILES[split]
        imgs = torch.from_numpy(_read_idx(os.path.join(d, img_f)).copy()).unsqueeze(1)
        labs = torch.from_numpy(_read_idx(os.path.join(d, lab_f)).astype(np.int64))
        out.append(TensorDataset(imgs.contiguous(), labs, FASHION_MEAN, FASHION_STD, classes))
    return out[0], out[1]


# ---------------------------------------------------------------------- image folders
def split_folder(root: str) -> tuple[str, str | None]:
    """(train dir, held-out dir or None): ``root/train`` + ``root/val`` (or ``test``) if present."""
    if not os.path.isdir(root):
        raise ValueError(f"--data-dir {root!r} is not a directory")
    tr = os.path.join(root, "train")
    if os.path.isdir(tr):
        for name in ("val", "test"):
            if os.path.isdir(os.path.join(root, name)):
                return tr, os.path.join(root, name)
        return tr, None
    return root, None


def load_folder_tensor(root: str, image_size: int, channels: int = 3) -> TensorDataset:
    """Every image of an ImageFolder tree, resized (shorter side) and centre-cropped to
    ``image_size``, as one uint8 tensor (for small datasets)."""
    from PIL import Image
    from torchvision.transforms import v2

    ds = _image_folder(root)
    tf = v2.Compose([v2.Resize(image_size), v2.CenterCrop(image_size), v2.PILToTensor()])
    imgs = torch.empty(len(ds), channels, image_size, image_size, dtype=torch.uint8)
    mode = "L" if channels == 1 else "RGB"
    good = []
    for i, (path, _) in enumerate(ds.samples):
        try:
            with Image.open(path) as im:
                imgs[i] = tf(im.convert(mode))
            good.append(i)
        except UNREADABLE_IMAGE_ERRORS as exc:
            _warn_unreadable(path, exc)
    if not good:
        raise ValueError(f"--data-dir {root!r}: none of its {len(ds)} images could be read")
    labels = torch.tensor(ds.targets, dtype=torch.long)
    if len(good) < len(ds):
        print(f"minc-train: warning: skipped {len(ds) - len(good)} unreadable image(s) of {len(ds)} "
              f"in {root}", file=sys.stderr, flush=True)
        keep = torch.tensor(good)
        imgs, labels = imgs[keep], labels[keep]
    mean, std = (FASHION_MEAN, FASHION_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    return TensorDataset(imgs, labels, mean, std, list(ds.classes))


def holdout_split(ds: TensorDataset, fraction: float = 0.1, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Deterministic (train, held-out) split of a TensorDataset."""
    n = len(ds)
    n_out = max(1, int(round(n * fraction)))
    if n - n_out < 2:
        raise ValueError(f"dataset too small to hold out {fraction:.0%} for evaluation ({n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = perm[n_out:], perm[:n_out]
    mk = lambda idx: TensorDataset(ds.images[idx], ds.labels[idx], ds.mean, ds.std, ds.classes)
    return mk(a), mk(b)


# ---------------------------------------------------------------------- augmentation configs
@dataclass
class ViewConfig:
    """Augmentation of one view (probabilities in [0, 1])."""
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grey_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0


def view_configs(recipe: str, image_size: int, channels: int) -> tuple[ViewConfig, ViewConfig]:
    """The two views' augmentations.

    ``byol``: asymmetric BYOL/MINC views (blur 1.0/0.1, solarise 0/0.2); ``simclr``:
    symmetric (crop (0.2, 1), jitter (0.4,0.4,0.4,0.1), grey, blur 0.5 above 32 px);
    ``weak``: MIO's weak crops (0.8, 1); ``mild``: for 28-px greyscale (crop (0.5, 1),
    flip, brightness/contrast 0.4 only).  Blur is dropped at 32 px and below.
    """
    big = image_size > 32
    if recipe == "mild":
        v = ViewConfig(scale=(0.5, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.0,
                       hue=0.0, grey_p=0.0)
        return v, ViewConfig(**vars(v))
    if recipe == "byol":
        v1 = ViewConfig(scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                        blur_p=1.0 if big else 0.0, solarize_p=0.0)
        v2 = ViewConfig(**{**vars(v1), "blur_p": 0.1 if big else 0.0, "solarize_p": 0.2})
        out = (v1, v2)
    elif recipe == "simclr":
        v = ViewConfig(scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                       blur_p=0.5 if big else 0.0)
        out = (v, ViewConfig(**vars(v)))
    elif recipe == "weak":
        v = ViewConfig(scale=(0.8, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                       blur_p=0.5 if big else 0.0, solarize_p=0.2 if big else 0.0)
        out = (v, ViewConfig(**vars(v)))
    else:
        raise ValueError(f"--augment must be one of 'byol', 'simclr', 'weak', 'mild', got {recipe!r}")
    if channels == 1:  # no colour on greyscale: keep brightness/contrast
        out = tuple(ViewConfig(**{**vars(v), "saturation": 0.0, "hue": 0.0, "grey_p": 0.0}) for v in out)
    return out


# ---------------------------------------------------------------------- batched augmentation
def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``angle`` (radians, per sample) in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=x.dtype, device=x.device)
    from_yiq = torch.linalg.inv(to_yiq)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = from_yiq @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


class BatchAugment:
    """Augments a uint8 batch (B, C, H, W) into a normalised float view of ``out_size`` px.

    All random numbers come from the given CPU ``torch.Generator`` (drawn per sample, then
    moved to the batch's device), so results depend only on the generator's state.
    """

    def __init__(self, cfg: ViewConfig, out_size: int, mean, std):
        self.cfg, self.out_size, self.mean, self.std = cfg, out_size, mean, std

    def _u(self, g, n, lo=0.0, hi=1.0):
        return torch.rand(n, generator=g) * (hi - lo) + lo

    def __call__(self, x_uint8: torch.Tensor, g: torch.Generator, device=None) -> torch.Tensor:
        cfg, b = self.cfg, x_uint8.shape[0]
        x = x_uint8.to(device, non_blocking=True).float().div_(255.0)
        dev = x.device
        # random resized crop + flip: one affine grid_sample (bilinear)
        area = self._u(g, b, *cfg.scale)
        logr = self._u(g, b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
        ratio = torch.exp(logr)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (self._u(g, b) * 2 - 1) * (1 - w)
        cy = (self._u(g, b) * 2 - 1) * (1 - h)
        flip = torch.where(self._u(g, b) < cfg.flip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta.to(dev), [b, x.shape[1], self.out_size, self.out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        col = lambda v: v.to(dev).view(b, 1, 1, 1)
        # colour jitter (fixed order: brightness, contrast, saturation, hue), applied with jitter_p
        jit = col((self._u(g, b) < cfg.jitter_p).float())
        if cfg.brightness > 0:
            f = col(self._u(g, b, 1 - cfg.brightness, 1 + cfg.brightness))
            x = (x * (1 + jit * (f - 1))).clamp_(0, 1)
        if cfg.contrast > 0:
            f = col(self._u(g, b, 1 - cfg.contrast, 1 + cfg.contrast))
            m = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (m + (x - m) * (1 + jit * (f - 1))).clamp_(0, 1)
        if x.shape[1] == 3:
            if cfg.saturation > 0:
                f = col(self._u(g, b, 1 - cfg.saturation, 1 + cfg.saturation))
                gr = _grey(x)
                x = (gr + (x - gr) * (1 + jit * (f - 1))).clamp_(0, 1)
            if cfg.hue > 0:
                ang = self._u(g, b, -cfg.hue, cfg.hue) * 2 * math.pi * jit.view(b).cpu()
                x = _hue_rotate(x, ang.to(dev)).clamp_(0, 1)
            if cfg.grey_p > 0:
                gm = col((self._u(g, b) < cfg.grey_p).float())
                x = x * (1 - gm) + _grey(x).expand_as(x) * gm
        if cfg.blur_p > 0:
            x = self._blur(x, g)
        if cfg.solarize_p > 0:
            sm = col((self._u(g, b) < cfg.solarize_p).float())
            x = torch.where((sm > 0) & (x >= 0.5), 1.0 - x, x)
        return normalize(x, self.mean, self.std)

    def _blur(self, x, g):
        cfg = self.cfg
        b, c, hgt, wid = x.shape
        apply = self._u(g, b) < cfg.blur_p
        sigma = self._u(g, b, *cfg.blur_sigma)
        k = max(3, int(0.1 * self.out_size) // 2 * 2 + 1)
        r = torch.arange(k, dtype=torch.float32) - k // 2
        ker = torch.exp(-(r.view(1, k) ** 2) / (2 * sigma.view(b, 1) ** 2))
        ker = ker / ker.sum(1, keepdim=True)
        ident = torch.zeros(k)
        ident[k // 2] = 1
        ker = torch.where(apply.view(b, 1), ker, ident.view(1, k)).to(x.device, x.dtype)
        ker = ker.repeat_interleave(c, 0)  # (b*c, k)
        y = x.reshape(1, b * c, hgt, wid)
        y = F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect")
        y = F.conv2d(y, ker.view(b * c, 1, 1, k), groups=b * c)
        y = F.pad(y, (0, 0, k // 2, k // 2), mode="reflect")
        y = F.conv2d(y, ker.view(b * c, 1, k, 1), groups=b * c)
        return y.view(b, c, hgt, wid)


# ---------------------------------------------------------------------- streaming (ImageNet-style)
def pil_view_transform(cfg: ViewConfig, size: int, mean, std):
    """torchvision.transforms.v2 pipeline of one view (per PIL image, in DataLoader workers)."""
    from torchvision.transforms import v2
    tf = [v2.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
          v2.RandomHorizontalFlip(cfg.flip)]
    if cfg.jitter_p > 0:
        tf.append(v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                                 p=cfg.jitter_p))
    if cfg.grey_p > 0:
        tf.append(v2.RandomGrayscale(cfg.grey_p))
    if cfg.blur_p > 0:
        k = max(3, int(0.1 * size) // 2 * 2 + 1)
        tf.append(v2.RandomApply([v2.GaussianBlur(k, sigma=cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        tf.append(v2.RandomSolarize(128, p=cfg.solarize_p))
    tf += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(tf)


def pil_eval_transform(size: int, mean, std):
    from torchvision.transforms import v2
    resize = int(round(size * 256 / 224)) if size > 64 else size
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class TwoViews:
    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


# What PIL raises for a truncated or corrupt file (UnidentifiedImageError is an OSError;
# some broken PNGs raise SyntaxError).
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError)


def _warn_unreadable(path: str, exc: BaseException) -> None:
    print(f"minc-train: warning: skipping unreadable image {path} ({type(exc).__name__}: {exc})",
          file=sys.stderr, flush=True)


class SkipUnreadable(torch.utils.data.Dataset):
    """An ``ImageFolder`` whose unreadable images are named on stderr and replaced by the next
    readable one (so batches keep their size); :attr:`skipped` counts them, also across
    DataLoader worker processes."""

    def __init__(self, folder):
        self.folder = folder
        self.classes = folder.classes
        self.samples = folder.samples
        # shared memory: workers inherit it and their increments are seen here
        self._skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        n = len(self.folder)
        for k in range(n):
            j = (index + k) % n
            try:
                return self.folder[j]
            except UNREADABLE_IMAGE_ERRORS as exc:
                _warn_unreadable(self.folder.samples[j][0], exc)
                with self._skipped.get_lock():
                    self._skipped.value += 1
        raise ValueError(f"no image under {self.folder.root!r} could be read")

    @property
    def skipped(self) -> int:
        """Unreadable images met so far (each meeting counts)."""
        return int(self._skipped.value)


def folder_stream(root: str, transform) -> SkipUnreadable:
    """``ImageFolder(root)`` with RGB conversion and ``transform``; unreadable images are
    skipped with a warning naming them (:class:`SkipUnreadable`)."""
    return SkipUnreadable(_image_folder(root, transform))


def _image_folder(root: str, transform=None):
    """``ImageFolder(root)``; its errors (no class folder, no image) name --data-dir."""
    from torchvision.datasets import ImageFolder
    try:
        ds = ImageFolder(root, transform=transform)
    except FileNotFoundError as exc:
        raise ValueError(f"--data-dir {root!r}: {exc}") from None
    if len(ds) == 0:
        raise ValueError(f"--data-dir {root!r} holds no images")
    return ds
