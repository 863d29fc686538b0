"""``python -m tq4jax.demo``: compress a model-sized KV cache and report what it costs.

Default shape: 32 layers x 8 KV heads x D=128 x 4096 tokens (a Llama-3-8B-like cache) on a GPU;
scaled down to 4 layers x 1024 tokens on a CPU so it finishes in seconds. Prints bytes before
and after, reconstruction cosine, and the attention error of the compressed cache.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import codebook, codec
from ._config import on_gpu, resolve_impl
from .layout import bytes_per_token_head


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


def main(argv: list[str] | None = None) -> None:
    gpu = on_gpu()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32 if gpu else 4)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096 if gpu else 1024)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--impl", default="auto", choices=["auto", "pallas", "reference"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

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
    print(f"bytes: fp16 {dense / 2**20:.1f} MiB -> TQ{a.bits} {packed / 2**20:.1f} MiB "
          f"({dense / packed:.2f}x; {bytes_per_token_head(a.head_dim)} B per token per head "
          f"vs {2 * a.head_dim}); compress incl. compile {t1 - t0:.2f} s")

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


if __name__ == "__main__":
    main()
