"""Message parsers: every dialect's message encoding -> the GenAI ≥1.37 message dict (semconv §2.1, §5 "One
message parser per encoding").

Output shape (validated later as :class:`normalizers.agent_run.Message`)::

    {"role": str, "parts": [{"type": ..., ...}], "name"?: str, "finish_reason"?: str}

Encodings handled:

1. GenAI parts JSON (``gen_ai.{input,output}.messages``, ``pydantic_ai.all_messages``): :func:`genai_messages`;
   ``tool_call_response`` accepts ``response`` or ``result`` and ``thinking`` becomes ``reasoning`` (semconv §2.1
   "Gotcha", §2.6 "Parts").
2. OpenInference flat ``llm.{input,output}_messages.N.message.*``: :func:`oi_flat_messages`.
3. OpenLLMetry flat ``gen_ai.{prompt,completion}.N.*``: :func:`oll_flat_messages`.
4. Legacy GenAI event bodies ``{content, role?, tool_calls?, id?}`` and ``gen_ai.choice``
   ``{index, finish_reason, message, tool_calls}``; 5. Vercel ``ai.prompt.messages`` content parts
   (``tool-call``/``tool-result``, ``args|input``, ``result|output``); 6. Pydantic AI v1 ``events`` arrays (items are
   legacy event bodies plus ``event.name``); 7. raw provider JSON (OpenAI chat/Responses, Anthropic Messages):
   all through :func:`chat_message` / :func:`provider_messages`.
"""

from __future__ import annotations

from typing import Any

from normalizers.dialects._base import compact_json, decode_json, present, to_str

_TEXT_TYPES = frozenset({"text", "input_text", "output_text"})
_REASONING_TYPES = frozenset({"reasoning", "thinking"})
# Roles implied by the deprecated per-message GenAI event names (semconv §2.1 "Deprecated event bodies").
EVENT_ROLES = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
               "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}


def text_message(role: str, text: Any) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def _part(block: Any) -> dict[str, Any]:
    """One content block of any dialect -> a GenAI part dict."""
    if not isinstance(block, dict):
        return {"type": "text", "content": block}
    t = block.get("type")
    if not isinstance(t, str):
        t = None
    if t in _TEXT_TYPES or (t is None and "text" in block):
        return {"type": "text", "content": block.get("content", block.get("text"))}
    if t in _REASONING_TYPES:
        return {"type": "reasoning",
                "content": block.get("content", block.get("text", block.get("thinking")))}
    if t == "tool_call":  # GenAI
        return {"type": "tool_call", "id": to_str(block.get("id")), "name": to_str(block.get("name")),
                "arguments": decode_json(block.get("arguments"))}
    if t == "tool-call":  # Vercel: v4 `args`, v5+ `input`
        return {"type": "tool_call", "id": to_str(block.get("toolCallId")), "name": to_str(block.get("toolName")),
                "arguments": decode_json(block["input"] if "input" in block else block.get("args"))}
    if t in ("tool_use", "function_call"):  # Anthropic block / OpenAI Responses item
        return {"type": "tool_call", "id": to_str(block.get("id") if t == "tool_use" else block.get("call_id")),
                "name": to_str(block.get("name")),
                "arguments": decode_json(block["input"] if t == "tool_use" else block.get("arguments"))}
    if t == "tool_call_response":  # GenAI schema says `response`, Pydantic AI and the registry example `result`
        part = {"type": "tool_call_response", "id": to_str(block.get("id")),
                "response": block["response"] if "response" in block else block.get("result")}
        if block.get("name"):
            part["name"] = to_str(block["name"])
        return part
    if t == "tool-result":  # Vercel: v4 `result` (+ `isError`), v5+ `output: {type, value}`
        out = block.get("output")
        is_error = bool(block.get("isError"))
        if isinstance(out, dict) and "type" in out:
            is_error = is_error or str(out["type"]).startswith("error")
            response = out.get("value")
        else:
            response = out if "output" in block else block.get("result")
        return _response_part(block.get("toolCallId"), block.get("toolName"), response, is_error)
    if t == "tool_result":  # Anthropic
        return _response_part(block.get("tool_use_id"), None, block.get("content"), bool(block.get("is_error")))
    if t == "function_call_output":  # OpenAI Responses
        return _response_part(block.get("call_id"), None, block.get("output"), False)
    part = {**block, "type": t or "unknown"}
    for key in ("id", "name"):  # typed as strings on MessagePart; other keys stay as they came
        if key in part:
            part[key] = to_str(part[key])
    return part


