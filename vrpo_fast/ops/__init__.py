"""Public surface of vrpo-fast's fused ops.

Each op has one entry here, a plain-PyTorch ``*_reference`` twin it is tested against, and a
dispatch: CUDA tensors -> Triton kernel, CPU tensors -> C++ extension or chunked PyTorch.
Every op also takes ``backend="auto" | "triton" | "torch"`` to force a path. Underneath, each is a
PyTorch custom op (``torch.ops.vrpo_fast.*``, with a fake kernel and, where differentiable, an autograd
formula), so ``torch.compile(fullgraph=True)`` traces the public functions without a graph break.
"""
from .gae import gae, gae_reference
from .linear_stats import linear_logprobs_entropy, linear_logprobs_entropy_reference
from .sampling import keyed_sample, keyed_sample_reference
from .sequence import masked_mean, sequence_perplexity
from .token_stats import token_logprobs_entropy, token_logprobs_entropy_reference
from .vib import vib_sample_kl, vib_sample_kl_reference

__all__ = [
    "keyed_sample",
    "keyed_sample_reference",
    "token_logprobs_entropy",
    "token_logprobs_entropy_reference",
    "linear_logprobs_entropy",
    "linear_logprobs_entropy_reference",
    "sequence_perplexity",
    "masked_mean",
    "gae",
    "gae_reference",
    "vib_sample_kl",
    "vib_sample_kl_reference",
]
