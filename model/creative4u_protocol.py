"""Creative4U's text side: the evaluation protocol, the prompt for one pair, the target text built
from a pair's known factors, strict output parsing and the rewards of Reason-to-Select RFT.

Everything here is plain text and dicts (no torch), so the trainer (CoT-SFT, then GRPO with TRL),
the scoring job and the tests share one definition of the format:

    prompt     chat-templated text with one ``<|image_pad|>`` per creative (the Hugging Face
               convention: the processor expands each to the image's token count)
    output     ``<think>comparative reasoning</think><answer>A</answer>`` (or ``B``)

Parsing is strict: exactly one think block, then exactly one answer block holding ``A`` or
``B``, and nothing else (surrounding whitespace aside). Anything else is malformed, with a reason
code; the scorer retries a malformed output a bounded number of times, then records the comparison
as undecided. An answer is never guessed from malformed text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
FORMAT_TOKENS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)
ANSWERS = ("A", "B")
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

# The protocol the prompt walks, in the paper's order. The target reasoning follows the same steps.
PROTOCOL_STEPS: tuple[tuple[str, str], ...] = (
    ("similarity", "Are the two creatives too similar to judge?"),
    ("match", "How well does each match the user's searches and the product title?"),
    ("text", "Is the text in each image legible and useful?"),
    ("props", "Do models or props help or distract?"),
    ("layout", "Is the layout balanced and easy to read?"),
    ("subject", "Is the product subject prominent, well framed and well lit?"),
    ("background", "Is the background clean or cluttered?"),
    ("click", "Which creative would this user click?"),
)

SYSTEM_PROMPT = (
    "You are Creative4U, an advertising creative evaluator for an e-commerce platform. Given a product, "
    "a user's interests (their frequent searches) and two creative images A and B of the product, decide "
    "which creative the user is more likely to click. Reason step by step inside <think></think>, then give "
    "only the letter inside <answer></answer>."
)

# The factors a creative is composed from (jobs.creative_data draws them) and how the reasoning
# phrases each level. ``message`` is what a legible overlay text says.
FACTORS: dict[str, dict[str, str]] = {
    "framing": {"tight": "fills the frame", "medium": "is shown at medium size", "wide": "is small in the frame"},
    "background": {"clean": "clean", "cluttered": "cluttered"},
    "overlay_text": {"none": "no text", "legible": "legible text", "garbled": "garbled, unreadable text"},
    "message": {"sale": "a sale offer", "new": "a new-season message", "premium": "a premium-quality message"},
    "layout": {"centered": "centered", "offset": "offset to one side"},
    "brightness": {"normal": "well lit", "dark": "too dark", "bright": "washed out"},
}
# Words of a search query that a legible overlay message answers.
MESSAGE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "sale": ("sale", "deal", "discount", "cheap", "bargain", "offer"),
    "new": ("new", "trend", "trending", "season", "latest"),
    "premium": ("premium", "luxury", "quality", "designer", "best"),
}
_STEP_OF_FACTOR = {
    "message": "match",
    "overlay_text": "text",
    "layout": "layout",
    "framing": "subject",
    "brightness": "subject",
    "background": "background",
}


@dataclass(frozen=True)
class PairPrompt:
    """What one comparison shows the model: the product, the segment's interests, creatives A and B."""

    title: str
    interest_queries: Sequence[str]

    def __post_init__(self) -> None:
        if not (self.title or "").strip():
            raise ValueError("a comparison needs the product title: it is part of the protocol")


def user_text(prompt: PairPrompt, max_queries: int = 8) -> tuple[str, str, str]:
    """The user turn's three text parts: before image A, between A and B, after B."""
    queries = [q.strip() for q in prompt.interest_queries if q and q.strip()][:max_queries]
    interests = "; ".join(queries) if queries else "(no searches recorded)"
    steps = "\n".join(f"{i}. {question}" for i, (_, question) in enumerate(PROTOCOL_STEPS, start=1))
    head = f"Product title: {prompt.title.strip()}\nUser interests (frequent searches): {interests}\nCreative A:"
    tail = f"\nFollow this protocol:\n{steps}\nAnswer with A or B."
    return head, "\nCreative B:", tail


