"""MOON3.0 training on DeepSpeed with the tiny preset: real steps, every parameter learns, resume,
2 ranks, the GRPO/InfoNCE maths on known values, evaluation and the promotion gate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from datetime import date

import psutil
import pytest
import torch

from jobs.training_data import export_training_sets
from model.moon3_checkpoint import build_model, load_checkpoint, read_manifest, save_checkpoint
from moonpipe.settings import PROJECT_ROOT, Settings
from training import registry
from training.engine import free_port
from training.evaluate import evaluate
from training.launch import load_config, run_dir_for, train
from training.losses import group_advantages, grpo_loss, info_nce
from training.moon3_eval import category_agreement
from training.moon3_trainer import plan_step
from training.promote import promote
from tests.ragged_ranks_worker import launch, sharded_zero3

FAST = {"run": {"max_steps": 2, "micro_batch": 6, "warmup_steps": 1, "weight_decay": 0.0, "learning_rate": 1e-3,
                "checkpoint_every": 1, "log_every": 1, "threads": 2},
        "sft_warmup_steps": 0, "sft_weight": 1.0, "grpo_every": 1, "grpo_products": 2, "grpo_group_size": 2,
        "max_reasoning_tokens": 6, "text_dropout": 0.5}


def _config(name: str, **changes):
    config = json.loads(json.dumps(FAST))
    config["run"]["run_name"] = name
    for key, value in changes.items():
        if key == "run":
            config["run"].update(value)
        else:
            config[key] = value
    return config


@pytest.fixture(scope="module")
def settings(spark, tmp_path_factory):
    settings = Settings.from_env(home=str(tmp_path_factory.mktemp("training-moon3")))
    export_training_sets(date(2026, 11, 3), settings, spark, fashion_train_limit=160, fashion_test_limit=40)
    return settings


@pytest.fixture(scope="module")
def trained(settings):
    return train("moon3", _config("all-terms"), settings=settings)


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 10.0, 20.0, 30.0, 40.0])
    advantages = group_advantages(rewards, group_size=4)
    first = torch.tensor([1.0, 3.0, 0.0, 0.0])
    expected = (first - first.mean()) / (first.std() + 1e-4)
    assert torch.allclose(advantages[:4], expected, atol=1e-5)
    second = advantages[4:]
    assert abs(float(second.mean())) < 1e-6 and math.isclose(float(second.std()), 1.0, rel_tol=1e-3)
    assert torch.allclose(advantages[4:], torch.tensor([-1.1619, -0.3873, 0.3873, 1.1619]), atol=1e-3)
    assert torch.equal(group_advantages(torch.full((4,), 7.0), 2), torch.zeros(4))  # equal rewards: no signal
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_grpo_loss_is_advantage_weighted_and_kl_is_zero_at_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, kl = grpo_loss(logprobs, logprobs.detach(), mask, torch.tensor([1.0, -1.0]), kl_weight=0.1)
    assert float(kl) == 0.0 and float(loss.detach()) == 0.0  # (-1 * 1 + 1 * 1) / 2 with ratio 1
    loss.backward()
    # d/dlogp of -A * ratio, averaged over each row's tokens and the rows.
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.25, -0.25], [0.5, 0.0]]))
    _, kl = grpo_loss(logprobs.detach(), logprobs.detach() - 1.0, mask, torch.zeros(2), kl_weight=0.1)
    assert math.isclose(float(kl), math.exp(-1) + 1 - 1, rel_tol=1e-5)


def test_info_nce_masks_same_group_negatives_and_uses_the_temperature():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor([math.log(10.0)])
    plain = info_nce(a, a, scale)
    masked = info_nce(a, a, scale, groups=torch.tensor([0, 0, 1]))
    assert masked < plain  # rows 0 and 1 no longer push each other away
    logits = 10.0 * a @ a.T
    logits[0, 1] = logits[1, 0] = float("-inf")
    assert torch.isclose(masked, torch.nn.functional.cross_entropy(logits, torch.arange(3)), atol=1e-6)


def test_info_nce_with_group_positives_averages_over_every_same_group_key():
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    keys = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [1.0, 0.1], [0.1, 1.0]]), dim=-1)
    scale = torch.tensor([math.log(5.0)])
    groups = torch.tensor([0, 0, 1])
    loss = info_nce(queries, keys, scale, groups, symmetric=False, group_positives=True)
    log_probs = (5.0 * queries @ keys.T).log_softmax(dim=1)
    # Rows 0 and 1 have two positives (keys 0 and 1), row 2 one (key 2).
    expected = -((log_probs[0, 0] + log_probs[0, 1]) / 2 + (log_probs[1, 0] + log_probs[1, 1]) / 2 + log_probs[2, 2]) / 3
    assert torch.isclose(loss, expected, atol=1e-6)
    both = info_nce(queries, keys, scale, groups, group_positives=True)
    reverse = info_nce(keys, queries, scale, groups, symmetric=False, group_positives=True)
    assert torch.isclose(both, 0.5 * (loss + reverse), atol=1e-6)
    # With one member per group it is plain InfoNCE.
    distinct = torch.tensor([0, 1, 2])
    assert torch.isclose(info_nce(queries, keys, scale, distinct, group_positives=True),
                         info_nce(queries, keys, scale), atol=1e-6)


def test_schedule_warms_up_with_sft_then_runs_the_joint_objective():
    config = load_config("moon3", {"sft_warmup_steps": 2, "grpo_every": 2, "sft_weight": 0.1})
    assert plan_step(config, 0) == {"sft": 1.0, "query_nce": 0.0, "product_nce": 0.0, "grpo": 0.0}
    assert plan_step(config, 2) == {"sft": 0.1, "query_nce": 1.0, "product_nce": 1.0, "grpo": 0.5}
    assert plan_step(config, 3)["grpo"] == 0.0
    with pytest.raises(ValueError, match="every objective is off"):
        load_config("moon3", {"sft_weight": 0, "query_nce_weight": 0, "product_nce_weight": 0, "grpo_weight": 0})
    with pytest.raises(ValueError, match="unknown option"):
        load_config("moon3", {"use_firee": False})


def test_learning_rate_anneals_over_the_time_budget_when_it_runs_out_first():
    from training.engine import TrainingClock, lr_lambda
    from training.run_config import RunConfig

    run = RunConfig(max_steps=1000, warmup_steps=10, min_lr_ratio=0.1, time_budget_s=100.0, anneal_by="time")
    clock = TrainingClock()
    factor = lr_lambda(run, clock)
    assert factor(4) == pytest.approx(0.5)  # the warm-up counts steps either way
    clock.set(50.0)  # half the budget gone at step 110: the time decides (steps alone say 10%)
    assert factor(110) == pytest.approx(0.1 + 0.9 * 0.5)
    clock.set(100.0)
    assert factor(110) == pytest.approx(0.1)  # budget spent: fully annealed
    clock.set(1.0)  # the steps run out first: they decide
    assert factor(1000) == pytest.approx(0.1)
    by_steps = lr_lambda(RunConfig(max_steps=1000, warmup_steps=10, min_lr_ratio=0.1, time_budget_s=100.0))
    assert by_steps(110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 100 / 990)))
    with pytest.raises(ValueError, match="set time_budget_s"):
        RunConfig(anneal_by="time")
    with pytest.raises(ValueError, match="anneal_by"):
        RunConfig(anneal_by="epochs", time_budget_s=10)


def test_the_sft_term_reuses_the_embedding_pass_vision_outputs(settings):
    """One vision pass serves the embeddings and the SFT rows (the anchors): the same log-probs,
    and gradients, as a separate pass over the anchors' own batch."""
    import numpy as np

    from model.moon3_processing import Moon3Processor
    from training.moon3_data import load_training_set
    from training.moon3_trainer import build_inputs, completion_logprobs

    config = load_config("moon3", {"text_dropout": 0.5, "max_reasoning_tokens": 6})
    model = build_model(config.model_config())
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    examples = load_training_set(settings).batch(0, 0, 0, 4)
    weights = {"sft": 1.0, "query_nce": 1.0, "product_nce": 1.0, "grpo": 0.0}
    inputs = build_inputs(examples, model, processor, config, weights, np.random.default_rng(0), torch.device("cpu"))
    assert "sft_batch" not in inputs  # the SFT rows are the products' first rows
    batch = inputs["products"]
    anchors = processor.collate([processor.encode(e.product.view(False)) for e in examples])
    shared, grid = model.leading_images(model.encode_images(batch["pixel_values"], batch["image_grid_thw"]),
                                        batch["image_grid_thw"], batch["input_ids"], len(examples))
    assert torch.equal(grid, batch["image_grid_thw"][: len(examples)])
    rows = {"input_ids": batch["input_ids"][:4], "attention_mask": batch["attention_mask"][:4], "image_grid_thw": grid}
    targets = inputs["sft_targets"]
    reused, reused_mask = completion_logprobs(model, rows, targets, shared)
    own_inputs = build_inputs(examples, model, processor, config, {**weights, "query_nce": 0.0, "product_nce": 0.0},
                              np.random.default_rng(0), torch.device("cpu"))
    separate, separate_mask = completion_logprobs(model, own_inputs["sft_batch"], targets)
    assert torch.equal(reused_mask, separate_mask) and reused_mask.sum() > 0
    assert torch.allclose(reused, separate, atol=1e-5)
    # Gradients reach the vision tower through the shared pass.
    vision_weight = model.backbone.model.visual.patch_embed.proj.weight
    (-(reused * reused_mask).sum()).backward()
    assert vision_weight.grad is not None and vision_weight.grad.abs().sum() > 0
    assert anchors["pixel_values"].shape[0] == int(grid.prod(-1).sum())  # the anchors' own patches, no more


