"""MOON3.0 trainer: SFT warm-up of the reasoning format, then joint InfoNCE + GRPO, on DeepSpeed.

Per step, on each rank, a batch of B query->product clicks with a same-category positive per product:

* **SFT** (warm-up, then optionally kept as a small auxiliary term): teacher-forced likelihood of the
  product's attribute reasoning (``category: x; color: y``, built from the catalog) after its prompt,
  closed by ``</think>``.
* **InfoNCE**: query->product (a text-only query prompt against the clicked product) and
  product<->product (product against its positive), in-batch negatives, a learnable temperature;
  in-batch items of the same category are positives, not negatives.
* **GRPO** over the generated reasoning: for R products, sample G reasonings each; the reward of a
  sample is the retrieval quality of the embedding it leads to (cosine to the product's positive
  minus the hardest other-category product in the batch) plus a format reward (closed ``</think>``,
  a parsable ``category:``); advantages are normalised within each group; a per-token KL penalty
  keeps the policy near a frozen reference (the model at the end of the warm-up).

Each term has a weight; a weight of 0 switches it off. MHMF and FIRE are switched in the model
config (``use_mhmf``/``use_fire``) for ablations. Products are shown with their text or, with
probability ``text_dropout``, as their image alone, so the embedding also works from the image.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.moon3 import Moon3Model, parse_attributes
from model.moon3_config import SYSTEM_PROMPT, Moon3Config, PromptBudget
from model.moon3_processing import Moon3Processor
from moonpipe.settings import Settings
from training import engine as ds
from training.losses import group_advantages, grpo_loss, info_nce
from training.moon3_data import MAX_SHIFT, Example, TrainingSet, load_training_set
from training.run_config import RunConfig, register_config
from training.step_inputs import step_inputs
from training.throughput import StepFlops, throughput_summary
from training.weight_average import WeightAverage

LOG = logging.getLogger("moonpipe.training.moon3")


@register_config
@dataclass(frozen=True)
class Moon3TrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(run_name="moon3"))
    # The model: a checkpoint to continue from, or a fresh one from these fields.
    init_from: str | None = None
    backbone: str = "tiny"
    embedding_dim: int = 128
    use_mhmf: bool = True
    use_fire: bool = True
    image_pixels: int = 56 * 56  # largest image (pixels): 56x56 gives 4x4 patches of 14 pixels
    # Smaller images are upscaled to this many pixels (default: min(image_pixels, 56x56)); set it to
    # image_pixels to give small photos (Fashion-MNIST's 28x28) the whole budget of patches.
    min_image_pixels: int | None = None
    max_reasoning_tokens: int = 16
    system_prompt: str = SYSTEM_PROMPT  # "" for none: see model.moon3_config.SYSTEM_PROMPT
    export_date: str | None = None  # the training-set export to read (default: the latest)
    # Train on the clicks whose query names the clicked product's category only: a click that
    # contradicts the catalog (a misclick, click noise) would teach the query the wrong products.
    matching_clicks_only: bool = False
    text_dropout: float = 0.5  # probability that a product is shown as its image alone
    augment_images: bool = False  # mirror and shift each training view's photo at random
    augment_shift: float = MAX_SHIFT  # the largest shift, as a share of the image's side (0: mirror only)
    # Exponential moving average of the weights (0: off): the run's model/ is the average, its
    # online-model/ the last step's weights (training/weight_average.py).
    ema_decay: float = 0.0
    # Objectives (weight 0 = off).
    sft_warmup_steps: int = 20
    sft_weight: float = 0.1  # after the warm-up
    query_nce_weight: float = 1.0
    product_nce_weight: float = 1.0
    initial_temperature: float = 0.07
    # In-batch products of the anchor's category: masked out of the negatives (False) or also
    # counted as positives (True, supervised contrastive).
    category_positives: bool = False
    # Each product's positive drawn afresh from its category every step, instead of the export's
    # fixed pair (moon3_product_pairs), which an anchor meets again every epoch.
    fresh_product_partners: bool = False
    grpo_weight: float = 0.5
    grpo_every: int = 4  # GRPO on every N-th step (generation is the costly part)
    grpo_products: int = 4  # R
    grpo_group_size: int = 4  # G
    grpo_kl_weight: float = 0.05
    grpo_temperature: float = 1.0
    retrieval_reward_weight: float = 1.0
    format_reward_weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.text_dropout <= 1:
            raise ValueError(f"text_dropout={self.text_dropout} must lie in [0, 1]")
        weights = (self.sft_weight, self.query_nce_weight, self.product_nce_weight, self.grpo_weight)
        if any(w < 0 for w in weights) or self.sft_warmup_steps < 0:
            raise ValueError("loss weights and sft_warmup_steps must be >= 0")
        if self.query_nce_weight == self.product_nce_weight == self.grpo_weight == self.sft_weight == 0:
            raise ValueError("every objective is off: give at least one loss a positive weight")
        if self.grpo_weight > 0 and (self.grpo_group_size < 2 or self.grpo_products < 1 or self.grpo_every < 1):
            raise ValueError("GRPO needs grpo_group_size >= 2, grpo_products >= 1 and grpo_every >= 1")
        if not 0 <= self.augment_shift < 0.5:
            raise ValueError(f"augment_shift={self.augment_shift} must lie in [0, 0.5) (a share of the image's side)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must lie in [0, 1) (0: no weight average)")
        if not 0 < self.initial_temperature < 1:
            raise ValueError(f"initial_temperature={self.initial_temperature} must lie in (0, 1)")

    def model_config(self) -> Moon3Config:
        dims = tuple(d for d in (32, 64, 128, 256) if d < self.embedding_dim) + (self.embedding_dim,)
        smallest = self.min_image_pixels or min(self.image_pixels, 56 * 56)
        budget = PromptBudget(max_image_pixels=self.image_pixels, min_image_pixels=smallest,
                              max_reasoning_tokens=self.max_reasoning_tokens, system_prompt=self.system_prompt)
        return Moon3Config(backbone=self.backbone, embedding_dim=self.embedding_dim, matryoshka_dims=dims,
                           use_mhmf=self.use_mhmf, use_fire=self.use_fire, prompt=budget, seed=self.run.seed)


# -- inputs ----------------------------------------------------------------------------------------


def _unpadded_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(row)
        mask[b, length - len(row):] = 1
    return ids.to(device), mask.to(device)


def completion_logprobs(
    model: Moon3Model, batch: dict[str, torch.Tensor], completions: list[list[int]],
    encoded_images: tuple[Any, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities [N, K] of each row's completion after its prompt, and the mask.
    ``encoded_images``: the vision outputs of the batch's images when another pass computed them
    (``batch`` then needs no pixels, but its ``image_grid_thw``)."""
    pad = model.tokenizer.pad_token_id
    rows = [p + c for p, c in zip(_unpadded_prompts(batch), completions)]
    device = batch["input_ids"].device
    ids, mask = _left_pad(rows, pad, torch.device("cpu"))
    grid = batch.get("image_grid_thw")
    rope = model.rope_positions(ids, mask, grid.cpu()) if grid is not None else None  # on the CPU: see there
    ids, mask, rope = ids.to(device), mask.to(device), rope.to(device) if rope is not None else None
    if encoded_images is None:
        encoded_images = model.encode_images(batch.get("pixel_values"), grid)
    vision, features = encoded_images
    with model._injecting(ids, features):  # FIRE residuals apply while the reasoning is read too
        states = model.backbone.model(input_ids=ids, attention_mask=mask, use_cache=False,
                                      **model._image_inputs(ids, vision, grid, rope)).last_hidden_state
    longest = max(len(c) for c in completions)
    logits = model.backbone.lm_head(states[:, -longest - 1:-1]).float()
    targets = ids[:, -longest:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    lengths = torch.tensor([len(c) for c in completions], device=ids.device)
    token_mask = torch.arange(longest, device=ids.device)[None, :] >= (longest - lengths)[:, None]
    return logprobs, token_mask


@torch.no_grad()
def embed_with_reasoning(model: Moon3Model, batch: dict[str, torch.Tensor], reasoning: list[list[int]]) -> torch.Tensor:
    """Embeddings of prompt + given reasoning + ``</think><|emb|>``, as ``Moon3Model.forward`` computes
    them after its own generation (MHMF reads the prompt only)."""
    pad = model.tokenizer.pad_token_id
    prompts = _unpadded_prompts(batch)
    rows = [p + r + [model.think_end_id, model.embed_token_id] for p, r in zip(prompts, reasoning)]
    ids, mask = _left_pad(rows, pad, batch["input_ids"].device)
    grid = batch.get("image_grid_thw")
    vision, features = model.encode_images(batch.get("pixel_values"), grid)
    states, _ = model._llm_states(ids, mask, vision, features, grid)
    pooled = states[:, -1]
    if model.mhmf is not None:
        input_ids = batch["input_ids"]
        raw = model._raw_states(input_ids, vision)
        vision_mask = input_ids == model.image_token_id
        text_mask = batch["attention_mask"].bool() & ~torch.isin(input_ids, model.special_ids.to(input_ids.device))
        fused, _ = model.mhmf(raw, vision_mask, text_mask)
        pooled = pooled + fused.to(pooled.dtype)
    return F.normalize(model.head(pooled).float(), dim=-1)


def format_reward(completion: list[int], text: str, think_end_id: int) -> float:
    """0.5 for closing the reasoning with ``</think>``, 0.5 for a parsable ``category: ...``."""
    closed = bool(completion) and completion[-1] == think_end_id
    return 0.5 * closed + 0.5 * ("category" in parse_attributes(text))


# -- the objective (the module DeepSpeed wraps) -----------------------------------------------------


class Moon3Objective(nn.Module):
    """MOON3.0 plus the learnable temperature; ``forward`` returns the weighted loss and its parts."""

    def __init__(self, model: Moon3Model, config: Moon3TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / config.initial_temperature)]))
        self._reference: list[Moon3Model] = []  # kept out of the module tree: frozen, never optimised
        bad = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|emb|>", "<think>"]
        self.banned = [[model.tokenizer.convert_tokens_to_ids(t)] for t in bad]

    def set_reference(self, reference: Moon3Model | None) -> None:
        self._reference = [reference] if reference is not None else []

    def forward(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        weights = inputs["weights"]
        model = self.model
        zero = self.logit_scale.sum() * 0.0  # keeps the graph whole when a term is off
        loss, metrics = zero, {}
        products = groups = None
        sft_rows, sft_images = inputs.get("sft_batch"), None
        if weights["query_nce"] > 0 or weights["product_nce"] > 0 or weights["grpo"] > 0:
            batch = inputs["products"]
            encoded = model.encode_images(batch.get("pixel_values"), batch.get("image_grid_thw"))
            products = model(**batch, encoded_images=encoded).embeddings
            if weights["sft"] > 0 and sft_rows is None:
                # The SFT rows are the anchors, the batch's first rows: one vision pass serves both terms.
                count = len(inputs["sft_targets"])
                sft_images, grid = model.leading_images(encoded, batch["image_grid_thw"], batch["input_ids"], count)
                sft_rows = {"input_ids": batch["input_ids"][:count], "attention_mask": batch["attention_mask"][:count],
                            "image_grid_thw": grid}
            groups = inputs["groups"]
            half = products.shape[0] // 2
            anchors, positives = products[:half], products[half:]
            by_category = self.config.category_positives
            if weights["product_nce"] > 0:
                pp = info_nce(anchors, positives, self.logit_scale, groups, group_positives=by_category)
                loss = loss + weights["product_nce"] * pp
                metrics["product_nce"] = float(pp.detach())
            if weights["query_nce"] > 0:
                queries = model(**inputs["queries"]).embeddings
                qp = info_nce(queries, anchors, self.logit_scale, groups, group_positives=by_category)
                loss = loss + weights["query_nce"] * qp
                metrics["query_nce"] = float(qp.detach())
            metrics["temperature"] = float(1.0 / self.logit_scale.detach().exp().clamp(max=100.0))
        if weights["sft"] > 0:
            logprobs, mask = completion_logprobs(model, sft_rows, inputs["sft_targets"], sft_images)
            sft = -(logprobs * mask).sum() / mask.sum()
            loss = loss + weights["sft"] * sft
            metrics["sft_loss"] = float(sft.detach())
        if weights["grpo"] > 0:
            rl, rl_metrics = self._grpo(inputs, products.detach(), groups)
            loss = loss + weights["grpo"] * rl
            metrics.update(rl_metrics)
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def _grpo(self, inputs: dict[str, Any], products: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, dict]:
        config, model = self.config, self.model
        batch, owners = inputs["grpo_batch"], inputs["grpo_owners"]  # owner = the anchor row of each sample
        tokenizer = model.tokenizer
        stops = {model.think_end_id, tokenizer.eos_token_id}
        with torch.no_grad():
            vision, features = model.encode_images(batch.get("pixel_values"), batch.get("image_grid_thw"))
            with model._injecting(batch["input_ids"], features):
                generated = model.backbone.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    **model._image_inputs(batch["input_ids"], vision, batch.get("image_grid_thw")),
                    max_new_tokens=config.max_reasoning_tokens, do_sample=True, temperature=config.grpo_temperature,
                    top_k=0, top_p=1.0, bad_words_ids=self.banned, eos_token_id=sorted(stops),
                    pad_token_id=tokenizer.pad_token_id, synced_gpus=ds.generation_syncs_ranks(model),
                )[:, batch["input_ids"].shape[1]:]
            completions, reasonings, texts = [], [], []
            for row in generated.tolist():
                taken = []
                for token in row:
                    taken.append(token)
                    if token in stops:
                        break
                completions.append(taken)
                reasoning = [t for t in taken if t not in stops]
                reasonings.append(reasoning)
                texts.append(tokenizer.decode(reasoning, skip_special_tokens=True).strip())
            embeddings = embed_with_reasoning(model, batch, reasonings)
            half = products.shape[0] // 2
            positives = products[half:][owners]
            similarity = embeddings @ products.T  # against every product embedding in the batch
            all_groups = torch.cat([groups, groups])
            other = all_groups[None, :] != groups[owners][:, None]
            hardest = similarity.masked_fill(~other, -2.0).max(dim=1).values
            retrieval = (embeddings * positives).sum(-1) - hardest
            formats = torch.tensor([format_reward(c, t, model.think_end_id) for c, t in zip(completions, texts)],
                                   device=retrieval.device)
            rewards = config.retrieval_reward_weight * retrieval + config.format_reward_weight * formats
            advantages = group_advantages(rewards, config.grpo_group_size)
            reference = self._reference[0] if self._reference else None
            if reference is not None and config.grpo_kl_weight > 0:
                ref_logprobs, _ = completion_logprobs(reference, batch, completions)
        logprobs, mask = completion_logprobs(model, batch, completions)
        if reference is None or config.grpo_kl_weight == 0:
            ref_logprobs = logprobs.detach()
        loss, kl = grpo_loss(logprobs, ref_logprobs, mask, advantages, config.grpo_kl_weight)
        return loss, {
            "grpo_loss": float(loss.detach()), "grpo_kl": float(kl), "reward": float(rewards.mean()),
            "reward_retrieval": float(retrieval.mean()), "reward_format": float(formats.mean()),
            "reasoning_tokens": float(mask.sum(1).float().mean()), "sample_reasoning": texts[0][:80],
        }


