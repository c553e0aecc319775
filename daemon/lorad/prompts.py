"""The prompt a text-to-SQL model sees: one place, so training and evaluation match."""

from __future__ import annotations

from typing import Any


def schema_of(context: str) -> str:
    """The CREATE statements of a gretel sql_context; its INSERT rows are for execution, not the prompt.

    Dropping them keeps prompts ~3x shorter, which is most of the training time on a CPU.
    """
    from lorad.score import split_statements

    creates = [s for s in split_statements(context) if s.lstrip().upper().startswith("CREATE")]
    return ";\n".join(creates) + ";" if creates else context.strip()


def chat_prompt(tokenizer: Any, content: str) -> str:
    """One user turn as the model's chat template renders it: the text training, evaluation and checks all feed."""
    return messages_prompt(tokenizer, [{"role": "user", "content": content}])


def messages_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The turns so far, ending where the assistant's answer starts (as mlx-lm's ChatDataset masks them)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(str(m["content"]) for m in messages)


def gretel_prompt(question: str, context: str, with_context: bool = True) -> str:
    """User turn for a gretel row; the schema first, as the literature recommends."""
    if with_context and context.strip():
        return f"Database schema:\n{schema_of(context)}\n\nQuestion: {question.strip()}\nSQL:"
    return f"Question: {question.strip()}\nSQL:"
