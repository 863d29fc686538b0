"""``python -m tq4jax.verify``: check that the TQ4-compressed KV cache keeps a model's outputs.

Runs the example Llama-style model (:mod:`tq4jax.model`; weights from a ``.npz`` /
``.safetensors`` file or a directory holding one, random weights when none is given) over a
prompt twice, teacher-forced on the same tokens: once with the dense fp16 cache and once with
the TQ4 cache. Prints, per layer, the K/V cosine and the attention error of the layer's
queries over its K/V compressed in isolation (the dense run's K/V, so errors do not compound),
then the logits error and top-1 agreement of the end-to-end compressed run, and the cache bytes
dense vs compressed. Exits 1 when a metric is past its threshold (``--min-kv-cos``,
``--max-attn-err``, ``--min-logits-cos``, ``--min-top1``), 2 on bad arguments.

``--against-originals`` (CUDA GPU with turboquant-vllm, torch and triton installed) also runs
the original PyTorch/Triton kernels on the same caches and prints their differences from
tq4jax: ``tq4_compress`` vs the cache's codes, ``triton_flash_attention_tq4_kv`` vs
``flash_attention_tq4_kv``, and ``fused_paged_tq4_decode`` vs ``paged_decode`` on a paged
copy of each layer. :func:`load_originals` is the loader the comparison tests and
``bench/originals.py`` share.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import model as llama
from .attention import flash_attention_tq4_kv
from .backend import on_gpu, resolve_impl
from .cache import TQ4Cache
from .codec import dequantize
from .layout import paged_layout
from .paged import paged_decode, paged_write

ORIGINAL_MODULES = ("tq4_compress", "tq4_decompress", "flash_attention", "flash_attention_tq4",
                    "flash_attention_tq4_kv", "fused_paged_tq4_attention",
                    "fused_paged_tq4_int8_prefill")


def original_modules() -> types.SimpleNamespace:
    """turboquant-vllm's Triton kernel modules (``ORIGINAL_MODULES``, by name), torch imported.

    The kernel modules need only torch and triton; when the package's ``triton/__init__``
    cannot be imported (it also pulls in transformers), they are loaded without it.
    Raises ImportError with the reason when turboquant-vllm, torch or triton is missing.
    """
    for dep in ("torch", "triton", "turboquant_vllm"):
        if importlib.util.find_spec(dep) is None:
            raise ImportError(f"{dep.replace('_', '-')} is not installed")
    try:
        mods = [importlib.import_module(f"turboquant_vllm.triton.{m}") for m in ORIGINAL_MODULES]
    except ImportError:
        root = Path(importlib.util.find_spec("turboquant_vllm").submodule_search_locations[0])
        for name, path in (("turboquant_vllm", root), ("turboquant_vllm.triton", root / "triton")):
            if name not in sys.modules:
                stub = types.ModuleType(name)
                stub.__path__ = [str(path)]
                sys.modules[name] = stub
        mods = [importlib.import_module(f"turboquant_vllm.triton.{m}") for m in ORIGINAL_MODULES]
    return types.SimpleNamespace(**dict(zip(ORIGINAL_MODULES, mods)))


def load_originals() -> types.SimpleNamespace:
    """turboquant-vllm's Triton kernel functions (``tq4_compress``, ``tq4_decompress``,
    ``triton_flash_attention``, ``triton_flash_attention_tq4``, ``triton_flash_attention_tq4_kv``,
    ``fused_paged_tq4_decode``, ``fused_paged_tq4_int8_prefill``) plus ``torch``
    (:func:`original_modules`; ImportError with the reason when one is missing)."""
    mods = original_modules()
    import torch
    names = ("tq4_compress", "tq4_decompress", "triton_flash_attention",
             "triton_flash_attention_tq4", "triton_flash_attention_tq4_kv",
             "fused_paged_tq4_decode", "fused_paged_tq4_int8_prefill")
    return types.SimpleNamespace(torch=torch, **{n: getattr(getattr(mods, m), n)
                                                  for n, m in zip(names, ORIGINAL_MODULES)})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m tq4jax.verify", description=__doc__.split("\n\n")[1]
                 .replace("``", "").replace(":mod:`tq4jax.model`", "tq4jax.model"),
                 epilog="Exit status: 0 all thresholds met, 1 one missed, 2 bad arguments or "
                 "--against-originals unavailable.",
                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = ap.add_argument_group("model (shape flags apply to random weights; with --weights the "
                              "shape is read from the weights, except --head-dim)")
    m.add_argument("--weights", help="a .npz/.safetensors file, or a directory holding one, with "
                   "tq4jax.model.param_names names (default: random weights)")
    m.add_argument("--layers", type=int, default=2, help="decoder layers")
    m.add_argument("--dim", type=int, default=256, help="model width")
    m.add_argument("--heads", type=int, default=4, help="query heads")
    m.add_argument("--kv-heads", type=int, default=2, help="KV heads (GQA)")
    m.add_argument("--head-dim", type=int, default=64, help="head dimension D (even, 16-512)")
    m.add_argument("--ffn-dim", type=int, default=512, help="SwiGLU hidden width")
    m.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    m.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base")
    m.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights and activations (attention runs in fp16)")
    r = ap.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="random weights and prompt")
    r.add_argument("--batch", type=int, default=2, help="prompts (random tokens)")
    r.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt")
    r.add_argument("--k-bits", type=int, default=4, choices=(2, 3, 4),
                   help="key codebook bits (codes always take a nibble)")
    r.add_argument("--v-bits", type=int, default=4, choices=(2, 3, 4), help="value codebook bits")
    r.add_argument("--impl", default="auto", choices=["auto", "pallas", "triton", "reference"],
                   help="tq4jax path: auto = Pallas kernels on a GPU, reference elsewhere")
    r.add_argument("--against-originals", action="store_true",
                   help="also run turboquant-vllm's kernels on the same caches (CUDA GPU)")
    t = ap.add_argument_group("thresholds (exit 1 when one is missed)")
    t.add_argument("--min-kv-cos", type=float, default=0.99,
                   help="lowest per-layer mean K or V cosine")
    t.add_argument("--max-attn-err", type=float, default=0.2,
                   help="highest per-layer relative L2 attention error")
    t.add_argument("--min-logits-cos", type=float, default=0.98,
                   help="lowest mean logits cosine")
    t.add_argument("--min-top1", type=float, default=0.8,
                   help="lowest top-1 agreement over the prompt positions (random weights "
                   "give flat logits, so near-ties flip; real models agree more)")
    return ap


def _check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("layers", "dim", "heads", "kv_heads", "head_dim", "ffn_dim", "vocab", "batch",
                 "prompt_tokens"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.head_dim % 2 or not 16 <= a.head_dim <= 512:
        ap.error(f"--head-dim must be even and in [16, 512], got {a.head_dim}")
    if a.heads % a.kv_heads:
        ap.error(f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
    for name, lo, hi in (("min_kv_cos", -1, 1), ("min_logits_cos", -1, 1), ("min_top1", 0, 1),
                         ("max_attn_err", 0, math.inf)):
        if not lo <= getattr(a, name) <= hi:
            ap.error(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got "
                     f"{getattr(a, name)}")
    if a.weights is not None and not Path(a.weights).exists():
        ap.error(f"--weights {a.weights!r} does not exist")


def _weights_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.npz"))
        if len(found) != 1:
            raise ValueError(f"--weights directory {path} must hold exactly one .safetensors or "
                             f".npz file, found {[f.name for f in found]}")
        p = found[0]
    return p


def _config(a: argparse.Namespace) -> tuple[llama.LlamaConfig, dict]:
    """The model config and its parameters (loaded, shape read from the file, or random)."""
    if a.weights is None:
        cfg = llama.LlamaConfig(a.vocab, a.dim, a.layers, a.heads, a.kv_heads, a.head_dim,
                                a.ffn_dim, a.rope_theta, dtype=a.dtype)
        return cfg, llama.init_params(cfg, a.seed)
    path = _weights_file(a.weights)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "np") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    else:
        with np.load(path) as f:
            shapes = {k: f[k].shape for k in f.files}
    try:
        vocab, dim = shapes["embed"]
        layers = sum(1 for k in shapes if k.startswith("layers.") and k.endswith(".wq"))
        heads, rem = divmod(shapes["layers.0.wq"][1], a.head_dim)
        kv_heads, rem2 = divmod(shapes["layers.0.wk"][1], a.head_dim)
        ffn = shapes["layers.0.w1"][1]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: not tq4jax.model weights ({e})") from e
    if rem or rem2 or not kv_heads or heads % kv_heads:
        raise ValueError(f"{path}: wq/wk widths {shapes['layers.0.wq'][1]}/"
                         f"{shapes['layers.0.wk'][1]} do not fit --head-dim {a.head_dim}")
    cfg = llama.LlamaConfig(int(vocab), int(dim), layers, heads, kv_heads, a.head_dim, int(ffn),
                            a.rope_theta, dtype=a.dtype)
    return cfg, llama.load_params(str(path), cfg)


@contextlib.contextmanager
def _capture_queries(store: dict):
    """Record each layer's query as tq4jax.model.forward passes it to the attention call."""
    inner = llama.dot_product_attention

    def spy(query, key, value, *args, layer=None, **kw):
        store[layer] = query
        return inner(query, key, value, *args, layer=layer, **kw)

    llama.dot_product_attention = spy
    try:
        yield
    finally:
        llama.dot_product_attention = inner


