"""The engine: any AutoModelForImageTextToText model, parity with the model's own `generate`."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import other_models
import pytest
import tiny_models
import torch
from conftest import free_port, photo, serving
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from docker_vit.captioner import Captioner
from docker_vit.checkpoints import DeviceUnavailable, Unservable, _check_captioning, pick_device, pick_dtype
from docker_vit.config import DEFAULT_MODEL, Settings
from docker_vit.engine import CaptionEngine

PHOTOS = ["french_bulldog.jpg", "astronaut.jpg", "coffee.jpg", "chelsea.jpg"]


def own_generate(folder: Path, data: bytes, num_beams: int = 4, max_new_tokens: int = 15) -> str:
    """The model's own path: processor, generate, tokenizer; nothing of Docker-ViT."""
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
    ids = model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("kind", ["blip_dir", "git_dir", "pix2struct_dir", "nougat_dir"])
def test_other_kinds_serve_their_own_captions(kind: str, request: pytest.FixtureRequest) -> None:
    """BLIP, GIT, Pix2Struct (whose processor gives patches and a mask, not pixels: they reach
    `generate` as they are) and Nougat (a Donut-Swin encoder with an MBart decoder)."""
    folder = request.getfixturevalue(kind)
    with serving(Settings(model=str(folder))) as client:
        photos = [photo(name).read_bytes() for name in PHOTOS[:2]]
        alone = [own_generate(folder, data) for data in photos]
        assert [client.post("/", files={"file": data}).text for data in photos] == alone
        body = {"images": [base64.b64encode(data).decode() for data in photos]}
        assert [c["text"] for c in client.post("/v1/captions", json=body).json()["captions"]] == alone
        assert client.get("/v1/model").json()["model"] == str(folder)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_batch_equals_images_one_by_one(wordy_model_dir: Path, num_beams: int) -> None:
    engine = CaptionEngine(str(wordy_model_dir))
    engine.load()
    pixels = [engine.pixels(Image.open(photo(name)).convert("RGB")) for name in PHOTOS]
    together = engine.generate(pixels, num_beams, 15)
    alone = [engine.generate([p], num_beams, 15)[0] for p in pixels]
    reference = engine.model.generate(
        pixel_values=torch.stack([p["pixel_values"] for p in pixels]), num_beams=num_beams, max_new_tokens=15
    ).tolist()
    assert together == alone == reference
    assert all(len(ids) == 16 for ids in together)  # 15 real tokens each: the comparison has teeth
    assert len({tuple(ids) for ids in together}) > 1  # and the photos do not all get one caption
    assert all(engine.text(ids) for ids in together)


@pytest.mark.parametrize(
    ("kind", "num_beams"), [("wordy_model_dir", 1), ("wordy_model_dir", 3), ("git_dir", 2)]
)
def test_the_between_steps_call_runs_each_step_and_can_stop_the_call(
    kind: str, num_beams: int, request: pytest.FixtureRequest
) -> None:
    """Docker-ViT's own decode (vit-gpt2) and the model's `generate` (GIT) both ask it each step."""
    engine = CaptionEngine(str(request.getfixturevalue(kind)))
    engine.load()
    pixels = [engine.pixels(Image.open(photo(name)).convert("RGB")) for name in PHOTOS[:2]]
    asked = []
    plain = engine.generate(pixels, num_beams, 8)
    assert engine.generate(pixels, num_beams, 8, between_steps=lambda: asked.append(1)) == plain
    assert len(asked) >= 3  # once a step, and the ids are the same

    class Gone(Exception):
        pass

    def third() -> None:
        asked.append(1)
        if len(asked) == 3:
            raise Gone

    asked.clear()
    with pytest.raises(Gone):
        engine.generate(pixels, num_beams, 8, between_steps=third)
    assert len(asked) == 3


def test_device_and_dtype_choice() -> None:
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError):
        pick_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_takes_bfloat16_only_where_the_gpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, capability: tuple, expected: torch.dtype
) -> None:
    """A T4 (7.5) or V100 (7.0) only emulates bfloat16, which `is_bf16_supported` counts as support."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert pick_dtype("auto", torch.device("cuda")) == expected


def test_reduced_precision_is_available_on_request(vit_gpt2_dir: Path, bulldog: bytes) -> None:
    with serving(Settings(model=str(vit_gpt2_dir), dtype="bfloat16")) as client:
        assert client.get("/v1/model").json()["dtype"] == "bfloat16"
        answer = client.post("/", files={"file": bulldog})
        assert answer.status_code == 200 and answer.text.strip()


def test_the_default_model_is_loaded_from_the_hub_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything up to the network: the real loader is asked for the seed's model id."""
    asked: list[tuple[str, dict]] = []

    def refuse(model_id, **kwargs):
        asked.append((model_id, kwargs))
        raise OSError("no network in tests")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)
    with pytest.raises(OSError):
        CaptionEngine(Settings().model).load()
    # the Hub cache first (no network wanted when the model is there), then the Hub itself
    assert asked == [
        (DEFAULT_MODEL, {"local_files_only": True, "dtype": torch.float32}),
        (DEFAULT_MODEL, {"dtype": torch.float32}),
    ]


