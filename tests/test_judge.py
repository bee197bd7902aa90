"""The rubric judge against a loopback OpenAI-compatible server (tests/support/judge_stub.py):
valid verdicts are parsed, malformed and out-of-range ones are re-asked and counted, server
errors are counted, nothing crashes; pairwise orders cancel position bias; the key goes only
to the judge URL and is never printed."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.judge_stub import JudgeStub, is_retry, prompt_of
from training.judge import (PROMPT_VERSION, Judge, JudgeConfig, JudgeError, VerdictError,
                            combine_orders, parse_pairwise, parse_rubric, prompt_record)

pytestmark = pytest.mark.timeout(120)
GOOD = '{"accuracy": 4, "completeness": 3, "clarity": 5}'


@pytest.mark.parametrize("text", [
    GOOD, f"  {GOOD}\n", f"```json\n{GOOD}\n```", f"```\n{GOOD}\n```",
    '{"clarity": 5, "accuracy": 4, "completeness": 3}'])
def test_rubric_parses_exact_json(text):
    assert parse_rubric(text) == {"accuracy": 4, "completeness": 3, "clarity": 5}


@pytest.mark.parametrize("text, why", [
    ("", "empty"), (None, "empty"), ("Accuracy: 4, completeness: 3", "not JSON"),
    (f"Here you go: {GOOD}", "not JSON"), ("[4, 3, 5]", "not an object"),
    ('{"accuracy": 4, "completeness": 3}', "missing clarity"),
    ('{"accuracy": 4, "completeness": 3, "clarity": 5, "note": "ok"}', "unexpected note"),
    ('{"accuracy": 6, "completeness": 3, "clarity": 5}', "outside 1..5"),
    ('{"accuracy": 0, "completeness": 3, "clarity": 5}', "outside 1..5"),
    ('{"accuracy": 4.5, "completeness": 3, "clarity": 5}', "not an integer"),
    ('{"accuracy": "4", "completeness": 3, "clarity": 5}', "not an integer"),
    ('{"accuracy": true, "completeness": 3, "clarity": 5}', "not an integer")])
def test_rubric_refuses_anything_else(text, why):
    with pytest.raises(VerdictError, match=why):
        parse_rubric(text)


def test_pairwise_parsing_and_order_combination():
    assert [parse_pairwise(json.dumps({"winner": w})) for w in ("A", "B", "tie")] == ["A", "B", "tie"]
    for bad in ('{"winner": "a"}', '{"winner": "C"}', '{"better": "A"}', "A"):
        with pytest.raises(VerdictError):
            parse_pairwise(bad)
    # base_first: base is A; tuned_first: tuned is A
    assert combine_orders("B", "A") == "win" and combine_orders("A", "B") == "loss"
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("A", "A") == "tie"  # always the first position: position bias
    assert combine_orders("B", "B") == "tie"
    assert combine_orders("B", "tie") == "tie"  # only agreement makes a win
    assert combine_orders(None, "A") is None


def answer_of(request) -> str:
    return re.search(r"ANSWER:\n<<<(.*?)>>>", prompt_of(request), re.S).group(1)


def test_judge_over_http_parses_retries_and_counts(monkeypatch, capsys):
    """Scripted per answer: valid; malformed then valid; out of range three times (never
    valid); a server error. Each ends as it should, counted, and nothing raises."""
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    replies = {"good": [GOOD], "fixed": ["I think it is a 4.", GOOD],
               "range": ['{"accuracy": 7, "completeness": 3, "clarity": 5}'] * 3}

    def reply(request):
        answer = answer_of(request)
        if answer == "boom":
            return 500, '{"error": {"message": "judge overloaded"}}'
        script = replies[answer]
        n = sum(answer_of(r) == answer for r in stub.requests) - 1
        return script[min(n, len(script) - 1)]

    with JudgeStub(reply) as stub:
        judge = Judge(JudgeConfig(url=stub.url, model="stub-judge", key_env="JUDGE_TEST_KEY",
                                  retries=2))
        judge.client = judge.client.with_options(max_retries=0)  # a 500 is not re-sent here
        good = judge.rubric("Q?", "Reference.", "good")
        fixed = judge.rubric("Q?", "Reference.", "fixed")
        bad = judge.rubric("Q?", "Reference.", "range")
        down = judge.rubric("Q?", "Reference.", "boom")
        judge.close()

    assert good.value == {"accuracy": 4, "completeness": 3, "clarity": 5} and good.attempts == 1
    assert fixed.value == good.value and fixed.attempts == 2
    assert bad.value is None and bad.attempts == 3 and "outside 1..5" in bad.error
    assert bad.raw.startswith('{"accuracy": 7')
    assert down.value is None and down.failed_request and "500" in down.error
    assert judge.rubric_counts.to_dict() == {
        "asked": 4, "requests": 6, "valid_first_try": 1, "valid_after_retry": 1,
        "unparseable": 1, "failed_requests": 1}
    # the re-ask carries the bad reply and says what was wrong
    retry = [r for r in stub.requests if is_retry(r)][0]
    assert retry["messages"][-2] == {"role": "assistant", "content": "I think it is a 4."}
    assert "not JSON" in retry["messages"][-1]["content"]
    # temperature 0, the model named, the key only in the Authorization header, never printed
    assert all(r["temperature"] == 0 and r["model"] == "stub-judge" for r in stub.requests)
    assert all(h["authorization"] == "Bearer sk-secret-123" for h in stub.headers)
    assert not any("sk-secret-123" in json.dumps(r) for r in stub.requests)
    out = capsys.readouterr()
    assert "sk-secret-123" not in out.out + out.err
    assert "sk-secret-123" not in repr(judge.config) + json.dumps(bad.to_dict())


def test_pairwise_position_bias_cancels():
    """A judge that always prefers position A gives ties overall; one that prefers the tuned
    answer in both orders gives wins."""
    with JudgeStub(lambda request: '{"winner": "A"}') as stub:
        judge = Judge(JudgeConfig(url=stub.url, model="stub-judge"))
        results = judge.map(judge.compare, [("Q?", "Ref.", f"base {i}", f"tuned {i}")
                                            for i in range(3)])
    assert [r["outcome"] for r in results] == ["tie"] * 3
    assert len(stub.requests) == 6 and judge.pairwise_counts.valid_first_try == 6
    # the two orders really swap the answers
    first = prompt_of(stub.requests[0])
    assert "ANSWER A:\n<<<base" in first or "ANSWER A:\n<<<tuned" in first
    orders = {(re.search(r"ANSWER A:\n<<<(\w+)", prompt_of(r)).group(1)) for r in stub.requests}
    assert orders == {"base", "tuned"}

    def prefers_tuned(request):
        a = re.search(r"ANSWER A:\n<<<(\w+)", prompt_of(request)).group(1)
        return json.dumps({"winner": "A" if a == "tuned" else "B"})

    with JudgeStub(prefers_tuned) as stub:
        judge = Judge(JudgeConfig(url=stub.url, model="stub-judge"))
        assert judge.compare("Q?", "Ref.", "base", "tuned")["outcome"] == "win"
        assert judge.compare("Q?", "Ref.", "tuned", "base")["outcome"] == "loss"


def test_unreachable_judge_and_bad_config_never_crash(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="NO_SUCH_JUDGE_KEY"):
        Judge(JudgeConfig(url="http://127.0.0.1:1/v1", model="m", key_env="NO_SUCH_JUDGE_KEY"))
    with pytest.raises(JudgeError, match="http"):
        Judge(JudgeConfig(url="ftp://somewhere", model="m"))
    with JudgeStub(lambda r: GOOD) as stub:
        url = stub.url
    judge = Judge(JudgeConfig(url=url, model="m", timeout=2))  # the server is gone now
    judge.client = judge.client.with_options(max_retries=0)
    v = judge.rubric("Q?", "Ref.", "answer")
    assert v.value is None and v.failed_request and judge.rubric_counts.failed_requests == 1
    assert JudgeConfig(url="http://h:1", model="m").base_url == "http://h:1/v1"
    assert prompt_record()["version"] == PROMPT_VERSION
