"""The capability server's configuration (`--config topics.json`): its schema, its defaults, and the
checks that stop the server at start naming the field that is wrong.

design: plain JSON checked by hand (no schema library at run time), into frozen dataclasses the
executor reads. The minimal file is `{"model": "<a served causal LM>", "topics": [{"name",
"description"}]}`; every capability then runs with the defaults below:
- classification: each topic's label (" <name>") scored by its log-likelihood after `prompt`
  (placeholders `{text}` and `{topics}`, the topics' names and descriptions), softmaxed over the
  topics; or `{"model": "<a served encoder classifier>"}` whose labels are the topics;
- recommendations: `max_tokens` greedy tokens after `prompt` (`{text}`, `{top_topics}`: the
  `top_topics` best topics by classification);
- alerts: `rules` over classification scores (`{"topic", "threshold", "message"}`; the minimal
  file has none) and an optional `judge` (`{"question", "message"}`), answered by the LLM as the
  likelier of " yes" and " no" after `{text}` and the question.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from binserve.config import read_json_file
from models.layout import detect_adapter, directory_model_name

CAPABILITIES = ("classification", "recommendations", "alerts")
MAX_TOPICS = 64
MAX_CONFIG_BYTES = 1 << 20
DEFAULT_CLASSIFY_PROMPT = "Topics:\n{topics}\nText: {text}\nThe topic of this text is:"
DEFAULT_RECOMMEND_PROMPT = "Text: {text}\nTopics: {top_topics}\nRecommendation:"
DEFAULT_JUDGE_PROMPT = "Text: {text}\nQuestion: {question}\nAnswer (yes or no):"


@dataclass(frozen=True)
class Sample:
    """One text of a /classify request and the capabilities the request asked for it."""

    text: str
    capabilities: frozenset[str]


@dataclass(frozen=True)
class Topic:
    name: str
    description: str = ""


@dataclass(frozen=True)
class Rule:
    """An alert when `topic`'s classification score is at least `threshold`."""

    topic: str
    threshold: float
    message: str