def test_matching_clicks_only_drops_the_clicks_that_contradict_the_catalog(settings):
    from moonpipe import delta
    from training.moon3_data import load_training_set

    every = load_training_set(settings)
    matching = load_training_set(settings, matching_clicks_only=True)

    def names_category(query, product_id):
        return every.products[product_id].category.lower().replace("/", " ") in query.lower()

    contradicting = [pair for pair in every.query_pairs if not names_category(*pair)]
    assert contradicting  # the simulated logs carry click noise
    assert all(names_category(*pair) for pair in matching.query_pairs)
    assert sorted(matching.query_pairs) == sorted(p for p in every.query_pairs if names_category(*p))
    table = delta.read_arrow(settings.table_uri("moon3_query_pairs"), columns=["split", "matches_category"])
    noisy_in_train = [m for s, m in zip(*table.to_pydict().values()) if s == "train" and not m]
    assert len(contradicting) == len(noisy_in_train)


def test_fresh_product_partners_are_other_products_of_the_category_drawn_anew_each_step(settings):
    from training.moon3_data import load_training_set

    data = load_training_set(settings)
    fixed = data.batch(0, 3, 0, 32)
    fresh = data.batch(0, 3, 0, 32, fresh_partners=True)
    # The same clicks either way: only the positives change.
    assert [(e.query, e.product.product_id) for e in fresh] == [(e.query, e.product.product_id) for e in fixed]
    assert [e.positive.product_id for e in fixed] == [data.product_pairs[e.product.product_id] for e in fixed]
    assert all(e.positive.category == e.product.category and e.positive.product_id != e.product.product_id
               and e.positive.product_id in data.products for e in fresh)  # the training split only
    # Deterministic per (seed, step, rank), so a resumed run draws the same; new at other steps.
    again = data.batch(0, 3, 0, 32, fresh_partners=True)
    assert [e.positive.product_id for e in again] == [e.positive.product_id for e in fresh]
    anchor = fresh[0].product
    partners = set()
    for step in range(40):
        partners.update(e.positive.product_id for e in data.batch(0, step, 0, len(data), fresh_partners=True)
                        if e.product.product_id == anchor.product_id)
    of_category = [pid for pid, p in data.products.items() if p.category == anchor.category]
    assert len(partners) > 1 and partners <= set(of_category) - {anchor.product_id}


