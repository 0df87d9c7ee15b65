"""Creative4U's model API on the tiny preset: prompt and chat template, target/parse round trips,
malformed and adversarial outputs, rewards, guided and free decoding with bounded retries, the
A/B confidence, unreadable images, checkpoints. Creatives are composed from real sample photos."""

from __future__ import annotations

import pytest
import torch

from jobs.creative_click_model import SEGMENTS, effect_gap
from jobs.creative_compose import compose_creative, draw_factor_sets, encode_jpeg
from jobs.creative_data import sample_products
from model.creative4u import Comparison, CreativeRejected, decode_creative
from model.creative4u_checkpoint import CheckpointError, build_model, load_checkpoint, read_manifest, save_checkpoint
from model.creative4u_config import Creative4UConfig
from model.creative4u_protocol import (
    PairPrompt,
    answer_reward,
    build_prompt,
    build_target,
    format_reward,
    message_matches,
    parse_output,
)
from moonpipe.settings import Settings

PROMPT = PairPrompt("Laptop", ("cheap laptop", "laptop sale"))


@pytest.fixture(scope="module")
def creatives() -> list[tuple[dict, bytes]]:
    [product] = sample_products(Settings.from_env().raw_data_dir, vendure=1, fashion=0)
    return [(f, encode_jpeg(compose_creative(product.photo, f, f"t{k}"))) for k, f in enumerate(draw_factor_sets(3, "t"))]


@pytest.fixture(scope="module")
def model():
    return build_model(Creative4UConfig(guided_think_tokens=6, max_new_tokens=12, max_retries=1))


# -- protocol ----------------------------------------------------------------------------------


def test_target_parses_back_to_its_answer_in_both_orders(creatives):
    (fa, _), (fb, _) = creatives[0], creatives[1]
    segment = SEGMENTS[0]
    for answer in ("A", "B"):
        target = build_target(PROMPT, fa, fb, answer, effect_gap(fa, fb, segment))
        parsed = parse_output(target)
        assert parsed.ok and parsed.answer == answer and parsed.error_code is None
        assert parsed.reasoning.startswith("1. Similarity") and f"8. Click: {answer}" in parsed.reasoning
        assert format_reward(target) == 1.0
        assert answer_reward(target, answer) == 1.0 and answer_reward(target, "B" if answer == "A" else "A") == 0.0
    # the decisive factors named are the ones the click model favours the answer for
    legible = {**fa, "overlay_text": "legible", "message": "sale", "background": "clean"}
    garbled = {**fa, "overlay_text": "garbled", "message": "sale", "background": "clean"}
    target = build_target(PROMPT, legible, garbled, "A", effect_gap(legible, garbled, SEGMENTS[0]))
    assert "mainly for its overlay text and message" in target  # 1.05 and 0.9 logits
    assert message_matches(legible, PROMPT.interest_queries) == ["cheap laptop", "laptop sale"]
    assert message_matches(garbled, PROMPT.interest_queries) == []


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("<think>clean background</think>", "no_answer"),
        ("just A", "no_answer"),
        ("<think>x</think><answer>A</answer><answer>B</answer>", "multiple_answers"),
        ("<think>x <answer>A</answer></think>", "answer_in_think"),
        ("<answer>A</answer><think>x</think>", "text_before_think"),
        ("<think>x</think> because <answer>A</answer>", "text_between"),
        ("<think>x</think><answer>A</answer> and B too", "text_after_answer"),
        ("<think>x</think><answer>C</answer>", "bad_answer_value"),
        ("<think>x</think><answer>A or B</answer>", "bad_answer_value"),
        ("<think>  </think><answer>B</answer>", "empty_reasoning"),
        ("<think>a</think><think>b</think><answer>A</answer>", "bad_think"),
        ("<think>x<answer>A</answer>", "bad_think"),
        ("", "no_answer"),
    ],
)
def test_malformed_and_adversarial_outputs_are_never_guessed(text, code):
    parsed = parse_output(text)
    assert parsed.answer is None and parsed.error_code == code and parsed.error
    assert format_reward(text) == 0.0 and answer_reward(text, "A") == 0.0


