"""Chat messages -> the text a model reads, through the checkpoint's own chat template.

A real checkpoint's template does more than wrap turns: Qwen2/2.5-VL insert a default system prompt,
Gemma 3 renders `<bos>` itself, Qwen3.5 ends the generation prompt with a think block (open with
`enable_thinking=True`, closed and empty without). `ChatTemplate` renders with the run's template
arguments (`chat_template_kwargs`) everywhere a prompt or an SFT target is made, so rollouts, log-prob
passes, SFT and evaluation read the same tokens that `processor.apply_chat_template(messages,
add_generation_prompt=True, tokenize=True)` gives (docs/families.md, "Real checkpoints").

Reasoning blocks. When the generation prompt opens a `<think>` block, the model's completion continues
inside it: `opened` is that text ("<think>\\n"), and the completion text handed to rewards starts with
it, so a reward sees the whole reasoning block the model wrote. When the generation prompt closes an
empty block (`closes_reasoning`: thinking off), a completion in the `<think>...</think><answer>...`
format would be a second block after an empty one: trainers refuse that combination at start.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PROBE = [{"role": "user", "content": "zqxjv"}]  # a user turn any template renders


class ChatTemplate:
    """A processor's (or tokenizer's) chat template with fixed template arguments."""

    def __init__(self, processor, kwargs: dict | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.kwargs = dict(kwargs or {})
        self.opened, self.closes_reasoning = "", False
        tail = self._generation_tail()
        start = tail.rfind(THINK_OPEN)
        if start >= 0:
            if THINK_CLOSE in tail[start:]:
                self.closes_reasoning = True
            else:
                self.opened = tail[start:]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **self.kwargs)

    def add_special_tokens(self, text: str) -> bool:
        """Whether tokenizing rendered `text` adds the tokenizer's special tokens, as transformers'
        `apply_chat_template(tokenize=True)` decides: a bare tokenizer never; a processor not when
        the text already starts with the BOS token (Gemma's template renders it)."""
        if self.processor is self.tokenizer:
            return False
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def continuation(self, messages: list[dict], completion: str, row_index: int) -> str:
        """The text that follows the generation prompt of `messages` when the assistant answers
        `completion`, as the template renders that turn (it may trim, or restructure a think block).

        The rendered conversation must start with the rendered generation prompt; when it does not
        (a template that closes an empty think block before a target with its own reasoning), the
        target cannot be trained as the model will be prompted, and the error names the row.
        """
        prompt = self.render(messages)
        full = self.render([*messages, {"role": "assistant", "content": completion}], add_generation_prompt=False)
        if not full.startswith(prompt):
            hint = (f"; the generation prompt closes an empty think block, so a target with its own {THINK_OPEN} "
                    f"block cannot follow it: set chat_template_kwargs {{'enable_thinking': True}} or drop the "
                    f"think block from the targets") if self.closes_reasoning else ""
            raise ValueError(f"row {row_index}: the chat template renders the conversation with this target so that it "
                             f"does not continue the generation prompt (prompt ends {prompt[-40:]!r}, the rendered turn "
                             f"reads {full[len(prompt) - 40 : len(prompt) + 40]!r}){hint}")
        return full[len(prompt):]

    def _generation_tail(self) -> str:
        """What the generation prompt adds after a user turn (e.g. "<|im_start|>assistant\\n<think>\\n")."""
        try:
            with_prompt = self.render(_PROBE)
            without = self.render(_PROBE, add_generation_prompt=False)
        except Exception:  # no template (a bare tokenizer of a base model): nothing to read
            return ""
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""


def check_reasoning_fits(template: ChatTemplate, reward_funcs, what: str = "the rewards") -> None:
    """Refuse, at start, rewards that read a `<think>` block (marked `expects_reasoning = True`, as
    `rewards.format_reward` and `rewards.JudgeReward` are) under a template whose generation prompt
    closes an empty one: every completion would score as if the model had not reasoned, or learn to
    write a second block after the empty one."""
    if not template.closes_reasoning:
        return
    names = [getattr(f, "__name__", type(f).__name__) for f in reward_funcs if getattr(f, "expects_reasoning", False)]
    if names:
        raise ValueError(f"{what} ({', '.join(names)}) expect a {THINK_OPEN}...{THINK_CLOSE} block, but the chat template "
                         f"closes an empty one at the end of the generation prompt (thinking off): pass "
                         f"chat_template_kwargs={{'enable_thinking': True}} so the prompt opens {THINK_OPEN} and the "
                         f"completion continues it, or use rewards that do not read a think block")


def check_targets_fit(template: ChatTemplate, targets: list[str]) -> None:
    """Refuse, at start, SFT targets with a `<think>` block under a template whose generation prompt
    closes an empty one (the target could only follow it as a second reasoning block)."""
    if not template.closes_reasoning:
        return
    for index, target in enumerate(targets):
        if THINK_OPEN in target:
            raise ValueError(f"train_dataset row {index}: field 'completion' holds a {THINK_OPEN} block, but the chat "
                             f"template closes an empty one at the end of the generation prompt (thinking off): pass "
                             f"chat_template_kwargs={{'enable_thinking': True}}, or train targets without a think block")
