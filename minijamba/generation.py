"""Sampling from a language model with an inference cache: one loop shared by MambaLM and JambaLM.

Generation is prefill + decode: the prompt runs through the model in parallel once (filling the cache: Mamba's
conv/ssm states, attention's keys and values), then each new token is one `step` that reads and advances the
cache. A batch of prompts of different lengths is left-padded, with an attention_mask (1 = token, 0 = pad) that
prefill reads and the cache keeps (lm.py); every new token is real. A model plugs in with three methods:
    new_cache(batch)           the state before the first token
    prefill(prompt_ids, cache, attention_mask)
                               logits (batch, vocab) for the token after the prompt; fills the cache
    step(token, cache)         logits (batch, vocab) for the token after `token`; advances the cache by one

Every argument is checked before any work, and a bad one is a ValueError naming it; the CLIs share the checks
(check_seed, check_temperature, check_max_new_tokens take the name to report: sample.py's --seed, TrainConfig.seed).
"""

import math
from numbers import Integral, Real

import torch

from .checks import positive_int

__all__ = [
    "MAX_NEW_TOKENS",
    "check_seed",
    "check_temperature",
    "check_max_new_tokens",
    "sample_next",
    "GenerationMixin",
]

# A sanity bound, not a memory one: each new token is one Python-level step, and the attention layers' KV cache grows
# by one position per token, so a million is far past any context this package trains on, yet a mistyped 10**12
# would run for days and end out of memory instead of failing at once.
MAX_NEW_TOKENS = 1_000_000


def check_seed(name, value, none_ok=False):
    """Raise ValueError unless value is an int in [0, 2**64), what torch's manual_seed takes (or None, when none_ok);
    bools are refused. Returns value."""
    if none_ok and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < 2**64:
        raise ValueError(f"{name} must be an integer in [0, 2**64) (what torch's manual_seed takes), got {value!r}")
    return value


def check_temperature(name, value):
    """Raise ValueError unless value is a finite real >= 0 (bools refused): nan would make every probability nan."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0 (0 = greedy), got {value!r}")
    return value


def check_max_new_tokens(name, value):
    """Raise ValueError unless value is an int in [0, MAX_NEW_TOKENS] (bools refused). Returns value."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= MAX_NEW_TOKENS:
        raise ValueError(f"{name} must be an integer in [0, {MAX_NEW_TOKENS:_}] (MAX_NEW_TOKENS), got {value!r}")
    return value


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """logits (batch, vocab) -> token ids (batch,). temperature 0 = argmax; top_k keeps the k largest logits."""
    check_temperature("temperature", temperature)
    positive_int("top_k", top_k, none_ok=True)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (batch, vocab)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class GenerationMixin:
    """`generate` for any model with new_cache / prefill / step (see the module docstring)."""

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, seed=None, attention_mask=None):
        """prompt_ids (batch, L) -> (batch, L + max_new_tokens): parallel prefill, then one step per new token.

        temperature: finite and >= 0, 0 is greedy (argmax); top_k: an int >= 1, sample among the k most likely
        tokens; max_new_tokens: at most MAX_NEW_TOKENS; seed: an int in [0, 2**64), fixes the sampling.
        attention_mask (batch, L): 0 at the left pads of prompts shorter than L, as in HF's generate; the output
        keeps the pads, and a row's new tokens are those its prompt alone would get.
        """
        check_temperature("temperature", temperature)
        positive_int("top_k", top_k, none_ok=True)
        check_max_new_tokens("max_new_tokens", max_new_tokens)
        check_seed("seed", seed, none_ok=True)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
        cache = self.new_cache(prompt_ids.shape[0])
        logits = self.prefill(prompt_ids, cache, attention_mask)  # (batch, vocab)
        tokens = [prompt_ids]
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, generator)  # (batch,)
            tokens.append(token[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(token, cache)
        return torch.cat(tokens, dim=1)