def _response_part(call_id: Any, name: Any, response: Any, is_error: bool) -> dict[str, Any]:
    """A ``tool_call_response`` part; ``is_error`` (extra key) marks a failed tool whose error went back to the
    model (Vercel ``error-*`` outputs / ``isError``, Anthropic ``is_error``; semconv §2.4)."""
    part: dict[str, Any] = {"type": "tool_call_response", "id": to_str(call_id), "response": response}
    if name:
        part["name"] = to_str(name)
    if is_error:
        part["is_error"] = True
    return part


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        # OpenLLMetry serializes multimodal content lists as a JSON string; only a list of typed blocks counts,
        # so user text that merely starts with "[" stays text.
        decoded = decode_json(content)
        if isinstance(decoded, list) and decoded and all(isinstance(b, dict) and "type" in b for b in decoded):
            return [_part(b) for b in decoded]
        return [{"type": "text", "content": content}]
    if isinstance(content, list):
        return [_part(b) for b in content]
    return [_part(content)]


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _tool_call_part(tc: Any) -> dict[str, Any] | None:
    """OpenAI ``tool_calls[]`` item ``{id, type, function:{name, arguments}}`` or the flattened
    ``{id, name, arguments}`` form (OpenLLMetry, legacy GenAI events)."""
    if not isinstance(tc, dict):
        return None
    fn = tc.get("function") if isinstance(tc.get("function"), dict) else tc
    return {"type": "tool_call", "id": to_str(tc.get("id")), "name": to_str(fn.get("name")),
            "arguments": decode_json(fn.get("arguments"))}


def chat_message(obj: Any, default_role: str) -> dict[str, Any] | None:
    """One message in any dict form (GenAI parts, OpenAI/Anthropic/Vercel/legacy-event ``content``, a
    ``gen_ai.choice`` / OpenAI choice wrapping ``message``) or a bare string -> a GenAI message dict.

    ``default_role`` applies when the object has no ``role`` (legacy event bodies take it from the event name).
    A ``tool``-role message answering a call id (``tool_call_id``, or ``id`` on legacy ``gen_ai.tool.message``)
    becomes a ``tool_call_response`` part.
    """
    if isinstance(obj, str):
        return text_message(default_role, obj) if obj else None
    if not isinstance(obj, dict):
        return None
    inner = obj.get("message")
    if isinstance(inner, dict) and "role" not in obj and "parts" not in obj:
        msg = chat_message(inner, "assistant") or {"role": "assistant", "parts": []}
        # gen_ai.choice puts tool_calls beside `message` (openai-v2 nests them inside, handled by the recursion).
        msg["parts"].extend(p for tc in _as_list(obj.get("tool_calls")) if (p := _tool_call_part(tc)))
        if present(obj.get("finish_reason")):
            msg["finish_reason"] = to_str(obj["finish_reason"])
        return msg
    role = to_str(obj.get("role")) or default_role
    if isinstance(obj.get("parts"), list):
        parts = [_part(p) for p in obj["parts"]]
    else:
        content = obj.get("content")
        call_id = obj.get("tool_call_id") or (obj.get("id") if role == "tool" else None)
        if role == "tool" and call_id and not isinstance(content, list):
            parts = [_response_part(call_id, obj.get("name"), content, False)]
        else:
            parts = _content_parts(content)
        parts.extend(p for tc in _as_list(obj.get("tool_calls")) if (p := _tool_call_part(tc)))
        if isinstance(obj.get("function_call"), dict):  # pre-tools OpenAI API
            parts.append(_tool_call_part(obj["function_call"]))
    msg: dict[str, Any] = {"role": role, "parts": parts}
    if present(obj.get("name")) and role != "tool":
        msg["name"] = to_str(obj["name"])
    fr = obj.get("finish_reason", obj.get("stop_reason"))
    if present(fr):
        msg["finish_reason"] = to_str(fr)
    return msg


