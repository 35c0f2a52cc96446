"""`docker_vit.decoding` must return exactly `model.generate`'s token ids, or decline via `supports`."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from conftest import photo
from PIL import Image
from transformers import (
    AutoImageProcessor,
    BertConfig,
    GenerationConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from docker_vit import decoding, gpt2_cache, products

PHOTOS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "french_bulldog.jpg"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls are dominated by OpenMP hand-offs, and awful when the cores are oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(folder: Path) -> VisionEncoderDecoderModel:
    return VisionEncoderDecoderModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def plain(vit_gpt2_dir: Path) -> VisionEncoderDecoderModel:
    return _load(vit_gpt2_dir)


@pytest.fixture(scope="module")
def eos_model(eos_model_dir: Path) -> VisionEncoderDecoderModel:
    return _load(eos_model_dir)


@pytest.fixture(scope="module")
def sharp(vit_gpt2_dir: Path) -> VisionEncoderDecoderModel:
    """Scaled decoder weights make peaked, image-dependent distributions; a moderate EOS boost makes
    hypotheses finish at many different steps (the finished-beam bookkeeping path)."""
    model = _load(vit_gpt2_dir)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
        model.decoder.lm_head.weight[eos] += 3.0 * model.decoder.lm_head.weight[:50].mean(0)
    return model


@pytest.fixture(scope="module")
def pixels(vit_gpt2_dir: Path) -> torch.Tensor:
    """Four real photos plus two random images: a batch whose rows really differ."""
    processor = AutoImageProcessor.from_pretrained(vit_gpt2_dir)
    images = [Image.open(photo(name)).convert("RGB") for name in PHOTOS]
    px = processor(images=images, return_tensors="pt").pixel_values
    torch.manual_seed(0)
    return torch.cat([px, torch.randn(2, *px.shape[1:]) * 2.0])


def _cfg(model: VisionEncoderDecoderModel, **kw) -> GenerationConfig:
    ids = {k: getattr(model.generation_config, k) for k in ("decoder_start_token_id", "pad_token_id")}
    return GenerationConfig(eos_token_id=model.generation_config.eos_token_id, **ids, **kw)


def _mismatches(model, px: torch.Tensor, configs: list[GenerationConfig]) -> list[str]:
    bad = []
    for cfg in configs:
        assert decoding.supports(model, cfg), cfg
        want = model.generate(pixel_values=px, generation_config=cfg)
        got = decoding.generate(model, px, cfg)
        if want.shape != got.shape or not torch.equal(want, got):
            bad.append(f"{cfg.num_beams=} {cfg.max_new_tokens=} {cfg.early_stopping=} {cfg.length_penalty=}")
    return bad


@pytest.mark.parametrize("name", ["plain", "eos_model", "sharp"])
def test_beam_and_greedy_parity(name: str, request: pytest.FixtureRequest, pixels: torch.Tensor) -> None:
    model = request.getfixturevalue(name)
    configs = [_cfg(model, num_beams=1, max_new_tokens=n) for n in (1, 5, 15)]
    for beams, new in itertools.product((2, 4, 5), (1, 5, 15)):
        configs.append(_cfg(model, num_beams=beams, max_new_tokens=new))
    for beams, early in itertools.product((2, 5), (True, "never")):
        configs.append(_cfg(model, num_beams=beams, max_new_tokens=15, early_stopping=early))
    assert _mismatches(model, pixels, configs) == []


@pytest.mark.parametrize("penalty", [0.0, 0.5, 2.0, -1.0])
def test_length_penalty_parity(penalty: float, sharp, eos_model, pixels: torch.Tensor) -> None:
    configs = [
        _cfg(m, num_beams=4, max_new_tokens=15, early_stopping=early, length_penalty=penalty)
        for m in (sharp,)
        for early in (False, True, "never")
    ]
    assert _mismatches(sharp, pixels, configs) == []
    assert (
        _mismatches(eos_model, pixels, [_cfg(eos_model, num_beams=3, max_length=12, length_penalty=penalty)])
        == []
    )


def test_eos_really_happens(sharp, eos_model, pixels: torch.Tensor) -> None:
    """Guard against a vacuous parity test: some captions end before max length, others don't."""
    for model in (sharp, eos_model):
        eos = model.generation_config.eos_token_id
        out = decoding.generate(model, pixels, _cfg(model, num_beams=4, max_new_tokens=15))
        ended = (out[:, 1:] == eos).any(dim=1)
        assert ended.any(), out
    out = decoding.generate(sharp, pixels, _cfg(sharp, num_beams=4, max_new_tokens=15))
    assert not (out[:, 1:] == sharp.generation_config.eos_token_id).any(dim=1).all(), out


