"""A rubric judge: another model, behind any OpenAI-compatible chat completions endpoint, grades
each answer against the gold answer (accuracy, completeness, clarity, 1-5), and compares two
models' answers to the same question (pairwise, asked in both orders).

    judge = Judge(JudgeConfig(url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-72B-Instruct",
                              key_env="JUDGE_API_KEY"))
    judge.rubric(question, reference, answer)      # Verdict(value={"accuracy": 4, ...}, ...)
    judge.pairwise(question, reference, a, b)      # Verdict(value="A" | "B" | "tie", ...)

The prompts are fixed constants with a version (`PROMPT_VERSION`, recorded in eval.json): change
a word of them and the version must change, since scores under different prompts do not compare.
Requests use temperature 0. A reply must be exactly one JSON object with exactly the expected
keys (the rubric's values integers 1..5, the pairwise winner "A", "B" or "tie"); a single
Markdown code fence around it is tolerated. An invalid reply is answered with what was wrong
and the judge is asked again, up to `retries` times; what never parses is counted as
unparseable and left out of the means, never guessed. Transport errors (after the client's own
retries) are counted separately. Nothing here raises for a bad reply.

Pairwise comparisons cancel position bias: each question is asked with the base answer as A and
again with it as B; a model wins only when both orders pick it, anything else is a tie (and an
order disagreement is counted).

The API key is read from the environment variable the caller names, sent only to the judge URL
(in the Authorization header, by the openai client) and never printed or recorded.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from medchat.errors import UserError

# openai (the official client: retries with backoff, typed errors) is imported in a function:
# the command line imports this module through evaluate, and most evaluations use no judge.

PROMPT_VERSION = "medchat-judge-v1"
CRITERIA = ("accuracy", "completeness", "clarity")
WINNERS = ("A", "B", "tie")

SYSTEM_PROMPT = (
    "You are an experienced clinical pharmacist who grades answers to consumer questions about "
    "medicines. You compare each answer with a reference answer taken from a trusted source. "
    "You are strict, consistent and brief, and you reply with JSON only.")

RUBRIC_PROMPT = """Grade the ANSWER to the QUESTION against the REFERENCE answer.

Score each criterion with an integer from 1 (worst) to 5 (best):
- accuracy: is what the answer says medically correct and consistent with the reference? An
  answer that could mislead a patient in a harmful way (for example calling a combination safe
  when the reference warns against it) scores 1 or 2.
- completeness: does the answer cover the points of the reference that matter to the person
  asking?
- clarity: is the answer clear, well organised and easy for a patient to understand?

QUESTION:
<<<{question}>>>

REFERENCE:
<<<{reference}>>>

ANSWER:
<<<{answer}>>>

Reply with only this JSON object and no other text:
{{"accuracy": <integer 1-5>, "completeness": <integer 1-5>, "clarity": <integer 1-5>}}"""

PAIRWISE_PROMPT = """Two answers, A and B, were written to the same QUESTION. Using the REFERENCE
answer from a trusted source, decide which answer is better for the person asking: judge
accuracy first, then completeness, then clarity. Say "tie" when neither is better.

QUESTION:
<<<{question}>>>

REFERENCE:
<<<{reference}>>>

ANSWER A:
<<<{a}>>>

ANSWER B:
<<<{b}>>>

