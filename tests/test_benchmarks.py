"""The benchmark helpers count, tokenize and load-test correctly (benchmarks/: model, flops, load, baseline)."""

from __future__ import annotations

import importlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks import flops, load, model
from tests.conftest import photo


def test_tokenizer_has_gpt2_vocabulary_and_every_id_decodes() -> None:
    tokenizer = model.tokenizer()
    assert len(tokenizer) == model.VOCAB_SIZE == 50257
    assert tokenizer.eos_token_id == model.EOS_ID == 50256
    ids = list(range(0, model.VOCAB_SIZE, 97)) + [model.EOS_ID - 1, model.EOS_ID]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str) and text and "<|endoftext|>" not in text


def test_flops_count_vit_gpt2_by_hand() -> None:
    # Encoder ~35 GFLOP, cross K/V ~5.6, one decoder token per beam ~0.28: beam 4 ~57.7, greedy ~44.9.
    assert flops.per_image(4, 15) == pytest.approx(57.68e9, rel=1e-3)
    assert flops.per_image(1, 15) == pytest.approx(44.95e9, rel=1e-3)
    one_more = flops.per_image(1, 16) - flops.per_image(1, 15)
    assert one_more == pytest.approx(
        2 * (12 * (6 * 768**2 + 2 * 768 * 3072 + 2 * 16 * 768 + 2 * 197 * 768) + 768 * 50257)
    )


def test_build_never_writes_over_a_folder_of_other_files(tmp_path: Path) -> None:
    """`--model-dir` naming the user's own model must not replace it with random weights."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="no benchmark model folder"):
        model.build(tmp_path, tiny=True)
    assert [path.name for path in tmp_path.iterdir()] == ["config.json"]


def test_a_build_cut_short_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or a full disk) after the weights: the folder is the benchmark's own, not a user's."""
    real = model.tokenizer

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.build(tmp_path, tiny=True)
    monkeypatch.setattr(model, "tokenizer", real)
    assert model.build(tmp_path, tiny=True) == tmp_path
    assert json.loads((tmp_path / "bench-model.json").read_text())["tiny"]


def test_shape_of_reads_a_saved_config(tmp_path: Path) -> None:
    encoder = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "patch_size": 16,
        "image_size": 224,
    }
    decoder = {"n_embd": 32, "n_layer": 3, "n_inner": None, "vocab_size": 500}
    (tmp_path / "config.json").write_text(json.dumps({"encoder": encoder, "decoder": decoder}))
    assert flops.shape_of(tmp_path) == flops.Shape(64, 2, 128, 196, 768, 32, 3, 128, 500)


class _Echo(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = b'name="file"' in body and b"IMAGE" in body and b'name="num_beams"\r\n\r\n1' in body
        self.send_response(200 if ok else 400)
        self.end_headers()
        self.wfile.write(b"a caption")

    def log_message(self, *args: object) -> None:
        pass


def test_closed_loop_client_sends_every_request_once() -> None:
    server = ThreadingHTTPServer((load.HOST, 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        level = load.drive(
            server.server_address[1], [b"IMAGE"], 4, 10, fields={"num_beams": "1"}, timeout=10, deadline_s=30
        )
    finally:
        server.shutdown()
    assert (level.requests, level.errors, len(level.latencies)) == (10, 0, 10)
    assert level.sample == "a caption" and level.throughput > 0
    assert level.quantile(0.5) <= level.quantile(0.95)


def test_baseline_app_answers_like_the_original(vit_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flask", reason="the baseline needs the 'bench' extra (flask)")
    monkeypatch.setenv("BASELINE_MODEL_DIR", str(vit_gpt2_dir))
    monkeypatch.setenv("BASELINE_DEVICE", "cpu")
    monkeypatch.delitem(sys.modules, "benchmarks.baseline_app", raising=False)
    app = importlib.import_module("benchmarks.baseline_app")
    with photo("french_bulldog.jpg").open("rb") as image:
        response = app.app.test_client().post("/", data={"file": (image, "dog.jpg")})
    assert response.status_code == 200
    expected = app.tokenizer.decode(
        app.model.generate(
            app.feature_extractor(
                images=[app.Image.open(photo("french_bulldog.jpg")).convert("RGB")], return_tensors="pt"
            ).pixel_values,
            max_length=16,
            num_beams=4,
        )[0],
        skip_special_tokens=True,
    ).strip()
    assert response.get_data(as_text=True) == expected


def test_agreement_compares_a_dtype_with_float32(
    vit_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """float32 against itself agrees everywhere: the counting is right, over ten pictures a photo."""
    from benchmarks import agreement

    monkeypatch.setattr(agreement.model, "build", lambda folder, tiny: vit_gpt2_dir)
    assert agreement.main(["--quick", "--dtypes", "float32", "--beams", "1,2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float32")]
    assert len(rows) == 2 and all("| 20 of 20 |" in row and "(100%)" in row for row in rows), rows


def test_agreement_counts_a_captions_own_tokens() -> None:
    from benchmarks.agreement import own_tokens

    assert own_tokens([0, 5, 6, 2, 2, 2], {2}) == [5, 6, 2]  # no start token, no padding after the end
    assert own_tokens([0, 5, 6, 7], {2}) == [5, 6, 7]  # cut by the length


def test_graph_probe_times_the_eager_steps_on_a_cpu(
    vit_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Without a GPU the probe still runs its eager column: the script is checked before a lent run."""
    from benchmarks import graph_probe

    monkeypatch.setattr(graph_probe.model, "build", lambda folder, tiny: vit_gpt2_dir)
    assert graph_probe.main(["--quick", "--device", "cpu", "--beams", "2"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "|---" not in line
    ]
    assert [row.split("|")[1:3] for row in rows[1:]] == [[" 1 ", " 2 "], [" 4 ", " 2 "]], rows
    assert all(row.count("–") == 3 for row in rows[1:]), rows


def test_report_names_a_gpu_and_keeps_its_small_shares() -> None:
    import argparse

    from benchmarks import report

    assert report._where(argparse.Namespace(device="cuda")) == "on cuda"
    assert report._where(argparse.Namespace(device="cpu")).endswith("CPU threads")
    assert report._share(0.0034) == "0.34%" and report._share(0.48) == "48%"


def test_cuda_parity_script_compares_every_form_with_generate(capsys: pytest.CaptureFixture) -> None:
    """The script a lent GPU runs works here first: every form exact on a CPU, narrow model."""
    from benchmarks import cuda_parity

    forms = ",".join(cuda_parity.VARIANTS)
    assert (
        cuda_parity.main(
            ["--quick", "--device", "cpu", "--sides", "32", "--dtypes", "float32", "--variants", forms]
        )
        == 0
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32 ")]
    assert len(rows) == 2 * len(cuda_parity.VARIANTS) and all(row.endswith("| 0: - |") for row in rows), rows
