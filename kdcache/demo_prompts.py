"""The demo's built-in prompts: used when no dataset is given and the hub is not reachable.

Written for this project: varied tasks (explanation, math, code, writing, advice, classification,
other languages), short enough for a CPU teacher. In `generate` mode the teacher writes the
responses, which makes a small synthetic teacher-labelled dataset (the first stage of two-stage KD).
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about a cat watching rain.",
    "Give me three tips for sleeping better.",
    "What is 17 times 23? Show your steps.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that returns the factorial of n.",
    "Translate 'Good morning, how are you?' into French.",
    "What causes the seasons on Earth?",
    "Suggest a name for a bakery that sells only bread.",
    "Is a tomato a fruit or a vegetable? Explain briefly.",
    "Write a short, polite email asking a colleague for a meeting next week.",
    "What are the three states of matter?",
    "How do I reverse a string in JavaScript?",
    "Give a one-paragraph definition of machine learning for a ten-year-old.",
    "List four countries in South America and their capitals.",
    "What is photosynthesis?",
    "Write two lines of dialogue between a pirate and a robot.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
    "What does HTTP stand for, and what is it used for?",
    "Recommend a simple recipe for dinner with rice and eggs.",
    "Explain what a prime number is and give three examples.",
    "Write a limerick about a forgetful wizard.",
    "How can I stay focused while studying?",
    "What is the capital of Australia?",
    "Describe the water cycle in simple terms.",
    "Write a SQL query that counts the rows of a table named users.",
    "¿Cuál es la montaña más alta del mundo?",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Give me a motivational quote and explain what it means.",
    "Classify the sentiment of this review: 'The food was cold and the service was slow.'",
    "What are two advantages and two disadvantages of remote work?",
    "Explain the difference between weather and climate.",
    "Write a Python one-liner that squares every number in a list.",
    "Why do we have leap years?",
    "Tell me a fun fact about octopuses.",
]


def write_prompts(path: str | Path, limit: int | None = None) -> Path:
    """Write the prompts as a Tulu-style .jsonl (id, source, messages) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = PROMPTS[:limit] if limit else PROMPTS
    with open(path, "w") as f:
        for i, text in enumerate(rows):
            f.write(
                json.dumps(
                    {
                        "id": f"kdcache-demo-{i:03d}",
                        "source": "kdcache-demo",
                        "messages": [{"role": "user", "content": text}],
                    }
                )
                + "\n"
            )
    return path
