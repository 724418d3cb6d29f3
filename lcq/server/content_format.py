"""Whether a chat template reads a message's content as text or as a list of parts (vLLM's
--chat-template-content-format). Templates written for multimodal or Responses-style inputs (Llama 3.2
Vision's, Llama 4's, Mistral Small 3.1's, Gemma 3's, many Qwen VL ones) loop over `message.content`; handed a
string, they loop over its characters and render nothing or garbage. "auto" finds such a loop in the
template's syntax tree, as vLLM does."""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

CONTENT_FORMATS = ("auto", "string", "openai")


def resolved_content_format(setting: str, template: str) -> str:
    """"string" or "openai": the setting, or under "auto" what the template reads."""
    return detected_content_format(template) if setting == "auto" else setting


@lru_cache(maxsize=16)
def detected_content_format(template: str) -> str:
    """"openai" where the template loops over a message's content, else "string" (also for a template that
    does not parse: rendering it will say what is wrong)."""
    try:
        tree = _environment().parse(template)
    except Exception:
        return "string"
    return "openai" if next(_content_loops(tree), None) is not None else "string"


def _environment():
    """The Jinja environment transformers renders chat templates in (its extensions, e.g. {% generation %},
    parse there), or a plain one with loop controls where its private helper is gone."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template("").environment
    except Exception:
        import jinja2
        return jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])


def _reads(node, names: set[str], key: str | None = None) -> bool:
    """Whether `node` is one of `names` (with `key`: its `key` field), through filters, tests and slices
    (`messages[1:]`, `messages|selectattr(...)`, `message['content'] is iterable`)."""
    from jinja2 import nodes
    if isinstance(node, (nodes.Filter, nodes.Test)) or (isinstance(node, nodes.Getitem)
                                                        and isinstance(node.arg, nodes.Slice)):
        return node.node is not None and _reads(node.node, names, key)
    if key is None:
        return isinstance(node, nodes.Name) and node.name in names
    if isinstance(node, nodes.Getattr):
        return node.attr == key and _reads(node.node, names)
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == key and _reads(node.node, names)
    return False


def _aliases(tree, names: set[str], key: str | None = None) -> set[str]:
    """`names` and every variable set from them (`{% set loop_messages = messages[1:] %}`), transitively;
    with `key`, the variables set from their `key` field and those set from these."""
    from jinja2 import nodes
    found = set(names) if key is None else set()
    grew = True
    while grew:
        grew = False
        for assign in tree.find_all(nodes.Assign):
            if isinstance(assign.target, nodes.Name) and assign.target.name not in found and \
                    (_reads(assign.node, found) or (key is not None and _reads(assign.node, names, key))):
                found.add(assign.target.name)
                grew = True
    return found


def _loop_targets(tree, names: set[str], key: str | None = None) -> Iterator[str]:
    """The variables of `{% for x in y %}` loops whose y reads one of `names` (with `key`: its field)."""
    from jinja2 import nodes
    for loop in tree.find_all(nodes.For):
        if _reads(loop.iter, names, key):
            yield from (target.name for target in ([loop.target] if isinstance(loop.target, nodes.Name)
                                                   else loop.target.find_all(nodes.Name)))


def _macro_parameters(tree, names: set[str], key: str | None = None) -> set[str]:
    """The parameters of macros called with one of `names` (with `key`: its field) in their place:
    `{% macro render(m) %}...{% endmacro %}{{ render(message) }}` makes `m` a message."""
    from jinja2 import nodes
    macros = {macro.name: macro for macro in tree.find_all(nodes.Macro)}
    found = set()
    for call in tree.find_all(nodes.Call):
        macro = macros.get(call.node.name) if isinstance(call.node, nodes.Name) else None
        if macro is not None:
            found |= {param.name for param, arg in zip(macro.args, call.args) if _reads(arg, names, key)}
            found |= {given.key for given in call.kwargs if _reads(given.value, names, key)}
    return found


def _content_loops(tree) -> Iterator[str]:
    """Loops over a message's content: `{% for part in message['content'] %}` where message is an item of the
    messages (or of a variable set from them), also through `{% set content = message.content %}` and through
    macros handed a message or its content."""
    messages = _aliases(tree, {"messages"})
    message_names = set(_loop_targets(tree, messages)) | {"message"}
    message_names |= _macro_parameters(tree, message_names)
    contents = _aliases(tree, message_names, key="content") | _macro_parameters(tree, message_names, key="content")
    yield from _loop_targets(tree, message_names, key="content")
    yield from _loop_targets(tree, contents)
