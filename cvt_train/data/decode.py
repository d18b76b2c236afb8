"""Decoding images with no more work than the training crop needs.

data.decode picks how the training images are decoded:
    full     every file at full size (torchvision.io's libjpeg-turbo / libpng; PIL for other formats)
    scaled   JPEGs through libjpeg-turbo's DCT scaling (simplejpeg): RandomResizedCrop's box is drawn from the
             header's size before decoding, and the file is decoded at the smallest M/8 scale at which the box still
             covers image_size pixels both ways; then cropped and resized as usual. Other formats: full.
    gpu      the workers read the bytes and draw the crop; nvJPEG decodes the batch on the GPU
             (torchvision.io.decode_jpeg on a list, device="cuda"), which crops and resizes there too
    auto     scaled where simplejpeg is installed, else full
Evaluation always decodes at full size: reported accuracy must not depend on the decoder.

simplejpeg over PyTurboJPEG: its wheels carry their own libjpeg-turbo (PyTurboJPEG needs the system's libturbojpeg),
and it chooses the scale from a minimum output size, which is exactly the question asked here. torchvision.io's
decoders are deprecated in favour of TorchCodec, but they are what torchvision 0.2x ships on every machine we run on
(TorchCodec is not installed on the GPU machines we check on), and the GPU path needs only decode_jpeg.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

try:
    import simplejpeg
except ImportError:  # optional: pip install 'cvt-train[fast]'
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"


class CorruptImage(Exception):
    """An image file that cannot be read or decoded (message: its name and the reason)."""


def short(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160]


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptImage(f"{path}: cannot read the file ({short(e)})") from None
    if not data:
        raise CorruptImage(f"{path}: the file is empty")
    return data


def decode_bytes(data: bytes, name: str) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, H, W) RGB at full size. torchvision.io for JPEG/PNG/GIF/WEBP, PIL for the rest."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as tv_error:
        img = _decode_pil(data, name, tv_error)
    if img.ndim != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
        raise CorruptImage(f"{name}: decoded to an unexpected shape {tuple(img.shape)}")
    return img


def _decode_pil(data: bytes, name: str, tv_error: Exception) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptImage(f"{name}: not a readable image ({short(tv_error)}; {short(e)})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an RGB or grayscale JPEG from its header, or None (not a JPEG, CMYK, no simplejpeg, or a
    header simplejpeg cannot read: the full decoder then reports the problem)."""
    if simplejpeg is None or not data.startswith(JPEG_MAGIC):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (h, w) if colorspace in ("RGB", "YCbCr", "Gray") else None


def decode_crop_scaled(
    data: bytes, name: str, size: tuple[int, int], box: tuple[int, int, int, int], out: int, interp: InterpolationMode
) -> torch.Tensor:
    """The box (top, left, height, width, in full-size pixels) of a JPEG of `size`, resized to out x out: decoded at
    the smallest scale of 1/2, 1/4, 1/8 whose box is still >= out both ways, so the final resize only ever shrinks.

    Measured on the 500x375-ish quality-90 photographs of scripts/make_imagenet_like.py (1 core, AMD EPYC Zen 5,
    ms per image): full 0.77, 1/2 0.67, 1/4 0.62. Entropy decoding does not scale, so this saves 13-20%, more on
    larger photographs. libjpeg-turbo's other M/8 scales are slower than a full decode (8/7: 1.21, 8/6: 1.03, 8/5:
    0.91 ms): their IDCTs have no fast path, so they are not used."""
    (height, width), (top, left, h, w) = size, box
    factor = 1
    while factor < 8 and min(h, w) >= 2 * factor * out:
        factor *= 2
    try:
        if factor == 1:
            arr = simplejpeg.decode_jpeg(data, "RGB")
        else:
            arr = simplejpeg.decode_jpeg(
                data, "RGB", min_height=math.ceil(height / factor), min_width=math.ceil(width / factor)
            )
    except ValueError as e:
        raise CorruptImage(f"{name}: not a readable JPEG ({short(e)})") from None
    sy, sx = arr.shape[0] / height, arr.shape[1] / width
    t, lft = min(round(top * sy), arr.shape[0] - 1), min(round(left * sx), arr.shape[1] - 1)
    hh, ww = max(1, min(round(h * sy), arr.shape[0] - t)), max(1, min(round(w * sx), arr.shape[1] - lft))
    # an (H, W, 3) view as (3, H, W): torch's uint8 resize is fastest on this channels-last layout (0.16 ms vs 0.43
    # for a contiguous copy, 224 output)
    img = torch.from_numpy(arr).permute(2, 0, 1)
    return TF.resized_crop(img, t, lft, hh, ww, [out, out], interpolation=interp, antialias=True)


def decode_on_gpu(
    encoded: list[torch.Tensor],
    boxes: list[tuple[int, int, int, int]],
    flips: list[bool],
    out: int,
    interp: InterpolationMode,
    device: torch.device,
) -> torch.Tensor:
    """nvJPEG-decode a list of JPEG byte tensors on `device` in one call, crop each to its box, resize to out x out,
    flip where asked; -> uint8 (n, 3, out, out) on the device."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    crops = []
    for img, (top, left, h, w), flip in zip(images, boxes, flips):
        # float for the resize: CUDA's antialiased bicubic has no uint8 kernel
        c = TF.resized_crop(img.float(), top, left, h, w, [out, out], interpolation=interp, antialias=True)
        crops.append(c.flip(-1) if flip else c)
    return torch.stack(crops).round_().clamp_(0, 255).to(torch.uint8)
