"""Sampling from a language model with an inference cache: one loop shared by MambaLM and JambaLM.

Generation is prefill + decode: the prompt runs through the model in parallel once (filling the cache: Mamba's
conv/ssm states, attention's keys and values), then each new token is one `step` that reads and advances the
cache. A batch of prompts of different lengths is left-padded, with an attention_mask (1 = token, 0 = pad) that
prefill reads and the cache keeps (lm.py); every new token is real. A model plugs in with three methods:
    new_cache(batch)           the state before the first token
    prefill(prompt_ids, cache, attention_mask)
                               logits (batch, vocab) for the token after the prompt; fills the cache
    step(token, cache)         logits (batch, vocab) for the token after `token`; advances the cache by one
"""

import torch

__all__ = ["sample_next", "GenerationMixin"]


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """logits (batch, vocab) -> token ids (batch,). temperature 0 = argmax; top_k keeps the k largest logits."""
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

        temperature 0 is greedy (argmax); top_k samples among the k most likely tokens; seed fixes the sampling.
        attention_mask (batch, L): 0 at the left pads of prompts shorter than L, as in HF's generate; the output
        keeps the pads, and a row's new tokens are those its prompt alone would get.
        """
        if temperature < 0 or (top_k is not None and top_k < 1) or max_new_tokens < 0:
            raise ValueError("need temperature >= 0, top_k None or >= 1, max_new_tokens >= 0")
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
