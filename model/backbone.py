"""Vision-language backbones: a local Hugging Face directory, or a named preset built in code.

No model hub is reachable, and none may be: real weights are downloaded once by a person and
loaded from a local directory (``trust_remote_code`` off, safetensors only). Presets build a
Qwen2-VL of a chosen size with random weights and a byte-level BPE tokenizer trained on the fly,
for tests, benchmarks and the embedded default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Tokens the pipeline adds to any backbone: the reasoning span and the embedding token.
THINK_START, THINK_END, EMBED_TOKEN = "<think>", "</think>", "<|emb|>"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PIPELINE_TOKENS = (THINK_START, THINK_END, EMBED_TOKEN)
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # Qwen3-VL: its deepstack vision path is not wired yet


@dataclass(frozen=True)
class BackbonePreset:
    """A Qwen2-VL shape. Fields follow transformers' Qwen2VLConfig names."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vision_depth: int
    vision_embed_dim: int
    vision_num_heads: int
    vocab_size: int  # embedding rows; at least the tokenizer's size
    tokenizer_vocab: int  # BPE vocabulary trained for the preset
    family: str = "qwen2_vl"  # or "qwen2_5_vl" (windowed vision attention, SwiGLU vision MLP)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, BackbonePreset] = {
    # Unit tests: about half a million parameters, forward in milliseconds.
    "tiny": BackbonePreset(64, 2, 4, 2, 128, 2, 32, 2, 1024, 1024),
    # tiny with a vision tower twice as wide (64): the Fashion-MNIST quality config; 1.3x tiny's step time.
    "tiny-vision64": BackbonePreset(64, 2, 4, 2, 128, 2, 64, 4, 1024, 1024),
    "tiny-qwen2.5": BackbonePreset(64, 2, 4, 2, 128, 2, 32, 2, 1024, 1024, family="qwen2_5_vl"),
    # CPU benchmarks and the local demo: big enough for timings to mean something.
    "small": BackbonePreset(256, 4, 4, 2, 768, 4, 128, 4, 4096, 4096),
    # Qwen2-VL-2B's dimensions (random weights) for GPU throughput measurements.
    "qwen2-vl-2b-shape": BackbonePreset(1536, 28, 12, 2, 8960, 32, 1280, 16, 151936, 4096),
}

# A small corpus of catalog language, so the preset tokenizer splits product text into sensible pieces.
_CORPUS = """
product title category attributes description brand color size material price image style
category: dress; color: red; material: silk; pattern: floral; sleeve: long; fit: slim
electronics computers photo sports outdoor equipment footwear home garden plants furniture fashion
tops bottoms dresses outerwear accessories t-shirt top trouser pullover dress coat sandal shirt sneaker
bag ankle boot laptop tablet camera lens skateboard basketball shoe statue desk chair lamp plant
black white gray grey blue red green brown beige navy yellow pink purple orange wood gold silver
leather canvas nylon suede cotton wool denim linen metal plastic glass ceramic
small medium large xs s m l xl inch gb tb ram ssd hdd cpu
new season best seller premium limited edition classic modern vintage casual formal
the a an and or with for of in on to from by is are this that it its
""".strip()


def _prompt_corpus() -> list[str]:
    """The models' fixed prompt text, so a prompt costs tens of tokens rather than hundreds of
    single-letter pieces (a real Qwen tokenizer knows these words too)."""
    # Imported here: both modules import this one.
    from model import creative4u_protocol as creative
    from model.moon3_config import SYSTEM_PROMPT

    steps = [question for _, question in creative.PROTOCOL_STEPS]
    labels = "Title: Category: Attributes: Description: Query: Product title: User interests (frequent searches): "
    labels += "Creative A: Creative B: Follow this protocol: Answer with A or B."
    # Creative4U's reasoning names the factors of a creative and their levels.
    reasoning = "Similarity: Match: Text: Props: Layout: Subject: Background: Click: mainly for its they differ in "
    reasoning += "answers matches no search directly has neither uses models or props in the product is it "
    reasoning += " ".join(f"{name.replace('_', ' ')} {' '.join(levels)} {' '.join(levels.values())}"
                          for name, levels in creative.FACTORS.items())
    return [SYSTEM_PROMPT, creative.SYSTEM_PROMPT, labels, reasoning, *steps]


def _train_tokenizer(vocab_size: int) -> "PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer with the Qwen special tokens, trained deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = list(QWEN_SPECIAL_TOKENS + PIPELINE_TOKENS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines() + _prompt_corpus()
    # Title-case too: product titles and field labels start with capitals.
    tokenizer.train_from_iterator((lines + [line.title() for line in lines]) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:] + PIPELINE_TOKENS),
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Split half the head dimension over (time, height, width) as Qwen2-VL does (16/24/24 of 64)."""
    half = head_dim // 2
    temporal = half // 4
    spatial = (half - temporal) // 2
    return [temporal, spatial, half - temporal - spatial]


def build_preset(name: str, seed: int = 0) -> tuple["PreTrainedModel", "PreTrainedTokenizerFast", Any]:
    """A randomly initialised Qwen2-VL of preset ``name``, its tokenizer and image processor."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}: use one of {sorted(PRESETS)} or a local model directory")
    preset = PRESETS[name]
    tokenizer = _train_tokenizer(preset.tokenizer_vocab)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    text_config = {
        "vocab_size": max(preset.vocab_size, len(tokenizer)),
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": _mrope_section(preset.head_dim),
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    if preset.family == "qwen2_vl":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision_config = {
            "depth": preset.vision_depth,
            "embed_dim": preset.vision_embed_dim,
            "hidden_size": preset.hidden_size,
            "num_heads": preset.vision_num_heads,
        }
    else:
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision_config = {
            "depth": preset.vision_depth,
            "hidden_size": preset.vision_embed_dim,
            "intermediate_size": preset.vision_embed_dim * 2,
            "out_hidden_size": preset.hidden_size,
            "num_heads": preset.vision_num_heads,
            "window_size": 56,  # 2x2 merged tokens per window at 14-pixel patches
            "fullatt_block_indexes": [preset.vision_depth - 1],
        }
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model, tokenizer, _image_processor()


def _image_processor(**overrides: Any) -> Any:
    # The PIL backend needs no torchvision (whose only build here is CUDA-only).
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**overrides)


def load_local(directory: str | Path, dtype: Any = None) -> tuple["PreTrainedModel", "PreTrainedTokenizerFast", Any]:
    """Backbone, tokenizer and image processor from a local Hugging Face model directory."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"backbone directory {path} does not exist: download the model once (config.json, "
            f"*.safetensors, tokenizer and preprocessor files) and point the model config at it"
        )
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (path / n).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (pickled .bin weights are refused)")
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer.json")
    if missing:
        raise FileNotFoundError(f"backbone directory {path} is incomplete: missing {', '.join(missing)}")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"backbone at {path} is a {model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        config=config,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        dtype=dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return model, tokenizer, image_processor


def add_pipeline_tokens(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast") -> None:
    """Make sure the reasoning and embedding tokens exist, growing the embeddings if needed."""
    missing = [t for t in PIPELINE_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def preset_summary(name: str) -> dict[str, Any]:
    return {"preset": name, **asdict(PRESETS[name])}
