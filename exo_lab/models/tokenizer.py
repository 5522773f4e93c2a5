"""Byte-level BPE tokenizers for synthetic models, trained on local text.

The corpus is the Python standard library's own sources (always present, no
network). Training takes about a second and the result is cached, keyed by
the corpus and the settings, so every synthetic model of a machine shares it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from exo_lab.paths import cache_dir

log = logging.getLogger(__name__)

BASE_VOCAB = 8192
CORPUS_CHARS = 4_000_000

LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = LLAMA_SPECIALS + CHATML_SPECIALS
#: the reasoning tags of the ``think`` family (Qwen3's), added after the trained vocabulary (not special: they
#: show in decoded text, as Qwen3's do)
THINK_TOKENS = ["<think>", "</think>"]


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= CORPUS_CHARS:
            break
    return texts


def _train(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def base_tokenizer_json() -> str:
    """The trained base tokenizer (``BASE_VOCAB`` ids) as JSON, cached on disk."""
    texts = _corpus()
    digest = hashlib.sha256()
    digest.update(f"v1 {BASE_VOCAB} {SPECIAL_TOKENS}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace"))
    path = cache_dir() / "tokenizers" / f"bpe-{digest.hexdigest()[:16]}.json"
    if path.exists():
        return path.read_text()
    log.info("training a byte-level BPE tokenizer on the standard library's sources")
    text = _train(texts).to_str()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def build(vocab_size: int, family: str) -> Tokenizer:
    """A tokenizer whose every id in ``range(vocab_size)`` decodes.

    Ids beyond the trained vocabulary are padding entries ``<pad_N>`` in the
    BPE vocabulary itself (no merges reach them), so they decode to text.
    ``family`` is ``"llama"`` (BOS added on encode), ``"chatml"``, or ``"think"`` (chatml with Qwen3's
    ``<think>`` / ``</think>`` as the first ids after the trained vocabulary).
    """
    data = json.loads(base_tokenizer_json())
    vocab: dict[str, int] = data["model"]["vocab"]
    trained = len(vocab)
    extra = THINK_TOKENS if family == "think" else []
    if vocab_size < trained + len(extra):
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {trained + len(extra)} ids")
    for i in range(trained, vocab_size):
        k = i - trained
        vocab[extra[k] if k < len(extra) else f"<pad_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    if extra:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    if family == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


# Tools (when given) are listed in a system turn in the Hermes format; the
# assistant calls them as <tool_call>{"name", "arguments"}</tool_call>, which
# mlx_lm's ``json_tools`` parser reads; tool results come back as <tool_response>.
_TOOLS_INTRO = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _template(open_: str, close: str, trim: bool, bos: bool) -> str:
    """A chat template: turns ``open_(role) + content + close``, tools in the Hermes format."""
    content = "message['content'] | trim" if trim else "message['content']"
    sys_content = "messages[0]['content'] | trim" if trim else "messages[0]['content']"
    return (
        ("{{- bos_token }}" if bos else "")
        + "{%- if tools %}"
        + "{{- "
        + open_.format(role="'system'")
        + " }}"
        + "{%- if messages[0]['role'] == 'system' %}{{- "
        + sys_content
        + " + '\\n\\n' }}{%- endif %}"
        + "{{- "
        + repr(_TOOLS_INTRO)
        + " }}"
        + "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
        + "{{- "
        + repr(_TOOLS_OUTRO)
        + " + "
        + close
        + " }}"
        + "{%- endif %}"
        + "{%- for message in messages %}"
        + "{%- if tools and loop.first and message['role'] == 'system' %}"
        + "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
        + "{{- "
        + open_.format(role="'assistant'")
        + " }}{{- "
        + content
        + " }}"
        + "{%- for tool_call in message.tool_calls %}"
        + "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
        + "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
        + '{{- \'<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
        + "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
        + "{{- '}\\n</tool_call>' }}"
        + "{%- endfor %}"
        + "{{- "
        + close
        + " }}"
        + "{%- elif message['role'] == 'tool' %}"
        + "{{- "
        + open_.format(role="'tool'")
        + " + '<tool_response>\\n' + message['content'] + '\\n</tool_response>' + "
        + close
        + " }}"
        + "{%- else %}"
        + "{{- "
        + open_.format(role="message['role']")
        + " }}{{- "
        + content
        + " }}{{- "
        + close
        + " }}"
        + "{%- endif %}"
        + "{%- endfor %}"
        + "{%- if add_generation_prompt %}{{- "
        + open_.format(role="'assistant'")
        + " }}{%- endif %}"
    )


def _thinking(template: str, open_assistant: str) -> str:
    """``template`` for a thinking model (as Qwen3's thinking models): the generation prompt opens a ``<think>``
    block, or holds an empty one when ``enable_thinking`` is false; a ``reasoning_effort`` is said in a system
    line first."""
    effort = (
        "{%- if reasoning_effort is defined and reasoning_effort %}"
        "{{- '<|im_start|>system\\nReasoning: ' + reasoning_effort + '<|im_end|>\\n' }}{%- endif %}"
    )
    plain = "{%- if add_generation_prompt %}{{- " + open_assistant + " }}{%- endif %}"
    assert template.endswith(plain)
    think = (
        "{%- if add_generation_prompt %}{{- "
        + open_assistant
        + " }}{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
    )
    return effort + template[: -len(plain)] + think


LLAMA_TEMPLATE = _template("'<|start_header_id|>' + {role} + '<|end_header_id|>\\n\\n'", "'<|eot_id|>'", True, True)
CHATML_TEMPLATE = _template("'<|im_start|>' + {role} + '\\n'", "'<|im_end|>\\n'", False, False)
THINK_TEMPLATE = _thinking(CHATML_TEMPLATE, "'<|im_start|>' + 'assistant' + '\\n'")


def tokenizer_config(family: str, tok: Tokenizer) -> dict:
    """``tokenizer_config.json`` for transformers' ``AutoTokenizer`` and mlx_lm."""
    if family == "llama":
        specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}
        template = LLAMA_TEMPLATE
    else:
        specials = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        template = THINK_TEMPLATE if family == "think" else CHATML_TEMPLATE
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    for t in THINK_TOKENS if family == "think" else []:
        added[str(tok.token_to_id(t))] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
    return {
        "added_tokens_decoder": added,
        **specials,
        "add_bos_token": family == "llama",
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