def test_min_length_and_model_defaults(sharp, pixels: torch.Tensor) -> None:
    """Options that reach generate through the merged config: min_new_tokens, the model's ids."""
    configs = [
        _cfg(sharp, num_beams=4, max_new_tokens=10, min_new_tokens=4),
        _cfg(sharp, num_beams=1, max_new_tokens=10, min_length=6),
        GenerationConfig(num_beams=2, max_length=9),  # ids come from model.generation_config
    ]
    assert _mismatches(sharp, pixels, configs) == []


def test_single_image_and_output_type(plain, pixels: torch.Tensor) -> None:
    cfg = _cfg(plain, num_beams=4, max_length=16)
    out = decoding.generate(plain, pixels[:1], cfg)
    assert out.dtype == torch.long and out.shape[0] == 1
    assert torch.equal(out, plain.generate(pixel_values=pixels[:1], generation_config=cfg))


def _near_tie_model(width: int, heads: int) -> VisionEncoderDecoderModel:
    """A decoder whose output embedding holds pairs of tokens one float step apart: any rounding that
    differs from `generate`'s, however small, picks the other token of a pair."""
    model = tiny_models.vit_gpt2(512, 511, seed=2, image_size=64, n_embd=width, n_head=heads).eval()
    with torch.no_grad():
        for weight in model.decoder.parameters():
            if weight.dim() > 1:
                weight.mul_(2.0)
        rows = model.decoder.lm_head.weight
        for token in range(10, 60, 5):
            rows[token] = torch.randn(width) * 0.5
            rows[token + 1] = rows[token]
            rows[token + 1, 0] = torch.nextafter(rows[token, 0], torch.tensor(1e9))
    return model


@pytest.fixture(scope="module")
def near_ties() -> VisionEncoderDecoderModel:
    return _near_tie_model(256, 4)


def test_beam_search_rounds_as_generate_does(near_ties) -> None:
    """Every beam is its own query row in cross-attention and at the first step, as in `generate`:
    one attention call for all beams of an image, or one row per image at the first step, rounded
    otherwise and picked the other token of a near tie."""
    generator = torch.Generator().manual_seed(9)
    configs = []
    for beams, early in itertools.product((2, 4, 5), (True, False, "never")):
        configs.append(_cfg(near_ties, num_beams=beams, max_new_tokens=5, early_stopping=early))
    for batch in (1, 3, 6):
        px = torch.randn(batch, 3, 64, 64, generator=generator) * 2.0
        assert _mismatches(near_ties, px, configs) == []


def test_beam_search_rounds_as_generate_does_on_two_threads(near_ties) -> None:
    """With more than one thread a cross-attention cell can round otherwise on one thread than on
    another, and `generate` hands the cells to the threads by beam: the beams share their image's K/V
    only where that gives the same bits (on 2 threads here, an even number of images)."""
    generator = torch.Generator().manual_seed(9)
    configs = [_cfg(near_ties, num_beams=beams, max_new_tokens=5) for beams in (3, 4, 5)]
    torch.set_num_threads(2)
    try:
        for batch in (1, 4, 7):
            px = torch.randn(batch, 3, 64, 64, generator=generator) * 2.0
            assert _mismatches(near_ties, px, configs) == []
    finally:
        torch.set_num_threads(1)


