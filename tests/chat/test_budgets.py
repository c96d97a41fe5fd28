"""A template cannot run forever or build huge values: each is stopped with a 400."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from server.chat.deadline import DeadlineExceeded, call_with_deadline
from server.chat.template import prompt_text, render_chat
from server.errors import PromptRenderError

USER = [{"role": "user", "content": "x"}]
LOOP = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}")


def test_a_looping_template_is_stopped_in_time() -> None:
    start = time.monotonic()
    with pytest.raises(PromptRenderError, match=r"took longer than 0\.3 s") as err:
        render_chat(LOOP, USER, seconds=0.3, template_name="The chat template of model 'm'")
    assert time.monotonic() - start < 1.5
    assert "model 'm'" in err.value.message and err.value.status_code == 400


def test_the_deadline_leaves_nothing_pending() -> None:
    # Many renders that finish just around their deadline: none may leak the stop exception.
    for _ in range(200):
        with contextlib.suppress(DeadlineExceeded):
            call_with_deadline(lambda: sum(range(20000)), 0.0005)
        total = 0
        for i in range(2000):  # a stop left pending would be raised here
            total += i
        time.sleep(0.001)
        assert total == 1999000


def test_the_deadline_works_in_any_thread() -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            render_chat(LOOP, USER, seconds=0.2)
        except PromptRenderError as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and len(errors) == 1


@pytest.mark.parametrize("template", [
    "{{ 'x' * 1000000000 }}",
    "{{ ['x'] * 1000000000 }}",
    "{{ 'x'.center(1000000000) }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ 'x'.zfill(1000000000) }}",
    "{{ ('\t' * 1000).expandtabs(1000000) }}",
    "{% set s = 'x' * 1000000 %}{{ s.replace('', s) }}",
    "{% set s = 'x' * 1000000 %}{{ s | replace('x', s) }}",
    "{% set s = 'x' * 10000000 %}{{ [s, s, s] | join }}",
    "{% set s = 'x' * 10000000 %}{{ s.join([s, s, s]) }}",
    "{% set s = 'x' * 10000000 %}{{ s ~ s }}",
    "{% set s = 'x' * 10000000 %}{{ s + s }}",
    "{% set s = 'x\\n' * 10000 %}{{ s | indent(10000) }}",
    "{{ 7 ** 100000000 }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '%*d' % (999999999, 1) }}",
    "{{ '%999999999d' | format(1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ [1] | tojson(indent=1000000) }}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",  # the output as a whole
])
def test_huge_values_are_stopped(template: str) -> None:
    with pytest.raises(PromptRenderError, match="stopped"):
        render_chat(template, USER)


def test_ordinary_sizes_pass() -> None:
    template = "{{ '-' * 80 }}{{ 'x'.center(9) }}{{ [1, 2] | join(', ') }}{{ 2 ** 10 }}"
    assert prompt_text(render_chat(template, USER)) == "-" * 80 + "    x    1, 21024"
