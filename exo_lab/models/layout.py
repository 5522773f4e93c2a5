"""The weights and caches of a model, layer by layer, from its ``config.json`` alone.

Each family's rules (:func:`layout`) list the modules one layer of mlx_lm's model holds once it is
built (``mlx_lm.models.<arch>.Model``): linear layers, stacked experts, per-head matrices, norms and
loose parameters, with their shapes. From that list :mod:`exo_lab.models.card` counts bytes (plain
or quantized the way mlx_lm stores them), bytes read per decoded token (routed experts count
``experts_per_token / experts``), parameters multiplied per token (FLOPs) and the cache each layer
keeps (full KV, a sliding window, or a constant recurrent state).

Plain data, no MLX: the planner uses it for models far larger than any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Modules mlx_lm can quantize (they have ``to_quantized``): their ``weight`` is packed.
QUANTIZABLE = ("linear", "embedding", "experts", "per_head")


@dataclass(frozen=True)
class Module:
    """One module of the model: ``kind`` is one of linear, embedding, experts (stacked, dim 0 =
    expert), per_head (mlx_lm's MultiLinear), norm or param (a loose array, never quantized)."""

    path: str  # relative to the layer (``self_attn.q_proj``) or to the model for outside modules
    kind: str
    shape: tuple[int, ...]  # of ``weight`` (or of the param itself)
    bias: tuple[int, ...] | None = None  # shape of ``bias`` when the module has one
    routed: bool = False  # a routed-experts module: only some experts are read per token

    @property
    def weight_elements(self) -> int:
        return _prod(self.shape)

    @property
    def bias_elements(self) -> int:
        return _prod(self.bias) if self.bias else 0


@dataclass(frozen=True)
class LayerCache:
    """What one layer caches: ``per_token`` bytes per token of context (0 for a recurrent state),
    at most ``window`` tokens of them (None: unbounded), and ``fixed`` bytes whatever the context."""

    per_token: int
    window: int | None = None
    fixed: int = 0

    def nbytes(self, context: int) -> int:
        tokens = context if self.window is None else min(context, self.window)
        return self.per_token * tokens + self.fixed

    def to_json(self) -> dict[str, Any]:
        return {"per_token": self.per_token, "window": self.window, "fixed": self.fixed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerCache:
        return cls(int(data["per_token"]), data.get("window"), int(data.get("fixed", 0)))


@dataclass(frozen=True)
class Layout:
    """A model's modules per layer and outside the layers, its caches, and how tensor groups split it."""

    layers: list[list[Module]]
    outside: list[Module]  # embedding, final norm, head (paths relative to the model)
    caches: list[LayerCache]
    experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    attention_width: int = 0  # per layer and context token: q.k and p.v multiply-adds / 2
    tensor_dims: dict[str, int] = field(default_factory=dict)  # must divide by the tensor group size
    # input dims that "sharded-to-all" layers split: each rank's part must hold whole quantization groups
    tensor_group_dims: dict[str, int] = field(default_factory=dict)
    tensor_unsupported: str | None = None  # why no tensor split exists for this family
    kv_splits_with_tensor: bool = True  # False: every tensor rank keeps the whole cache (MLA's latent)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _linear(path: str, out: int, inp: int, bias: bool = False) -> Module:
    return Module(path, "linear", (out, inp), (out,) if bias else None)


def _norm(path: str, dim: int) -> Module:
    return Module(path, "norm", (dim,))


def _mlp(prefix: str, hidden: int, inter: int) -> list[Module]:
    return [
        _linear(f"{prefix}.gate_proj", inter, hidden),
        _linear(f"{prefix}.up_proj", inter, hidden),
        _linear(f"{prefix}.down_proj", hidden, inter),
    ]


def _switch(prefix: str, experts: int, hidden: int, inter: int, bias: bool = False) -> list[Module]:
    def m(name: str, out: int, inp: int) -> Module:
        return Module(f"{prefix}.{name}", "experts", (experts, out, inp), (experts, out) if bias else None, True)

    return [m("gate_proj", inter, hidden), m("up_proj", inter, hidden), m("down_proj", hidden, inter)]


def _gqa(c: dict[str, Any], bias: bool, o_bias: bool, qk_norm: bool, q_factor: int = 1) -> list[Module]:
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or hidden // heads)
    mods = [
        _linear("self_attn.q_proj", heads * hd * q_factor, hidden, bias),
        _linear("self_attn.k_proj", kv * hd, hidden, bias),
        _linear("self_attn.v_proj", kv * hd, hidden, bias),
        _linear("self_attn.o_proj", hidden, heads * hd, o_bias),
    ]
    if qk_norm:
        mods += [_norm("self_attn.q_norm", hd), _norm("self_attn.k_norm", hd)]
    return mods


def _norms(hidden: int, names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")) -> list[Module]:
    return [_norm(n, hidden) for n in names]


def _kv_cache(c: dict[str, Any], act: int, window: int | None = None) -> LayerCache:
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    return LayerCache(2 * kv * hd * act, window)


def _gqa_dims(c: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    return {"attention heads": heads, "KV heads": kv}, {"attention output": heads * hd}


def _outside(c: dict[str, Any], tied: bool) -> list[Module]:
    hidden, vocab = int(c["hidden_size"]), int(c["vocab_size"])
    mods = [Module("model.embed_tokens", "embedding", (vocab, hidden)), _norm("model.norm", hidden)]
    if not tied:
        mods.append(_linear("lm_head", vocab, hidden))
    return mods


def _attn_width(c: dict[str, Any]) -> int:
    heads = int(c["num_attention_heads"])
    return heads * int(c.get("head_dim") or int(c["hidden_size"]) // heads)


def _dense(c: dict[str, Any], act: int) -> Layout:
    """Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms)."""
    mt = c.get("model_type", "llama")
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    bias = bool(c.get("attention_bias", mt == "qwen2"))
    layer = (
        _gqa(c, bias, bool(c.get("attention_bias")) and mt == "llama", mt == "qwen3")
        + _mlp("mlp", hidden, int(c["intermediate_size"]))
        + _norms(hidden)
    )
    dims, group_dims = _gqa_dims(c)
    inter = int(c["intermediate_size"])
    return Layout(
        [layer] * n,
        _outside(c, bool(c.get("tie_word_embeddings", False))),
        [_kv_cache(c, act)] * n,
        attention_width=_attn_width(c),
        tensor_dims={**dims, "intermediate size": inter},
        tensor_group_dims={**group_dims, "intermediate size": inter},
    )


def _qwen3_moe(c: dict[str, Any], act: int) -> Layout:
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    experts, moe_inter = int(c["num_experts"]), int(c["moe_intermediate_size"])
    step, dense_only = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or [])
    attn = _gqa(c, bool(c.get("attention_bias")), False, True)
    layers = []
    for i in range(n):
        if i not in dense_only and experts > 0 and (i + 1) % step == 0:
            mlp = [_linear("mlp.gate", experts, hidden)] + _switch("mlp.switch_mlp", experts, hidden, moe_inter)
        else:
            mlp = _mlp("mlp", hidden, int(c["intermediate_size"]))
        layers.append(attn + mlp + _norms(hidden))
    dims, group_dims = _gqa_dims(c)
    inter = int(c["intermediate_size"])
    return Layout(
        layers,
        _outside(c, bool(c.get("tie_word_embeddings", False))),
        [_kv_cache(c, act)] * n,
        experts,
        int(c["num_experts_per_tok"]),
        _attn_width(c),
        {**dims, "intermediate size": inter, "expert intermediate size": moe_inter},
        {**group_dims, "intermediate size": inter, "expert intermediate size": moe_inter},
    )


def _deepseek_v3(c: dict[str, Any], act: int) -> Layout:
    """DeepSeek-V3 / R1 and Kimi K2: multi-head latent attention, shared + routed experts, first dense layers."""
    hidden, n, heads = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    q_lora, kv_lora = c.get("q_lora_rank"), int(c["kv_lora_rank"])
    rope, nope, v = int(c["qk_rope_head_dim"]), int(c["qk_nope_head_dim"]), int(c["v_head_dim"])
    bias = bool(c.get("attention_bias", False))
    attn = []
    if q_lora is None:
        attn.append(_linear("self_attn.q_proj", heads * (nope + rope), hidden))
    else:
        q_lora = int(q_lora)
        attn += [
            _linear("self_attn.q_a_proj", q_lora, hidden, bias),
            _norm("self_attn.q_a_layernorm", q_lora),
            _linear("self_attn.q_b_proj", heads * (nope + rope), q_lora),
        ]
    attn += [
        _linear("self_attn.kv_a_proj_with_mqa", kv_lora + rope, hidden, bias),
        _norm("self_attn.kv_a_layernorm", kv_lora),
        Module("self_attn.embed_q", "per_head", (heads, kv_lora, nope)),
        Module("self_attn.unembed_out", "per_head", (heads, v, kv_lora)),
        _linear("self_attn.o_proj", hidden, heads * v, bias),
    ]
    routed = c.get("n_routed_experts")
    experts = int(routed or 0)
    moe_inter, shared = int(c["moe_intermediate_size"]), c.get("n_shared_experts")
    first_dense, freq = int(c.get("first_k_dense_replace", 0)), int(c.get("moe_layer_freq", 1))
    layers = []
    for i in range(n):
        if routed is not None and i >= first_dense and i % freq == 0:
            mlp = _switch("mlp.switch_mlp", experts, hidden, moe_inter) + [
                Module("mlp.gate.weight", "param", (experts, hidden)),
                Module("mlp.gate.e_score_correction_bias", "param", (experts,)),
            ]
            if shared is not None:
                mlp += _mlp("mlp.shared_experts", hidden, moe_inter * int(shared))
        else:
            mlp = _mlp("mlp", hidden, int(c["intermediate_size"]))
        layers.append(attn + mlp + _norms(hidden))
    inter = int(c["intermediate_size"])
    split = {"attention heads": heads, "intermediate size": inter, "expert intermediate size": moe_inter}
    if shared is not None:
        split["shared expert intermediate size"] = moe_inter * int(shared)
    return Layout(
        layers,
        _outside(c, bool(c.get("tie_word_embeddings", False))),
        [LayerCache((kv_lora + rope) * act)] * n,
        experts,
        int(c.get("num_experts_per_tok", 1)),
        heads * (kv_lora + rope + kv_lora) // 2,  # absorbed form: q.k over latent + rope, p.v over the latent
        split,
        {**{k: d for k, d in split.items() if "intermediate" in k}, "attention output": heads * v},
        kv_splits_with_tensor=False,
    )


def _glm4_moe(c: dict[str, Any], act: int) -> Layout:
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    experts, moe_inter = int(c["n_routed_experts"]), int(c["moe_intermediate_size"])
    shared, first_dense = c.get("n_shared_experts"), int(c.get("first_k_dense_replace", 0))
    attn = _gqa(c, bool(c.get("attention_bias", False)), False, bool(c.get("use_qk_norm", False)))
    layers = []
    for i in range(n):
        if i >= first_dense:
            mlp = _switch("mlp.switch_mlp", experts, hidden, moe_inter) + [
                Module("mlp.gate.weight", "param", (experts, hidden)),
                Module("mlp.gate.e_score_correction_bias", "param", (experts,)),
            ]
            if shared:
                mlp += _mlp("mlp.shared_experts", hidden, moe_inter * int(shared))
        else:
            mlp = _mlp("mlp", hidden, int(c["intermediate_size"]))
        layers.append(attn + mlp + _norms(hidden))
    dims, group_dims = _gqa_dims(c)
    inter = int(c["intermediate_size"])
    split = {**dims, "intermediate size": inter, "expert intermediate size": moe_inter}
    if shared:
        split["shared expert intermediate size"] = moe_inter * int(shared)
    return Layout(
        layers,
        _outside(c, bool(c.get("tie_word_embeddings", False))),
        [_kv_cache(c, act)] * n,
        experts,
        int(c["num_experts_per_tok"]),
        _attn_width(c),
        split,
        {**group_dims, **{k: v for k, v in split.items() if "intermediate" in k}},
    )


def gpt_oss_layer_types(c: dict[str, Any]) -> list[str]:
    """gpt-oss's attention per layer: ``layer_types``, else sliding and full alternating (mlx_lm's default)."""
    n = int(c["num_hidden_layers"])
    return list(c.get("layer_types") or ["sliding_attention", "full_attention"] * (n // 2))


def _gpt_oss(c: dict[str, Any], act: int) -> Layout:
    hidden, n, heads = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    experts, inter = int(c["num_local_experts"]), int(c["intermediate_size"])
    layer = (
        [Module("self_attn.sinks", "param", (heads,))]
        + _gqa(c, True, True, False)
        + _switch("mlp.experts", experts, hidden, inter, bias=True)
        + [_linear("mlp.router", experts, hidden, True)]
        + _norms(hidden)
    )
    window = int(c.get("sliding_window") or 128)
    caches = [_kv_cache(c, act, window if t == "sliding_attention" else None) for t in gpt_oss_layer_types(c)]
    dims, group_dims = _gqa_dims(c)
    return Layout(
        [layer] * n,
        _outside(c, bool(c.get("tie_word_embeddings", False))),
        caches,
        experts,
        int(c["num_experts_per_tok"]),
        _attn_width(c),
        {**dims, "expert intermediate size": inter},
        {**group_dims, "expert intermediate size": inter},
    )


def _gemma3(c: dict[str, Any], act: int) -> Layout:
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    layer = (
        _gqa(c, False, False, True)
        + _mlp("mlp", hidden, int(c["intermediate_size"]))
        + _norms(
            hidden,
            ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
        )
    )
    pattern, window = int(c.get("sliding_window_pattern", 6)), int(c.get("sliding_window", 512))
    caches = [_kv_cache(c, act, window if (i + 1) % pattern else None) for i in range(n)]
    return Layout(
        [layer] * n,
        _outside(c, bool(c.get("tie_word_embeddings", True))),
        caches,
        attention_width=_attn_width(c),
        tensor_unsupported="mlx_lm's gemma3_text has no shard()",
    )


def _qwen3_next(c: dict[str, Any], act: int) -> Layout:
    """Qwen3-Next: gated-delta linear attention in most layers (a constant state), gated full attention
    every ``full_attention_interval``-th layer, MoE with a shared expert."""
    hidden, n = int(c["hidden_size"]), int(c["num_hidden_layers"])
    hk, hv = int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"])
    dk, dv = int(c["linear_key_head_dim"]), int(c["linear_value_head_dim"])
    kernel = int(c["linear_conv_kernel_dim"])
    key_dim, value_dim = hk * dk, hv * dv
    conv_dim = 2 * key_dim + value_dim
    linear = [
        Module("linear_attn.conv1d.weight", "param", (conv_dim, kernel, 1)),
        _linear("linear_attn.in_proj_qkvz", 2 * key_dim + 2 * value_dim, hidden),
        _linear("linear_attn.in_proj_ba", 2 * hv, hidden),
        Module("linear_attn.dt_bias", "param", (hv,)),
        Module("linear_attn.A_log", "param", (hv,)),
        _norm("linear_attn.norm", dv),
        _linear("linear_attn.out_proj", hidden, value_dim),
    ]
    full = _gqa(c, bool(c.get("attention_bias", False)), False, True, q_factor=2)
    interval = int(c.get("full_attention_interval", 4))
    experts, moe_inter = int(c["num_experts"]), int(c["moe_intermediate_size"])
    step, dense_only = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or [])
    shared = int(c["shared_expert_intermediate_size"])
    layers, caches = [], []
    for i in range(n):
        is_linear = (i + 1) % interval != 0
        if i not in dense_only and experts > 0 and (i + 1) % step == 0:
            mlp = (
                [_linear("mlp.gate", experts, hidden)]
                + _switch("mlp.switch_mlp", experts, hidden, moe_inter)
                + _mlp("mlp.shared_expert", hidden, shared)
                + [_linear("mlp.shared_expert_gate", 1, hidden)]
            )
        else:
            mlp = _mlp("mlp", hidden, int(c["intermediate_size"]))
        layers.append((linear if is_linear else full) + mlp + _norms(hidden))
        # linear layers: conv state ((kernel - 1) x conv_dim, activations) + recurrent state (Hv x Dv x Dk, fp32)
        caches.append(
            LayerCache(0, None, (kernel - 1) * conv_dim * act + hv * dv * dk * 4) if is_linear else _kv_cache(c, act)
        )
    return Layout(
        layers,
        _outside(c, bool(c.get("tie_word_embeddings", False))),
        caches,
        experts,
        int(c["num_experts_per_tok"]),
        _attn_width(c),
        tensor_unsupported="mlx_lm's qwen3_next has no shard()",
    )


FAMILIES: dict[str, Callable[[dict[str, Any], int], Layout]] = {
    "llama": _dense,
    "mistral": _dense,
    "qwen2": _dense,
    "qwen3": _dense,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
    "kimi_k2": _deepseek_v3,
    "glm4_moe": _glm4_moe,
    "gpt_oss": _gpt_oss,
    "gemma3_text": _gemma3,
    "gemma3": _gemma3,
    "qwen3_next": _qwen3_next,
}


def layout(config: dict[str, Any], act_bytes: int) -> Layout:
    """The modules and caches of the model ``config`` describes (``text_config`` if it has one).

    ``act_bytes``: bytes per element of activations and caches. Unknown families are read as dense
    Llama-style models.
    """
    c = config.get("text_config", config)
    rules = FAMILIES.get(str(c.get("model_type", "llama")), _dense)
    return rules(c, act_bytes)
