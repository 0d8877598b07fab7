"""A scripted LLM for the LLM-step tests: the loopback server's handler, answering each of
prefab's templates from what the request says (input-dependent, deterministic).

Markers in a prompt or answer inject faults: ``MALFORMED`` (invalid JSON), ``REFUSE``
(a refusal in plain text), ``REFUSAL_FIELD`` (an OpenAI structured-output refusal),
``TRUNCATE`` (a reply longer than max_tokens: the server cuts it, finish_reason=length),
``UNCHANGED`` (a rewrite equal to its input), ``DROPNUM`` (a rewrite that loses numbers),
``MISSATTR`` (a rating without one attribute).

Judges: ``length_judge`` prefers the longer answer; ``biased_judge`` prefers a clearly
longer answer but, between two about as long, always the one shown first (a position
bias the A/B swap has to cancel).
"""

from __future__ import annotations

import json
import re
from typing import Any

from factory.llm.testing import LoopbackServer

SECTION = re.compile(r"(?P<name>[A-Za-z ]+):\n<<<\n(?P<body>.*?)\n>>>", re.S)


def sections(text: str) -> dict[str, str]:
    return {m.group("name").strip().lower(): m.group("body") for m in SECTION.finditer(text)}


def schema_name(body: dict[str, Any]) -> str | None:
    return ((body.get("response_format") or {}).get("json_schema") or {}).get("name")


def user_text(body: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


def _faults(text: str, limit: int) -> Any:
    if "REFUSAL_FIELD" in text:
        return {"refusal": "I'm sorry, but I can't help with that request."}
    if "REFUSE" in text:
        return "I'm sorry, but I can't assist with that."
    if "MALFORMED" in text:
        return '{"attributes": [{"name": "factuality", '
    if "TRUNCATE" in text:
        return json.dumps({"rewrite": "x" * (limit * 4 + 50), "attributes": [], "verdict": "A"})
    return None


def length_judge(a: str, b: str) -> str:
    return "A" if len(a) >= len(b) else "B"


def biased_judge(a: str, b: str) -> str:
    """Prefers the clearly longer answer; between two about as long, says A (position bias)."""
    if max(len(a), len(b)) <= 1.3 * min(len(a), len(b)):
        return "A"
    return length_judge(a, b)


class ScriptedLLM:
    """``server.handler``: records every request body and answers it."""

    def __init__(self, judge=length_judge):
        self.judge = judge
        self.bodies: list[dict[str, Any]] = []

    def names(self) -> list[str | None]:
        return [schema_name(b) for b in self.bodies]

    def __call__(self, body: dict[str, Any], attempt: int) -> Any:
        self.bodies.append(body)
        name = schema_name(body)
        text = user_text(body)
        parts = sections(text)
        limit = int(body.get("max_tokens") or body.get("max_completion_tokens") or 10_000)
        fault = _faults(parts.get("prompt", "") + parts.get("answer", "") + parts.get("response", ""), limit)
        if fault is not None:
            return fault
        if name == "causal_attributes":
            reply = {"attributes": [
                {"name": "Factuality", "description": "Every claim is true."},
                {"name": "completeness", "description": "Covers every part of the question."},
                {"name": "factuality", "description": "duplicate, ignored"},
                {"name": "Clarity", "description": "Easy to follow."},
            ]}
        elif name in ("causal_degrade", "causal_upgrade"):
            answer = parts["answer"]
            attribute = re.search(r"this one attribute:\n(\S+):", text).group(1)
            if "UNCHANGED" in answer:
                reply = {"rewrite": answer}
            else:
                word = "worse" if name == "causal_degrade" else "better"
                reply = {"rewrite": f"{answer} ({word} in {attribute})"}
        elif name == "neutral_rewrite":
            answer = parts["answer"]
            if "DROPNUM" in answer:
                reply = {"rewrite": re.sub(r"\d", "", answer) + " Indeed."}
            elif "longer" in text:
                reply = {"rewrite": f"{answer} To put it another way, that is the whole answer."}
            elif "shorter" in text:
                reply = {"rewrite": answer.replace(" really", "").replace("Well, ", "") + " "}
            elif "formatting" in text:
                reply = {"rewrite": f"- {answer}"}
            else:
                reply = {"rewrite": f"Certainly. {answer}"}
        elif name == "rubric_write":
            topic = max(re.findall(r"[A-Za-z]{6,}", parts["prompt"]) or ["general"], key=len).lower()
            reply = {"hard_rules": ["The response must answer the question that was asked."],
                     "principles": ["The response should give the correct final result.",
                                    "The response should explain its reasoning in clear steps.",
                                    f"The response should describe {topic} precisely."]}
        elif name in ("rubric_judge", "consistency_judge", "consistency_generative"):
            verdict = self.judge(parts["response a"], parts["response b"])
            reply = {"reasoning": "compared.", "verdict": verdict} if name == "rubric_judge" else (
                {"reason": "compared.", "verdict": verdict} if name == "consistency_judge" else
                {"principles": ["Be correct.", "Be complete."], "critique": "A vs B compared.", "verdict": verdict})
        elif name == "ratings_rate":
            response = parts["response"]
            wanted = re.findall(r"^- ([^:\n]+):", text, re.M)
            good = 5 if "good" in response.lower() else 2 if "bad" in response.lower() else 3
            ratings = []
            for attribute in wanted:
                if "MISSATTR" in response and attribute == wanted[-1]:
                    continue
                score = {"verbosity": min(5, 1 + len(response) // 40), "complexity": 2}.get(attribute, good)
                ratings.append({"attribute": attribute, "rationale": "rated.", "score": score})
            reply = {"ratings": ratings}
        else:
            return None  # the server's default reply
        return json.dumps(reply)


def start(judge=length_judge, **config: Any) -> tuple[LoopbackServer, ScriptedLLM]:
    script = ScriptedLLM(judge)
    server = LoopbackServer(handler=script, **config).start()
    return server, script


def spec(server: LoopbackServer, **options: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"base_url": server.base_url, **options}.items())
    return f"openai:test-model?{query}"


def write_seeds(path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
