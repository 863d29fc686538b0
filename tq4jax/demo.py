"""``python -m tq4jax.demo``: compress a model-sized KV cache, then generate with the example
Llama-style model on a dense and on a compressed cache, and report what it costs.

Part 1 (codec). Default shape: 32 layers x 8 KV heads x D=128 x 4096 tokens (a Llama-3-8B-like
cache) on a GPU; 4 layers x 1024 tokens on a CPU. Prints bytes before and after,
reconstruction cosine, and the attention error of the compressed cache.

Part 2 (generation, :mod:`tq4jax.model`, random weights from a seed). Generates N tokens with
the dense fp16 cache and with the TQ4 cache, then prints cache bytes, per-layer K/V cosine,
logits cosine and top-1 agreement (teacher-forced on the dense run's tokens) and tokens/s.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import codebook, codec
from . import model as llama
from .backend import on_gpu, resolve_impl
from .layout import bytes_per_token_head


#: Mean squared error of a unit vector by bits (TurboQuant paper; bench/codec.py measures it).
_MSE = {2: 0.117, 3: 0.03, 4: 0.009}


def _cos(bits: int) -> str:
    """Expected cosine between a unit vector and its reconstruction: sqrt(1 - MSE)."""
    return f"{np.sqrt(1 - _MSE[bits]):.3f}"


def synthetic_kv(key: jax.Array, layers: int, heads: int, tokens: int, dim: int):
    """Keys with a few outlier channels (as real models have) and Gaussian values, fp16."""
    kk, kv, ks = jax.random.split(key, 3)
    scale = 1.0 + 9.0 * (jax.random.uniform(ks, (layers, heads, 1, dim)) > 0.95)
    k = jax.random.normal(kk, (layers, heads, tokens, dim)) * scale
    v = jax.random.normal(kv, (layers, heads, tokens, dim))
    return k.astype(jnp.float16), v.astype(jnp.float16)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain float32 GQA attention, q [Hq, Sq, D], k/v [Hkv, Sk, D]."""
    group = q.shape[0] // k.shape[0]
    k = jnp.repeat(k.astype(jnp.float32), group, axis=0)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=0)
    s = jnp.einsum("hqd,hkd->hqk", q.astype(jnp.float32), k) / np.sqrt(q.shape[-1])
    return jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(s, axis=-1), v)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``demo: error: ...``) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    gpu = on_gpu()
    ap = _Parser(prog="python -m tq4jax.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=_positive, default=32 if gpu else 4,
                    help="layers of the synthetic cache (default 32 on a GPU, 4 on a CPU)")
    ap.add_argument("--kv-heads", type=_positive, default=8, help="KV heads (default 8)")
    ap.add_argument("--q-heads", type=_positive, default=32,
                    help="query heads, a multiple of --kv-heads (default 32)")
    ap.add_argument("--tokens", type=_positive, default=4096 if gpu else 1024,
                    help="tokens per layer and head (default 4096 on a GPU, 1024 on a CPU)")
    ap.add_argument("--head-dim", type=_positive, default=128,
                    help="head dimension, even, 16-512 (default 128)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4),
                    help="Lloyd-Max codebook bits (default 4); codes are always stored as 4-bit "
                         "nibbles, so fewer bits lower accuracy, not the cache size")
    ap.add_argument("--impl", default="auto", choices=["auto", "pallas", "triton", "reference"],
                    help="which implementation runs the ops (default auto: the kernels on a GPU, "
                         "the pure-jnp reference elsewhere)")
    ap.add_argument("--seed", type=int, default=0, help="data, rotation and weight seed")
    ap.add_argument("--gen-tokens", type=int, default=64 if gpu else 16,
                    help="tokens to generate in part 2 (0: skip it)")
    ap.add_argument("--prompt-tokens", type=_positive, default=256 if gpu else 24,
                    help="prompt tokens of part 2 (default 256 on a GPU, 24 on a CPU)")
    a = ap.parse_args(argv)
    if a.q_heads % a.kv_heads or a.head_dim % 2 or not 16 <= a.head_dim <= 512:
        ap.error("--q-heads must be a multiple of --kv-heads and --head-dim even in [16, 512]")

    impl = resolve_impl(a.impl)
    print(f"tq4jax demo on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"impl={impl}, jax {jax.__version__}")
    print(f"cache: {a.layers} layers x {a.kv_heads} KV heads x {a.tokens} tokens x D={a.head_dim},"
          f" {a.bits}-bit codebook")
    centroids, boundaries = codebook.lloyd_max(a.head_dim, a.bits)
    rotation = jnp.asarray(codebook.haar_rotation(a.head_dim, seed=a.seed))
    key = jax.random.PRNGKey(a.seed)
    k, v = synthetic_kv(key, a.layers, a.kv_heads, a.tokens, a.head_dim)

    compress = jax.jit(lambda x: codec.compress(x, rotation, boundaries, impl=impl))
    t0 = time.perf_counter()
    kp, kn = jax.block_until_ready(compress(k))
    vp, vn = jax.block_until_ready(compress(v))
    t1 = time.perf_counter()
    dense = k.nbytes + v.nbytes
    packed = kp.nbytes + kn.nbytes + vp.nbytes + vn.nbytes
    nibble = "" if a.bits == 4 else f" (a {a.bits}-bit codebook still stores 4-bit nibbles)"
    print(f"bytes: fp16 {dense / 2**20:.1f} MiB -> TQ4 {packed / 2**20:.1f} MiB "
          f"({dense / packed:.2f}x; {bytes_per_token_head(a.head_dim)} B per token per head "
          f"vs {2 * a.head_dim}){nibble}; compress incl. compile {t1 - t0:.2f} s")

    deq = jax.jit(lambda p, n: codec.dequantize(p, n, centroids, rotation, jnp.float32, impl=impl))
    k_hat, v_hat = deq(kp, kn), deq(vp, vn)
    print(f"reconstruction cosine: K mean {float(jnp.mean(cosine(k, k_hat))):.4f} "
          f"min {float(jnp.min(cosine(k, k_hat))):.4f}; V mean "
          f"{float(jnp.mean(cosine(v, v_hat))):.4f} min {float(jnp.min(cosine(v, v_hat))):.4f}")

    q = jax.random.normal(jax.random.fold_in(key, 1), (a.q_heads, 4, a.head_dim), jnp.float16)
    errs = []
    for layer in range(a.layers):
        ref = attention(q, k[layer], v[layer])
        out = attention(q, k_hat[layer], v_hat[layer])
        errs.append(float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)))
    print(f"attention over the compressed cache ({a.q_heads} query heads, 4 queries per layer): "
          f"relative L2 error mean {np.mean(errs):.4f}, max {np.max(errs):.4f}")
    print(f"  what these mean: a {a.bits}-bit TurboQuant vector keeps cosine ~{_cos(a.bits)} with "
          f"the original (squared error {_MSE[a.bits]} for a unit vector), whatever its "
          f"norm. On random keys and values the attention output is an average of random "
          f"vectors, small beside each of them, so the K and V errors do not shrink relative to "
          f"it: expect a relative error of about sqrt(2 MSE) = {np.sqrt(2 * _MSE[a.bits]):.2f} "
          f"to twice that. Real models attend to few keys; part 2 measures what reaches the "
          f"logits.")
    if a.gen_tokens > 0:
        generation_report(a, gpu)


