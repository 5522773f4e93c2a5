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
    ``family`` is ``"llama"`` (BOS added on encode) or ``"chatml"``.
    """
    data = json.loads(base_tokenizer_json())
    vocab: dict[str, int] = data["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {len(vocab)} ids")
    for i in range(len(vocab), vocab_size):
        vocab[f"<pad_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    if family == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tokenizer_config(family: str, tok: Tokenizer) -> dict:
    """``tokenizer_config.json`` for transformers' ``AutoTokenizer`` and mlx_lm."""
    if family == "llama":
        specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}
        template = LLAMA_TEMPLATE
    else:
        specials = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        template = CHATML_TEMPLATE
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
    return {
        "added_tokens_decoder": added,
        **specials,
        "add_bos_token": family == "llama",
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
