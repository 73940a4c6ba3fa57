"""OpenAI chat messages and tools in the model's chat format (:func:`loopformer.inference.chat.encode_chat`).

The openings and end-of-turn token come from the checkpoint's tokenizer (its :class:`TokenRoles`). Beyond the
three chat roles:

* ``developer`` messages are system messages;
* ``tools`` are listed in the system message (one JSON object per line inside ``<tools>``) with how to call them:
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* an assistant message's ``tool_calls`` are written after its text in that same form;
* a ``tool`` message (a tool's result) is a user turn ``<tool_response>{result}</tool_response>``.

The tags are the tokenizer's special tokens, so the model sees one token for each.
"""

from __future__ import annotations

import json

from loopformer.inference.chat import Message
from loopformer.serve.errors import APIError
from loopformer.serve.parsing import TOOL_CLOSE, TOOL_OPEN
from loopformer.serve.schemas import ChatMessage, Tool, ToolCallIn

TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_PREAMBLE = "You may call the following tools. Each line inside <tools></tools> describes one:"
TOOLS_HOWTO = f'To call a tool, reply with {TOOL_OPEN}{{"name": NAME, "arguments": {{...}}}}{TOOL_CLOSE}.'


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a message: a string, or the concatenated text parts of a content list."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400, f"messages[{index}] has a {part.type!r} part; this server reads text only.", param="messages"
            )
        texts.append(part.text)
    return "".join(texts)


def render_tools(tools: list[Tool]) -> str:
    """The system-message block that declares ``tools``."""
    lines = [json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False) for tool in tools]
    return "\n".join([TOOLS_PREAMBLE, "<tools>", *lines, "</tools>", TOOLS_HOWTO])


def render_call(call: ToolCallIn) -> str:
    """An earlier tool call, as the model writes one."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    body = json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_OPEN}{body}{TOOL_CLOSE}"


def chat_messages(messages: list[ChatMessage], tools: list[Tool] | None = None) -> list[Message]:
    """The conversation as :class:`Message` s of the three chat roles, with the tools in the system message."""
    rendered: list[Message] = []
    for index, message in enumerate(messages):
        text = message_text(message, index)
        if message.role in ("system", "developer"):
            rendered.append(Message("system", text))
        elif message.role == "tool":
            rendered.append(Message("user", f"{TOOL_RESPONSE_OPEN}{text}{TOOL_RESPONSE_CLOSE}"))
        elif message.role == "assistant":
            calls = "".join(render_call(call) for call in message.tool_calls or [])
            rendered.append(Message("assistant", text + calls))
        else:
            rendered.append(Message("user", text))
    if tools:
        block = render_tools(tools)
        if rendered and rendered[0].role == "system":
            rendered[0] = Message("system", f"{rendered[0].content}\n\n{block}" if rendered[0].content else block)
        else:
            rendered.insert(0, Message("system", block))
    return rendered
