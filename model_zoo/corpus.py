"""The embedded corpus: CPython's own `pydoc_data` topics (they ship with Python), and the needle text."""

import pydoc_data.topics

# The needle as LWM's evaluation phrases it.
NEEDLE = "The special magic {city} number is: {number}."
QUESTION = "What is the special magic {city} number?"
CHAT_TEMPLATE = "You are a helpful assistant. USER: {prompt} ASSISTANT:"
CITIES = (
    "Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mexico City", "Seattle",
    "Lagos", "Amsterdam", "Belgrade", "Cairo", "Baghdad", "Damascus", "Kigali", "Dakar", "Sofia",
    "Victoria", "Tashkent", "Mumbai", "Barcelona", "Kabul", "Dhaka", "Lisbon", "Oslo", "Lima",
    "Helsinki", "Nairobi", "Hanoi", "Montreal", "Quito", "Riga", "Tunis", "Zagreb", "Vienna",
    "Prague", "Santiago", "Manila", "Havana", "Accra",
)


def corpus_documents() -> list[str]:
    """The topics in a fixed order (sorted by name), so tokenised offsets are reproducible."""
    topics = pydoc_data.topics.topics
    return [topics[name] for name in sorted(topics)]


def chat_prompt(prompt: str) -> str:
    return CHAT_TEMPLATE.format(prompt=prompt)
