"""Hand-written kernels for the single-device hot path, each with a pure-PyTorch reference.

- `chunked_ce.chunked_cross_entropy` fuses the LM head with the cross-entropy loss chunk by
  chunk of tokens, so the [tokens, vocab] fp32 logits of a whole batch never exist at once
  (plain PyTorch).
- `rmsnorm.fused_rms_norm`, `swiglu.fused_swiglu`, `rotary.fused_apply_rotary`: Triton
  forward and backward kernels for RMSNorm, SwiGLU's activation and rotary embedding,
  wrapped as torch.library custom ops (`torch.ops.plait.*`, opaque to torch.compile). Each
  has exactly the signature of its reference in plait.model (llama.rms_norm, mlp.swiglu,
  llama.apply_rotary) and matches it forward and backward (tests/test_kernels.py).
- `install.install_fused_kernels(model)` points every RMSNorm, SwiGLU and Attention of a
  model at the fused functions.
- `availability.triton_usable(device)` says whether the Triton kernels can run there.

The rule: CPU runs use the reference path; the fused kernels run on CUDA (or on the CPU
under the Triton interpreter, TRITON_INTERPRET=1, for tests). The Triton modules import
triton, an optional dependency: `install` imports them with this package only where triton
imports. Each fused function falls back to its reference wherever its kernels cannot run.
"""

from plait.kernels.availability import triton_usable
from plait.kernels.chunked_ce import chunked_cross_entropy
from plait.kernels.install import install_fused_kernels

__all__ = ["chunked_cross_entropy", "install_fused_kernels", "triton_usable"]
