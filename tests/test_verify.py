"""``python -m tq4jax.verify``: the report, its exit codes (0 pass, 1 a threshold missed, 2 a bad
flag) and the CPU refusal of ``--against-originals``."""

import pytest

from conftest import ON_GPU
from tq4jax import verify

# ----------------------------------------------------------------------------------------------
# python -m tq4jax.verify
# ----------------------------------------------------------------------------------------------

TINY = ["--layers", "1", "--dim", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
        "--ffn-dim", "64", "--vocab", "64", "--batch", "1", "--prompt-tokens", "8"]


def test_verify_cli_exit_codes(capsys, tmp_path):
    # random weights: 4-bit K/V keep cosine ~0.995, logits cosine ~0.998; top-1 over 8
    # positions of a random (flat-logits) model is noisy, so its threshold is loose here
    assert verify.main(TINY + ["--min-top1", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "K cosine" in out and "top-1 agreement" in out and "cache bytes: dense fp16 1024" in out
    from tq4jax import model
    cfg = model.LlamaConfig(64, 64, 1, 2, 1, 32, 64)
    model.save_params(str(tmp_path / "w.npz"), model.init_params(cfg, 3))
    assert verify.main(["--weights", str(tmp_path), "--head-dim", "32", "--batch", "1",
                        "--prompt-tokens", "8", "--min-kv-cos", "0.9999"]) == 1
    out = capsys.readouterr().out
    assert f"weights {tmp_path}" in out and "1 layers, 2/1 heads, D=32" in out
    assert "FAIL K/V cosine" in out and "ok   logits cosine" in out


@pytest.mark.parametrize("argv,msg", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--heads", "3"], "--heads (3) must be a multiple of --kv-heads (2)"),
    (["--min-top1", "2"], "--min-top1 must be in [0, 1]"),
    (["--weights", "/nonexistent/w.npz"], "does not exist"),
    (["--k-bits", "5"], "invalid choice"),
])
def test_verify_cli_bad_flags(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        verify.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1  # one line


@pytest.mark.skipif(ON_GPU, reason="checks the CPU refusal")
def test_verify_against_originals_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        verify.main(TINY + ["--against-originals"])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
