"""Images in: the photos that installed packages ship, image folders, and the model's preprocessing."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

# Images longer than this aspect ratio are centre-cropped when opened.
MAX_ASPECT = 4.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageError(ValueError):
    """An image path or folder that cannot be used; the message says what to do."""


def shipped_photos() -> dict[str, Image.Image]:
    """Natural photos shipped inside installed packages (no download): scikit-image, scikit-learn, matplotlib."""
    # Imported here: these three packages take seconds to import and only this function needs them.
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: Image.fromarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")}
    sample = load_sample_images()
    for filename, array in zip(sample.filenames, sample.images):
        photos[Path(filename).stem] = Image.fromarray(array)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = Image.open(handle).convert("RGB")
    return {name: image.convert("RGB") for name, image in photos.items()}


def open_rgb(path: str | Path) -> Image.Image:
    """One image as RGB, or ImageError with the reason (corrupt, truncated, empty, unsupported).

    Greyscale, palette, CMYK and 16-bit files are converted (16-bit and float rescaled to 8 bits, not
    saturated); alpha is composited on white; extremely elongated images are centre-cropped to aspect ratio
    ``MAX_ASPECT`` first, so a 1 x 100000 strip cannot blow up memory (the model crops a centre square anyway).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {str(path)!r} does not exist")
    return _decode(path, f"image {str(path)!r}", "remove or replace the file")


def image_from_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """An image file's bytes (e.g. an upload) as RGB, converted like :func:`open_rgb`; ImageError names ``name``."""
    return _decode(io.BytesIO(bytes(data)), f"{name!r}", "give a PNG, JPEG or another image file")


def _decode(source, what: str, todo: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as raw:
                raw.load()
                image = _to_8bit(raw)
                if image.mode in ("RGBA", "LA", "P", "PA"):
                    image = _composite(image)
                image = image.convert("RGB")
    except Exception as error:  # corrupt, truncated, empty, decompression bomb, unsupported codec
        reason = "not an image file" if type(error).__name__ == "UnidentifiedImageError" else f"{type(error).__name__}: {error}"
        raise ImageError(f"{what} cannot be read as an image ({reason}); {todo}") from None
    width, height = image.size
    if min(width, height) < 1:
        raise ImageError(f"{what} is empty ({width} x {height})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        long_side = int(MAX_ASPECT * min(width, height))
        left, top = (width - long_side) // 2 if width > height else 0, (height - long_side) // 2 if height > width else 0
        image = image.crop((left, top, left + min(width, long_side), top + min(height, long_side)))
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale images would saturate under PIL's RGB conversion: rescale them to 8 bits."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = np.nanmin(array), np.nanmax(array)
        scaled = np.zeros_like(array) if not high > low else (array - low) / (high - low) * 255
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8))
    return image


def _composite(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


class LazyItems(Sequence):
    """A data set read on demand, item by item (photo collections are large): ``ids`` in order and ``read(id)``
    give ``len``, indexing, slicing (a list) and iteration."""

    ids: list[str]

    def read(self, key: str):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.read(self.ids[index])


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (any depth, sorted), e.g. ImageNet's ``val/<class>/<file>`` layout."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ImageError(f"image folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {str(folder)!r}")
    return files


def image_files(root: str | Path) -> list[str]:
    """Relative POSIX paths of every image under ``root`` (any depth), sorted as strings: the order that
    shards split and that breaks score ties. Works for ImageNet's ``val/<wnid>/<file>.JPEG`` layout."""
    root = Path(root).expanduser()
    return sorted(p.relative_to(root).as_posix() for p in list_images(root))


def images_by_stem(folder: str | Path, recursive: bool = False) -> dict[str, Path]:
    """``{file stem: path}`` of the image files in ``folder`` (sorted; ``recursive``: any depth); empty when
    the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return {p.stem: p for p in sorted(paths) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def load_folder(folder: str | Path, limit: int | None = None) -> dict[str, Image.Image]:
    """Readable images of a folder by relative path; unreadable files are skipped with a warning."""
    folder = Path(folder).expanduser()
    images: dict[str, Image.Image] = {}
    skipped = []
    for path in list_images(folder):
        if limit is not None and len(images) >= limit:
            break
        try:
            images[str(path.relative_to(folder))] = open_rgb(path)
        except ImageError:
            skipped.append(path.name)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {folder}: {', '.join(skipped[:5])}")
    if not images:
        raise ImageError(f"none of the images under {str(folder)!r} could be read")
    return images


def model_transform(model: nn.Module):
    """The model's eval preprocessing (resize, centre crop, normalise) from timm's data config."""
    config = timm.data.resolve_data_config({}, model=model)
    size = int(model.patch_embed.img_size[0])
    config["input_size"] = (3, size, size)
    return timm.data.create_transform(**config)


def to_pixels(model: nn.Module, images: Image.Image | list[Image.Image]) -> torch.Tensor:
    """``[B, 3, S, S]`` float32 model input for PIL images."""
    if isinstance(images, Image.Image):
        images = [images]
    transform = model_transform(model)
    return torch.stack([transform(image.convert("RGB")) for image in images])


def display_crop(model: nn.Module, image: Image.Image) -> np.ndarray:
    """``[S, S, 3]`` uint8: the image region the model sees (resize + centre crop, no normalisation),
    for drawing token maps over the photo."""
    config = timm.data.resolve_data_config({}, model=model)
    size = int(model.patch_embed.img_size[0])
    config.update(input_size=(3, size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    tensor = timm.data.create_transform(**config)(image.convert("RGB"))
    return (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def batches(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def view_steps(model: nn.Module, interpolation: T.InterpolationMode) -> list:
    """The geometric steps (resize, centre crop) of the model's eval transform, with the resize redone at
    ``interpolation``: maps a mask or label map onto exactly the pixels the model sees.

    NEAREST keeps label ids intact; BILINEAR (antialiased) averages with positive weights, so coverage
    fractions of a float mask stay in [0, 1]. The steps take PIL images or ``[..., H, W]`` tensors.
    """
    steps = []
    for step in model_transform(model).transforms:
        if isinstance(step, T.Resize):
            steps.append(T.Resize(step.size, interpolation=interpolation, max_size=step.max_size, antialias=True))
        elif isinstance(step, T.CenterCrop):
            steps.append(step)
        elif type(step).__name__ in ("MaybeToTensor", "ToTensor", "Normalize", "MaybePILToTensor"):
            continue
        else:
            raise NotImplementedError(f"cannot map masks through the transform step {step!r}; "
                                      "qklib supports resize + centre crop preprocessing")
    return steps