def test_beam_search_rounds_as_generate_does_on_many_threads(near_ties) -> None:
    """MKL rounds a product of few rows otherwise than the same rows in a larger one, more of them the
    more threads: at 16 threads one image's 17 encoder rows gave other K/V bits than `generate`'s 68
    repeated rows, and other tokens (a review: 7 of 24 decodes). Such batches take `generate`'s form."""
    generator = torch.Generator().manual_seed(9)
    configs = [_cfg(near_ties, num_beams=beams, max_new_tokens=8) for beams in (2, 4, 5)]
    torch.set_num_threads(16)
    try:
        for _ in range(3):
            px = torch.randn(1, 3, 64, 64, generator=generator) * 2.0
            assert _mismatches(near_ties, px, configs) == []
        state = torch.randn(1, 17, 256, generator=generator)
        c_attn = near_ties.decoder.transformer.h[0].crossattention.c_attn
        assert not products.per_image([c_attn], state, 4)  # 17 rows alone round otherwise here
        assert decoding._encode(near_ties, px, 4)[1] == "expanded"
    finally:
        torch.set_num_threads(1)
    assert products.per_image([c_attn], state, 4)  # on one thread they do not
    assert decoding._encode(near_ties, px, 4)[1] == "shared"


def test_a_thread_share_that_cuts_an_image_keeps_kv_per_beam() -> None:
    """Whether a cell rounds otherwise on another thread depends on its values too, so no check on
    random values can vouch for a batch whose thread shares cut an image: 7 images x 3 beams x 2 heads
    on 2 threads (21 cells each, an image is 6) gave a token of its own in this model before."""
    model = _near_tie_model(32, 2)
    config = _cfg(model, num_beams=3, max_new_tokens=8, early_stopping=False)
    generator = torch.Generator().manual_seed(3)
    torch.set_num_threads(2)
    try:
        for _ in range(2):
            px = torch.randn(7, 3, 64, 64, generator=generator) * 2.0
            assert _mismatches(model, px, [config]) == []
        assert not gpt2_cache.kv_per_image(model.decoder, torch.zeros(7, 17, 32), 3)
        assert gpt2_cache.kv_per_image(model.decoder, torch.zeros(4, 17, 32), 3)  # 12 cells each: 2 images
        assert gpt2_cache.kv_per_image(model.decoder, torch.zeros(1, 17, 32), 3)  # one image: a stride of 0
    finally:
        torch.set_num_threads(1)


def test_beams_share_an_image_kv_only_where_exact(near_ties) -> None:
    """The check runs once per shape, dtype and thread count; a GPU, greedy and reduced precision skip it."""
    decoder = near_ties.decoder
    attn = decoder.transformer.h[0].crossattention
    shape = (4, attn.num_heads, 17, attn.head_dim, attn.scaling)  # 4 beams, 17 encoder tokens
    states = torch.zeros(3, 17, 256)
    gpt2_cache._shares_exact.clear()
    assert gpt2_cache.kv_per_image(decoder, states, 4)  # one thread: every cell on the same thread
    assert gpt2_cache.kv_per_image(decoder, states, 1)
    assert gpt2_cache.kv_per_image(decoder, states.bfloat16(), 4)
    assert not gpt2_cache.kv_per_image(decoder, torch.zeros(3, 17, 256, device="meta"), 4)
    assert set(gpt2_cache._shares_exact) == {(3, *shape, torch.float32, 1)}  # the others skip the check
    torch.set_num_threads(2)
    try:
        assert not gpt2_cache.kv_per_image(decoder, states, 4)  # 48 cells, 24 each: image 2 is cut
        assert gpt2_cache.kv_per_image(decoder, torch.zeros(2, 17, 256), 4)  # 16 cells an image
        gpt2_cache.kv_per_image(decoder, states.double(), 4)
    finally:
        torch.set_num_threads(1)
    assert set(gpt2_cache._shares_exact) == {
        (3, *shape, torch.float32, 1),
        (3, *shape, torch.float32, 2),
        (2, *shape, torch.float32, 2),
        (3, *shape, torch.float64, 2),
    }


