"""The original service, as a baseline: Flask, one image per request, `model.generate` with beam 4.

Run it as the original ran, under gunicorn with one sync worker:
    BASELINE_MODEL_DIR=/tmp/docker-vit-bench-model gunicorn -w 1 benchmarks.baseline_app:app
It mirrors the original's code path on purpose (no batching, transformers' own `generate`, the model
on cuda when there is one); only the model folder, and the beam width for the greedy comparison, come
from the environment.
"""

from __future__ import annotations

import os

import torch
from flask import Flask, request
from PIL import Image
from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

MODEL_DIR = os.environ["BASELINE_MODEL_DIR"]
NUM_BEAMS = int(os.environ.get("BASELINE_NUM_BEAMS", "4"))
MAX_LENGTH = 16

device = torch.device(os.environ.get("BASELINE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
model = VisionEncoderDecoderModel.from_pretrained(MODEL_DIR).to(device)
feature_extractor = ViTImageProcessor.from_pretrained(MODEL_DIR)
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)

app = Flask(__name__)


def predict_caption(image: Image.Image) -> str:
    if image.mode != "RGB":
        image = image.convert(mode="RGB")
    pixel_values = feature_extractor(images=[image], return_tensors="pt").pixel_values.to(device)
    output_ids = model.generate(pixel_values, max_length=MAX_LENGTH, num_beams=NUM_BEAMS)
    preds = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
    return preds[0].strip()


@app.route("/", methods=["POST"])
def caption() -> str:
    image = Image.open(request.files["file"].stream)
    return predict_caption(image)
