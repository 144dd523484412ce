"""Chat templates: render a conversation with a tokenizer's Jinja template, as `transformers` does.

Same environment as transformers' apply_chat_template (a sandbox with trim_blocks/lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a non-escaping `tojson`, and `{% generation %}` blocks rendered as their
body), so a template from the Hub renders the same text here. `assistant_spans` finds where each assistant turn
sits in the rendered text by rendering prefixes, which works for any template (no `{% generation %}` needed).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

from parallel.errors import UserError


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise UserError("data.sft_template: rendering the tokenizer's chat template needs jinja2 "
                        "(pip install jinja2), or set data.sft_template to a format string") from None
    return jinja2


@functools.lru_cache(maxsize=8)
def compile_template(template: str):
    jinja2 = _jinja()

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): just the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"data.tokenizer_path: the tokenizer's chat template does not parse ({e}); fix it or set "
                        "data.sft_template") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict[str, str]) -> str:
    """The conversation as text; special_tokens supplies bos_token / eos_token / pad_token to the template."""
    jinja2 = _jinja()
    try:
        return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"data.sft_template: the tokenizer's chat template failed on a conversation ({e}); fix the "
                        "data or set data.sft_template") from None


def assistant_spans(template: str, messages: list[dict], special_tokens: dict[str, str]) -> tuple[str, list]:
    """(rendered text, [(start, end)] character spans of each assistant turn: its content and its turn's end).

    Turn i starts where messages[:i] rendered with the generation prompt ends (so the prompt header is not
    trained, exactly what the model is given at inference) and ends where messages[:i+1] ends."""
    text = render(template, messages, False, special_tokens)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render(template, messages[:i], True, special_tokens)
        upto = render(template, messages[:i + 1], False, special_tokens)
        if not (text.startswith(before) and text.startswith(upto) and cursor <= len(before) <= len(upto)):
            raise UserError("data.sft_template: the tokenizer's chat template renders a conversation's prefix "
                            "differently from the whole conversation, so assistant turns cannot be located; set "
                            "data.sft_template to a format string")
        spans.append((len(before), len(upto)))
        cursor = len(upto)
    return text, spans