def test_a_model_in_the_hub_cache_starts_without_asking_the_hub(vit_gpt2_dir: Path, tmp_path: Path) -> None:
    """Asked, an unreachable Hub costs retries per optional file the cache lacks: minutes, offline."""
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in vit_gpt2_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing there
    env.pop("HF_HUB_OFFLINE", None)
    code = "from docker_vit.engine import CaptionEngine; CaptionEngine('someone/tiny').load(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=100)
    assert done.stdout == "ok\n", done.stderr
    assert "Retrying" not in done.stderr


def _hub_of(folder: Path) -> type[BaseHTTPRequestHandler]:
    """Enough of the Hub's API for transformers to fetch `folder` as any repository, at one commit."""
    commit = "0" * 40

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path, data, headers = self.path.split("?")[0], None, {}
            if path.startswith("/api/models/") and "/tree/" not in path:
                files = [{"rfilename": file.name} for file in folder.iterdir()]
                data = json.dumps({"sha": commit, "siblings": files}).encode()
            elif "/resolve/" in path:
                file = folder / path.split("/resolve/")[1].split("/", 1)[1]
                if file.is_file():
                    data = file.read_bytes()
                    headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": commit}
            self.send_response(404 if data is None else 200)
            headers = {"X-Error-Code": "EntryNotFound"} if data is None else headers
            for name, value in {**headers, "Content-Length": str(len(data or b""))}.items():
                self.send_header(name, value)
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Hub


@pytest.mark.parametrize("before", ["", "AutoModelForImageTextToText.from_pretrained('someone/tiny'); "])
def test_a_model_not_in_the_cache_is_fetched_with_its_processor(
    vit_gpt2_dir: Path, tmp_path: Path, before: str
) -> None:
    """The quick start's first run: the model's fetch leaves only its own files in the cache, so a
    processor asked of the cache alone failed ("Unrecognized processing class") and never served.
    So did a cache left holding the model alone (an earlier run's, or another program's)."""
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _hub_of(vit_gpt2_dir))
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"}
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "from transformers import AutoModelForImageTextToText; from docker_vit.engine import CaptionEngine; "
    )
    code += before + "CaptionEngine('someone/tiny').load(); print('ok')"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=100
        )
    finally:
        hub.shutdown()
    assert done.stdout == "ok\n", done.stderr[-2000:]


def test_serve_exits_with_a_clear_error_when_the_model_cannot_be_fetched(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "DOCKER_VIT_PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "docker_vit.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "loading the model failed" in done.stderr and "connect" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the device")
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "xpu"])
def test_a_device_this_machine_lacks_is_a_one_line_setup_error(vit_gpt2_dir: Path, device: str) -> None:
    with pytest.raises(DeviceUnavailable, match=f"device {device} is not available"):
        CaptionEngine(str(vit_gpt2_dir), device=device).load()


