"""The prompt a text-to-SQL model sees: one place, so training and evaluation match."""

from __future__ import annotations

SQL_SYSTEM = "You are a SQLite expert. Answer with one SQL query and nothing else."


def gretel_prompt(question: str, context: str, with_context: bool = True) -> str:
    """User turn for a gretel row; the schema (sql_context) first, as the literature recommends."""
    if with_context and context.strip():
        return f"Database schema:\n{context.strip()}\n\nQuestion: {question.strip()}\nSQL:"
    return f"Question: {question.strip()}\nSQL:"