# -- the training loop -----------------------------------------------------------------------------


def plan_step(config: Moon3TrainConfig, step: int) -> dict[str, float]:
    """The weight of each term at ``step``: SFT alone in the warm-up, the joint objective after."""
    if step < config.sft_warmup_steps:
        return {"sft": 1.0, "query_nce": 0.0, "product_nce": 0.0, "grpo": 0.0}
    grpo_now = config.grpo_weight > 0 and (step - config.sft_warmup_steps) % config.grpo_every == 0
    return {"sft": config.sft_weight, "query_nce": config.query_nce_weight,
            "product_nce": config.product_nce_weight, "grpo": config.grpo_weight if grpo_now else 0.0}


def sft_completion(tokenizer: Any, target: str, budget: int, think_end_id: int) -> list[int]:
    return tokenizer(target, add_special_tokens=False)["input_ids"][:budget] + [think_end_id]


def build_inputs(
    examples: list[Example], model: Moon3Model, processor: Moon3Processor, config: Moon3TrainConfig,
    weights: dict[str, float], rng: np.random.Generator, device: torch.device,
) -> dict[str, Any]:
    show_text = rng.random(2 * len(examples)) >= config.text_dropout
    augment = rng if config.augment_images else None
    views = [e.product.view(bool(t), augment, config.augment_shift)
             for e, t in zip(examples, show_text[: len(examples)])]
    views += [e.positive.view(bool(t), augment, config.augment_shift)
              for e, t in zip(examples, show_text[len(examples):])]
    encoded = [processor.encode(v) for v in views]
    inputs: dict[str, Any] = {"weights": weights}
    if weights["query_nce"] > 0 or weights["product_nce"] > 0 or weights["grpo"] > 0:
        products = processor.collate(encoded)
        # transformers derives these row by row in Python: done here, they are off the step's path.
        products["position_ids"] = model.rope_positions(
            products["input_ids"], products["attention_mask"], products.get("image_grid_thw"))
        inputs["products"] = {key: value.to(device) for key, value in products.items() if value is not None}
        inputs["groups"] = torch.tensor([e.category_id for e in examples], device=device)
    if weights["query_nce"] > 0:
        inputs["queries"] = processor.collate([processor.encode_query(e.query) for e in examples], device)
    if weights["sft"] > 0:
        if "products" not in inputs:  # with products, the SFT rows are their first rows (the anchors)
            inputs["sft_batch"] = processor.collate(encoded[: len(examples)], device)
        inputs["sft_targets"] = [sft_completion(processor.tokenizer, e.product.reasoning_target,
                                                config.max_reasoning_tokens, model.think_end_id) for e in examples]
    if weights["grpo"] > 0:
        owners = [i for i in range(min(config.grpo_products, len(examples))) for _ in range(config.grpo_group_size)]
        inputs["grpo_batch"] = processor.collate([encoded[i] for i in owners], device)
        inputs["grpo_owners"] = torch.tensor(owners, device=device)
    return inputs


