"""The dashboard's chat box: a transcript that streams from a model served here or a ready instance."""

from __future__ import annotations

import html
import time
from typing import Any

import panel as pn

from exo_lab.ui.dashboard.theme import ACCENT, BG2, BORDER, CRIT, FG3, card, card_title, html_pane

CHAT_CSS = f"""
:host {{ width: 100%; }}
.exo-chat {{ height: 340px; overflow-y: auto; display: flex; flex-direction: column-reverse;
  background: {BG2}; border: 1px solid {BORDER}; border-radius: 8px; padding: 10px 12px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 13px; box-sizing: border-box; }}
.exo-chat-inner {{ display: flex; flex-direction: column; gap: 10px; }}
.exo-chat-empty {{ color: {FG3}; font-style: italic; text-align: center; margin: auto 0; padding: 120px 0; }}
.exo-msg {{ max-width: 82%; display: flex; flex-direction: column; gap: 3px; }}
.exo-msg.user {{ align-self: flex-end; align-items: flex-end; }}
.exo-msg.assistant {{ align-self: flex-start; }}
.exo-who {{ font-size: 11px; color: {FG3}; font-weight: 600; letter-spacing: 0.02em; }}
.exo-bubble {{ padding: 7px 11px; border-radius: 12px; white-space: pre-wrap; word-break: break-word; line-height: 1.45; }}
.exo-msg.user .exo-bubble {{ background: {ACCENT}; color: #fff; border-bottom-right-radius: 4px; }}
.exo-msg.assistant .exo-bubble {{ background: #fff; border: 1px solid {BORDER}; border-bottom-left-radius: 4px; }}
.exo-msg.error .exo-bubble {{ border-color: {CRIT}; color: {CRIT}; }}
.exo-msg.streaming .exo-bubble::after {{ content: "▍"; color: {ACCENT}; animation: exo-blink 1s steps(2) infinite; }}
@keyframes exo-blink {{ 50% {{ opacity: 0; }} }}
.exo-usage {{ font-size: 11px; color: {FG3}; font-variant-numeric: tabular-nums; }}
"""

NO_CHAT_MODEL = {
    "cluster": "No model is ready to chat with yet: preview a model below and launch a plan.",
    "what-if": "A what-if cluster runs nothing. To chat, serve a model (exo-lab up) or open the "
    "dashboard of a live cluster (exo-lab dashboard --local 2).",
    "this machine": "No model is served here: exo-lab up serves one, with this dashboard.",
}


def transcript_html(
    messages: list[dict[str, Any]], empty: str = "Send a message to chat with the selected model."
) -> str:
    if not messages:
        return f"<div class='exo-chat'><div class='exo-chat-empty'>{html.escape(empty)}</div></div>"
    parts = []
    for m in messages:
        role = m["role"]
        classes = (
            f"exo-msg {role}" + (" streaming" if m.get("streaming") else "") + (" error" if m.get("error") else "")
        )
        who = "you" if role == "user" else m.get("model", "model")
        text = m.get("error") or m["content"]
        usage = f"<div class='exo-usage'>{html.escape(m['usage'])}</div>" if m.get("usage") else ""
        parts.append(
            f"<div class='{classes}'><div class='exo-who'>{html.escape(who)}</div>"
            f"<div class='exo-bubble'>{html.escape(text)}</div>{usage}</div>"
        )
    return f"<div class='exo-chat'><div class='exo-chat-inner'>{''.join(parts)}</div></div>"


def usage_text(usage: Any, finish: str | None) -> str:
    if usage is None:
        return ""
    bits = [f"{usage.completion_tokens} tokens"]
    if usage.generation_tps:
        bits.append(f"{usage.generation_tps:.1f} tok/s")
    if usage.ttft_s:
        bits.append(f"TTFT {usage.ttft_s * 1000:.0f} ms")
    if finish and finish != "stop":
        bits.append(f"finish: {finish}")
    return " · ".join(bits)