def test_a_torch_without_the_shared_form_keeps_kv_per_beam(monkeypatch) -> None:
    """An attention that refuses the grouped call (a torch without `enable_gqa`) only means per beam."""

    def refuse(*args, **kwargs):
        raise TypeError("scaled_dot_product_attention() got an unexpected keyword argument 'enable_gqa'")

    monkeypatch.setattr(gpt2_cache, "_shared", refuse)
    assert gpt2_cache._shared_as_generate(2, 4, 12, 197, 64, 0.125, torch.float32) is False


def test_shared_kv_are_read_as_one_query_row_per_beam() -> None:
    """The shared forms (one image's K/V by a stride of 0, several images' beams as grouped heads)
    equal one call per beam, each a query of length 1, at one thread."""
    torch.manual_seed(0)
    for images, beams, length in [(1, 4, 197), (16, 4, 197), (3, 5, 577), (6, 2, 50), (5, 1, 197)]:
        q_rows = torch.randn(images * beams, 768)
        q = q_rows.view(images, beams, 12, 64).transpose(1, 2)
        kv = torch.randn(images, length, 2 * 768)
        k, v = (t.reshape(-1, 768).view(images, -1, 12, 64).transpose(1, 2) for t in kv.split(768, 2))
        per_beam = [
            F.scaled_dot_product_attention(q[:, :, j : j + 1], k, v, scale=0.125) for j in range(beams)
        ]
        want = torch.cat(per_beam, dim=2).transpose(1, 2).reshape(images * beams, 768)
        assert torch.equal(gpt2_cache._shared(q_rows, k, v, beams, 0.125), want)


@pytest.mark.parametrize("form", ["expanded", "repeated"])
@pytest.mark.parametrize("name", ["sharp", "eos_model", "near_ties"])
def test_per_beam_cross_attention_keeps_parity(name: str, form: str, request, pixels, monkeypatch) -> None:
    """The per-beam forms (cross K/V per beam, one attention call, as `generate` shapes them: from
    states repeated per beam, a GPU's, or copied from each image's K/V, a CPU's where the beams may not
    share them) keep every token too; here they are forced."""
    model = request.getfixturevalue(name)
    made = []

    class Recording(decoding.Gpt2Stepper):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(decoding, "kv_per_image", lambda decoder, states, beams: False)
    monkeypatch.setattr(decoding, "_copies", lambda: form)
    monkeypatch.setattr(decoding, "Gpt2Stepper", Recording)
    px = (
        pixels
        if name != "near_ties"
        else torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    )
    configs = [_cfg(model, num_beams=b, max_new_tokens=9) for b in (1, 2, 4, 5)]
    configs.append(_cfg(model, num_beams=4, max_new_tokens=9, early_stopping="never", length_penalty=2.0))
    assert _mismatches(model, px, configs) == []
    assert made and all(s.per_beam and s.batch == px.shape[0] for s in made)
    assert made[-1].cross[0][0].shape[0] == px.shape[0] * 4  # K/V rows: images x beams
    if (
        name == "near_ties" and form == "expanded"
    ):  # a 32-wide encoder, a 256-wide decoder: both project the per-beam states
        rows: list[int] = []
        hook = model.enc_to_dec_proj.register_forward_hook(lambda mod, args, out: rows.append(out.shape[0]))
        try:
            for run in (
                model.generate,
                lambda pixel_values, generation_config: decoding.generate(
                    model, pixel_values, generation_config
                ),
            ):
                rows.clear()
                run(pixel_values=px, generation_config=configs[2])  # 4 beams
                assert rows and set(rows) == {px.shape[0] * 4}, rows
        finally:
            hook.remove()