def _jpeg(size: tuple[int, int]) -> bytes:
    noise = torch.randint(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(noise).resize(size, Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_the_processor_runs_while_the_decode_budget_counts_the_picture(git_dir: Path, bulldog: bytes) -> None:
    """The processor's resize holds full-size copies of the picture, longer than its decode: a budget
    that let go before it would let twice the pictures it means into memory."""
    from docker_vit import images

    captioner = Captioner(Settings(model=str(git_dir)))
    captioner.load()
    held: list[int] = []
    pixels = captioner.engine.pixels
    captioner.engine.pixels = lambda image: held.append(images.decode_budget.taken) or pixels(image)  # type: ignore[method-assign]
    captioner.prepare(bulldog, captioner.options({}))
    width, height = Image.open(io.BytesIO(bulldog)).size
    assert held == [width * height] and images.decode_budget.taken == 0


def test_photos_are_decoded_whole_unless_far_larger_than_any_model_input(
    git_dir: Path, bulldog: bytes
) -> None:
    """Parity with the model's own processor holds for ordinary photos, even for a 64-px model; the
    JPEG draft (opt-in: --jpeg-draft) only touches images of 2048 px and more."""
    exact, drafted = (
        Captioner(Settings(model=str(git_dir))),
        Captioner(Settings(model=str(git_dir), jpeg_draft=True)),
    )
    exact.load()
    drafted.engine = exact.engine
    processor = AutoProcessor.from_pretrained(git_dir)

    def reference(data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return processor(images=[image], return_tensors="pt").pixel_values[0]

    options = exact.options({})
    for data in (bulldog, _jpeg((2000, 1600))):
        assert torch.equal(drafted.prepare(data, options)["pixel_values"], reference(data))
    huge = _jpeg((2400, 2400))
    assert torch.equal(exact.prepare(huge, options)["pixel_values"], reference(huge))
    assert not torch.equal(drafted.prepare(huge, options)["pixel_values"], reference(huge))
    image = Image.open(io.BytesIO(huge))
    image.draft("RGB", (2 * drafted._draft(),) * 2)
    assert image.size == (1200, 1200)  # the draft keeps at least 1024 px a side


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_sliver_the_processors_resize_would_blow_up_is_413_before_the_resize(git_dir: Path) -> None:
    """GIT's processor resizes the short side and keeps the aspect ratio: a 1 x 100,000 PNG of a few
    hundred bytes would become 64 x 6,400,000 floats (224 x 22,400,000 for the real model)."""
    engine = CaptionEngine(str(git_dir), "cpu")
    engine.load()
    assert engine.resized(1, 100_000) == (64, 6_400_000)
    assert engine.resized(640, 427) == (95, 64)
    engine.image_processor.size = {"shortest_edge": 64, "longest_edge": 128}
    assert engine.resized(1, 100_000) == (1, 128)
    engine.image_processor.size = {"height": 32, "width": 48}
    assert engine.resized(1, 100_000) == (48, 32)
    with serving(Settings(model=str(git_dir))) as client:
        answer = client.post("/v1/captions", files={"file": ("tall.png", _png((1, 100_000)), "image/png")})
        assert answer.status_code == 413, answer.text
        error = answer.json()["error"]
        assert error["type"] == "payload_too_large" and "resize it to 64x6400000" in error["message"]
        assert client.post("/", files={"file": ("wide.png", _png((400, 1)), "image/png")}).status_code == 200


def test_a_model_folder_under_the_home_folder(vit_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(vit_gpt2_dir.parent))
    engine = CaptionEngine(f"~/{vit_gpt2_dir.name}", device="cpu")
    engine.load()
    assert engine.describe()["model"] == f"~/{vit_gpt2_dir.name}"  # the user's name for it, as given
    picture = Image.new("RGB", (32, 32), (200, 120, 40))
    assert len(engine.generate([engine.pixels(picture)], 1, 3)[0]) > 1  # tokens, from that folder's model


def test_folders_the_captioner_cannot_serve_say_why_in_one_short_line(
    vit_gpt2_dir: Path, tmp_path: Path
) -> None:
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(vit_gpt2_dir, no_tokenizer)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(Unservable, match="has no tokenizer"):
        CaptionEngine(str(no_tokenizer), device="cpu").load()

    from transformers import GPT2Config, GPT2LMHeadModel

    text_only = tmp_path / "text-only"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50)).save_pretrained(text_only)
    with pytest.raises(Unservable) as refused:
        CaptionEngine(str(text_only), device="cpu").load()
    assert "GPT2Config" in str(refused.value) and len(str(refused.value)) < 300

    class Sound:  # a processor of other inputs than an image's
        def __call__(self, images, return_tensors):
            return {"input_features": None}

    with pytest.raises(Unservable, match="gives input_features, not flattened_patches or pixel_values"):
        _check_captioning("whisper", AutoProcessor.from_pretrained(vit_gpt2_dir), Sound())

    class Question:  # Pix2Struct's VQA checkpoints: an image needs a question
        def __call__(self, images, return_tensors):
            raise ValueError("A header text must be provided for VQA models.")

    with pytest.raises(Unservable, match="cannot take an image alone: ValueError: A header text must"):
        _check_captioning("pix2struct-vqa", AutoProcessor.from_pretrained(vit_gpt2_dir), Question())


def test_the_token_limit_leaves_out_positions_spent_before_the_caption(tmp_path: Path) -> None:
    """RoBERTa's position ids start at padding_idx + 1: a decoder of 20 positions writes 18 new tokens;
    BLIP-2's query tokens come first in its decoder's positions. A caption at the limit runs (their
    end-of-text is suppressed: every caption runs that long), one token more is a 422."""
    folder = other_models.save_vit_roberta(tmp_path / "roberta", positions=20)
    captioner = Captioner(Settings(model=str(folder), max_new_tokens=8))
    captioner.load()
    assert captioner.describe()["limits"]["max_new_tokens"] == 18
    pixels = captioner.prepare(photo("coffee.jpg").read_bytes(), captioner.options({}))
    for num_beams in (1, 2):
        options = captioner.options({"num_beams": num_beams, "max_new_tokens": 18})
        assert len(captioner.predict([pixels], options)[0]) == 19  # the start token and 18 new ones
    with pytest.raises(ValueError, match="between 1 and 18"):
        captioner.options({"max_new_tokens": 19})

    blip2 = Captioner(Settings(model=str(other_models.save_blip2(tmp_path / "blip2")), max_new_tokens=8))
    blip2.load()  # 64 positions, the first 4 the Q-Former's queries
    assert blip2.describe()["limits"]["max_new_tokens"] == 60
    pixels = blip2.prepare(photo("coffee.jpg").read_bytes(), blip2.options({}))
    for num_beams in (1, 2):
        options = blip2.options({"num_beams": num_beams, "max_new_tokens": 60})
        assert len(blip2.predict([pixels], options)[0]) >= 60  # the caption runs to the limit, no 500


def test_a_model_that_cannot_caption_an_image_alone_is_refused_at_load(
    vit_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt-driven model (LLaVA, Kosmos-2) fails the load's one-token probe: one line that says
    what the captioner serves, not the warm-up's error or a failure on every image."""

    def needs_a_prompt(self, pixels, num_beams, max_new_tokens, between_steps=None):
        raise ValueError("torch.cat(): expected a non-empty list of Tensors")

    monkeypatch.setattr(CaptionEngine, "generate", needs_a_prompt)
    with pytest.raises(Unservable) as refused:
        Captioner(Settings(model=str(vit_gpt2_dir))).load()
    message = str(refused.value)
    assert "failed to caption a test image at 4 beam(s) (ValueError: torch.cat(): expected" in message
    assert "(prompt-driven ones, such as LLaVA or Kosmos-2, need a handler" in message and "\n" not in message

    monkeypatch.undo()
    instructblip = other_models.save_instructblip(tmp_path / "instructblip")  # its Q-Former reads a prompt
    with pytest.raises(Unservable, match="failed to caption a test image at 4 beam.s. .TypeError"):
        Captioner(Settings(model=str(instructblip))).load()

    folder = tmp_path / "grouped"  # generation settings this transformers runs only with remote code
    shutil.copytree(vit_gpt2_dir, folder)
    path = folder / "generation_config.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "num_beam_groups": 2, "diversity_penalty": 0.5})
    )
    with pytest.raises(
        Unservable, match="failed to caption a test image at 4 beam.s. .ValueError: Group Beam Search"
    ):
        Captioner(Settings(model=str(folder))).load()  # at the default 4 beams: what requests would run

    def out_of_memory(self, pixels, num_beams, max_new_tokens, between_steps=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(CaptionEngine, "generate", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # said as itself: no fault of the model's kind
        Captioner(Settings(model=str(vit_gpt2_dir))).load()


@pytest.mark.parametrize(
    "damage",
    ["no tokenizer.json", "weights cut short", "empty preprocessor config"],
)
def test_a_damaged_model_folder_fails_to_load_in_one_line(
    vit_gpt2_dir: Path, tmp_path: Path, damage: str
) -> None:
    """Not a model that serves empty captions (a tokenizer of a few tokens), nor a traceback."""
    folder = tmp_path / "damaged"
    shutil.copytree(vit_gpt2_dir, folder)
    if damage == "no tokenizer.json":
        (folder / "tokenizer.json").unlink()
        expected = "tokenizer knows"
    elif damage == "weights cut short":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
        expected = "cannot read"
    else:
        (folder / "preprocessor_config.json").write_text("{}")
        expected = "cannot read"
    with pytest.raises(Unservable, match=expected) as refused:
        CaptionEngine(str(folder), device="cpu").load()
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 500


def test_a_path_that_is_no_model_folder_is_said_as_such(
    vit_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file, by any path (transformers reads one as pickled weights, and its "Weights only load
    failed" suggests an unsafe retry), and a folder without config.json (transformers: "Should have a
    `model_type` key in its config.json")."""
    no_config = tmp_path / "no-config"
    shutil.copytree(vit_gpt2_dir, no_config)
    (no_config / "config.json").unlink()
    monkeypatch.chdir(tmp_path)
    for given in ("no-config", str(no_config)):
        with pytest.raises(FileNotFoundError, match=f"^no config.json in {given}: not a saved model folder"):
            CaptionEngine(given, device="cpu").load()
    shutil.copy(vit_gpt2_dir / "config.json", tmp_path / "config.json")
    for given in ("config.json", str(tmp_path / "config.json")):
        with pytest.raises(NotADirectoryError, match=f"^no model folder at {given}: it is a file"):
            CaptionEngine(given, device="cpu").load()


def test_requests_stop_where_the_models_positions_do(git_dir: Path, tmp_path: Path, caplog) -> None:
    """The tiny GIT has 64 positions: beyond 64 new tokens is a 422, not the model's IndexError; and a
    model that sets its own max_length captions without a warning per batch."""
    model = tmp_path / "git"
    shutil.copytree(git_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "max_length": 20}))
    settings = Settings(model=str(model), max_new_tokens_limit=200, max_wait_ms=0)
    with serving(settings) as client:
        assert client.get("/v1/model").json()["limits"]["max_new_tokens"] == 64
        data = photo("coffee.jpg").read_bytes()
        assert client.post("/?max_new_tokens=65", files={"file": data}).status_code == 422
        with caplog.at_level("WARNING"):
            assert client.post("/?max_new_tokens=64", files={"file": data}).status_code == 200
        assert "max_length" not in caplog.text
    with pytest.raises(Unservable, match="more than .* can generate"):
        Captioner(Settings(model=str(git_dir), max_new_tokens=70, max_new_tokens_limit=200)).load()


def test_a_captioner_subclass_keeps_its_name_and_is_described_as_itself(vit_gpt2_dir: Path) -> None:
    class Shout(Captioner):
        name = "shout"

    handler = Shout(Settings(model=str(vit_gpt2_dir)))
    assert handler.name == "shout" and Captioner(Settings(model=str(vit_gpt2_dir))).name == str(vit_gpt2_dir)
    assert handler.describe()["name"] == "shout" and handler.describe()["model"] == str(vit_gpt2_dir)
    assert handler.describe()["handler"].endswith(
        ":test_a_captioner_subclass_keeps_its_name_and_is_described_as_itself.<locals>.Shout"
    )


def test_a_file_the_model_does_not_need_may_be_unreadable_with_a_warning(
    vit_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a refusal (a stray file), but said: transformers skips an unreadable generation_config.json
    without a word, and the captions would then follow other settings."""
    folder = tmp_path / "with-notes"
    shutil.copytree(vit_gpt2_dir, folder)
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr("os.access", lambda path, mode: not str(path).endswith("notes.txt"))
    engine = CaptionEngine(str(folder), device="cpu")
    with caplog.at_level("WARNING", logger="docker_vit.engine"):
        engine.load()
    assert engine.model is not None
    assert f"cannot read {folder / 'notes.txt'}: permission denied" in caplog.text


def test_checkpoint_output_options_still_give_one_caption_per_image(tmp_path) -> None:
    """A generation_config.json asking for dict outputs or several sequences per image: still one
    list of ids per image."""
    folder = tiny_models.save_vit_gpt2(tmp_path / "m", seed=1)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(return_dict_in_generate=True, output_scores=True, num_return_sequences=2, num_beams=2)
    path.write_text(json.dumps(config))
    engine = CaptionEngine(str(folder), device="cpu", dtype="float32")
    engine.load()
    pixels = [{"pixel_values": torch.zeros(3, 224, 224)}, {"pixel_values": torch.ones(3, 224, 224)}]
    for beams in (1, 2):
        out = engine.generate(pixels, beams, 5)
        assert len(out) == 2 and all(isinstance(row, list) for row in out)


def test_generate_does_not_warn_of_padding_a_stacked_batch_never_has(
    vit_gpt2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """float16 runs the model's own `generate`, which warned at the first batch of two or more that
    an attention mask was missing ("you may observe unexpected behavior"): vit-gpt2's pad token is
    its end token. Items of one shape are stacked, never padded: the warning is wrong here."""
    from transformers.utils import logging as hf_logging

    engine = CaptionEngine(str(vit_gpt2_dir), dtype="float16")
    engine.load()
    pixels = [engine.pixels(Image.open(photo(name)).convert("RGB")) for name in PHOTOS[:2]]
    hf_logging.warning_once.cache_clear()  # said once a process: perhaps by an earlier test
    with caplog.at_level("WARNING"):
        assert len(engine.generate(pixels, 2, 5)) == 2
        hf_logging.get_logger("transformers.generation.utils").warning("another warning")
    assert "attention mask" not in caplog.text and "another warning" in caplog.text