def genai_messages(value: Any, default_role: str) -> list[dict[str, Any]]:
    """A message list (structured, or a JSON string as GenAI SDKs put on spans) -> message dicts.

    A malformed JSON string is kept as one ``default_role`` text message holding the raw string, so content that
    did arrive is never dropped.
    """
    value = decode_json(value)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return [m for item in value if (m := chat_message(item, default_role))]
    if present(value):
        return [text_message(default_role, to_str(value))]
    return []


def system_instructions_text(value: Any) -> str | None:
    """``gen_ai.system_instructions`` (``[{type:"text", content}]``, or a plain string) -> joined text."""
    value = decode_json(value)
    if isinstance(value, list):
        texts = [t for p in value if (t := to_str(_part(p).get("content")))]
        return "\n".join(texts) or None
    return to_str(value)


def indexed(attrs: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """Flattened list attributes ``{prefix}N.rest`` -> ``[{rest: value}, ...]`` ordered by ``N`` (``prefix``
    ends with a dot). Keys whose segment after the prefix is not an integer are ignored."""
    groups: dict[int, dict[str, Any]] = {}
    n = len(prefix)
    for k, v in attrs.items():
        if k.startswith(prefix):
            idx, _, rest = k[n:].partition(".")
            if idx.isdigit() and rest:
                groups.setdefault(int(idx), {})[rest] = v
    return [groups[i] for i in sorted(groups)]


def oi_flat_messages(attrs: dict[str, Any], prefix: str, default_role: str) -> list[dict[str, Any]]:
    """OpenInference ``llm.input_messages`` / ``llm.output_messages`` flattened keys (semconv §2.2) -> messages."""
    out = []
    for d in indexed(attrs, prefix + "."):
        obj: dict[str, Any] = {"role": d.get("message.role"), "name": d.get("message.name"),
                               "tool_call_id": d.get("message.tool_call_id")}
        blocks = []
        for c in indexed(d, "message.contents."):
            ctype = c.get("message_content.type")
            url = c.get("message_content.image.image.url")
            if url is not None:
                blocks.append({"type": "uri", "modality": "image", "uri": url})
            else:
                blocks.append({"type": ctype or "text", "text": c.get("message_content.text")})
        obj["content"] = blocks or d.get("message.content")
        obj["tool_calls"] = [{"id": tc.get("tool_call.id"), "name": tc.get("tool_call.function.name"),
                              "arguments": tc.get("tool_call.function.arguments")}
                             for tc in indexed(d, "message.tool_calls.")]
        if d.get("message.function_call_name"):  # legacy OpenInference function calling
            obj["function_call"] = {"name": d["message.function_call_name"],
                                    "arguments": d.get("message.function_call_arguments_json")}
        if (m := chat_message(obj, default_role)) is not None:
            out.append(m)
    return out


def oll_flat_messages(attrs: dict[str, Any], prefix: str, default_role: str) -> list[dict[str, Any]]:
    """OpenLLMetry ≤0.54 ``gen_ai.prompt.N.*`` / ``gen_ai.completion.N.*`` (semconv §2.3) -> messages;
    ``.refusal`` becomes a ``refusal`` part (as in the new OpenLLMetry format)."""
    out = []
    for d in indexed(attrs, prefix + "."):
        obj = {"role": d.get("role"), "content": d.get("content"), "tool_call_id": d.get("tool_call_id"),
               "finish_reason": d.get("finish_reason"),
               "tool_calls": [{"id": tc.get("id"), "name": tc.get("name"), "arguments": tc.get("arguments")}
                              for tc in indexed(d, "tool_calls.")]}
        m = chat_message(obj, default_role)
        if m is None:
            continue
        if present(d.get("refusal")):
            m["parts"].append({"type": "refusal", "content": d["refusal"]})
        out.append(m)
    return out


def provider_messages(payload: Any, output: bool) -> list[dict[str, Any]]:
    """Raw provider JSON (semconv §5 encoding 7) -> messages: a request (OpenAI chat ``messages``, Anthropic
    ``system`` + ``messages``, OpenAI Responses ``input``, ``prompt``) when ``output`` is false, else a response
    (OpenAI ``choices``, Anthropic ``{role:"assistant", content:[…], stop_reason}``, OpenAI Responses ``output``,
    Logfire ``{message}``). Unknown shapes -> ``[]``."""
    p = decode_json(payload)
    if isinstance(p, list):
        return genai_messages(p, "assistant" if output else "user")
    if not isinstance(p, dict):
        return []
    if output:
        if isinstance(p.get("choices"), list):
            return [m for c in p["choices"] if (m := chat_message(c, "assistant"))]
        if isinstance(p.get("output"), list):  # Responses API: output items are messages or tool calls
            parts: list[dict[str, Any]] = []
            for item in p["output"]:
                if isinstance(item, dict) and item.get("type") == "message":
                    parts.extend(_content_parts(item.get("content")))
                elif item is not None:
                    parts.append(_part(item))
            return [{"role": "assistant", "parts": parts}] if parts else []
        if isinstance(p.get("message"), dict) or p.get("role") == "assistant":
            m = chat_message(p, "assistant")
            return [m] if m else []
        return []
    msgs: list[dict[str, Any]] = []
    system = p.get("system", p.get("instructions"))
    if present(system):
        msgs.append({"role": "system", "parts": _content_parts(system)})
    source = p.get("messages", p.get("input", p.get("prompt")))
    msgs.extend(genai_messages(source, "user") if present(source) else ())
    return msgs


def message_text(msg: dict[str, Any]) -> str | None:
    """Text parts of one message joined by newlines; ``None`` when it has none."""
    texts = [to_str(p.get("content")) for p in msg.get("parts", ()) if p.get("type") == "text"]
    return "\n".join(t for t in texts if t) or None


def first_text(messages: list[dict[str, Any]], role: str) -> str | None:
    """Text of the first ``role`` message that has text (tool returns sent as ``user`` messages have none)."""
    for m in messages:
        if m.get("role") == role and (t := message_text(m)):
            return t
    return None


def last_text(messages: list[dict[str, Any]], role: str) -> str | None:
    for m in reversed(messages):
        if m.get("role") == role and (t := message_text(m)):
            return t
    return None


_INPUT_KEYS = ("input", "query", "question", "prompt", "task", "message", "text", "content")
_OUTPUT_KEYS = ("output", "final_output", "answer", "result", "response", "text", "content")


def payload_text(value: Any, output: bool) -> str | None:
    """A generic run input/output payload (OpenInference ``input.value``/``output.value``, Langfuse
    ``…input``/``…output``, …) -> text: the string itself; a dict's obvious text field (``input``, ``query``, …
    / ``output``, ``answer``, …); the last user (assistant) text of a message list or provider payload; else the
    value as compact JSON (or the raw string when it was a string)."""
    if not present(value):
        return None
    v = decode_json(value)
    if isinstance(v, str):
        return v
    role = "assistant" if output else "user"
    if isinstance(v, dict):
        for k in _OUTPUT_KEYS if output else _INPUT_KEYS:
            if isinstance(v.get(k), str) and v[k]:
                return v[k]
        msgs = provider_messages(v, output) or genai_messages([v] if "role" in v else [], role)
    elif isinstance(v, list):
        msgs = genai_messages(v, role)
    else:
        msgs = []
    text = last_text(msgs, role)
    if text:
        return text
    return value if isinstance(value, str) else compact_json(v)
