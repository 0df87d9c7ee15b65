"""A MOON3.0 training step's inputs: transformers' own preprocessing vs this project's, side by side.

On one real batch (the Fashion-MNIST config's views: ``--batch`` anchors and their positives from
the exported training set), each stage is timed both ways in one run and the outputs compared:

    pixels      Qwen2VLImageProcessorPil per photo   vs  model.image_pixels.qwen_vl_pixels
    tokens      the tokenizer per prompt              vs  Moon3Processor.token_ids (memoised)
    rope        get_rope_index over the batch         vs  Moon3Model.rope_positions (once per layout)

    python -m benchmarks.training_inputs [--config training/configs/moon3_fashion_quality.json]

Needs an export (``moonpipe training-data export --date D``) in ``MOONPIPE_HOME``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from model.image_pixels import qwen_vl_pixels
from model.moon3_processing import Moon3Processor, _decode_image


def _best_ms(work: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    result = work()  # warm: first calls allocate and fill caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best * 1000, result


def main(argv: list[str] | None = None) -> int:
    from moonpipe.settings import Settings
    from training.launch import load_config
    from training.moon3_data import load_training_set
    from model.moon3_checkpoint import build_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="training/configs/moon3_fashion_quality.json")
    parser.add_argument("--batch", type=int, default=64, help="anchors (each with its positive: 2x the views)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the best is kept")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = load_config("moon3", args.config)
    model = build_model(config.model_config())
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    examples = load_training_set(Settings.from_env(), config.export_date).batch(config.run.seed, 0, 0, args.batch)
    views = [e.product.view(False) for e in examples] + [e.positive.view(False) for e in examples]
    budget = processor.budget
    size = {"shortest_edge": budget.min_image_pixels, "longest_edge": budget.max_image_pixels}
    images = [_decode_image(v.image_bytes, "photo") for v in views]

    rows = []
    hf_ms, hf_pixels = _best_ms(lambda: [model.image_processor(images=[i], size=size, return_tensors="pt")
                                         ["pixel_values"] for i in images], args.repeats)
    ours_ms, our_pixels = _best_ms(lambda: [qwen_vl_pixels(model.image_processor, [i], budget.min_image_pixels,
                                                           budget.max_image_pixels)[0] for i in images], args.repeats)
    rows.append(("pixels", hf_ms, ours_ms, all(torch.equal(a, b) for a, b in zip(hf_pixels, our_pixels))))

    grids = [qwen_vl_pixels(model.image_processor, [i], budget.min_image_pixels, budget.max_image_pixels)[1]
             for i in images]
    prompts = [processor.product_prompt(v, grid) for v, grid in zip(views, grids)]
    hf_ms, hf_ids = _best_ms(lambda: [model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
                             args.repeats)
    ours_ms, our_ids = _best_ms(lambda: [processor.token_ids(p) for p in prompts], args.repeats)
    rows.append(("tokens", hf_ms, ours_ms, hf_ids == our_ids))

    batch = processor.collate([processor.encode(v) for v in views])
    types = (batch["input_ids"] == model.image_token_id).int()
    hf_ms, (hf_rope, _) = _best_ms(lambda: model.backbone.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=types, image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"]), args.repeats)
    ours_ms, our_rope = _best_ms(lambda: model.rope_positions(
        batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]), args.repeats)
    rows.append(("rope", hf_ms, ours_ms, torch.equal(hf_rope, our_rope)))

    print(f"MOON3.0 training inputs, {len(views)} views ({args.config}), best of {args.repeats}, "
          f"{args.threads} torch threads")
    print(f"{'stage':8s} {'transformers ms':>16s} {'moonpipe ms':>12s} {'speed-up':>9s} {'same output':>12s}")
    for stage, theirs, ours, same in rows:
        print(f"{stage:8s} {theirs:16.1f} {ours:12.1f} {theirs / ours:8.1f}x {str(same):>12s}")
    total_theirs, total_ours = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'total':8s} {total_theirs:16.1f} {total_ours:12.1f} {total_theirs / total_ours:8.1f}x")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
