"""Per-model pre- and post-processing: pixels in, one confidence per label out.

A family knows its network's input layout and how to turn the raw output for
one image into label confidences; the `Classifier` does the rest. The three
families match the shipped models:

- `efficientnet`: EfficientNet-Lite0 (ImageNet), NCHW, shorter side to 256,
  centre crop 224, (x - 127) / 128; softmax over the logits.
- `open_nsfw`: Yahoo open_nsfw, NHWC BGR, 256×256, centre crop 224, minus the
  Caffe mean; the network already ends in a softmax.
- `nudenet`: NudeNet v3 `320n` detector (YOLOv8), padded to a square, 320×320,
  RGB / 255; a label's confidence is its best score over all candidate boxes.
- `yolov3`: Darknet's YOLOv3 heads (YOLOv3-tiny, COCO, exported by
  tools/export_objects.py), letterboxed into 416×416 on Darknet's grey,
  RGB / 255; its output is the heads' raw terms side by side, and a label's
  confidence is its best box score, sigmoid(objectness) × sigmoid(class logit),
  over all candidate boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from services.imaging import RGBImage, resize

FamilyName = Literal["efficientnet", "open_nsfw", "nudenet", "yolov3"]
Tensor = NDArray[np.float32]


@dataclass(frozen=True)
class InputSize:
    """The smallest picture a family's preprocessing gives the network the same input from: its first step scales
    any picture down to this (one of the two sides)."""

    shorter_side: int

    def scale(self, width: int, height: int) -> float:
        """The factor that brings a `width`×`height` picture down to this size (1 for one that is not larger)."""
        return min(1.0, self.shorter_side / min(width, height))


class ModelFamily(Protocol):
    # None: the family declares no such size (open_nsfw squashes every picture to 256×256, so no smaller picture
    # gives it the same input; nudenet and yolov3 have not been measured at their own size)
    input_size: InputSize | None

    def preprocess(self, pixels: RGBImage) -> Tensor:
        """One image's network input, without the batch axis."""
        ...

    def confidences(self, output: Tensor) -> NDArray[np.float64]:
        """One image's raw network output (without the batch axis) → one value per label."""
        ...


def _resize_centre_crop(pixels: RGBImage, resized: tuple[int, int], crop: int) -> RGBImage:
    width, height = resized
    same_size = (height, width) == pixels.shape[:2]  # encoded at the family's input size already
    scaled = pixels if same_size else resize(pixels, width, height)
    top, left = (height - crop) // 2, (width - crop) // 2
    return scaled[top : top + crop, left : left + crop]


def _softmax(logits: Tensor) -> NDArray[np.float64]:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    result: NDArray[np.float64] = shifted / shifted.sum()
    return result


class EfficientNet:
    RESIZE = 256
    CROP = 224
    input_size: InputSize | None = InputSize(shorter_side=RESIZE)

    def preprocess(self, pixels: RGBImage) -> Tensor:
        height, width = pixels.shape[:2]
        scale = self.RESIZE / min(height, width)
        size = (max(self.RESIZE, round(width * scale)), max(self.RESIZE, round(height * scale)))
        crop = _resize_centre_crop(pixels, size, self.CROP).astype(np.float32)
        return ((crop - 127.0) / 128.0).transpose(2, 0, 1)

    def confidences(self, output: Tensor) -> NDArray[np.float64]:
        return _softmax(output)


class OpenNsfw:
    input_size: InputSize | None = None
    RESIZE = 256
    CROP = 224
    MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)

    def preprocess(self, pixels: RGBImage) -> Tensor:
        crop = _resize_centre_crop(pixels, (self.RESIZE, self.RESIZE), self.CROP)
        bgr: Tensor = crop[:, :, ::-1].astype(np.float32) - self.MEAN_BGR
        return bgr

    def confidences(self, output: Tensor) -> NDArray[np.float64]:
        probabilities = output.astype(np.float64)
        result: NDArray[np.float64] = probabilities / probabilities.sum()
        return result


class NudeNet:
    input_size: InputSize | None = None
    SIZE = 320
    BOX_FIELDS = 4  # cx, cy, w, h before the class scores

    def preprocess(self, pixels: RGBImage) -> Tensor:
        height, width = pixels.shape[:2]
        side = max(height, width)
        square = np.zeros((side, side, 3), dtype=np.uint8)  # padded bottom and right, as NudeNet does
        square[:height, :width] = pixels
        scaled = resize(square, self.SIZE, self.SIZE)
        return (scaled.astype(np.float32) / 255.0).transpose(2, 0, 1)

    def confidences(self, output: Tensor) -> NDArray[np.float64]:
        class_scores = output[self.BOX_FIELDS :]  # (classes, candidates)
        result: NDArray[np.float64] = np.clip(class_scores.max(axis=1), 0.0, 1.0).astype(np.float64)
        return result


class YoloV3:
    input_size: InputSize | None = None
    SIZE = 416
    FILL = 0.5  # Darknet letterboxes on mid grey
    OBJECTNESS = 4  # the row after the box terms tx, ty, tw, th; the class logits follow

    def preprocess(self, pixels: RGBImage) -> Tensor:
        height, width = pixels.shape[:2]
        scale = self.SIZE / max(height, width)
        inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = np.full((self.SIZE, self.SIZE, 3), self.FILL, dtype=np.float32)
        top, left = (self.SIZE - inner_h) // 2, (self.SIZE - inner_w) // 2
        canvas[top : top + inner_h, left : left + inner_w] = resize(pixels, inner_w, inner_h) / np.float32(255.0)
        return canvas.transpose(2, 0, 1)

    def confidences(self, output: Tensor) -> NDArray[np.float64]:
        logits = output.astype(np.float64)  # (85, candidates)
        box_scores = _sigmoid(logits[self.OBJECTNESS]) * _sigmoid(logits[self.OBJECTNESS + 1 :])
        result: NDArray[np.float64] = box_scores.max(axis=1)
        return result


def _sigmoid(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    result: NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * logits))  # no overflow for large negatives
    return result


FAMILIES: dict[str, ModelFamily] = {
    "efficientnet": EfficientNet(),
    "open_nsfw": OpenNsfw(),
    "nudenet": NudeNet(),
    "yolov3": YoloV3(),
}
