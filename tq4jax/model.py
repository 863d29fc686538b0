"""An example Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) with a jit-compiled generation
loop that runs on a dense fp16 KV cache or the TQ4-compressed one (:mod:`tq4jax.cache`).

Weights are random from a seed (:func:`init_params`) or loaded from a user's ``.npz`` /
``.safetensors`` file (:func:`load_params`, names as :func:`param_names`). Attention goes
through :func:`tq4jax.dot_product_attention` with the cache: swapping the cache type is the only
change between the dense and the compressed model.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .cache import DenseCache, TQ4Cache
from .nn import dot_product_attention

__all__ = ["LlamaConfig", "init_params", "load_params", "save_params", "param_names",
           "forward", "generate", "make_cache"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model shape. The default is small (CPU-friendly); ``bench/generate.py`` uses 16 layers,
    32/8 heads, D=128."""
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"  # activations and weights; attention runs in fp16


def param_names(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Flat parameter names -> shapes (the file format of :func:`load_params`)."""
    hd = cfg.head_dim
    names = {"embed": (cfg.vocab_size, cfg.dim), "final_norm": (cfg.dim,),
             "lm_head": (cfg.dim, cfg.vocab_size)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names.update({p + "attn_norm": (cfg.dim,), p + "wq": (cfg.dim, cfg.n_heads * hd),
                      p + "wk": (cfg.dim, cfg.n_kv_heads * hd),
                      p + "wv": (cfg.dim, cfg.n_kv_heads * hd),
                      p + "wo": (cfg.n_heads * hd, cfg.dim), p + "ffn_norm": (cfg.dim,),
                      p + "w1": (cfg.dim, cfg.ffn_dim), p + "w3": (cfg.dim, cfg.ffn_dim),
                      p + "w2": (cfg.ffn_dim, cfg.dim)})
    return names


def init_params(cfg: LlamaConfig, seed: int = 0) -> dict[str, jnp.ndarray]:
    """Random weights, GPT-2 style: N(0, 1) embeddings, N(0, 1/fan_in) matrices with the
    residual-branch outputs (wo, w2) scaled by 1/sqrt(2 * n_layers), unit norm weights."""
    rng = np.random.default_rng(seed)
    out = {}
    branch = 1.0 / np.sqrt(2 * cfg.n_layers)
    for name, shape in param_names(cfg).items():
        if len(shape) == 1:
            w = np.ones(shape, np.float32)
        elif name == "embed":
            w = rng.standard_normal(shape).astype(np.float32)
        else:
            w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[0])
            if name.endswith(("wo", "w2")):
                w *= branch
        out[name] = jnp.asarray(w, cfg.dtype)
    return out


def save_params(path: str, params: dict[str, Any]) -> None:
    """Write params to ``.npz``."""
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in params.items()})


def load_params(path: str, cfg: LlamaConfig) -> dict[str, jnp.ndarray]:
    """Weights from ``.npz`` or ``.safetensors`` (needs the safetensors package), checked
    against :func:`param_names`."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError("loading .safetensors needs the safetensors package") from e
        raw = load_file(path)
    else:
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    out = {}
    for name, shape in param_names(cfg).items():
        if name not in raw:
            raise ValueError(f"{path}: missing parameter {name!r} {shape}")
        if tuple(raw[name].shape) != shape:
            raise ValueError(f"{path}: {name!r} must have shape {shape}, got "
                             f"{tuple(raw[name].shape)}")
        out[name] = jnp.asarray(raw[name], cfg.dtype)
    return out


def make_cache(cfg: LlamaConfig, batch: int, capacity: int, kind: str = "tq4", *,
               k_bits: int = 4, v_bits: int = 4,
               implementation: str | None = None) -> TQ4Cache | DenseCache:
    """An empty cache: ``kind`` "tq4" (compressed) or "dense" (fp16)."""
    if kind == "tq4":
        return TQ4Cache.create(cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim,
                               k_bits=k_bits, v_bits=v_bits)
    if kind == "dense":
        return DenseCache.create(cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim,
                                 implementation=implementation)
    raise ValueError(f"kind must be 'tq4' or 'dense', got {kind!r}")


def _rms_norm(x: jnp.ndarray, w: jnp.ndarray, eps: float) -> jnp.ndarray:
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype) * w