def test_split_products_keep_parity(sharp, eos_model, pixels, monkeypatch) -> None:
    """The CPU fast paths (vocabulary blocks incl. a short last one, Conv1D column halves) keep every
    token of `generate`, and really run."""
    monkeypatch.setattr(products, "VOCAB_BLOCK", 64)
    for model in (sharp, eos_model):
        configs = [_cfg(model, num_beams=b, max_new_tokens=15) for b in (1, 4)]
        configs.append(_cfg(model, num_beams=3, max_new_tokens=9, early_stopping=True, length_penalty=2.0))
        assert _mismatches(model, pixels, configs) == []
        vocab = products._verdicts[model.decoder.lm_head]
        assert vocab and all(vocab.values()), "the blocked path must really have run"
        convs = [products._verdicts.get(b.mlp.c_fc, {}) for b in model.decoder.transformer.h]
        assert all(convs) and any(any(v.values()) for v in convs), "the halves must really have run"


@pytest.mark.parametrize("rows", [1, 4, 16, 32, 64])
def test_full_vocabulary_projection_is_blocked_and_exact(rows: int) -> None:
    """At vit-gpt2's size (50,257 x 768) the first product of a row count is checked every way, and
    this CPU's bits match, so the blocks are in the race from then on; a head with a bias is left alone."""
    torch.manual_seed(rows)
    head = torch.nn.Linear(768, 50257, bias=False)
    x = torch.randn(rows, 768)
    assert torch.equal(products.vocabulary(head, x), head(x))  # checked every way
    forms = [("looped", products.VOCAB_BLOCK), ("stacked", products.VOCAB_BLOCK)]
    assert products._verdicts[head] == {(form, rows, 1): True for form in forms}
    for _ in range(3):
        assert torch.equal(products.vocabulary(head, x), head(x))  # the race's forms
    biased = torch.nn.Linear(768, 50257)
    products.vocabulary(biased, torch.randn(2, 768))
    assert biased not in products._verdicts


@pytest.mark.parametrize("vocab", [1025, 2049, 2050, 3072])
def test_a_short_rest_of_the_vocabulary_joins_the_last_block(vocab: int) -> None:
    """A one-row last product rounded some values otherwise than the plain product, so a split that
    passed its first check at 2 rows could differ later (vocabulary 1025, a review); a short rest now
    joins the last whole block, and every later call keeps the plain product's bits."""
    torch.manual_seed(vocab)
    blocks = products._whole_blocks(vocab)
    assert blocks == {1025: 0, 2049: 1, 2050: 1, 3072: 3}[vocab]
    head = torch.nn.Linear(32, vocab, bias=False)
    for _ in range(100):
        x = torch.randn(2, 32)
        assert torch.equal(products.vocabulary(head, x), head(x))
        if blocks:
            assert torch.equal(products._looped(head.weight, x), head(x))
            assert torch.equal(products._stacked(head.weight, x), head(x))
    assert (head in products._verdicts) == bool(blocks)


def test_conv1d_column_parts_are_exact_at_gpt2_shapes() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    for n_out, n_in in [(2304, 768), (768, 768), (3072, 768), (768, 3072)]:
        conv = Conv1D(n_out, n_in)
        for rows in (1, 4, 16, 64):
            x = torch.randn(rows, n_in)
            want = torch.addmm(conv.bias, x, conv.weight)
            assert torch.equal(products.conv1d(conv, x), want)  # checked every way
            assert torch.equal(products.conv1d(conv, x), want)  # the verdict's choice
        forms = products.COLUMN_PARTS
        assert set(products._verdicts[conv]) == {(form, rows, 1) for form in forms for rows in (1, 4, 16, 64)}