Reply with only this JSON object and no other text:
{{"winner": "A" | "B" | "tie"}}"""

RUBRIC_FORMAT = ('{"accuracy": <integer 1-5>, "completeness": <integer 1-5>, '
                 '"clarity": <integer 1-5>}')
PAIRWISE_FORMAT = '{"winner": "A" | "B" | "tie"}'
RETRY_PROMPT = "Your reply could not be used: {reason}. Reply with only the JSON object {fmt}"

MAX_FIELD_CHARS = 6000  # a question, reference or answer sent to the judge is cut beyond this
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S | re.I)


class JudgeError(UserError, ValueError):
    """A judge that cannot be used as configured (URL, key variable); the message says how."""


class VerdictError(ValueError):
    """A judge reply that is not a valid verdict; the message says what was wrong."""


# -- parsing -------------------------------------------------------------------------------------

def _json_object(text: Any) -> dict[str, Any]:
    if not isinstance(text, str) or not text.strip():
        raise VerdictError("the reply was empty")
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise VerdictError(f"it is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise VerdictError(f"it is a JSON {type(value).__name__}, not an object")
    return value


def _exact_keys(value: dict[str, Any], keys: Iterable[str]) -> None:
    want, got = set(keys), set(value)
    if got != want:
        parts = []
        if want - got:
            parts.append("missing " + ", ".join(sorted(want - got)))
        if got - want:
            parts.append("unexpected " + ", ".join(sorted(got - want)))
        raise VerdictError("keys " + "; ".join(parts) + f" (expected exactly {', '.join(keys)})")


def parse_rubric(text: Any) -> dict[str, int]:
    """{"accuracy", "completeness", "clarity"} as integers 1..5, or VerdictError."""
    value = _json_object(text)
    _exact_keys(value, CRITERIA)
    for k in CRITERIA:
        v = value[k]
        if not isinstance(v, int) or isinstance(v, bool):
            raise VerdictError(f"{k} is {json.dumps(v)[:40]}, not an integer")
        if not 1 <= v <= 5:
            raise VerdictError(f"{k} is {v}, outside 1..5")
    return {k: value[k] for k in CRITERIA}


def parse_pairwise(text: Any) -> str:
    """"A", "B" or "tie", or VerdictError."""
    value = _json_object(text)
    _exact_keys(value, ("winner",))
    if value["winner"] not in WINNERS:
        raise VerdictError(f"winner is {json.dumps(value['winner'])[:40]}, not \"A\", \"B\" or "
                           "\"tie\"")
    return value["winner"]


# -- the client ----------------------------------------------------------------------------------

@dataclass
class JudgeConfig:
    url: str  # the server's OpenAI base URL (http(s)://host:port/v1)
    model: str  # the judge model's name on that server
    key_env: str | None = None  # environment variable holding the API key (None: no key)
    retries: int = 2  # re-asks after an invalid reply
    concurrency: int = 4  # requests in flight at once
    timeout: float = 120.0  # seconds per request
    max_tokens: int = 100  # a verdict is a short JSON object

    def checked(self) -> "JudgeConfig":
        parts = urlsplit(self.url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise JudgeError(f"--judge-url: {self.url!r} is not an http(s) URL; give the judge "
                             "server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
        if not (self.model or "").strip():
            raise JudgeError("--judge-model: name the judge model (as the server lists it)")
        if self.key_env and not os.environ.get(self.key_env):
            raise JudgeError(f"--judge-key-env: the environment variable {self.key_env} is not "
                             "set; export it with the judge's API key, or leave the flag out "
                             "for a server without keys")
        if self.retries < 0 or self.concurrency < 1:
            raise JudgeError("judge retries must be >= 0 and concurrency >= 1")
        return self

    @property
    def base_url(self) -> str:
        """The URL as the openai client wants it: a bare host gets /v1."""
        url = self.url.rstrip("/")
        return url if urlsplit(url).path else url + "/v1"


@dataclass
class Verdict:
    """One judgement: the parsed value (None when unusable), the attempts and what went wrong."""

    value: Any = None
    attempts: int = 0  # judge replies received
    error: str | None = None  # why the value is None
    failed_request: bool = False  # the server could not be reached / answered with an error
    raw: str | None = None  # the last reply, kept only when it never parsed (for inspection)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "attempts": self.attempts}
        if self.error:
            out["error"] = self.error
            out["raw"] = self.raw
        return out


@dataclass
class Counts:
    """What asking the judge cost and how many replies were usable."""

    asked: int = 0  # verdicts requested
    requests: int = 0  # HTTP requests answered (re-asks included)
    valid_first_try: int = 0
    valid_after_retry: int = 0
    unparseable: int = 0  # no valid reply within the retries
    failed_requests: int = 0  # transport or server errors (after the client's retries)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, v: Verdict) -> None:
        with self._lock:
            self.asked += 1
            self.requests += v.attempts
            if v.value is not None:
                if v.attempts <= 1:
                    self.valid_first_try += 1
                else:
                    self.valid_after_retry += 1
            elif v.failed_request:
                self.failed_requests += 1
            else:
                self.unparseable += 1

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("asked", "requests", "valid_first_try",
                                              "valid_after_retry", "unparseable",
                                              "failed_requests")}


def _reply_text(reply: Any) -> str | None:
    """The first choice's message text; None for a completion of another shape."""
    try:
        content = reply.choices[0].message.content
    except (AttributeError, IndexError, TypeError, KeyError):
        return None
    return content if isinstance(content, str) else None


