"""MOON3.0 on the tiny preset: shapes, switchable components, gradients, reasoning, checkpoints,
the batch predictor's per-row errors and batching. Inputs are real sample products and photos."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.moon3 import parse_attributes, truncate
from model.moon3_checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from model.moon3_config import Moon3Config, PromptBudget
from model.moon3_predictor import make_predict_fn, plan_batches
from model.moon3_processing import Moon3Processor, ProductInput, ProductRejected
from moonpipe.settings import Settings

RAW = Path(Settings.from_env().raw_data_dir)


def _photo(name: str, size: int = 160) -> bytes:
    """A real Vendure photo, downscaled so the tests stay fast."""
    image = Image.open(RAW / "vendure" / "images" / name).convert("RGB")
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def products() -> list[ProductInput]:
    photos = sorted(p.name for p in (RAW / "vendure" / "images").glob("*.jpg"))[:4]
    return [
        ProductInput("Laptop", _photo(photos[0]), "Electronics > Computers", {"brand": "Apple", "RAM": "8GB"},
                     "Now equipped with seventh-generation Intel Core processors."),
        ProductInput("Wooden Side Desk", _photo(photos[1]), "Home & Garden > Furniture", {"color": "wood"}, None),
        ProductInput("Hi-Top Basketball Shoe", _photo(photos[2]), "Sports & Outdoor > Footwear", {"color": "white"},
                     "Classic high-top silhouette."),
        ProductInput("Hanging Plant", _photo(photos[3]), "Home & Garden > Plants", {}, "Perfect for the balcony."),
    ]


@pytest.fixture(scope="module")
def model():
    return build_model(Moon3Config())


def _embed(model, products, **kwargs):
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    batch = processor.collate([processor.encode(p) for p in products])
    with torch.inference_mode():
        return model(**batch, **kwargs)


def test_embeddings_are_normalised_and_truncatable(model, products):
    out = _embed(model, products)
    assert out.embeddings.shape == (4, 128)
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(4), atol=1e-5)
    short = _embed(model, products, dim=32).embeddings
    assert short.shape == (4, 32)
    assert torch.allclose(short, truncate(out.embeddings, 32), atol=1e-6)
    assert torch.allclose(short.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert len({tuple(row.round(decimals=4).tolist()) for row in out.embeddings}) == 4  # products differ


def test_fire_gates_start_closed_and_change_the_output_once_open(products):
    with_fire = build_model(Moon3Config(use_fire=True))
    without = build_model(Moon3Config(use_fire=False))
    assert torch.equal(with_fire.fire.gates, torch.zeros_like(with_fire.fire.gates))
    closed = _embed(with_fire, products).embeddings
    assert torch.allclose(closed, _embed(without, products).embeddings, atol=1e-6)  # neutral at init
    with torch.no_grad():
        with_fire.fire.gates.fill_(0.5)
    opened = _embed(with_fire, products).embeddings
    assert (opened - closed).abs().max() > 1e-3


def test_mhmf_gates_start_even_and_fusion_changes_the_output(products):
    with_mhmf = build_model(Moon3Config(use_mhmf=True))
    without = build_model(Moon3Config(use_mhmf=False))
    out = _embed(with_mhmf, products)
    assert out.modality_gates.shape == (4, 4)
    assert torch.allclose(out.modality_gates, torch.full((4, 4), 0.5))  # even vision/text mix at init
    assert (out.embeddings - _embed(without, products).embeddings).abs().max() > 1e-3
    assert _embed(without, products).modality_gates is None


def test_reasoning_on_generates_attribute_text_and_a_different_embedding(model, products):
    off = _embed(model, products)
    on = _embed(model, products, reasoning=True)
    assert off.reasoning == [None] * 4
    assert all(isinstance(text, str) and text for text in on.reasoning)
    assert (on.embeddings - off.embeddings).abs().max() > 1e-3
    assert torch.allclose(on.embeddings, _embed(model, products, reasoning=True).embeddings)  # greedy: deterministic


def test_gradients_reach_mhmf_fire_and_the_head(products):
    net = build_model(Moon3Config())
    with torch.no_grad():
        net.fire.gates.fill_(0.1)  # closed gates pass gradient only to themselves
    processor = Moon3Processor(net.tokenizer, net.image_processor, net.config.prompt)
    batch = processor.collate([processor.encode(p) for p in products])
    target = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    loss = (net(**batch).embeddings * target).sum()
    loss.backward()
    for name, part in (("mhmf", net.mhmf), ("fire", net.fire), ("head", net.head)):
        for param_name, param in part.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}.{param_name}"


def test_checkpoint_round_trip_reproduces_embeddings(tmp_path, model, products):
    version = save_checkpoint(model, tmp_path / "ck")
    assert version.startswith("moon3-")
    manifest = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert manifest["model_version"] == version and "backbone/model.safetensors" in manifest["files"]
    assert not list((tmp_path / "ck").rglob("*.bin")) and not list((tmp_path / "ck").rglob("*.pt"))
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.version == version
    assert torch.equal(_embed(loaded, products).embeddings, _embed(model, products).embeddings)
    assert save_checkpoint(loaded, tmp_path / "again") == version  # the version is the weights' identity
    with pytest.raises(FileExistsError):
        save_checkpoint(model, tmp_path / "ck")


def test_a_corrupt_or_incomplete_checkpoint_is_refused(tmp_path, model):
    save_checkpoint(model, tmp_path / "ck")
    heads = tmp_path / "ck" / "heads.safetensors"
    original = heads.read_bytes()
    heads.write_bytes(original[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="heads.safetensors does not match its recorded SHA-256"):
        load_checkpoint(tmp_path / "ck")
    heads.write_bytes(original)
    (tmp_path / "ck" / "moon3_config.json").unlink()
    with pytest.raises(CheckpointError, match="moon3_config.json is missing"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(tmp_path)


def test_local_backbone_directories_are_checked(tmp_path, model):
    with pytest.raises(ValueError, match="neither a preset"):
        Moon3Config(backbone=str(tmp_path / "nowhere"))
    from model.backbone import load_local

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_local(tmp_path / "nowhere")
    model.backbone.save_pretrained(tmp_path / "vlm", safe_serialization=True)
    with pytest.raises(FileNotFoundError, match="incomplete: missing preprocessor_config.json, tokenizer.json"):
        load_local(tmp_path / "vlm")
    model.tokenizer.save_pretrained(tmp_path / "vlm")
    model.image_processor.save_pretrained(tmp_path / "vlm")
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    (tmp_path / "vlm" / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ValueError, match="is a 'llava' model; supported: qwen2_vl, qwen2_5_vl"):
        load_local(tmp_path / "vlm")
    (tmp_path / "vlm" / "config.json").write_text(json.dumps(config))
    built = build_model(Moon3Config(backbone=str(tmp_path / "vlm")))  # a real local directory loads
    assert built.backbone.config.text_config.hidden_size == 64


def test_prompt_respects_text_and_image_budgets(model):
    budget = PromptBudget(max_text_tokens=40, max_image_pixels=112 * 112)
    processor = Moon3Processor(model.tokenizer, model.image_processor, budget)
    huge = ProductInput("Dress " * 500, _photo(sorted((RAW / "vendure" / "images").glob("*.jpg"))[0].name, 600),
                        "Fashion", {"color": "red"}, "long " * 1000)
    text = processor.product_text(huge)
    assert len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 40
    encoded = processor.encode(huge)
    grid = encoded.image_grid_thw[0]
    assert grid.prod() * 14 * 14 <= 112 * 112 * 1.0 + 1e-9  # patches of 14x14 within the pixel budget
    assert encoded.input_ids.count(model.image_token_id) == int(grid.prod() // 4)
    with pytest.raises(ProductRejected, match="neither a title nor a description") as caught:
        processor.encode(ProductInput("  ", huge.image_bytes))
    assert caught.value.code == "empty_text"


def test_preset_prompts_spend_tokens_on_the_product_not_on_the_fixed_text(model):
    """The preset tokenizer learned the prompt's own words: the fixed text costs tens of tokens."""
    from model.creative4u_protocol import SYSTEM_PROMPT as CREATIVE_PROMPT
    from model.moon3_config import SYSTEM_PROMPT

    count = lambda text: len(model.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    # Under two tokens a word, punctuation included (single letters made it about four).
    assert count(SYSTEM_PROMPT) < 2 * len(SYSTEM_PROMPT.split())
    assert count(CREATIVE_PROMPT) < 2 * len(CREATIVE_PROMPT.split())
    # A 28x28 photo is upscaled to the budget's minimum: 56x56 -> 4x4 patches -> 4 LLM tokens.
    processor = Moon3Processor(model.tokenizer, model.image_processor, PromptBudget(min_image_pixels=56 * 56))
    small = io.BytesIO()
    Image.new("L", (28, 28), 128).save(small, "PNG")
    encoded = processor.encode(ProductInput("product", small.getvalue()))
    assert encoded.input_ids.count(model.image_token_id) == 4
    assert len(encoded.input_ids) < 80  # was 133 when the system prompt was spelt letter by letter


def test_the_system_prompt_is_saved_with_the_model_and_can_be_left_out(tmp_path, model, products):
    """A model trained without a system turn is prompted without one after loading; a config saved
    before the field existed loads with the default instruction."""
    from model.moon3_config import SYSTEM_PROMPT

    bare = build_model(Moon3Config(prompt=PromptBudget(system_prompt="")))
    full_processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    full = full_processor.encode(products[1])
    save_checkpoint(bare, tmp_path / "bare")
    loaded = load_checkpoint(tmp_path / "bare")
    assert loaded.config.prompt.system_prompt == ""
    processor = Moon3Processor(loaded.tokenizer, loaded.image_processor, loaded.config.prompt)
    short = processor.encode(products[1])
    decoded = loaded.tokenizer.decode(short.input_ids)
    assert decoded.startswith("<|im_start|>user\n") and "system" not in decoded
    system_tokens = len(model.tokenizer(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")["input_ids"])
    assert short.length == full.length - system_tokens
    assert torch.equal(short.pixel_values, full.pixel_values)
    query = processor.encode_query("red dress")
    assert model.tokenizer.decode(query.input_ids).startswith("<|im_start|>user\nQuery: red dress<|im_end|>")
    assert torch.isfinite(_embed(loaded, products[:2]).embeddings).all()
    legacy = json.loads(bare.config.to_json())
    del legacy["prompt"]["system_prompt"]
    assert Moon3Config.from_json(json.dumps(legacy)).prompt.system_prompt == SYSTEM_PROMPT


def test_predictor_turns_bad_products_into_row_errors(products):
    predict = make_predict_fn(Moon3Config(), device="cpu")
    good_bytes = products[0].image_bytes
    batch = [
        products[0],
        ProductInput("Corrupt photo", b"\xff\xd8\xff\xe0 not really a jpeg"),
        products[1],
        ProductInput("Truncated photo", good_bytes[: len(good_bytes) // 3]),
        ProductInput("", products[2].image_bytes, description=""),
        products[3],
    ]
    result = predict(batch)
    assert result.error_codes == [None, "image_undecodable", None, "image_undecodable", "empty_text", None]
    assert "cannot be decoded" in result.errors[1]
    assert np.allclose(np.linalg.norm(result.vectors[result.ok], axis=1), 1.0, atol=1e-5)
    assert not result.vectors[~result.ok].any()
    alone = predict([products[1]])  # padding and batch company do not change a product's vector
    assert np.allclose(alone.vectors[0], result.vectors[2], atol=1e-5)
    assert np.array_equal(predict(batch).vectors, result.vectors)  # deterministic
    assert set(result.timings) == {"preprocess", "forward"} and result.model_version.startswith("untrained-")


def test_batches_respect_the_token_budget_and_cover_every_row_once():
    lengths = [50, 300, 120, 80, 310, 60, 2000, 90]
    batches = plan_batches(lengths, token_budget=640, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 640
    assert batches[0] == [6]  # the longest row alone: it exceeds the budget by itself
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


def test_attribute_parsing():
    assert parse_attributes("category: dress; color: red\nmaterial: silk; junk; : x") == {
        "category": "dress", "color": "red", "material": "silk"
    }
    assert parse_attributes(None) == {}


def test_grouped_vision_attention_matches_per_image_attention(model, products):
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    batch = processor.collate([processor.encode(p) for p in products])
    with torch.inference_mode():
        grouped = model(**batch).embeddings
        model.backbone.set_attn_implementation({"vision_config": "sdpa"})  # transformers' per-image loop
        try:
            per_image = model(**batch).embeddings
        finally:
            from model.vision_attention import use_grouped_vision_attention

            use_grouped_vision_attention(model.backbone)
    assert torch.allclose(grouped, per_image, atol=1e-5)


def test_patch_projection_is_the_convolution_computed_as_one_matrix_product(model, products):
    from model.patch_projection import PatchProjection

    projection = model.backbone.model.visual.patch_embed.proj
    assert type(projection) is PatchProjection  # installed by the model, under the convolution's name
    assert "backbone.model.visual.patch_embed.proj.weight" in dict(model.named_parameters())
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    pixels = processor.collate([processor.encode(p) for p in products])["pixel_values"]
    embed = model.backbone.model.visual.patch_embed
    patches = pixels.view(-1, embed.in_channels, embed.temporal_patch_size, embed.patch_size, embed.patch_size)
    with torch.no_grad():
        as_linear = projection(patches)
        as_convolution = torch.nn.functional.conv3d(patches, projection.weight, stride=projection.stride)
        assert as_linear.shape == as_convolution.shape == (patches.shape[0], embed.embed_dim, 1, 1, 1)
        assert torch.allclose(as_linear, as_convolution, atol=1e-5)
        # An input larger than the kernel is a real convolution (several positions): the Conv3d path.
        wide = torch.randn(2, embed.in_channels, 2 * embed.temporal_patch_size, embed.patch_size, embed.patch_size)
        assert torch.allclose(projection(wide), torch.nn.functional.conv3d(wide, projection.weight, stride=projection.stride))


def test_batched_pixels_equal_the_image_processors_own(model, products):
    from model.image_pixels import qwen_vl_pixels
    from model.moon3_processing import _decode_image

    rng = np.random.default_rng(0)
    images = [_decode_image(p.image_bytes, "photo") for p in products]  # real photos
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
               for h, w in ((28, 28), (100, 37), (300, 200), (57, 91))]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)))  # grayscale
    for low, high in ((56 * 56, 28 * 28 * 1280), (84 * 84, 4 * 84 * 84)):
        size = {"shortest_edge": low, "longest_edge": high}
        expected = model.image_processor(images=images, size=size, return_tensors="pt")
        pixels, grid = qwen_vl_pixels(model.image_processor, images, low, high)
        assert len({tuple(g) for g in grid.tolist()}) > 3  # several sizes in one call, order kept
        assert torch.equal(grid, expected["image_grid_thw"])
        assert pixels.dtype == torch.float32 and torch.equal(pixels, expected["pixel_values"])  # bit for bit
    # A processor configured otherwise is called as it is.
    plain = type(model.image_processor)(do_normalize=False)
    pixels, _ = qwen_vl_pixels(plain, images[:2], 56 * 56, 28 * 28 * 1280)
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    assert torch.equal(pixels, plain(images=images[:2], size=size, return_tensors="pt")["pixel_values"])


def test_prompt_tokens_are_memoised_and_equal_the_tokenizers(model):
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    text = processor.chat_prompt("Title: red dress")
    expected = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    first = processor.token_ids(text)
    assert first == expected and text in processor._token_cache
    first.append(0)  # each caller gets its own list: the memo cannot be changed through it
    assert processor.token_ids(text) == expected


def test_qwen2_5_vl_backbone_with_fire_in_image_order(products):
    net = build_model(Moon3Config(backbone="tiny-qwen2.5"))
    assert type(net.backbone).__name__ == "Qwen2_5_VLForConditionalGeneration"
    processor = Moon3Processor(net.tokenizer, net.image_processor, net.config.prompt)
    batch = processor.collate([processor.encode(p) for p in products])
    with torch.inference_mode():
        vision, _ = net.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        # FIRE reads the blocks in window order; restored, the last block's merged states are the pooled output.
        restored = net.backbone.model.visual.merger(vision.hidden_states[-1])[net._merged_token_order(batch["image_grid_thw"])]
        assert torch.allclose(restored, torch.cat(vision.pooler_output), atol=1e-5)
        out = net(**batch)
    assert out.embeddings.shape == (4, 128)
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_image_tokens_get_3d_rotary_positions(model, products):
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    batch = processor.collate([processor.encode(p) for p in products])
    rope = model.rope_positions(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    assert rope.shape == (3, 4, batch["input_ids"].shape[1])
    image = batch["input_ids"][0] == model.image_token_id
    grid_h, grid_w = (batch["image_grid_thw"][0][1:] // 2).tolist()
    height, width = rope[1, 0, image], rope[2, 0, image]
    assert int(height.max() - height.min()) == grid_h - 1 and int(width.max() - width.min()) == grid_w - 1
    assert torch.equal(rope[0, 0, image], rope[0, 0, image][:1].expand(int(image.sum())))  # one frame: one time
    with torch.inference_mode():  # precomputed (CPU) positions give what the model derives itself
        assert torch.equal(model(**batch, position_ids=rope).embeddings, model(**batch).embeddings)
    # Rows sharing a layout are computed once: the same positions as transformers' row-by-row loop,
    # with repeated rows, other lengths and a product with two images in one batch.
    two_images = ProductInput("Two photos", products[0].image_bytes, extra_images=(products[2].image_bytes,))
    mixed = processor.collate([processor.encode(p) for p in [*products, products[1], products[1], two_images, products[0]]])
    types = (mixed["input_ids"] == model.image_token_id).int()
    expected, _ = model.backbone.model.get_rope_index(mixed["input_ids"], mm_token_type_ids=types,
                                                      image_grid_thw=mixed["image_grid_thw"],
                                                      attention_mask=mixed["attention_mask"])
    assert torch.equal(model.rope_positions(mixed["input_ids"], mixed["attention_mask"], mixed["image_grid_thw"]),
                       expected)