@dataclass(frozen=True)
class CapabilityConfig:
    """What `--config` declares, checked; `from_file` and `parse` build it."""

    model: str
    topics: tuple[Topic, ...]
    classify_prompt: str = DEFAULT_CLASSIFY_PROMPT
    classify_model: str | None = None  # an encoder classifier backing classification instead of the LLM
    recommend_prompt: str = DEFAULT_RECOMMEND_PROMPT
    recommend_max_tokens: int = 32
    top_topics: int = 2
    rules: tuple[Rule, ...] = ()
    judge_question: str | None = None
    judge_message: str = ""
    judge_prompt: str = DEFAULT_JUDGE_PROMPT

    @property
    def served_model(self) -> str:
        """The name of the LLM the capabilities run on: `model`, or - when `model` is a model directory
        (so `--config topics.json` alone serves one, as document 000's command line does) - the name
        that directory is served under."""
        return directory_model_name(self.model) if os.path.isdir(self.model) else self.model

    def model_spec(self) -> str:
        """`name=adapter:path` for a `model` that is a directory (served beside `models`), else ""."""
        if not os.path.isdir(self.model):
            return ""
        return f"{self.served_model}={detect_adapter(self.model)}:{os.path.abspath(self.model)}"

    @property
    def topic_names(self) -> list[str]:
        return [t.name for t in self.topics]

    def topics_text(self) -> str:
        """`{topics}` in the classification prompt: one line per topic, with its description."""
        return "\n".join(f"- {t.name}: {t.description}" if t.description else f"- {t.name}" for t in self.topics)

    @classmethod
    def from_file(cls, path: str) -> CapabilityConfig:
        """Read and check `path`; ValueError naming the file and the field that is wrong."""
        return cls.parse(read_json_file(path, MAX_CONFIG_BYTES, "config"), path)

    @classmethod
    def parse(cls, raw, where: str = "config") -> CapabilityConfig:
        """Check a parsed config object; ValueError naming the field."""
        _object(raw, where, {"model", "topics", "classification", "recommendations", "alerts"})
        model = _string(raw.get("model"), f"{where}: 'model'")
        topics_raw = raw.get("topics")
        if not isinstance(topics_raw, list) or not 1 <= len(topics_raw) <= MAX_TOPICS:
            raise ValueError(f"{where}: 'topics' must be a list of 1-{MAX_TOPICS} topics")
        topics = []
        for i, t in enumerate(topics_raw):
            at = f"{where}: topics[{i}]"
            _object(t, at, {"name", "description"})
            topics.append(Topic(_string(t.get("name"), f"{at}.name", 64),
                                _string(t.get("description", ""), f"{at}.description", 1000, empty=True)))  # fmt: skip
        names = [t.name for t in topics]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: topic names must be unique, got {names}")
        values: dict = {"model": model, "topics": tuple(topics)}
        cls._classification(raw.get("classification"), f"{where}: 'classification'", values)
        cls._recommendations(raw.get("recommendations"), f"{where}: 'recommendations'", values)
        cls._alerts(raw.get("alerts"), f"{where}: 'alerts'", values, names)
        return cls(**values)

    @staticmethod
    def _classification(c, at: str, values: dict) -> None:
        if c is None:
            return
        _object(c, at, {"prompt", "model"})
        if "model" in c:
            values["classify_model"] = _string(c["model"], f"{at}.model")
        if "prompt" in c:
            values["classify_prompt"] = _template(c["prompt"], f"{at}.prompt", {"text", "topics"})

    @staticmethod
    def _recommendations(c, at: str, values: dict) -> None:
        if c is None:
            return
        _object(c, at, {"prompt", "max_tokens", "top_topics"})
        if "prompt" in c:
            values["recommend_prompt"] = _template(c["prompt"], f"{at}.prompt", {"text", "top_topics"})
        if "max_tokens" in c:
            values["recommend_max_tokens"] = _int(c["max_tokens"], f"{at}.max_tokens", 1, 1024)
        if "top_topics" in c:
            values["top_topics"] = _int(c["top_topics"], f"{at}.top_topics", 1, MAX_TOPICS)

    @staticmethod
    def _alerts(c, at: str, values: dict, names: list[str]) -> None:
        if c is None:
            return
        _object(c, at, {"rules", "judge"})
        rules = []
        for i, r in enumerate(c.get("rules") or []):
            rat = f"{at}.rules[{i}]"
            _object(r, rat, {"topic", "threshold", "message"})
            topic = _string(r.get("topic"), f"{rat}.topic")
            if topic not in names:
                raise ValueError(f"{rat}.topic: {topic!r} is not one of the topics {names}")
            threshold = r.get("threshold")
            if type(threshold) not in (int, float) or not 0 <= threshold <= 1:
                raise ValueError(f"{rat}.threshold must be a number in [0, 1], got {threshold!r}")
            message = _string(r.get("message", f"{topic} at {{score:.2f}}"), f"{rat}.message", 500)
            rules.append(Rule(topic, float(threshold), message))
        values["rules"] = tuple(rules)
        judge = c.get("judge")
        if judge is not None:
            _object(judge, f"{at}.judge", {"question", "message", "prompt"})
            values["judge_question"] = _string(judge.get("question"), f"{at}.judge.question", 500)
            values["judge_message"] = _string(judge.get("message", values["judge_question"]), f"{at}.judge.message",
                                              500)  # fmt: skip
            if "prompt" in judge:
                values["judge_prompt"] = _template(judge["prompt"], f"{at}.judge.prompt", {"text", "question"})


def _object(value, at: str, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{at} must be an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{at}: unknown fields {unknown} (known: {sorted(allowed)})")


def _string(value, at: str, most: int = 200, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or len(value) > most:
        raise ValueError(f"{at} must be a {'' if empty else 'non-empty '}string of at most {most} characters")
    return value


def _int(value, at: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{at} must be an int in [{low}, {high}], got {value!r}")
    return value


def _template(value, at: str, fields: set[str]) -> str:
    text = _string(value, at, 4000)
    try:
        text.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{at}: a template may use {sorted('{' + f + '}' for f in fields)}, not {exc}") from None
    if "{text}" not in text:
        raise ValueError(f"{at} must contain {{text}}")
    return text


def served_models(models: str, config_path: str) -> str:
    """The `models` setting plus the capability config's LLM when that is a directory to serve
    (`models` empty: only it, not the default MiniLM - the config names what the server is for)."""
    spec = CapabilityConfig.from_file(config_path).model_spec() if config_path else ""
    if not spec:
        return models
    return f"{models},{spec}" if models.strip() else spec
