from __future__ import annotations

import json
from typing import Any

import pytest

from services.dispatch import templating
from services.dispatch.templating import (
    RenderError,
    render_context,
    render_message,
    single_line,
    validate_template,
)


def context(**traits: Any) -> dict[str, Any]:
    return render_context(
        user={"id": "u1", "traits": traits},
        event={"name": "cart_abandoned", "properties": {"sku": "SKU-1", "price": 12.5}},
        campaign={"id": "c1", "name": "Winback"},
    )


def render_one(source: str, ctx: dict[str, Any], field: str = "body") -> str:
    return render_message({field: source}, ctx)[field]


def test_personalizes_from_user_event_trigger_and_campaign() -> None:
    out = render_message(
        {
            "subject": "Hi {{ user.traits.first_name }}",
            "body": "{{ event.properties.sku }} {{ trigger.name }} {{ campaign.name }}"
            " {{ event.properties.price | times: 2 }}",
        },
        context(first_name="Ann"),
    )
    assert out == {"subject": "Hi Ann", "body": "SKU-1 cart_abandoned Winback 25.0"}


def test_default_filter_applies_to_missing_variable() -> None:
    source = "Hi {{ user.traits.first_name | default: 'there' }}!"
    assert render_one(source, context()) == "Hi there!"
    assert render_one(source, context(first_name="Ann")) == "Hi Ann!"


def test_missing_variable_raises_render_error_naming_it() -> None:
    with pytest.raises(RenderError) as caught:
        render_message({"subject": "ok", "body": "Hi {{ user.traits.first_nam }}"}, context())
    error = caught.value
    assert error.field == "body"
    assert "user.traits.first_nam" in error.reason
    assert error.kind == "undefined"
    assert error.retryable is False


def test_missing_variable_is_false_in_conditions_but_not_iterable() -> None:
    source = "{% if user.traits.vip %}VIP{% else %}regular{% endif %}"
    assert render_one(source, context()) == "regular"
    assert render_one(source, context(vip=True)) == "VIP"
    with pytest.raises(RenderError, match=r"user\.traits\.items"):
        render_one("{% for i in user.traits.items %}{{ i }}{% endfor %}", context())


def test_html_fields_are_autoescaped_and_text_fields_are_not() -> None:
    ctx = context(first_name="<script>alert(1)</script>")
    out = render_message(
        {
            "html": "<p>Hi {{ user.traits.first_name }}</p>",
            "body": "Hi {{ user.traits.first_name }}",
        },
        ctx,
    )
    assert out["html"] == "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert out["body"] == "Hi <script>alert(1)</script>"


def test_header_fields_have_line_breaks_removed_and_are_trimmed() -> None:
    ctx = context(first_name="Ann\r\nBcc: victim@example.test\u2028X-Evil: 1", email=" a@b.test \n")
    out = render_message(
        {"subject": "Hi {{ user.traits.first_name }}", "to": "{{ user.traits.email }}"}, ctx
    )
    assert out["subject"] == "Hi Ann Bcc: victim@example.test X-Evil: 1"
    assert "\r" not in out["subject"]
    assert "\n" not in out["subject"]
    assert out["to"] == "a@b.test"
    assert single_line("\x00a\tb\x85c\r") == "a b c"