def test_image_augmentation_mirrors_and_shifts_deterministically():
    import io

    import numpy as np
    from PIL import Image

    from training.moon3_data import augmented_image

    pixels = np.zeros((28, 28), np.uint8)
    pixels[10:14, 3:6] = 255  # a bright block near the left edge
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    original = out.getvalue()

    def decoded(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)))

    views = [decoded(augmented_image(original, np.random.default_rng(seed))) for seed in range(40)]
    assert all(v.shape == (28, 28) and v.sum() == pixels.sum() for v in views)  # shifted, never cropped off
    block_columns = [int(np.flatnonzero(v.max(axis=0))[0]) for v in views]
    assert min(block_columns) >= 1 and max(block_columns) <= 24  # left: 3 +- 2; mirrored: 22 +- 2
    assert any(c < 14 for c in block_columns) and any(c > 14 for c in block_columns)  # both orientations
    assert len({v.tobytes() for v in views}) > 5
    again = decoded(augmented_image(original, np.random.default_rng(7)))
    assert np.array_equal(again, views[7])
    mirror_only = {decoded(augmented_image(original, np.random.default_rng(seed), max_shift=0)).tobytes()
                   for seed in range(40)}
    assert mirror_only == {pixels.tobytes(), pixels[:, ::-1].tobytes()}
    with pytest.raises(ValueError, match="augment_shift"):
        load_config("moon3", {"augment_shift": 0.5})


