"""Multi-device: the cache, the attention ops and paged decode inside jax.shard_map with KV
heads (query heads with them) or batch sharded over 4 devices == unsharded. Runs in a
subprocess on 4 forced CPU host devices, so the rest of the suite is untouched; on a multi-GPU
machine run the same script on GPUs with ``python3 tests/test_sharding.py`` (see __main__)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import os, numpy as np, jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    import tq4jax as tq
    n_dev = int(os.environ.get("TQ4_SHARD_DEVICES", "4"))  # 2 or 4
    assert len(jax.devices()) >= n_dev, jax.devices()
    print("devices", jax.devices()[:n_dev])
    mesh = jax.make_mesh((n_dev,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    b, hq, hkv, d, cap = 4, 8, 4, 64, 32
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float16)
    impl = "%(impl)s"

    def run(cache, q, k, v):
        cache = cache.update(0, k, v, impl=impl)
        return cache.attend(0, q, impl=impl), cache

    cache = tq.TQ4Cache.create(1, b, hkv, cap, d)
    q, k, v = arr(b, 5, hq, d), arr(b, 5, hkv, d), arr(b, 5, hkv, d)
    want, full = jax.jit(run)(cache, q, k, v)
    heads = tq.TQ4Cache(*(tuple(P(None, "x") for _ in range(1)) for _ in range(4)),
                        (P(),), cache.spec)
    for name, cs, ts in (
            ("heads", heads, P(None, None, "x")),
            ("batch", tq.TQ4Cache(*((P("x"),),) * 5, cache.spec), P("x"))):
        f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(cs, ts, ts, ts),
                                  out_specs=(ts, cs), check_vma=False))
        got, cache_s = f(cache, q, k, v)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        assert err < 2e-3, (name, err)
        assert np.array_equal(np.asarray(cache_s.k_codes[0]), np.asarray(full.k_codes[0])), name
        print(name, "ok", err)

    # paged decode with KV heads sharded: each device holds its heads' slice of every row
    hkv_p, bs = 4, 16
    lay = tq.paged_layout(hkv_p, d)
    cent, bnd = tq.lloyd_max(d, 4)
    rot = tq.haar_rotation(d)
    kv = arr(40, hkv_p, d)
    table = jnp.asarray(rng.permutation(6)[:6].reshape(2, 3), jnp.int32)
    slots = (table[np.arange(40) // 20, (np.arange(40) %% 20) // bs] * bs
             + (np.arange(40) %% 20) %% bs)
    slots = jnp.asarray(slots, jnp.int32)
    lens = jnp.asarray([20, 20], jnp.int32)
    qd = arr(2, 8, d)
    kw = dict(head_dim=d, block_size=bs, impl=impl)
    def dec(cache, q, n_heads):
        return tq.paged_decode(q, cache, table, lens, cent, rot, num_kv_heads=n_heads, **kw)
    caches, hp = [], hkv_p // n_dev
    for i in range(n_dev):  # per-device caches of hp KV heads each, stacked on a device axis
        c = jnp.zeros((6, bs, tq.paged_layout(hp, d).row_bytes), jnp.uint8)
        part = kv[:, i * hp:(i + 1) * hp]
        caches.append(tq.paged_write(c, part, part, slots, rot, bnd))
    whole = tq.paged_write(jnp.zeros((6, bs, lay.row_bytes), jnp.uint8), kv, kv, slots, rot, bnd)
    want = dec(whole, qd, hkv_p)
    stacked = jnp.concatenate(caches, axis=0)  # [n_dev * 6, bs, row]
    f = jax.jit(jax.shard_map(lambda c, q: dec(c, q, hp), mesh=mesh,
                              in_specs=(P("x"), P(None, "x")), out_specs=P(None, "x"),
                              check_vma=False))
    got = f(stacked, qd)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    assert err < 2e-3, ("paged", err)
    print("paged ok", err)
''')


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_shard_map_equals_unsharded(impl, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT % {"impl": impl})
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "heads ok" in r.stdout and "batch ok" in r.stdout and "paged ok" in r.stdout


if __name__ == "__main__":  # on a machine with >= 2 GPUs: the same checks on the GPUs
    n = os.environ.setdefault("TQ4_SHARD_DEVICES", "2")
    exec(compile(SCRIPT % {"impl": "pallas"}, "sharded", "exec"))