def _rope(x: jnp.ndarray, pos: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Rotary embedding (half-split pairs) of x [B, T, H, D] at positions pos [B, T]."""
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2, dtype=np.float32) / d)
    ang = pos[..., None].astype(jnp.float32) * freq  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def forward(params: dict[str, jnp.ndarray], tokens: jnp.ndarray, cache: Any, cfg: LlamaConfig,
            new_lengths: jnp.ndarray | None = None, implementation: str | None = None
            ) -> tuple[jnp.ndarray, Any]:
    """tokens [B, T] int32 (right-padded; ``new_lengths`` [B] valid counts, default T) at each
    row's next positions -> (logits [B, T, vocab] f32, updated cache). ``implementation``: as
    :func:`tq4jax.dot_product_attention` (e.g. "mosaic" for T = 1 steps on a TQ4 cache)."""
    b, t = tokens.shape
    hd = cfg.head_dim
    pos = cache.lengths[0][:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x = params["embed"][tokens]
    for i in range(cfg.n_layers):
        p = lambda n: params[f"layers.{i}.{n}"]  # noqa: E731
        h = _rms_norm(x, p("attn_norm"), cfg.norm_eps)
        q = _rope((h @ p("wq")).reshape(b, t, cfg.n_heads, hd), pos, cfg.rope_theta)
        k = _rope((h @ p("wk")).reshape(b, t, cfg.n_kv_heads, hd), pos, cfg.rope_theta)
        v = (h @ p("wv")).reshape(b, t, cfg.n_kv_heads, hd)
        o, cache = dot_product_attention(q.astype(jnp.float16), k, v, is_causal=True,
                                         query_seq_lengths=new_lengths, cache=cache, layer=i,
                                         implementation=implementation)
        x = x + o.astype(x.dtype).reshape(b, t, -1) @ p("wo")
        h = _rms_norm(x, p("ffn_norm"), cfg.norm_eps)
        x = x + (jax.nn.silu(h @ p("w1")) * (h @ p("w3"))) @ p("w2")
    logits = _rms_norm(x, params["final_norm"], cfg.norm_eps) @ params["lm_head"]
    return logits.astype(jnp.float32), cache


@partial(jax.jit, static_argnames=("cfg", "n_new"), donate_argnames=("cache",))
def generate(params: dict[str, jnp.ndarray], prompt: jnp.ndarray, prompt_lengths: jnp.ndarray,
             cache: Any, *, cfg: LlamaConfig, n_new: int):
    """Greedy generation: prefill the right-padded prompt [B, T0] (valid lengths [B]), then
    ``n_new`` decode steps in a ``lax.scan``. The cache is donated (updated in place).

    Raises ValueError when the prompt's padded length + ``n_new`` exceeds the cache capacity
    (the cache would drop tokens). Returns (tokens [B, n_new] int32, logits of each step
    [B, n_new, vocab] f32, cache)."""
    if prompt.shape[1] + n_new > cache.capacity:
        raise ValueError(f"cache overflow: prompt length {prompt.shape[1]} + n_new {n_new} "
                         f"exceeds the cache capacity {cache.capacity}")
    logits, cache = forward(params, prompt, cache, cfg, prompt_lengths)
    last = logits[jnp.arange(prompt.shape[0]), jnp.maximum(prompt_lengths - 1, 0)]

    def step(carry, _):
        tok_logits, cache = carry
        tok = jnp.argmax(tok_logits, -1).astype(jnp.int32)
        nxt, cache = forward(params, tok[:, None], cache, cfg)
        return (nxt[:, 0], cache), (tok, tok_logits)

    (_, cache), (toks, step_logits) = lax.scan(step, (last, cache), None, length=n_new)
    return toks.T, jnp.swapaxes(step_logits, 0, 1), cache