def messages(prompt: PairPrompt, max_queries: int = 8) -> list[dict]:
    """Chat messages in the Hugging Face multimodal format (two ``{"type": "image"}`` parts)."""
    head, middle, tail = user_text(prompt, max_queries)
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": head},
                {"type": "image"},
                {"type": "text", "text": middle},
                {"type": "image"},
                {"type": "text", "text": tail},
            ],
        },
    ]


# A Qwen2-VL style template for tokenizers that ship none (the presets): the same turn markers
# and image tags as Qwen2-VL-Instruct, so prompts look alike on a preset and on a real backbone.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_prompt(tokenizer, prompt: PairPrompt, max_queries: int = 8) -> str:
    """The prompt text for one pair through the tokenizer's chat template, ending where the
    assistant's answer starts. Each creative appears as one ``<|image_pad|>``."""
    text = tokenizer.apply_chat_template(messages(prompt, max_queries), tokenize=False, add_generation_prompt=True)
    if text.count("<|image_pad|>") != 2:
        raise ValueError(
            f"the tokenizer's chat template rendered {text.count('<|image_pad|>')} image placeholders for a pair "
            "(expected 2): use a Qwen2-VL chat template (model.creative4u_protocol.CHAT_TEMPLATE)"
        )
    return text


# -- targets (CoT-SFT) ---------------------------------------------------------------------------


def _level(factors: Mapping[str, str], name: str) -> str:
    value = factors.get(name)
    if value not in FACTORS[name]:
        raise ValueError(f"factor {name}={value!r} is not one of {sorted(FACTORS[name])}")
    return value


def message_matches(factors: Mapping[str, str], interest_queries: Sequence[str]) -> list[str]:
    """The segment's queries that a creative's legible overlay message answers."""
    if factors.get("overlay_text") != "legible":
        return []
    words = MESSAGE_KEYWORDS[_level(factors, "message")]
    return [q for q in interest_queries if any(w in re.findall(r"[a-z]+", q.lower()) for w in words)]


def build_target(
    prompt: PairPrompt,
    factors_a: Mapping[str, str],
    factors_b: Mapping[str, str],
    answer: str,
    effects: Mapping[str, float] | None = None,
) -> str:
    """The reference output for a pair whose factors and better creative are known.

    The reasoning walks the protocol, comparing the two creatives factor by factor, and ends by
    naming the factors that decide: ``effects`` maps a factor to its contribution to the click
    logit of A minus B (from the click model); the largest in favour of ``answer`` are named.
    """
    if answer not in ANSWERS:
        raise ValueError(f"answer must be 'A' or 'B', got {answer!r}")
    a = {name: _level(factors_a, name) for name in FACTORS}
    b = {name: _level(factors_b, name) for name in FACTORS}
    differing = [name for name in FACTORS if a[name] != b[name]]
    lines = []
    if differing:
        lines.append(f"1. Similarity: they differ in {', '.join(n.replace('_', ' ') for n in differing)}; comparable.")
    else:
        lines.append("1. Similarity: nearly identical compositions; judged on small details.")
    match_a, match_b = message_matches(a, prompt.interest_queries), message_matches(b, prompt.interest_queries)
    match = []
    for label, found in (("A", match_a), ("B", match_b)):
        match.append(f"{label} answers '{found[0]}'" if found else f"{label} matches no search directly")
    lines.append(f"2. Match: {'; '.join(match)}.")

    def text_of(f: dict[str, str]) -> str:
        if f["overlay_text"] == "legible":
            return f"legible text with {FACTORS['message'][f['message']]}"
        return FACTORS["overlay_text"][f["overlay_text"]]

    lines.append(f"3. Text: A has {text_of(a)}; B has {text_of(b)}.")
    lines.append("4. Props: neither uses models or props.")
    lines.append(f"5. Layout: A is {FACTORS['layout'][a['layout']]}; B is {FACTORS['layout'][b['layout']]}.")
    lines.append(
        f"6. Subject: in A the product {FACTORS['framing'][a['framing']]} and is {FACTORS['brightness'][a['brightness']]}; "
        f"in B it {FACTORS['framing'][b['framing']]} and is {FACTORS['brightness'][b['brightness']]}."
    )
    lines.append(f"7. Background: A is {a['background']}; B is {b['background']}.")
    sign = 1.0 if answer == "A" else -1.0
    decisive = sorted(
        ((sign * value, name) for name, value in (effects or {}).items() if sign * value > 0 and name in FACTORS),
        reverse=True,
    )[:2]
    reasons = " and ".join(name.replace("_", " ") for _, name in decisive) or "its overall presentation"
    lines.append(f"8. Click: {answer}, mainly for its {reasons}.")
    return f"{THINK_START}" + "\n".join(lines) + f"{THINK_END}{ANSWER_START}{answer}{ANSWER_END}"