def _cos(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) *
                                            jnp.linalg.norm(b, axis=-1), 1e-30)


def _rel(out: jax.Array, ref: jax.Array) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Compute every figure (see the module doc); returns them with the caches and queries."""
    cfg, params = _config(a)
    impl = resolve_impl(a.impl)
    b, t = a.batch, a.prompt_tokens
    tokens = jnp.asarray(np.random.default_rng(a.seed).integers(0, cfg.vocab_size, (b, t)),
                         jnp.int32)
    kw = dict(k_bits=a.k_bits, v_bits=a.v_bits)

    def fwd(params, tokens, cache):
        qs: dict = {}
        with _capture_queries(qs):
            logits, cache = llama.forward(params, tokens, cache, cfg)
        return logits, cache, [qs[i] for i in range(cfg.n_layers)]

    fwd = jax.jit(fwd)
    dense_logits, dense, queries = fwd(params, tokens, llama.make_cache(cfg, b, t, "dense"))
    tq4_logits, tq4, _ = fwd(params, tokens, llama.make_cache(cfg, b, t, "tq4", **kw))
    iso = TQ4Cache.create(cfg.n_layers, b, cfg.n_kv_heads, t, cfg.head_dim, **kw)
    rows = []
    for i in range(cfg.n_layers):
        iso = iso.update(i, dense.k[i], dense.v[i], impl=impl)
        cos = []
        for which, codes, norms, ref in (("k", iso.k_codes, iso.k_norms, dense.k),
                                         ("v", iso.v_codes, iso.v_norms, dense.v)):
            hat = dequantize(codes[i], norms[i], iso.spec.codebook(which)[0], iso.spec.rotation,
                             jnp.float32, impl=impl)
            cos.append(float(jnp.mean(_cos(jnp.swapaxes(ref[i], 1, 2), hat))))
        err = _rel(iso.attend(i, queries[i], impl=impl), dense.attend(i, queries[i]))
        rows.append((cos[0], cos[1], err))
    lcos = np.asarray(_cos(tq4_logits, dense_logits))
    top1 = float(np.mean(np.argmax(tq4_logits, -1) == np.argmax(dense_logits, -1)))
    return dict(cfg=cfg, impl=impl, layers=rows, logits_cos=float(lcos.mean()),
                logits_cos_min=float(lcos.min()), logits_err=_rel(tq4_logits, dense_logits),
                top1=top1, dense_bytes=dense.nbytes, tq4_bytes=tq4.nbytes, iso=iso, dense=dense,
                queries=queries)


def against_originals(res: dict[str, Any]) -> list[str]:
    """Run turboquant-vllm's kernels on the isolated TQ4 cache of every layer and return one
    line of differences per layer (needs a CUDA GPU; see :func:`load_originals`)."""
    from .interop import paged_cache_to_torch, tq4_cache_to_torch, to_torch

    o = load_originals()
    torch, iso, dense, cfg = o.torch, res["iso"], res["dense"], res["cfg"]
    rot = iso.spec.rotation
    rot_t = torch.from_numpy(np.array(rot)).cuda()
    even, odd = rot_t.T[:, 0::2].contiguous(), rot_t.T[:, 1::2].contiguous()
    kc, kb = iso.spec.codebook("k")
    cent_t = torch.from_numpy(np.array(kc)).cuda()
    same_cb = iso.spec.k_bits == iso.spec.v_bits
    lines = []
    for i, (kp, kn, vp, vn) in enumerate(tq4_cache_to_torch(iso)):
        b, h, s, _ = kp.shape
        k = to_torch(jnp.swapaxes(dense.k[i], 1, 2).reshape(b * h, s, -1))  # [B*H, S, D]
        pk, nk = o.tq4_compress(k.transpose(0, 1).contiguous(), even, odd,
                                torch.from_numpy(np.array(kb)).cuda())
        mine = kp.reshape(b * h, s, -1).transpose(0, 1)
        code_diff = float((pk != mine).float().mean())
        norm_diff = float((nk.reshape(s, b * h) - kn.reshape(b * h, s).T).abs().max())
        line = f"layer {i}: tq4_compress code bytes differing {code_diff:.2e}, norms max " \
               f"diff {norm_diff:.2e}"
        q = res["queries"][i]  # [B, T, Hq, D] fp16
        if same_cb:
            q_t = to_torch(jnp.swapaxes(q, 1, 2))
            theirs = o.triton_flash_attention_tq4_kv(q_t.contiguous(), kp, kn, vp, vn, cent_t,
                                                     rot_t, None, True)
            ours = flash_attention_tq4_kv(jnp.swapaxes(q, 1, 2), iso.k_codes[i], iso.k_norms[i],
                                          iso.v_codes[i], iso.v_norms[i], kc, rot, None, True)
            line += f"; flash_attention_tq4_kv max |diff| {_maxdiff(ours, theirs):.2e}"
            bs, hq = 16, q.shape[2]
            nb = -(-s // bs)
            cache = jnp.zeros((b * nb, bs, paged_layout(h, cfg.head_dim).row_bytes), jnp.uint8)
            slots = (jnp.arange(b)[:, None] * nb * bs + jnp.arange(s)[None, :]).reshape(-1)
            kv = lambda x: x[i].reshape(b * s, h, -1)  # noqa: E731
            cache = paged_write(cache, kv(dense.k), kv(dense.v), slots.astype(jnp.int32), rot,
                                kb, iso.spec.codebook("v")[1])
            table = jnp.arange(b * nb, dtype=jnp.int32).reshape(b, nb)
            lens = jnp.full((b,), s, jnp.int32)
            ours = paged_decode(q[:, -1], cache, table, lens, kc, rot, num_kv_heads=h,
                                head_dim=cfg.head_dim, block_size=bs,
                                v_centroids=iso.spec.codebook("v")[0])
            theirs = o.fused_paged_tq4_decode(
                to_torch(q[:, -1]).contiguous(), paged_cache_to_torch(cache, h, cfg.head_dim),
                to_torch(table), to_torch(lens), cent_t, rot_t, h, cfg.head_dim, bs)
            line += f"; paged decode (H_Q={hq}) max |diff| {_maxdiff(ours, theirs):.2e}"
        else:
            line += "; attention skipped (the originals take one codebook for K and V)"
        lines.append(line)
    return lines


def _maxdiff(ours: Any, theirs: Any) -> float:
    """max |ours - theirs| of a JAX array and a torch tensor, in float32 on the host."""
    return float(np.max(np.abs(np.asarray(ours, np.float32) -
                               theirs.float().cpu().numpy())))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 pass, 1 a threshold missed, 2 bad usage)."""
    ap = _parser()
    a = ap.parse_args(argv)
    _check_args(ap, a)
    if a.against_originals:
        if not on_gpu():
            ap.error("--against-originals needs a CUDA GPU (JAX sees none)")
        try:
            load_originals()
        except ImportError as e:
            ap.error(f"--against-originals needs turboquant-vllm, torch and triton: {e}")
    try:
        res = run(a)
    except (ValueError, ImportError) as e:
        ap.error(str(e))
    cfg = res["cfg"]
    print(f"tq4jax.verify: {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, "
          f"D={cfg.head_dim}, {'weights ' + a.weights if a.weights else 'random weights'}; batch "
          f"{a.batch} x {a.prompt_tokens} prompt tokens; K/V {a.k_bits}/{a.v_bits}-bit codebooks; "
          f"impl={res['impl']} on {jax.default_backend()}")
    print("layer  K cosine  V cosine  attention rel. L2 error (layer's queries, its K/V "
          "compressed alone)")
    for i, (kc, vc, err) in enumerate(res["layers"]):
        print(f"{i:5d}  {kc:8.5f}  {vc:8.5f}  {err:.5f}")
    print(f"logits (TQ4 cache end to end vs dense, {a.batch * a.prompt_tokens} positions): cosine "
          f"mean {res['logits_cos']:.5f} min {res['logits_cos_min']:.5f}, rel. L2 error "
          f"{res['logits_err']:.5f}; top-1 agreement {res['top1']:.4f}")
    print(f"cache bytes: dense fp16 {res['dense_bytes']}, TQ4 {res['tq4_bytes']} "
          f"({res['dense_bytes'] / res['tq4_bytes']:.2f}x smaller)")
    if a.against_originals:
        print("against the originals (turboquant-vllm kernels on the same caches):")
        for line in against_originals(res):
            print("  " + line)
    kv_min = min(min(k, v) for k, v, _ in res["layers"])
    attn_max = max(e for _, _, e in res["layers"])
    checks = [("K/V cosine", kv_min, ">=", a.min_kv_cos), ("attention error", attn_max, "<=",
              a.max_attn_err), ("logits cosine", res["logits_cos"], ">=", a.min_logits_cos),
              ("top-1 agreement", res["top1"], ">=", a.min_top1)]
    failed = [c for c in checks if not (c[1] >= c[3] if c[2] == ">=" else c[1] <= c[3])]
    for name, value, op, limit in checks:
        ok = "FAIL" if (name, value, op, limit) in failed else "ok"
        print(f"{ok:4s} {name} {value:.5f} (needs {op} {limit})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