def _build_model(config: Moon3TrainConfig) -> Moon3Model:
    from model.moon3_checkpoint import build_model, load_checkpoint

    if config.init_from:
        return load_checkpoint(config.init_from)
    return build_model(config.model_config())


def _save_model(engine: Any, directory: Path, parent: str | None) -> str | None:
    """Gather the weights (ZeRO-3) and write the model as a safetensors checkpoint on rank 0."""
    from model.moon3_checkpoint import read_manifest, save_checkpoint

    version = None
    with ds.gathered_parameters(engine):
        if ds.rank() == 0:
            if directory.exists():
                shutil.rmtree(directory)
            version = save_checkpoint(engine.module.model, directory, parent_version=parent)
    ds.barrier()
    return version or read_manifest(directory)["model_version"]


def _weight_average(engine: Any, decay: float) -> WeightAverage | None:
    if not decay:
        return None
    if engine.zero_optimization_stage() == 3:
        raise ValueError("ema_decay needs whole parameters on each rank, which ZeRO-3 shards: "
                         "train with run.zero='zero2', or set ema_decay=0")
    return WeightAverage(engine.module.model, decay)


def run(config: Moon3TrainConfig, settings: Settings, run_dir: Path) -> dict[str, Any]:
    """Train on this rank (all ranks call it); returns the run summary (rank 0 writes summary.json)."""
    from model.moon3_checkpoint import load_checkpoint

    run = config.run
    device, rank, world = ds.start_rank(run)
    data: TrainingSet = load_training_set(settings, config.export_date,
                                          matching_clicks_only=config.matching_clicks_only)
    model = _build_model(config).train()
    parent = getattr(model, "version", None)
    objective = Moon3Objective(model, config)
    clock = ds.TrainingClock(device)  # drives the time budget and a time-annealed schedule
    engine = ds.initialize(objective, run, clock)
    state = (ds.load_resumable(engine, run_dir) if run.resume else None) or ds.ResumeState()
    average = _weight_average(engine, config.ema_decay)  # from the resumed weights, if any
    if average is not None and state.extra and "weight_average" in state.extra:
        average.load_state_dict(state.extra.pop("weight_average"))
    resumed_from = state.step
    module: Moon3Objective = engine.module
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    reference_dir = run_dir / "reference"
    dtype = torch.bfloat16 if ds.use_bf16(run) else None

    def load_reference() -> None:
        if config.grpo_weight > 0 and config.grpo_kl_weight > 0:
            module.set_reference(load_checkpoint(reference_dir, dtype=dtype).to(device).eval().requires_grad_(False))

    if ds.reference_saved_before(state.step, config.sft_warmup_steps, reference_dir):
        load_reference()
    metrics_path = run_dir / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    stopped_by = "max_steps"
    clock.set(state.train_seconds)

    def build_step(step: int) -> tuple[int, dict[str, Any]]:
        examples = data.batch(run.seed, step, rank, run.micro_batch, config.fresh_product_partners)
        rng = np.random.default_rng([run.seed, step, rank, 1])
        cpu = torch.device("cpu")
        return len(examples), build_inputs(examples, model, processor, config, plan_step(config, step), rng, cpu)

    steps = step_inputs(build_step, state.step, run.max_steps, run.input_workers, device)
    step_flops = StepFlops(run.count_flops)
    while state.step < run.max_steps:
        if state.step == config.sft_warmup_steps and config.grpo_weight > 0 and not module._reference:
            _save_model(engine, reference_dir, parent)  # the reference: the model after its warm-up
            load_reference()
        batch_size, inputs = next(steps)
        kind = tuple(term for term, weight in inputs["weights"].items() if weight > 0)
        with step_flops.counting(kind):
            loss, metrics = engine(inputs)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"MOON3.0 loss is {float(loss)} at step {state.step}: lower the learning "
                                         f"rate or check the inputs ({metrics})")
            engine.backward(loss)
        engine.step()
        state.flops += step_flops.of(kind)
        if average is not None:
            average.update()
        state.step += 1
        state.samples += batch_size * world
        elapsed = clock.tick()
        record = {"step": state.step, "seconds": round(elapsed, 2), "lr": engine.get_lr()[0], **metrics,
                  "step_flops": step_flops.of(kind)}
        history.append(record)
        if rank == 0:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if state.step % run.log_every == 0 or state.step == 1:
                LOG.info("step %d: %s", state.step,
                         ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
        budget_hit = run.time_budget_s is not None and elapsed >= run.time_budget_s
        if budget_hit:
            stopped_by = "time_budget"
        if run.checkpoint_every and state.step % run.checkpoint_every == 0 or budget_hit or state.step == run.max_steps:
            state.train_seconds = elapsed
            if average is not None:
                state.extra = {"weight_average": average.state_dict()}
            ds.save_resumable(engine, run_dir, state, run.keep_checkpoints)
            state.extra = None
            clock.set(elapsed)  # writing the checkpoint is not training time
        if budget_hit:
            break
    model_dir = run_dir / "model"
    if average is None:
        version = _save_model(engine, model_dir, parent)
    else:
        _save_model(engine, run_dir / "online-model", parent)
        with average.applied():
            version = _save_model(engine, model_dir, parent)
    trained = state.step - resumed_from
    summary = {
        "model_kind": "moon3",
        "run_name": run.run_name,
        "run_dir": str(run_dir),
        "checkpoint_dir": str(model_dir),
        "online_checkpoint_dir": str(run_dir / "online-model") if average is not None else None,
        "model_version": version,
        "parent_version": parent,
        "export_date": data.export_date,
        "training_pairs": len(data),
        "steps": state.step,
        "steps_this_call": trained,
        "resumed_from_step": resumed_from,
        "samples": state.samples,
        "train_seconds": round(state.train_seconds, 2),
        "samples_per_second": round(state.samples / state.train_seconds, 3) if state.train_seconds else None,
        "stopped_by": stopped_by if trained else "already_complete",
        "world_size": world,
        "zero_stage": engine.zero_optimization_stage(),
        "precision": "bf16" if ds.use_bf16(run) else "fp32",
        "device": str(device),
        "throughput": throughput_summary(step_flops, state.flops, state.train_seconds, world, device,
                                         dtype or torch.float32),
        "last_metrics": {k: v for k, v in (history[-1] if history else {}).items() if not isinstance(v, str)},
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