# -- parsing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedOutput:
    """A generated text, parsed. ``answer`` is None when the text is malformed (``error_code`` says why)."""

    answer: str | None
    reasoning: str | None
    error_code: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.answer is not None


_TRAILING = ("<|im_end|>", "<|endoftext|>")


def _malformed(code: str, message: str, reasoning: str | None = None) -> ParsedOutput:
    return ParsedOutput(None, reasoning, code, message)


def parse_output(text: str) -> ParsedOutput:
    """Parse ``<think>…</think><answer>A|B</answer>`` strictly; see the module doc."""
    body = (text or "").strip()
    while body.endswith(_TRAILING):  # end-of-turn markers a decoder may keep
        body = body.removesuffix("<|im_end|>").removesuffix("<|endoftext|>").rstrip()
    counts = {tag: body.count(tag) for tag in FORMAT_TOKENS}
    if counts[ANSWER_START] == 0 and counts[ANSWER_END] == 0:
        return _malformed("no_answer", "the output has no <answer></answer> block")
    if counts[ANSWER_START] > 1 or counts[ANSWER_END] > 1:
        return _malformed("multiple_answers", f"the output has {max(counts[ANSWER_START], counts[ANSWER_END])} answer tags")
    if counts[THINK_START] != 1 or counts[THINK_END] != 1:
        return _malformed(
            "bad_think", f"the output needs exactly one <think>…</think> block (found {counts[THINK_START]} opening, "
            f"{counts[THINK_END]} closing)"
        )
    if counts[ANSWER_START] != 1 or counts[ANSWER_END] != 1:
        return _malformed("no_answer", "the answer block is not closed or not opened")
    think_start, think_end = body.index(THINK_START), body.index(THINK_END)
    answer_start, answer_end = body.index(ANSWER_START), body.index(ANSWER_END)
    reasoning = body[think_start + len(THINK_START) : think_end].strip() if think_start < think_end else None
    if think_start != 0:
        return _malformed("text_before_think", "the output must start with <think>", reasoning)
    if not think_start < think_end:
        return _malformed("bad_think", "</think> comes before <think>")
    if answer_start < think_end:
        return _malformed("answer_in_think", "the answer block is inside or before the reasoning", reasoning)
    if body[think_end + len(THINK_END) : answer_start].strip():
        return _malformed("text_between", "text between </think> and <answer>", reasoning)
    if not answer_start < answer_end:
        return _malformed("no_answer", "</answer> comes before <answer>", reasoning)
    if body[answer_end + len(ANSWER_END) :].strip():
        return _malformed("text_after_answer", "text after </answer>", reasoning)
    value = body[answer_start + len(ANSWER_START) : answer_end].strip()
    if value not in ANSWERS:
        return _malformed("bad_answer_value", f"the answer is {value[:20]!r}, not 'A' or 'B'", reasoning)
    if not reasoning:
        return _malformed("empty_reasoning", "the <think> block is empty: the choice must be explained", reasoning)
    return ParsedOutput(value, reasoning)


# -- rewards (GRPO) ----------------------------------------------------------------------------------


def format_reward(text: str) -> float:
    """1.0 for a well-formed output, else 0.0."""
    return 1.0 if parse_output(text).ok else 0.0


def answer_reward(text: str, label: str) -> float:
    """1.0 when the well-formed output picks ``label`` ('A' or 'B'), else 0.0 (malformed earns nothing)."""
    if label not in ANSWERS:
        raise ValueError(f"label must be 'A' or 'B', got {label!r}")
    return 1.0 if parse_output(text).answer == label else 0.0


def swap_answer(answer: str) -> str:
    """The same preference with the images shown in the other order."""
    return {"A": "B", "B": "A"}[answer]
