"""Creative4U trainer ("Reason-to-Select RFT"): CoT-SFT, then GRPO, on DeepSpeed.

* Examples: the CreativePairs of jobs.creative_data (``training_examples``), each pair in both
  orders, with the reference reasoning built from the creatives' known factors. Pairs are split by
  product (``sha256`` of the product id): held-out products never reach training.
* CoT-SFT (the first ``sft_steps`` steps): likelihood of the reference output after the prompt.
* GRPO: for R pairs, G sampled outputs each, decoded with the model's protocol grammar (the
  reasoning, then ``</think><answer>``, then the model's own sampled letter), so every sample is
  well formed and the answer reward carries the signal; reward = ``answer_weight`` x answer
  reward + ``format_weight`` x format reward (model.creative4u_protocol); group-normalised
  advantages; per-token KL to the SFT model (frozen, saved in the run folder).

The loop, DeepSpeed set-up, resumable checkpoints and launcher are training/engine.py's and
training/launch.py's, shared with MOON3.0. TRL's GRPOTrainer is not used: its rollouts go through
a processor's text-only chat path, while Creative4U's two-image prompt and its protocol grammar
live in model/creative4u.py; the GRPO loss is the shared one in training/losses.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moonpipe.settings import Settings
from training import engine as ds
from training.losses import group_advantages, grpo_loss
from training.run_config import RunConfig, register_config
from training.step_inputs import step_inputs
from training.throughput import StepFlops, throughput_summary

LOG = logging.getLogger("moonpipe.training.creative4u")


@register_config
@dataclass(frozen=True)
class Creative4UTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(run_name="creative4u", micro_batch=4))
    init_from: str | None = None  # a Creative4U checkpoint; else a fresh model from `backbone`
    backbone: str = "tiny"
    heldout_fraction: float = 0.2  # share of products whose pairs are held out for evaluation
    sft_steps: int = 20
    grpo_weight: float = 1.0  # 0: CoT-SFT only
    sft_weight_during_grpo: float = 0.0
    grpo_pairs: int = 2  # R
    grpo_group_size: int = 4  # G
    grpo_kl_weight: float = 0.05
    grpo_think_tokens: int = 24  # reasoning budget of a sampled output before the answer is due
    grpo_temperature: float = 1.0
    answer_weight: float = 1.0
    format_weight: float = 0.2
    max_target_tokens: int = 512  # CoT-SFT targets are cut here (the answer is kept)

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must lie in [0, 1)")
        if self.sft_steps < 0 or self.grpo_weight < 0 or self.grpo_kl_weight < 0:
            raise ValueError("sft_steps, grpo_weight and grpo_kl_weight must be >= 0")
        if self.grpo_weight > 0 and (self.grpo_group_size < 2 or self.grpo_pairs < 1):
            raise ValueError("GRPO needs grpo_group_size >= 2 and grpo_pairs >= 1")


def is_heldout(product_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"creative-split:{product_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_examples(examples: list, fraction: float) -> tuple[list, list]:
    train = [e for e in examples if not is_heldout(e.product_id, fraction)]
    held = [e for e in examples if is_heldout(e.product_id, fraction)]
    return train, held


def _left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, length - len(row):] = torch.tensor(row)
    return out


def sequence_batch(model: Any, encoded: list, completions: list[list[int]]) -> dict[str, torch.Tensor]:
    """Prompts + completions, left-padded, with labels on the completions only."""
    pad = model.tokenizer.pad_token_id
    ids = _left_pad([e.input_ids + c for e, c in zip(encoded, completions)], pad)
    labels = _left_pad([[-100] * len(e.input_ids) + c for e, c in zip(encoded, completions)], -100)
    mask = _left_pad([[1] * (len(e.input_ids) + len(c)) for e, c in zip(encoded, completions)], 0)
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "pixel_values": torch.cat([e.pixel_values for e in encoded]),
        "image_grid_thw": torch.cat([e.image_grid_thw for e in encoded]),
        "mm_token_type_ids": (ids == model.image_token_id).int(),
    }


def completion_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled positions [N, T-1] and their mask."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model.backbone(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logprobs * mask, mask


class Creative4UObjective(nn.Module):
    def __init__(self, model: Any, config: Creative4UTrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self._reference: list[Any] = []

    def set_reference(self, reference: Any | None) -> None:
        self._reference = [reference] if reference is not None else []

    def forward(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        # Terms only: touching a parameter outside its module's forward breaks ZeRO-3, which
        # gathers it for that forward alone. Each step has one term at least (see build_step).
        terms: list[torch.Tensor] = []
        metrics: dict[str, float] = {}
        if inputs.get("sft") is not None:
            logprobs, mask = completion_logprobs(self.model, inputs["sft"])
            sft = -logprobs.sum() / mask.sum()
            terms.append(inputs["sft_weight"] * sft)
            metrics["sft_loss"] = float(sft.detach())
        if inputs.get("grpo") is not None:
            rl, rl_metrics = self._grpo(inputs["grpo"], inputs["labels"])
            terms.append(self.config.grpo_weight * rl)
            metrics.update(rl_metrics)
        loss = torch.stack(terms).sum()
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def _grpo(self, encoded: list, labels: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        from model.creative4u_protocol import ANSWER_END, answer_reward, format_reward, parse_output

        config, model = self.config, self.model
        with torch.no_grad():
            prompt = model.collate(encoded)
            think_budget = model.config.guided_think_tokens
            model.config = model.config.replace(guided_think_tokens=config.grpo_think_tokens,
                                                retry_temperature=config.grpo_temperature)
            try:
                completions, _ = model._generate(prompt, guided=True, sample=True,
                                                 synced=ds.generation_syncs_ranks(model))
            finally:
                model.config = model.config.replace(guided_think_tokens=think_budget)
            answer_end = model.token_ids[ANSWER_END]  # a finished output ended with eos, which _generate strips
            completions = [c + [model.tokenizer.eos_token_id] if c and c[-1] == answer_end else c for c in completions]
            texts = [model.tokenizer.decode(c[:-1], skip_special_tokens=False) for c in completions]
            answers = torch.tensor([answer_reward(t, label) for t, label in zip(texts, labels)])
            formats = torch.tensor([format_reward(t) for t in texts])
            rewards = config.answer_weight * answers + config.format_weight * formats
            advantages = group_advantages(rewards, config.grpo_group_size)
            batch = sequence_batch(model, encoded, completions)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            reference = self._reference[0] if self._reference else None
            ref_logprobs = completion_logprobs(reference, batch)[0] if reference is not None else None
        logprobs, mask = completion_logprobs(model, batch)
        if ref_logprobs is None:
            ref_logprobs = logprobs.detach()
        loss, kl = grpo_loss(logprobs, ref_logprobs, mask, advantages.to(logprobs.device), config.grpo_kl_weight)
        decided = [parse_output(t).answer for t in texts]
        return loss, {"grpo_loss": float(loss.detach()), "grpo_kl": float(kl), "reward": float(rewards.mean()),
                      "answer_reward": float(answers.mean()), "format_reward": float(formats.mean()),
                      "decided": float(np.mean([a is not None for a in decided]))}


def _save(engine: Any, directory: Path, parent: str | None) -> str:
    from model.creative4u_checkpoint import read_manifest, save_checkpoint

    with ds.gathered_parameters(engine):
        if ds.rank() == 0:
            if directory.exists():
                shutil.rmtree(directory)
            save_checkpoint(engine.module.model, directory, parent_version=parent)
    ds.barrier()
    return read_manifest(directory)["model_version"]


def run(config: Creative4UTrainConfig, settings: Settings, run_dir: Path) -> dict[str, Any]:
    from jobs.creative_data import training_examples
    from model.creative4u_checkpoint import build_model, load_checkpoint
    from model.creative4u_config import Creative4UConfig

    run = config.run
    device, rank, world = ds.start_rank(run)
    train_set, held = split_examples(training_examples(settings), config.heldout_fraction)
    if not train_set:
        raise ValueError("no Creative4U training pairs outside the held-out products: build more creative data "
                         "(`moonpipe creatives build-data`) or lower heldout_fraction")
    model = load_checkpoint(config.init_from) if config.init_from else build_model(Creative4UConfig(backbone=config.backbone, seed=run.seed))
    parent = model.version if config.init_from else None
    model.train()
    clock = ds.TrainingClock(device)  # drives the time budget and a time-annealed schedule
    engine = ds.initialize(Creative4UObjective(model, config), run, clock)
    state = (ds.load_resumable(engine, run_dir) if run.resume else None) or ds.ResumeState()
    resumed_from = state.step
    objective: Creative4UObjective = engine.module
    reference_dir = run_dir / "reference"
    dtype = torch.bfloat16 if ds.use_bf16(run) else None

    def load_reference() -> None:
        if config.grpo_weight > 0 and config.grpo_kl_weight > 0:
            objective.set_reference(load_checkpoint(reference_dir, dtype=dtype).to(device).eval().requires_grad_(False))

    if ds.reference_saved_before(state.step, config.sft_steps, reference_dir):
        load_reference()
    history: list[dict[str, Any]] = []
    stopped_by = "max_steps"
    clock.set(state.train_seconds)
    tokenizer = model.tokenizer

    def build_step(step: int) -> dict[str, Any]:
        rng = np.random.default_rng([run.seed, step, rank])
        in_sft = step < config.sft_steps
        inputs: dict[str, Any] = {"sft": None, "grpo": None, "sft_weight": 1.0 if in_sft else config.sft_weight_during_grpo}
        if in_sft or config.sft_weight_during_grpo > 0 or config.grpo_weight == 0:
            picks = rng.choice(len(train_set), size=min(run.micro_batch, len(train_set)), replace=False)
            chosen = [train_set[int(i)] for i in picks]
            encoded = [model.encode(e.comparison) for e in chosen]
            targets = [tokenizer(e.target, add_special_tokens=False)["input_ids"][-config.max_target_tokens:]
                       + [tokenizer.eos_token_id] for e in chosen]
            inputs["sft"] = sequence_batch(model, encoded, targets)
            inputs["sft_weight"] = max(inputs["sft_weight"], 1.0 if config.grpo_weight == 0 else 0.0)
        if not in_sft and config.grpo_weight > 0:
            picks = rng.choice(len(train_set), size=min(config.grpo_pairs, len(train_set)), replace=False)
            chosen = [train_set[int(i)] for i in picks for _ in range(config.grpo_group_size)]
            inputs["grpo"] = [model.encode(e.comparison) for e in chosen]
            inputs["labels"] = [e.label for e in chosen]
        return inputs

    steps = step_inputs(build_step, state.step, run.max_steps, run.input_workers, device)
    step_flops = StepFlops(run.count_flops)
    while state.step < run.max_steps:
        if state.step == config.sft_steps and config.grpo_weight > 0 and not objective._reference:
            _save(engine, reference_dir, parent)
            load_reference()
        inputs = next(steps)
        kind = tuple(term for term in ("sft", "grpo") if inputs[term] is not None)
        with step_flops.counting(kind):
            loss, metrics = engine(inputs)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Creative4U loss is {float(loss)} at step {state.step} ({metrics})")
            engine.backward(loss)
        engine.step()
        state.flops += step_flops.of(kind)
        state.step += 1
        state.samples += (run.micro_batch if inputs["sft"] is not None else 0) * world
        elapsed = clock.tick()
        record = {"step": state.step, "seconds": round(elapsed, 2), "lr": engine.get_lr()[0], **metrics,
                  "step_flops": step_flops.of(kind)}
        history.append(record)
        if rank == 0:
            with (run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if state.step % run.log_every == 0 or state.step == 1:
                LOG.info("step %d: %s", state.step, ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
        budget_hit = run.time_budget_s is not None and elapsed >= run.time_budget_s
        stopped_by = "time_budget" if budget_hit else stopped_by
        if (run.checkpoint_every and state.step % run.checkpoint_every == 0) or budget_hit or state.step == run.max_steps:
            state.train_seconds = elapsed
            ds.save_resumable(engine, run_dir, state, run.keep_checkpoints)
            clock.set(elapsed)  # writing the checkpoint is not training time
        if budget_hit:
            break
    version = _save(engine, run_dir / "model", parent)
    trained = state.step - resumed_from
    summary = {
        "model_kind": "creative4u", "run_name": run.run_name, "run_dir": str(run_dir),
        "checkpoint_dir": str(run_dir / "model"), "model_version": version, "parent_version": parent,
        "training_examples": len(train_set), "heldout_examples": len(held), "steps": state.step,
        "steps_this_call": trained, "resumed_from_step": resumed_from, "train_seconds": round(state.train_seconds, 2),
        "stopped_by": stopped_by if trained else "already_complete", "world_size": world,
        "zero_stage": engine.zero_optimization_stage(), "precision": "bf16" if ds.use_bf16(run) else "fp32",
        "device": str(device),
        "throughput": throughput_summary(step_flops, state.flops, state.train_seconds, world, device,
                                         dtype or torch.float32),
        "last_metrics": history[-1] if history else {},
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_pairs(candidate: str, baseline: str | None, settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    """Pair accuracy (decided answers that pick the better creative, over all pairs) and the
    undecided rate on the held-out products' pairs, with a 95% Wilson interval for accuracy."""
    from jobs.creative_data import training_examples
    from model.creative4u_checkpoint import load_checkpoint

    fraction = options.pop("heldout_fraction", 0.2)
    decoding = options.pop("decoding", None)
    limit = options.pop("limit", None)
    if options:
        raise ValueError(f"unknown Creative4U evaluation options {sorted(options)}")
    _, held = split_examples(training_examples(settings), fraction)
    held = held[:limit] if limit else held
    if not held:
        raise ValueError("no held-out Creative4U pairs: build more creative data or raise heldout_fraction")

    def measure(directory: str) -> dict[str, Any]:
        model = load_checkpoint(directory)
        judgments = model.judge([e.comparison for e in held], decoding=decoding)
        right = sum(j.answer == e.label for j, e in zip(judgments, held))
        undecided = sum(j.answer is None for j in judgments)
        n = len(held)
        low, high = wilson_interval(right, n)
        return {"metrics": {"pair_accuracy": right / n, "pair_accuracy_ci_low": low, "pair_accuracy_ci_high": high,
                            "undecided_rate": undecided / n, "pairs": float(n)}}

    return {"candidate": measure(candidate), "baseline": measure(baseline) if baseline else None,
            "headline": ["pair_accuracy", "pair_accuracy_ci_low", "pair_accuracy_ci_high", "undecided_rate"]}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