def generation_report(a: argparse.Namespace, gpu: bool) -> dict[str, float]:
    """Part 2: generate with both caches; returns the printed figures."""
    cfg = (llama.LlamaConfig(vocab_size=2048, dim=1024, n_layers=8, n_heads=8, n_kv_heads=2,
                             head_dim=128, ffn_dim=2048, dtype="float16") if gpu
           else llama.LlamaConfig())
    params = llama.init_params(cfg, a.seed)
    b, t0, n = 4, a.prompt_tokens, a.gen_tokens
    rng = np.random.default_rng(a.seed)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t0)), jnp.int32)
    lens = jnp.asarray([t0] + [int(x) for x in rng.integers(t0 // 2, t0 + 1, b - 1)], jnp.int32)
    cap = t0 + n
    print(f"\ngeneration: Llama-style model {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} "
          f"heads, D={cfg.head_dim}, random weights; batch {b}, ragged prompts up to {t0} tokens, "
          f"{n} new tokens, greedy")
    runs = {}
    for kind in ("dense", "tq4"):
        gen = lambda: llama.generate(params, prompt, lens, llama.make_cache(  # noqa: E731
            cfg, b, cap, kind, k_bits=a.bits, v_bits=a.bits), cfg=cfg, n_new=n)
        jax.block_until_ready(gen())  # compile
        t_start = time.perf_counter()
        toks, logits, cache = jax.block_until_ready(gen())
        runs[kind] = (toks, logits, cache, b * n / (time.perf_counter() - t_start))
    dense, tq4 = runs["dense"][2], runs["tq4"][2]
    print(f"cache bytes (capacity {cap}): dense fp16 {dense.nbytes / 2**20:.2f} MiB, TQ4 "
          f"{tq4.nbytes / 2**20:.2f} MiB ({dense.nbytes / tq4.nbytes:.2f}x smaller)")
    # teacher-forced: both caches see the dense run's tokens
    seq = jnp.concatenate([prompt, jnp.zeros((b, n), jnp.int32)], 1)
    seq = jax.vmap(lambda s, t, ln: jax.lax.dynamic_update_slice(s, t, (ln,)))(
        seq, runs["dense"][0], lens)
    fwd = jax.jit(llama.forward, static_argnames="cfg")
    tf = {kind: fwd(params, seq, llama.make_cache(cfg, b, cap, kind), cfg=cfg,
                    new_lengths=lens + n) for kind in ("dense", "tq4")}
    lg = {kind: r[0] for kind, r in tf.items()}
    dense_tf, tq4_tf = tf["dense"][1], tf["tq4"][1]
    kv_cos = []
    for layer in range(cfg.n_layers):
        valid = jnp.arange(cap)[None, :] < dense_tf.lengths[layer][:, None]  # [B, C]
        pair = []
        for codes, norms, which, ref in ((tq4_tf.k_codes, tq4_tf.k_norms, "k", dense_tf.k),
                                         (tq4_tf.v_codes, tq4_tf.v_norms, "v", dense_tf.v)):
            hat = codec.dequantize(codes[layer], norms[layer], tq4_tf.spec.codebook(which)[0],
                                   tq4_tf.spec.rotation, jnp.float32)  # [B, H, C, D]
            c = cosine(jnp.swapaxes(ref[layer], 1, 2), hat)  # [B, H, C]
            pair.append(float(jnp.sum(jnp.where(valid[:, None], c, 0)) /
                              (jnp.sum(valid) * c.shape[1])))
        kv_cos.append(pair)
    print("per-layer K/V cosine (TQ4 cache vs dense cache, same tokens): " + ", ".join(
        f"L{i} {k:.4f}/{v:.4f}" for i, (k, v) in enumerate(kv_cos)))
    at = lens[:, None] - 1 + jnp.arange(n)[None, :]  # positions that predict new tokens
    pick = lambda x: jnp.take_along_axis(x, at[:, :, None], axis=1)  # noqa: E731
    ld, lt = pick(lg["dense"]), pick(lg["tq4"])
    cos = cosine(ld, lt)
    top1 = float(jnp.mean(jnp.argmax(ld, -1) == jnp.argmax(lt, -1)))
    print(f"logits (teacher-forced, {b * n} positions): cosine mean {float(jnp.mean(cos)):.4f} "
          f"min {float(jnp.min(cos)):.4f}; top-1 agreement {top1:.3f}")
    print(f"tokens/s (prefill + {n} decode steps, batch {b}): dense {runs['dense'][3]:.1f}, "
          f"TQ4 {runs['tq4'][3]:.1f}")
    return {"logits_cos_min": float(jnp.min(cos)), "top1": top1,
            "bytes_ratio": dense.nbytes / tq4.nbytes}


if __name__ == "__main__":
    main()
