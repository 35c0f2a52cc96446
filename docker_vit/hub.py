"""`docker-vit download`: a model's files fetched ahead of time, so a baked image or a later run needs
no network. Its own module, so the command does not import torch and transformers to make one Hub call."""

from __future__ import annotations

from collections.abc import Callable


def download(model: str, folder: str | None = None, warn: Callable[[str], None] = lambda line: None) -> str:
    """Fetch a model's files into the Hugging Face cache (or `folder`) so later runs need no network.

    Weights for other frameworks (TensorFlow, Flax, Rust, ONNX, Core ML) are left out: torch never
    reads them, and a baked image would carry them (BLIP's repositories hold TensorFlow weights too).
    So are pickled torch weights beside safetensors ones, which transformers loads instead: BLIP's
    repositories hold both, and an image would carry the model twice. A Hub out of reach leaves a
    cached copy as it was: `warn` says so, since the user asked for the latest files."""
    from huggingface_hub import snapshot_download  # the Hub client, imported only when asked for

    names = _listing(model)
    safetensors = not isinstance(names, Exception) and any(
        name.endswith(".safetensors") and "/" not in name for name in names
    )
    path = snapshot_download(
        repo_id=model, local_dir=folder, ignore_patterns=_OTHER_FRAMEWORKS + (_PICKLED if safetensors else [])
    )
    if isinstance(names, Exception):
        reason = " ".join(str(names).split())[:300]
        kept = f"the files already in {folder}" if folder else "the files are the cached copy"
        # out of reach, the download served what was there; refused (a 429), it may have reached the Hub
        said = f"{kept}, not refreshed" if _out_of_reach(names) else "pickled weights were not left out"
        warn(f"could not list {model} on the Hub ({type(names).__name__}: {reason}): {said}")
    return path


def _out_of_reach(exc: Exception) -> bool:
    """No answer from the Hub at all (offline, a name that does not resolve, a timeout): an OSError (the
    client's offline mode too), or its HTTP library's transport error, by name, as the Hub client's
    versions use httpx or httpx2, and neither need be importable here."""
    return isinstance(exc, OSError) or any(cls.__name__ == "TransportError" for cls in type(exc).__mro__)


def _listing(model: str) -> list[str] | Exception:
    """The repository's files, or why they cannot be listed (offline, say): then everything is kept,
    and the download says why it fails, or serves from the cache."""
    from huggingface_hub import model_info

    try:  # the call snapshot_download makes first: one try (list_repo_files retried for 23 s offline)
        return [sibling.rfilename for sibling in model_info(model).siblings or ()]
    except Exception as exc:
        return exc


_OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel"]
_OTHER_FRAMEWORKS += ["onnx/*", "coreml/*", "openvino/*"]
_PICKLED = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