def test_a_split_that_changes_bits_is_never_used(monkeypatch) -> None:
    """The safety net: where the split form differs in a single bit, the plain product stays."""
    from transformers.pytorch_utils import Conv1D

    monkeypatch.setattr(
        products, "_columns", lambda bias, x, weight, parts: torch.addmm(bias, x, weight) * 1.0001
    )
    conv = Conv1D(64, 32)
    x = torch.randn(3, 32)
    for _ in range(2):
        assert torch.equal(products.conv1d(conv, x), torch.addmm(conv.bias, x, conv.weight))
    assert products._verdicts[conv] == {("halves", 3, 1): False, ("quarters", 3, 1): False}
    six = Conv1D(66, 32)  # halves, but no quarters
    products.conv1d(six, x)
    assert products._verdicts[six] == {("halves", 3, 1): False}
    odd = Conv1D(63, 32)  # no even halves: the plain product, nothing recorded
    assert torch.equal(products.conv1d(odd, x), torch.addmm(odd.bias, x, odd.weight))
    assert odd not in products._verdicts
    strided = Conv1D(64, 32)  # a weight that is a transposed view cannot be halved without a copy
    strided.weight = torch.nn.Parameter(torch.randn(64, 32).t())
    assert torch.equal(products.conv1d(strided, x), torch.addmm(strided.bias, x, strided.weight))
    assert strided not in products._verdicts
    broken = Conv1D(64, 32)  # a form this torch build cannot run is not used, and breaks nothing
    monkeypatch.setattr(products, "_columns", lambda bias, x, weight, parts: torch.bmm(x, weight))
    assert torch.equal(products.conv1d(broken, x), torch.addmm(broken.bias, x, broken.weight))
    assert products._verdicts[broken] == {("halves", 3, 1): False, ("quarters", 3, 1): False}
    many = torch.randn(products.SPLIT_MAX_ROWS + 1, 32)  # enough rows to fill the cores unsplit
    assert torch.equal(products.conv1d(conv, many), torch.addmm(conv.bias, many, conv.weight))
    assert len(products._verdicts[conv]) == 2


def test_verdicts_are_per_thread_count_and_float32_only() -> None:
    """MKL splits some sums over its threads, so a verdict taken at one thread count says nothing of
    another; in bfloat16 a match depends on the values, so the plain product always runs."""
    from transformers.pytorch_utils import Conv1D

    conv, x = Conv1D(64, 32), torch.randn(3, 32)
    products.conv1d(conv, x)
    torch.set_num_threads(2)
    try:
        products.conv1d(conv, x)
    finally:
        torch.set_num_threads(1)
    assert set(products._verdicts[conv]) == {
        (form, 3, threads) for form in products.COLUMN_PARTS for threads in (1, 2)
    }
    half = Conv1D(64, 32).to(torch.bfloat16)
    head = torch.nn.Linear(32, 4 * products.VOCAB_BLOCK, bias=False).to(torch.bfloat16)
    hx = x.to(torch.bfloat16)
    assert torch.equal(products.conv1d(half, hx), torch.addmm(half.bias, hx, half.weight))
    assert torch.equal(products.vocabulary(head, hx), head(hx))
    assert half not in products._verdicts and head not in products._verdicts


def test_of_the_exact_forms_the_fastest_is_kept() -> None:
    """Every form is timed in turn for `RACE_CALLS` calls, then only the fastest one runs."""
    calls: list[str] = []

    def form(name: str, pause: float):
        def run() -> torch.Tensor:
            calls.append(name)
            time.sleep(pause)
            return torch.zeros(1)

        return run

    for forms in itertools.permutations((form("slow", 0.004), form("fast", 0.0), form("middling", 0.002))):
        calls.clear()
        race = products._Race(len(forms))
        for _ in range(3 * products.RACE_CALLS):
            race.run(forms)
        assert calls.count("slow") == calls.count("fast") == calls.count("middling") == products.RACE_CALLS
        calls.clear()
        for _ in range(3):
            race.run(forms)
        assert calls == ["fast"] * 3