def test_whitespace_and_end_of_turn_are_tolerated():
    parsed = parse_output("  <think> tidy layout </think>\n<answer> B </answer><|im_end|>")
    assert (parsed.answer, parsed.reasoning) == ("B", "tidy layout")


def test_prompt_uses_the_chat_template_with_two_images(model, creatives):
    text = build_prompt(model.tokenizer, PROMPT)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.count("<|image_pad|>") == 2 and "cheap laptop; laptop sale" in text
    assert text.index("Creative A:") < text.index("Creative B:")
    encoded = model.encode(Comparison(PROMPT, creatives[0][1], creatives[1][1]))
    image_tokens = sum(1 for t in encoded.input_ids if t == model.image_token_id)
    assert image_tokens == int(encoded.image_grid_thw.prod(dim=1).sum()) // model.image_processor.merge_size**2


def test_training_example_labels_only_the_target(model, creatives):
    target = build_target(PROMPT, creatives[0][0], creatives[1][0], "A")
    example = model.encode_for_training(Comparison(PROMPT, creatives[0][1], creatives[1][1]), target)
    labelled = example["labels"][0][example["labels"][0] != -100].tolist()
    assert model.tokenizer.decode(labelled[:-1]) == target and labelled[-1] == model.tokenizer.eos_token_id
    loss = model(**example).loss
    assert torch.isfinite(loss) and loss > 0


# -- judging ------------------------------------------------------------------------------------


def test_guided_decoding_gives_well_formed_answers_with_model_confidence(model, creatives):
    (_, a), (_, b), (_, c) = creatives
    judgments = model.judge([Comparison(PROMPT, a, b), Comparison(PROMPT, b, a), Comparison(PROMPT, a, c)], decoding="guided")
    for j in judgments:
        assert j.answer in ("A", "B") and j.attempts == 1 and j.error_code is None
        assert parse_output(j.raw_output).answer == j.answer
        assert 0.5 <= j.confidence <= 1.0 and j.confidence == pytest.approx(j.prob_a if j.answer == "A" else 1 - j.prob_a)
    again = model.judge([Comparison(PROMPT, a, b)], decoding="guided")[0]
    assert (again.answer, again.raw_output) == (judgments[0].answer, judgments[0].raw_output)  # deterministic


def test_free_decoding_of_an_untrained_model_is_retried_then_undecided(model, creatives):
    (_, a), (_, b), _ = creatives
    [j] = model.judge([Comparison(PROMPT, a, b)], decoding="free")
    # random weights never write the format: 1 greedy attempt + max_retries sampled ones
    assert j.answer is None and j.confidence is None and j.attempts == 2
    assert j.error_code in ("no_answer", "bad_think", "multiple_answers") and j.raw_output


def test_unreadable_creative_is_rejected_not_fatal(model, creatives):
    (_, a), (_, b), _ = creatives
    with pytest.raises(CreativeRejected) as error:
        decode_creative(a[: len(a) // 3], "creative X")
    assert error.value.code == "image_undecodable" and "creative X" in str(error.value)
    good, bad = model.judge([Comparison(PROMPT, a, b), Comparison(PROMPT, a, b"\x89PNG broken")], decoding="guided")
    assert good.answer in ("A", "B")
    assert bad.answer is None and bad.attempts == 0 and bad.error_code == "image_undecodable"


def test_checkpoint_round_trip_reproduces_judgments(model, creatives, tmp_path):
    (_, a), (_, b), _ = creatives
    version = save_checkpoint(model, tmp_path / "c4u")
    assert version.startswith("creative4u-") and read_manifest(tmp_path / "c4u")["model_version"] == version
    loaded = load_checkpoint(tmp_path / "c4u")
    assert loaded.version == version and loaded.config.guided_think_tokens == 6
    before = model.judge([Comparison(PROMPT, a, b)], decoding="guided")[0]
    after = loaded.judge([Comparison(PROMPT, a, b)], decoding="guided")[0]
    assert after.raw_output == before.raw_output and after.confidence == pytest.approx(before.confidence, abs=1e-5)
    with pytest.raises(FileExistsError):
        save_checkpoint(model, tmp_path / "c4u")
    (tmp_path / "c4u" / "creative4u_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "c4u")
    with pytest.raises(CheckpointError, match="init-model"):
        read_manifest(tmp_path)
