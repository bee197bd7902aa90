"""Pulled runs' chat templates render in a worker process: the same text as in-process for real
templates; a template that allocates without end, loops without end or writes without end is
refused clearly, and the next render works."""

from __future__ import annotations

import time

import pytest

from medchat.backend import BackendError
from medchat.chat_format import ensure_chat_template, render, sandbox_templates
from medchat.template_sandbox import TemplateSandbox

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is metformin for?"},
                {"role": "assistant", "content": "Type 2 diabetes."},
                {"role": "user", "content": 'And "ibuprofen"?'}]


@pytest.fixture(scope="module")
def sandbox():
    box = TemplateSandbox(timeout_s=2.0, memory_mb=256, max_chars=100_000)
    yield box
    box.close()


def test_a_sandboxed_tokenizer_renders_exactly_as_in_process(sandbox, tiny_model_dir):
    from transformers import AutoTokenizer

    custom = ("{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    for template in (None, custom):
        plain = AutoTokenizer.from_pretrained(tiny_model_dir)
        ensure_chat_template(plain, template)
        boxed = AutoTokenizer.from_pretrained(tiny_model_dir)
        ensure_chat_template(boxed, template)
        sandbox_templates(boxed, sandbox, tiny_model_dir, template)
        for gen in (False, True):
            assert render(boxed, CONVERSATION, gen) == render(plain, CONVERSATION, gen)


@pytest.mark.parametrize("template, says", [
    ("{{ 'a' * 2000000000 }}", "memory"),  # 2 GB in 0.1 s in-process
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "took more than 2 s"),
    ("{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}", "characters"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s }}", "memory"),
    ("{{ raise_exception('no system role') }}", "no system role"),
])
def test_a_hostile_template_is_refused_and_the_next_render_works(sandbox, tiny_model_dir,
                                                                 template, says):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sandbox_templates(tok, sandbox, tiny_model_dir, template)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=says):
        render(tok, CONVERSATION, True)
    assert time.monotonic() - t0 < 20  # a fresh worker's start-up included
    fine = AutoTokenizer.from_pretrained(tiny_model_dir)
    ensure_chat_template(fine)
    sandbox_templates(fine, sandbox, tiny_model_dir, None)
    assert "What is metformin for?" in render(fine, CONVERSATION, True)
