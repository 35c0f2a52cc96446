"""`docker-vit download`: a model's files fetched ahead of time, so a baked image or a later run needs
no network. Its own module, so the command does not import torch and transformers to make one Hub call."""

from __future__ import annotations


def download(model: str, folder: str | None = None) -> str:
    """Fetch a model's files into the Hugging Face cache (or `folder`) so later runs need no network.

    Weights for other frameworks (TensorFlow, Flax, Rust, ONNX, Core ML) are left out: torch never
    reads them, and a baked image would carry them (BLIP's repositories hold TensorFlow weights too).
    So are pickled torch weights beside safetensors ones, which transformers loads instead: BLIP's
    repositories hold both, and an image would carry the model twice."""
    from huggingface_hub import snapshot_download  # the Hub client, imported only when asked for

    ignore = _OTHER_FRAMEWORKS + (_PICKLED if _has_safetensors(model) else [])
    return snapshot_download(repo_id=model, local_dir=folder, ignore_patterns=ignore)


def _has_safetensors(model: str) -> bool:
    """Whether the repository's own weights come as safetensors; when it cannot be listed (offline,
    say), keep everything: the download then says why it fails, or serves from the cache."""
    from huggingface_hub import model_info

    try:  # the call snapshot_download makes first: one try (list_repo_files retried for 23 s offline)
        names = [sibling.rfilename for sibling in model_info(model).siblings or ()]
    except Exception:
        return False
    return any(name.endswith(".safetensors") and "/" not in name for name in names)


_OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel"]
_OTHER_FRAMEWORKS += ["onnx/*", "coreml/*", "openvino/*"]
_PICKLED = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