class ChatView:
    """The chat card: pick a model, send messages, watch the reply stream in."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.messages: list[dict[str, Any]] = []
        self.updates = 0  # transcript pushes, for tests: a streamed reply takes several
        self._generation: Any = None
        self.model = pn.widgets.Select(label="model", options=[], width=220)
        self.max_tokens = pn.widgets.IntInput(label="max tokens", value=64, start=1, end=8192, width=110)
        self.temperature = pn.widgets.FloatInput(
            label="temperature", value=0.0, start=0.0, end=2.0, step=0.1, width=110
        )
        self.transcript = pn.pane.HTML(
            transcript_html([]), stylesheets=[CHAT_CSS], sizing_mode="stretch_width", margin=(4, 0)
        )
        self.input = pn.widgets.TextInput(placeholder="Message the model…", sizing_mode="stretch_width")
        self.send_button = pn.widgets.Button(label="Send", color="primary", width=80)
        self.stop_button = pn.widgets.Button(label="Stop", color="default", width=70, disabled=True)
        self.clear_button = pn.widgets.Button(label="Clear", color="light", width=70)
        self.send_button.on_click(self._on_send)
        self.input.param.watch(self._on_send, "enter_pressed")
        self.stop_button.on_click(self._on_stop)
        self.clear_button.on_click(self._on_clear)
        self.card = card(
            html_pane(card_title("Chat", "streams from the selected model")),
            pn.Row(self.model, self.max_tokens, self.temperature, margin=0),
            self.transcript,
            pn.Row(self.input, self.send_button, self.stop_button, self.clear_button, margin=0),
            min_width=420,
        )
        self._render_chat()
        self.updates = 0

    def update_models(self) -> None:
        """Offer the models that are ready now (called when the instances change)."""
        models = list(self.source.chat_models())
        if models != list(self.model.options):
            self.model.options = models
            if models and self.model.value not in models:
                self.model.value = models[0]
            if not self.messages:
                self._render_chat()

    def _render_chat(self) -> None:
        empty = {} if self.model.options else {"empty": NO_CHAT_MODEL[self.source.mode]}
        self.transcript.object = transcript_html(self.messages, **empty)
        self.updates += 1

    async def _on_send(self, _event: Any = None) -> None:
        text = (self.input.value_input or self.input.value or "").strip()
        if not text or self._generation is not None:
            return
        models = self.source.chat_models()
        name = self.model.value
        if name not in models:
            self.messages.append(
                {
                    "role": "assistant",
                    "model": "exo_lab",
                    "content": "",
                    "error": "No model is ready: serve one, or launch a plan on the cluster.",
                }
            )
            self._render_chat()
            return
        backend = models[name]
        self.input.value = ""
        self.input.value_input = ""
        history = [
            {"role": m["role"], "content": m["content"]}
            for m in self.messages
            if not m.get("error") and m["role"] in ("user", "assistant") and m.get("model", name) == name
        ]
        self.messages.append({"role": "user", "content": text})
        reply = {"role": "assistant", "model": name, "content": "", "streaming": True}
        self.messages.append(reply)
        self._render_chat()
        self.send_button.disabled, self.stop_button.disabled = True, False
        try:
            max_tokens = self.max_tokens.value
            if max_tokens is None:
                raise ValueError("max tokens is empty")
            gen = backend.chat(
                [*history, {"role": "user", "content": text}],
                max_tokens=int(max_tokens),
                temperature=float(self.temperature.value),
            )
            self._generation = gen
            last = 0.0
            async for chunk in gen:
                if chunk.error:
                    reply["error"] = chunk.error
                reply["content"] += chunk.text
                now = time.monotonic()
                if chunk.finish_reason is None and now - last >= 0.05:
                    last = now
                    self._render_chat()
            reply["usage"] = usage_text(gen.usage, gen.finish_reason)
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            reply["streaming"] = False
            self._generation = None
            self.send_button.disabled, self.stop_button.disabled = False, True
            self._render_chat()

    def _on_stop(self, _event: Any = None) -> None:
        if self._generation is not None:
            self._generation.cancel()

    def _on_clear(self, _event: Any = None) -> None:
        if self._generation is None:
            self.messages = []
            self._render_chat()