def test_an_exact_split_that_runs_slower_is_dropped(monkeypatch) -> None:
    """On a CPU where MKL already spreads few-row products over the cores, the column parts only cost."""
    from transformers.pytorch_utils import Conv1D

    columns = products._columns
    used: list[int] = []

    def slow_columns(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
        used.append(parts)
        time.sleep(0.003)
        return columns(bias, x, weight, parts)

    monkeypatch.setattr(products, "_columns", slow_columns)
    monkeypatch.setattr(products, "_races", {})
    conv = Conv1D(64, 32)
    x = torch.randn(3, 32)
    want = torch.addmm(conv.bias, x, conv.weight)
    for _ in range(1 + 3 * products.RACE_CALLS):  # the bit checks, then the race
        assert torch.equal(products.conv1d(conv, x), want)
    assert products._verdicts[conv] == {("halves", 3, 1): True, ("quarters", 3, 1): True}
    assert sorted(used) == [2] * (1 + products.RACE_CALLS) + [4] * (1 + products.RACE_CALLS)
    used.clear()
    for _ in range(3):
        assert torch.equal(products.conv1d(conv, x), want)
    assert used == []


@pytest.mark.parametrize(
    "option",
    [
        {"do_sample": True},
        {"repetition_penalty": 1.2},
        {"no_repeat_ngram_size": 2},
        {"bad_words_ids": [[5]]},
        {"num_return_sequences": 2},
        {"num_beam_groups": 2, "diversity_penalty": 0.5},
        {"forced_eos_token_id": 3},
        {"suppress_tokens": [4]},
        {"output_scores": True, "return_dict_in_generate": True},
        {"max_new_tokens": None, "max_length": 1},
        {"max_time": 5.0},
        {"min_new_tokens": 2, "sequence_bias": {(5,): 1.0}},
    ],
)
def test_declines_what_it_does_not_reproduce(option: dict, plain) -> None:
    base = {"num_beams": 4, "max_new_tokens": 5}
    assert decoding.supports(plain, _cfg(plain, **base))
    assert not decoding.supports(plain, _cfg(plain, **{**base, **option}))


def test_declines_non_gpt2_decoder_and_training_mode(plain) -> None:
    enc = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    dec = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    dec.is_decoder = dec.add_cross_attention = True
    bert = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)).eval()
    cfg = GenerationConfig(num_beams=4, max_new_tokens=5, decoder_start_token_id=1, eos_token_id=2)
    assert not decoding.supports(bert, cfg)
    plain.train()
    try:
        assert not decoding.supports(plain, _cfg(plain, num_beams=4, max_new_tokens=5))
    finally:
        plain.eval()


def test_declines_attention_other_than_sdpa(near_ties) -> None:
    """The stepper always runs SDPA: a model set to eager attention (a config.json's
    "attn_implementation") rounds otherwise in `generate`, so it must take `generate`."""
    cfg = _cfg(near_ties, num_beams=2, max_new_tokens=5)
    assert decoding.supports(near_ties, cfg)
    near_ties.set_attn_implementation("eager")
    try:
        assert not decoding.supports(near_ties, cfg)
    finally:
        near_ties.set_attn_implementation("sdpa")


@pytest.mark.parametrize(
    ("dtype", "fast"), [(torch.float16, False), (torch.bfloat16, True), (torch.float32, True)]
)
def test_declines_float16(vit_gpt2_dir: Path, dtype: torch.dtype, fast: bool) -> None:
    """Half precision rounds the per-image attention calls otherwise than `generate` (an H200 gave 27 of 30
    configurations alike): it takes `generate`; bfloat16 and float32 keep the fast path."""
    model = _load(vit_gpt2_dir).to(dtype)  # its own copy: the module's shared models stay float32
    assert decoding.supports(model, _cfg(model, num_beams=2, max_new_tokens=5)) is fast


@pytest.mark.parametrize("extra", [5000, -1])
def test_min_length_ignores_eos_ids_outside_the_vocabulary(extra: int, sharp, pixels) -> None:
    """`generate` masks EOS ids with `isin`: an id past the vocabulary (or negative) masks nothing."""
    eos = sharp.generation_config.eos_token_id
    cfg = _cfg(sharp, num_beams=3, max_new_tokens=8, min_new_tokens=6)
    cfg.eos_token_id = [eos, extra]
    assert _mismatches(sharp, pixels, [cfg]) == []