def _cut(text: str) -> str:
    text = text or ""
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + " [...]"


class Judge:
    """Asks an OpenAI-compatible server for verdicts (see the module docstring)."""

    def __init__(self, config: JudgeConfig, client: Any = None):
        self.config = config.checked()
        if client is None:
            import openai

            key = os.environ.get(config.key_env) if config.key_env else None
            # the client refuses an empty key; servers without keys ignore this placeholder
            client = openai.OpenAI(base_url=config.base_url, api_key=key or "no-key",
                                   timeout=config.timeout, max_retries=2)
        self.client = client
        self.rubric_counts = Counts()
        self.pairwise_counts = Counts()

    def _ask(self, prompt: str, parse: Callable[[str], Any], fmt: str) -> Verdict:
        import openai

        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": prompt}]
        verdict = Verdict()
        for _ in range(self.config.retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.config.model, messages=messages, temperature=0,
                    max_tokens=self.config.max_tokens)
            except openai.APIStatusError as e:
                verdict.error = f"the judge server answered HTTP {e.status_code}"
                verdict.failed_request = True
                return verdict
            except openai.APIError as e:  # connection, timeout, a body that is not JSON
                verdict.error = f"the judge request failed ({type(e).__name__})"
                verdict.failed_request = True
                return verdict
            verdict.attempts += 1
            text = _reply_text(reply)
            try:
                verdict.value = parse(text)
                verdict.error = verdict.raw = None
                return verdict
            except VerdictError as e:
                verdict.error, verdict.raw = str(e), (text or "")[:500]
                messages = messages + [
                    {"role": "assistant", "content": text or ""},
                    {"role": "user", "content": RETRY_PROMPT.format(reason=e, fmt=fmt)}]
        return verdict

    def rubric(self, question: str, reference: str, answer: str) -> Verdict:
        """Accuracy, completeness and clarity (1-5) of `answer` against `reference`."""
        prompt = RUBRIC_PROMPT.format(question=_cut(question), reference=_cut(reference),
                                      answer=_cut(answer))
        verdict = self._ask(prompt, parse_rubric, RUBRIC_FORMAT)
        self.rubric_counts.add(verdict)
        return verdict

    def pairwise(self, question: str, reference: str, a: str, b: str) -> Verdict:
        """Which of answers A and B is better ("A", "B" or "tie"), in this one order."""
        prompt = PAIRWISE_PROMPT.format(question=_cut(question), reference=_cut(reference),
                                        a=_cut(a), b=_cut(b))
        verdict = self._ask(prompt, parse_pairwise, PAIRWISE_FORMAT)
        self.pairwise_counts.add(verdict)
        return verdict

    def compare(self, question: str, reference: str, base: str, tuned: str) -> dict[str, Any]:
        """Both orders (base as A, then tuned as A); the outcome for the tuned model."""
        first = self.pairwise(question, reference, base, tuned)
        second = self.pairwise(question, reference, tuned, base)
        return {"outcome": combine_orders(first.value, second.value),
                "base_first": first.to_dict(), "tuned_first": second.to_dict()}

    def map(self, fn: Callable[..., Any], jobs: list[tuple]) -> list[Any]:
        """fn(*job) for every job, `concurrency` at a time, results in job order."""
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            return list(pool.map(lambda job: fn(*job), jobs))

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close:
            close()


def combine_orders(base_first: str | None, tuned_first: str | None) -> str | None:
    """The tuned model's result from both orders: 'win', 'loss', 'tie', or None (unusable).

    `base_first` is the winner with the base answer as A, `tuned_first` with the tuned one as A.
    A model wins only when both orders name it; orders that disagree make a tie."""
    if base_first is None or tuned_first is None:
        return None
    first = {"A": "loss", "B": "win", "tie": "tie"}[base_first]
    second = {"A": "win", "B": "loss", "tie": "tie"}[tuned_first]
    return first if first == second else "tie"


def prompt_record() -> dict[str, Any]:
    """The prompts as recorded in eval.json (so a reader can see exactly what was asked)."""
    return {"version": PROMPT_VERSION, "system": SYSTEM_PROMPT, "rubric": RUBRIC_PROMPT,
            "pairwise": PAIRWISE_PROMPT, "retry": RETRY_PROMPT, "criteria": list(CRITERIA),
            "temperature": 0}
