"""Creative4U training on DeepSpeed (tiny preset): CoT-SFT then GRPO steps on real CreativePairs,
every parameter learns, losses finite, the held-out split by product, evaluation with a CI."""

from __future__ import annotations

import math
from datetime import date

import pytest
import torch

from jobs.creative_data import build_creative_data, training_examples
from model.creative4u_checkpoint import build_model, load_checkpoint
from model.creative4u_config import Creative4UConfig
from moonpipe.settings import Settings
from training.creative4u_trainer import split_examples, wilson_interval
from training.evaluate import evaluate
from training.launch import train
from tests.ragged_ranks_worker import launch, sharded_zero3

DATA = {"vendure_products": 2, "fashion_products": 1, "creatives_per_product": 4, "mean_impressions": 1100}


@pytest.fixture(scope="module")
def settings(spark, tmp_path_factory):
    settings = Settings.from_env(home=str(tmp_path_factory.mktemp("training-creative4u")))
    build_creative_data(date(2026, 11, 1), settings, spark, **DATA)
    return settings


def test_pairs_are_split_by_product(settings):
    examples = training_examples(settings)
    assert examples, "the creative data yields CreativePairs"
    train_set, held = split_examples(examples, 0.5)
    assert len(train_set) + len(held) == len(examples)
    assert not {e.product_id for e in train_set} & {e.product_id for e in held}
    assert split_examples(examples, 0.5) == (train_set, held)  # deterministic


def test_wilson_interval_on_known_counts():
    low, high = wilson_interval(80, 100)
    assert math.isclose(low, 0.7112, abs_tol=1e-3) and math.isclose(high, 0.8666, abs_tol=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_cot_sft_then_grpo_steps_change_every_parameter(settings):
    config = {"run": {"run_name": "c4u", "max_steps": 2, "micro_batch": 2, "warmup_steps": 1, "weight_decay": 0.0,
                      "learning_rate": 1e-3, "checkpoint_every": 0, "threads": 2},
              "heldout_fraction": 0.0, "sft_steps": 1, "grpo_pairs": 1, "grpo_group_size": 2, "grpo_think_tokens": 4}
    summary = train("creative4u", config, settings=settings)
    assert summary["steps"] == 2 and summary["zero_stage"] == 2
    metrics = summary["last_metrics"]
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grpo_loss"])
    assert metrics["format_reward"] == 1.0 and metrics["decided"] == 1.0  # grammar-guided rollouts
    before = dict(build_model(Creative4UConfig(backbone="tiny", seed=0)).named_parameters())
    after = dict(load_checkpoint(summary["checkpoint_dir"]).named_parameters())
    assert before.keys() == after.keys()
    assert [name for name, p in before.items() if torch.equal(p, after[name])] == []
    # Step 1 is CoT-SFT, step 2 GRPO (its rollouts' generation counted too): each kind counted once.
    flops = summary["throughput"]["flops_per_step_by_kind"]
    assert sorted(flops) == ["grpo", "sft"] and min(flops.values()) > 0
    assert summary["throughput"]["train_flops"] == flops["sft"] + flops["grpo"]
    report = evaluate("creative4u", summary["checkpoint_dir"], settings=settings, record=False,
                      heldout_fraction=0.5, decoding="guided", limit=4)
    values = report["candidate"]["metrics"]
    assert values["pairs"] >= 1 and 0 <= values["pair_accuracy_ci_low"] <= values["pair_accuracy"] <= 1
    assert values["undecided_rate"] == 0.0  # guided decoding always answers


@pytest.mark.slow
def test_zero3_shards_across_two_ranks_whose_rollouts_end_at_different_lengths(settings, tmp_path):
    # Rank 1's rollouts reason for 1 token, rank 0's for 6: generation must keep the ranks' ZeRO-3
    # parameter gathers in step, and the loss may touch parameters inside their modules' forward only.
    config = {"run": {"run_name": "c4u-zero3", "max_steps": 2, "micro_batch": 2, "warmup_steps": 1,
                      "weight_decay": 0.0, "learning_rate": 1e-3, "checkpoint_every": 0, "threads": 1,
                      "zero": sharded_zero3(tmp_path)},
              "heldout_fraction": 0.0, "sft_steps": 1, "grpo_pairs": 1, "grpo_group_size": 2, "grpo_think_tokens": 6}
    summary = launch("creative4u", config, settings, rank1="grpo_think_tokens=1")
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2 and summary["steps"] == 2
    assert math.isfinite(summary["last_metrics"]["grpo_loss"])
    before = dict(build_model(Creative4UConfig(backbone="tiny", seed=0)).named_parameters())
    after = dict(load_checkpoint(summary["checkpoint_dir"]).named_parameters())
    assert {name: p.shape for name, p in after.items()} == {name: p.shape for name, p in before.items()}
    assert [name for name, p in before.items() if torch.equal(p, after[name])] == []