def test_deepspeed_steps_change_every_trainable_parameter(settings, trained):
    assert trained["steps"] == 2 and trained["zero_stage"] == 2 and trained["world_size"] == 1
    metrics = trained["last_metrics"]
    for term in ("sft_loss", "product_nce", "query_nce", "grpo_loss", "loss"):
        assert math.isfinite(metrics[term]), term
    assert metrics["temperature"] != pytest.approx(0.07, abs=1e-7)  # the temperature is learned
    config = load_config("moon3", _config("all-terms"))
    before = dict(build_model(config.model_config()).named_parameters())
    after = dict(load_checkpoint(trained["checkpoint_dir"]).named_parameters())
    assert before.keys() == after.keys()
    unchanged = [name for name, p in before.items() if torch.equal(p, after[name])]
    assert unchanged == []
    # The reference of the KL term is the model before RL started (here: the initial model).
    reference = dict(load_checkpoint(f"{trained['run_dir']}/reference").named_parameters())
    assert all(torch.equal(before[name], reference[name]) for name in before)


def test_the_run_counts_its_model_flops_and_their_share_of_the_peak(trained):
    throughput = trained["throughput"]
    lines = [json.loads(line) for line in open(f"{trained['run_dir']}/metrics.jsonl")]
    # No warm-up and GRPO on every step: both steps are of one kind, counted once.
    assert list(throughput["flops_per_step_by_kind"]) == ["sft+query_nce+product_nce+grpo"]
    per_step = throughput["flops_per_step_by_kind"]["sft+query_nce+product_nce+grpo"]
    assert [line["step_flops"] for line in lines] == [per_step, per_step]
    # At least the projection head's product for the 12 products and 6 queries of a step, forward
    # and backward (the whole model costs far more).
    assert per_step > 3 * 2 * 18 * 64 * 128
    assert throughput["train_flops"] == 2 * per_step
    assert throughput["flops_per_second_per_rank"] == pytest.approx(2 * per_step / trained["train_seconds"], rel=0.01)
    assert throughput["peak_source"] == "measured matmul (cpu, float32)"
    assert 0 < throughput["fraction_of_peak"] < 1


