"""A `qvl serve` request's messages, Ollama's (`images`) or OpenAI's (content parts: text,
`image_url`, vLLM's `video_url`), in the transformers format Model.chat takes; their pictures and
videos decoded (inline_media.py), fetched where the server allows (media_fetch.py)."""

from __future__ import annotations

from typing import Any

from .inline_media import decode_image, decode_video
from .media_fetch import MediaAccess
from .request_error import RequestError


def request_messages(raw: Any, images_key: str | None, access: MediaAccess, name: str = "messages"
                     ) -> list[dict[str, Any]]:
    """Ollama's (`images_key` "images") or OpenAI's (None: content parts) messages in the
    transformers format Model.chat takes; errors name the list `name` (the Responses API's "input")."""
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, f"{name}: a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"{name}[{i}]: an object with role system, user or assistant")
        content = m.get("content") or ""
        parts: list[dict[str, Any]] = []
        if isinstance(content, list) and images_key is None:
            for j, p in enumerate(content):
                where = f"{name}[{i}].content[{j}]"
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind in ("image_url", "video_url"):  # video_url: vLLM's part for a video
                    url = p.get(kind)
                    url = url.get("url") if isinstance(url, dict) else url
                    parts.append({"type": "image", "image": decode_image(url, where, access)} if kind == "image_url"
                                 else {"type": "video", "video": decode_video(url, where, access)})
                else:
                    raise RequestError(400, f"{where}: a part of type text, image_url or video_url")
        elif isinstance(content, str):
            images = m.get(images_key, []) if images_key else []
            if not isinstance(images, list):
                raise RequestError(400, f"{name}[{i}].{images_key}: a list of base64 strings")
            parts = [{"type": "image", "image": decode_image(b, f"{name}[{i}].{images_key}[{j}]", access)}
                     for j, b in enumerate(images)]
            parts.append({"type": "text", "text": content})
        else:
            raise RequestError(400, f"{name}[{i}].content: a string")
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": m["role"],
                    "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out
