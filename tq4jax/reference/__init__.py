"""The pure ``jax.numpy`` math of every op (float32 accumulation). Nothing here imports
Pallas: the public ops run this for ``impl="reference"``, and tests use it as the oracle the
kernels must match.

* :mod:`.codec`: compress, decompress, dequantize (LAYOUTS.md family A);
* :mod:`.attention`: softmax attention with GQA, masks and lengths; paged (family A) gather,
  decode and prefill;
* :mod:`.vllm`: vLLM TurboQuant slots (family B): store, dequantize, decode.

Functions take checked, normalized arguments (the op layer checks them).
"""