@pytest.mark.parametrize(
    "payload",
    [
        "{{ 7*7 }}",
        "{% raw %}{{ 7*7 }}{% endraw %}",
        "{{ ''.__class__.__mro__ }}",
        "{% assign x = 1 %}{{ x }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_template_syntax_in_user_data_renders_literally(payload: str) -> None:
    assert render_one("Hi {{ user.traits.first_name }}", context(first_name=payload)) == (
        f"Hi {payload}"
    )


def test_python_attributes_are_not_reachable() -> None:
    with pytest.raises(RenderError, match="undefined"):
        render_one("{{ user.traits.first_name.__class__ }}", context(first_name="x"))


def test_loop_iteration_limit() -> None:
    with pytest.raises(RenderError, match="loop iteration limit") as caught:
        render_one("{% for i in (1..1000000) %}x{% endfor %}", context())
    assert caught.value.kind == "limit"
    nested = "{% for i in (1..200) %}{% for j in (1..200) %}{% endfor %}{% endfor %}"
    with pytest.raises(RenderError, match="loop iteration limit"):
        render_one(nested, context())


def test_output_limit() -> None:
    source = "{% for i in (1..9000) %}" + "x" * 100 + "{% endfor %}"
    with pytest.raises(RenderError, match="output stream limit") as caught:
        render_one(source, context())
    assert caught.value.kind == "limit"


def test_filters_cannot_materialize_huge_values() -> None:
    with pytest.raises(RenderError, match="too large") as caught:
        render_one("{{ (1..100000000) | join: ',' | size }}", context())
    assert caught.value.kind == "limit"
    growth = (
        "{% assign s = '" + "a" * 600 + "' %}{% assign s = s | replace: 'a', s %}{{ s | size }}"
    )
    with pytest.raises(RenderError, match="too large"):
        render_one(growth, context())


def test_local_namespace_limit() -> None:
    source = (
        "{% assign s = '" + "a" * 1000 + "' %}{% assign x = s %}"
        "{% for i in (1..100) %}{% assign s = s | append: x %}{% endfor %}"
        "{% assign t = s | append: 'b' %}{% assign u = s | append: 'c' %}"
    )
    with pytest.raises(RenderError, match="local namespace limit") as caught:
        render_one(source, context())
    assert caught.value.kind == "limit"


def test_syntax_error() -> None:
    with pytest.raises(RenderError) as caught:
        render_message({"subject": "Hi {{ user.traits.first_name "}, context(first_name="A"))
    assert caught.value.field == "subject"
    assert caught.value.kind == "syntax"
    assert "line 1" in caught.value.reason


def test_partials_are_disabled() -> None:
    with pytest.raises(RenderError, match="unexpected tag 'include'"):
        render_one("{% include 'secrets' %}", context())


def test_json_filter_quotes_user_data() -> None:
    ctx = context(first_name='Ann", "admin": true, "x": "')
    out = render_one('{"name": {{ user.traits.first_name | json }}}', ctx, field="body")
    assert out == '{"name": "Ann\\", \\"admin\\": true, \\"x\\": \\""}'
    with pytest.raises(RenderError, match=r"user\.traits\.nope"):
        render_one("{{ user.traits.nope | json }}", ctx, field="body")
    assert render_one("{{ user.traits.nope | default: nil | json }}", ctx) == "null"


def test_payload_leaves_are_templates_so_user_data_cannot_change_its_shape() -> None:
    ctx = context(first_name='Ann", "admin": true, "x": "')
    out = render_one(
        '{"name": "{{ user.traits.first_name }}", "n": [1, "{{ user.id }}"]}', ctx, field="payload"
    )
    assert json.loads(out) == {"name": 'Ann", "admin": true, "x": "', "n": [1, "u1"]}
    with pytest.raises(RenderError, match="not valid JSON"):
        render_one('{"name": {{ user.id }}}', ctx, field="payload")


def test_compiled_templates_are_cached_by_source() -> None:
    templating._compile.cache_clear()
    source = "cached {{ user.id }}"
    for _ in range(3):
        assert render_one(source, context()) == "cached u1"
    info = templating._compile.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert info.maxsize == templating.COMPILED_TEMPLATE_CACHE_SIZE


def test_validate_template_accepts_good_and_rejects_bad() -> None:
    validate_template("Hi {{ user.traits.first_name | default: 'there' | upcase }}")
    validate_template("{% assign n = event.properties.sku %}{{ n }}{{ trigger.name }}")
    with pytest.raises(RenderError, match="unknown filter 'bogus'") as caught:
        validate_template("{% if false %}{{ user.id | bogus }}{% endif %}", field="subject")
    assert caught.value.field == "subject"
    with pytest.raises(RenderError, match="expected '}}'"):
        validate_template("{{ user.id ")
    with pytest.raises(RenderError, match="unknown variable 'usr'"):
        validate_template("{{ usr.id }}")


def test_oversized_template_source_is_refused() -> None:
    with pytest.raises(RenderError, match="too large"):
        validate_template("x" * (templating.MAX_TEMPLATE_SOURCE_CHARS + 1))
