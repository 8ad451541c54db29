"""A support-router agent a tiny model can learn: the shape of NVIDIA's AIVA blueprint record (a store's support
assistant that delegates each request to a specialist by a tool call), with tools that take no free-text values,
so the whole call is one choice. The loop and controller tests distil the tiny random Llama on it and gate it on
the real rules (a certified confidence threshold, the teacher-share bound): a student that learns the routing is
promoted, one that does not stays on the teacher.

Requests are written from templates, seeded, one conversation each; `drifted` requests are off-topic chat the
teacher routes to `other_talk`, which the earlier traffic never asked for.
"""

from __future__ import annotations

import json
import random

AGENT = "support_router"
SYSTEM = ("You are the support assistant of an online store. Delegate each customer request to the specialist that "
          "handles it by calling exactly one tool.")
TOOLS = [{"type": "function", "function": {"name": name, "description": about,
                                           "parameters": {"type": "object", "properties": {}}}}
         for name, about in (("order_status", "Orders: where an order is, shipping, delivery."),
                             ("returns", "Returns and refunds."),
                             ("product_qa", "Product questions: sizes, warranty, manuals."),
                             ("other_talk", "Greetings and anything else."))]
PRODUCTS = ["ankle socks", "rain jacket", "desk lamp", "water bottle", "yoga mat", "backpack", "headphones",
            "coffee grinder", "running shoes", "phone case", "blender", "wool scarf"]
INTENTS = {
    "order_status": ["Where is my order {n}?", "Has order {n} shipped yet?", "When will order {n} arrive?",
                      "Track my order {n} please, the {p}."],
    "returns": ["I want to return the {p} and get a refund, customer {n}.", "How do I return my {p}? Refund {n}.",
                  "Refund for the {p} I sent back, return {n}."],
    "product_qa": ["Does the {p} have a warranty? Model {n}.", "What sizes does the {p} {n} come in?",
                    "Is there a manual for the {p} {n}? Warranty too?"],
}
OFF_TOPIC = ["Hello there, how is your day going? Nice weather in city {n}.", "Tell me a joke about {p}s, {n}!",
             "Hi! Who won the football game {n} last night?"]


def record(i: int, rng: random.Random, tool: str, template: str, prefix: str) -> dict:
    text = template.format(n=rng.randint(1000, 99999), p=rng.choice(PRODUCTS))
    call = {"id": f"call_{i}", "type": "function", "function": {"name": tool, "arguments": "{}"}}
    return {"request": {"model": "teacher", "messages": [{"role": "system", "content": SYSTEM},
                                                         {"role": "user", "content": text}], "tools": TOOLS},
            "response": {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                      "finish_reason": "tool_calls"}]},
            "workload_id": AGENT, "client_id": "router-test", "session_id": f"{prefix}-{i}",
            "timestamp": 1_700_000_000 + i}


def records(n: int, seed: int = 0) -> list[dict]:
    """n in-domain requests, the three specialists in turn, each with its teacher's call."""
    rng = random.Random(seed)
    tools = list(INTENTS)
    return [record(i, rng, tools[i % 3], rng.choice(INTENTS[tools[i % 3]]), f"s{seed}") for i in range(n)]


def drifted(n: int, seed: int = 1) -> list[dict]:
    """n off-topic requests, each answered by the teacher with other_talk."""
    rng = random.Random(seed)
    return [record(i, rng, "other_talk", rng.choice(OFF_TOPIC), f"d{seed}") for i in range(n)]


def write(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def teacher_answers(rows: list[dict]) -> dict:
    """The stand-in teacher's table: each request's last user turn -> its logged answer."""
    return {r["request"]["messages"][-1]["content"]: r["response"]["choices"][0]["message"] for r in rows}