def test_resume_continues_the_step_count(settings, trained):
    resumed = train("moon3", _config("all-terms", run={"max_steps": 3}), settings=settings)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 3 and resumed["steps_this_call"] == 1
    lines = [json.loads(line) for line in open(f"{resumed['run_dir']}/metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2, 3]
    again = train("moon3", _config("all-terms", run={"max_steps": 3}), settings=settings)
    assert again["steps_this_call"] == 0 and again["stopped_by"] == "already_complete"


def test_an_input_worker_feeds_the_same_batches_as_the_training_process(settings, trained):
    with_worker = train("moon3", _config("input-worker", run={"input_workers": 1}), settings=settings)
    assert with_worker["steps"] == 2
    lines = [[json.loads(line) for line in open(f"{run['run_dir']}/metrics.jsonl")][:2]
             for run in (trained, with_worker)]
    for inline, worker in zip(*lines):  # GRPO samples included: the loader draws nothing from torch's RNG
        for term in ("sft_loss", "product_nce", "query_nce", "grpo_loss", "reward"):
            assert worker[term] == pytest.approx(inline[term], rel=1e-5, abs=1e-6), term


def test_weight_average_follows_its_decay_and_restores_the_online_weights():
    from training.weight_average import WeightAverage

    layer = torch.nn.Linear(2, 1, bias=False)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    layer.register_parameter("frozen", frozen)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = WeightAverage(layer, decay=0.5)
    assert average.names == ["weight"]  # frozen parameters are not averaged
    with torch.no_grad():
        layer.weight.fill_(3.0)
    average.update()  # ramp: decay min(0.5, 1/10) = 0.1 -> 0.1 x 1 + 0.9 x 3
    assert torch.allclose(average.shadow[0], torch.full((1, 2), 2.8))
    with torch.no_grad():
        layer.weight.fill_(5.0)
    average.update()  # decay min(0.5, 2/11)
    expected = 2 / 11 * 2.8 + 9 / 11 * 5.0
    assert torch.allclose(average.shadow[0], torch.full((1, 2), expected))
    with average.applied():
        assert torch.allclose(layer.weight, torch.full((1, 2), expected))
    assert torch.equal(layer.weight, torch.full((1, 2), 5.0))
    restored = WeightAverage(layer, decay=0.5)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 2 and torch.equal(restored.shadow[0], average.shadow[0])
    with pytest.raises(ValueError, match="must lie in"):
        load_config("moon3", {"ema_decay": 1.0})


def test_the_weight_average_is_the_model_and_survives_a_resume(settings):
    def weights(path):
        return dict(load_checkpoint(path).named_parameters())

    first = train("moon3", _config("ema", ema_decay=0.9), settings=settings)
    average_at_2 = weights(first["checkpoint_dir"])
    resumed = train("moon3", _config("ema", ema_decay=0.9, run={"max_steps": 3}), settings=settings)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 3
    average_at_3, online_at_3 = weights(resumed["checkpoint_dir"]), weights(resumed["online_checkpoint_dir"])
    assert not any(torch.equal(average_at_3[name], online_at_3[name]) for name in online_at_3)
    # The third update continues the checkpointed average (2 updates so far: decay 3/12), rather
    # than starting one from the resumed weights.
    decay = 3 / 12
    for name, online in online_at_3.items():
        expected = decay * average_at_2[name] + (1 - decay) * online
        assert torch.allclose(average_at_3[name], expected, atol=1e-6), name


@pytest.mark.slow
def test_two_ranks_on_cpu_with_gloo(settings):
    # A time-annealed schedule: the ranks share one clock (the slowest rank's, all-reduced each step).
    run = {"max_steps": 1, "threads": 1, "time_budget_s": 600, "anneal_by": "time"}
    try:
        summary = train("moon3", _config("two-ranks", run=run), nproc=2, settings=settings, timeout_s=120)
    except TimeoutError:
        # A guard kept from a fixed bug (a late rank skipped the reference save's barrier;
        # docs/training.md): should a launch hang again, the ranks' stacks go into the warning and a
        # second launch must complete.
        log = (run_dir_for("moon3", "two-ranks", settings) / "launch.log").read_text(errors="replace")
        stacks = [line for line in log.splitlines() if line.lstrip().startswith(("File ", "Thread ", "Current thread"))]
        warnings.warn("2-rank launch hung; rank stacks:\n" + "\n".join(stacks[:80]), stacklevel=1)
        summary = train("moon3", _config("two-ranks-again", run=run), nproc=2, settings=settings, timeout_s=120)
    assert summary["world_size"] == 2 and summary["steps"] == 1 and summary["samples"] == 12
    assert math.isfinite(summary["last_metrics"]["loss"])
    assert load_checkpoint(summary["checkpoint_dir"]).version == summary["model_version"]


@pytest.mark.slow
def test_zero3_shards_across_two_ranks_whose_samples_end_at_different_lengths(settings, tmp_path):
    # Rank 1 samples 2 reasoning tokens, rank 0 six: without generation in lockstep, rank 0's
    # parameter gathers find no partner (a collective mismatch, or a hang).
    config = _config("zero3-ragged", run={"zero": sharded_zero3(tmp_path), "threads": 1, "checkpoint_every": 0})
    summary = launch("moon3", config, settings, rank1="max_reasoning_tokens=2")
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2 and summary["steps"] == 2
    assert math.isfinite(summary["last_metrics"]["grpo_loss"]) and math.isfinite(summary["last_metrics"]["loss"])
    before = dict(build_model(load_config("moon3", config).model_config()).named_parameters())
    after = dict(load_checkpoint(summary["checkpoint_dir"]).named_parameters())  # gathered whole to be saved
    assert {name: p.shape for name, p in after.items()} == {name: p.shape for name, p in before.items()}
    assert [name for name, p in before.items() if torch.equal(p, after[name])] == []


def test_the_process_group_starts_despite_a_stale_op_build_lock(tmp_path):
    # A killed process can leave a JIT build's lock file behind, on which torch waits without end:
    # DeepSpeed's backend would build its shared-memory op at start, under that lock (the likely
    # cause of a CI hang).
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    started = subprocess.run(
        [sys.executable, "-c", "from training.engine import init_distributed, world_size\n"
                               "init_distributed(); print('world', world_size())"],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    assert started.stdout.split()[-2:] == ["world", "1"]
    assert (tmp_path / "deepspeed_shm_comm" / "lock").exists()  # untouched: nothing waited on it


def _processes_naming(text: str) -> list[int]:
    return [process.pid for process in psutil.process_iter(["cmdline"]) if text in (process.info["cmdline"] or [])]


def test_a_launch_past_its_timeout_stops_every_rank_and_shows_the_log(settings):
    # After 8 s torchrun has started its ranks (its banner is in the log), which are still starting up.
    with pytest.raises(TimeoutError, match="timeout and was stopped; last lines of .*launch.log") as stopped:
        train("moon3", _config("timed-out"), nproc=2, settings=settings, timeout_s=8)
    assert "got signal: 15" in str(stopped.value)  # torchrun's last words: it was sent SIGTERM
    run_dir = run_dir_for("moon3", "timed-out", settings)
    log = (run_dir / "launch.log").read_text(errors="replace")
    assert "OMP_NUM_THREADS" in log and "Current thread" in log  # the ranks started, then dumped their stacks
    assert _processes_naming(str(run_dir / "config.json")) == []


def test_category_agreement_counts_generated_categories_that_name_the_catalog_one():
    generated = [{"category": "Dress"}, {"category": " t-shirt/top "}, {"color": "red"}, {"category": "Coat"}]
    assert category_agreement(generated, ["dress", "T-shirt/top", "Bag", "Shirt"]) == 0.5
    assert category_agreement([], []) == 0.0
    with pytest.raises(ValueError, match="2 generated attribute sets for 1 products"):
        category_agreement([{}, {}], ["Bag"])


def test_evaluation_with_reasoning_on_reports_the_generated_categories(settings, trained):
    checkpoint = trained["checkpoint_dir"]
    off = evaluate("moon3", checkpoint, baseline=None, settings=settings, record=False, gallery_limit=60, reasoning=False)
    on = evaluate("moon3", checkpoint, baseline=None, settings=settings, record=False, gallery_limit=60, reasoning=True)
    assert off["candidate"]["metrics"]["reasoning_on"] == 0.0
    assert "reasoning_category_accuracy" not in off["candidate"]["metrics"]
    metrics = on["candidate"]["metrics"]
    assert metrics["reasoning_on"] == 1.0 and 0.0 <= metrics["reasoning_category_accuracy"] <= 1.0
    assert on["options"]["reasoning"] is True and metrics["eval_products"] == 40
    assert 0.0 <= metrics["knn_accuracy"] <= 1.0


def test_evaluation_and_the_gate_refuses_a_worse_model(settings, trained, tmp_path):
    good = trained["checkpoint_dir"]  # the resume test may have trained it further: read its version
    good_version = read_manifest(good)["model_version"]
    first = evaluate("moon3", good, settings=settings, gallery_limit=120)
    assert first["baseline_version"] is None
    metrics = first["candidate"]["metrics"]
    for name in ("knn_accuracy", "p2p_recall@1", "p2p_recall@10", "p2p_map@100", "q2p_recall@5"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert metrics["p2p_recall@1"] <= metrics["p2p_recall@5"] <= metrics["p2p_recall@10"]
    assert metrics["eval_products"] == 40 and metrics["gallery_products"] == 120
    assert 0.0 <= metrics["train_knn_accuracy"] <= 1.0
    assert metrics["generalisation_gap"] == pytest.approx(metrics["train_knn_accuracy"] - metrics["knn_accuracy"])
    assert 0.3 < first["reference"]["raw_pixel_knn_accuracy"] <= 1.0
    assert open(first["plots"][0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    decision = promote("moon3", settings=settings)
    assert decision["promoted"] and registry.production(settings, "moon3")["model_version"] == good_version

    # A broken head maps every product to the same point: retrieval at chance.
    worse = load_checkpoint(good)
    with torch.no_grad():
        for p in worse.head.parameters():
            p.zero_()
    worse_dir = tmp_path / "worse"
    worse_version = save_checkpoint(worse, worse_dir)
    report = evaluate("moon3", str(worse_dir), settings=settings, gallery_limit=120)
    assert report["baseline_version"] == good_version
    assert report["candidate"]["metrics"]["knn_accuracy"] < report["baseline"]["metrics"]["knn_accuracy"]
    # A later look at the same version, unrecorded and without a baseline, writes a report of its
    # own: the recorded one, which the gate reads, is left as it was.
    recorded = open(report["report_uri"]).read()
    look = evaluate("moon3", str(worse_dir), baseline=None, settings=settings, gallery_limit=120, record=False)
    assert look["report_uri"] != report["report_uri"] and open(report["report_uri"]).read() == recorded
    assert registry.rows(settings, "moon3") and {
        r["eval_report_uri"] for r in registry.rows(settings, "moon3") if r["model_version"] == worse_version
    } == {report["report_uri"]}
    decision = promote("moon3", worse_version, settings=settings)
    assert decision["promoted"] is False and "margin" in decision["reason"]
    rows = {r["model_version"]: r for r in registry.rows(settings, "moon3")}
    assert rows[worse_version]["status"] == "rejected" and not rows[worse_version]["is_production"]
    assert [v for v, r in rows.items() if r["is_production"]] == [good_version]
