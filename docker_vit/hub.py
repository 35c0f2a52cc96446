"""`docker-vit download`: a model's files fetched ahead of time, so a baked image or a later run needs
no network. Its own module, so the command does not import torch and transformers to make one Hub call."""

from __future__ import annotations


def download(model: str, folder: str | None = None) -> str:
    """Fetch a model's files into the Hugging Face cache (or `folder`) so later runs need no network.

    Weights for other frameworks (TensorFlow, Flax, Rust, ONNX, Core ML) are left out: torch never
    reads them, and a baked image would carry them (BLIP's repositories hold TensorFlow weights too)."""
    from huggingface_hub import snapshot_download  # the Hub client, imported only when asked for

    return snapshot_download(repo_id=model, local_dir=folder, ignore_patterns=_OTHER_FRAMEWORKS)


_OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel"]
_OTHER_FRAMEWORKS += ["onnx/*", "coreml/*", "openvino/*"]
