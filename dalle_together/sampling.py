"""Autoregressive generation of image codes: KV cache, temperature, top-k/top-p, guidance.

The loop (min-dalle style): prefill the caption once, then draw one image code per step and feed it
back. With ``use_cache=False`` every step recomputes the whole sequence instead: the slow reference
path, which must draw exactly the same codes for a given seed.

Classifier-free guidance runs the conditional and the empty caption as one batch of ``2B`` rows and
mixes their logits ``uncond + s * (cond - uncond)``. Plain guidance pushed rare object codes onto the
background on ``shapes`` (see notes/shapes-calibration.md); we therefore keep only the codes to which
the conditional model itself gives at least ``guidance_min_prob``, which made guidance roughly
neutral there.

Logits are turned into probabilities in float64, so that the cached and the uncached path, whose
logits differ by float32 rounding only, agree on the tokens they draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dalle_together.model import DalleTransformer, empty_captions


def guided_logits(cond: Tensor, uncond: Tensor, scale: float, min_prob: float) -> Tensor:
    """Classifier-free guidance of ``(B, V)`` logits, restricted to plausible conditional tokens.

    Returns ``uncond + scale * (cond - uncond)`` where the conditional probability (temperature 1)
    is at least ``min_prob``, ``-inf`` elsewhere; the conditional argmax is always kept.
    """
    cond, uncond = cond.double(), uncond.double()
    guided = uncond + scale * (cond - uncond)  # (B, V)
    if min_prob > 0:
        probs = cond.softmax(-1)  # (B, V)
        keep = probs >= min_prob
        keep.scatter_(-1, probs.argmax(-1, keepdim=True), True)  # never filter everything out
        guided = guided.masked_fill(~keep, float("-inf"))
    return guided


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to ``-inf`` the logits (B, V) outside the ``top_k`` largest and outside the nucleus: the
    smallest set of most likely tokens whose probability reaches ``top_p``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (B, V) mass of the more likely tokens
        remove_sorted = mass_before >= top_p  # the most likely token is always kept
        remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One token per row of float64 ``logits`` (B, V): argmax at temperature 0, else a multinomial
    draw on ``generator`` (on the generator's device, so a CPU generator works for a GPU model)."""
    if temperature == 0:
        return logits.argmax(-1)  # (B,)
    probs = (logits / temperature).softmax(-1)  # (B, V) float64
    device = generator.device if generator is not None else probs.device
    tokens = torch.multinomial(probs.to(device), 1, generator=generator)  # (B, 1)
    return tokens[:, 0].to(logits.device)  # (B,)


@torch.no_grad()
def sample_image_tokens(
    model: DalleTransformer,
    text: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    guidance_min_prob: float = 0.01,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Draw ``(B, image_len)`` image codes for the captions ``text`` (B, text_len).

    :param temperature: divides the (guided) logits; ``0`` means greedy argmax
    :param top_k: keep only the ``top_k`` most likely codes at each step
    :param top_p: keep only the nucleus of probability mass ``top_p`` at each step
    :param guidance_scale: classifier-free guidance scale; ``1.0`` turns guidance off (the empty
        caption is then not run at all)
    :param guidance_min_prob: with guidance, only codes to which the conditional model gives at
        least this probability can be drawn (``0`` disables the filter)
    :param generator: source of randomness; the same seed gives the same codes
    :param use_cache: decode incrementally with a KV cache; ``False`` recomputes the whole sequence
        for every code (the reference path: same codes, much slower)
    """
    cfg = model.cfg
    if text.dim() != 2 or text.shape[1] != cfg.text_len:
        raise ValueError(f"expected captions of shape (B, {cfg.text_len}), got {tuple(text.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    batch = text.shape[0]
    guided = guidance_scale != 1.0
    if guided:  # rows [0, B) conditional, [B, 2B) unconditional
        text = torch.cat([text, empty_captions(batch, cfg.text_len, text.device)], 0)  # (2B, text_len)

    def next_token(image_logits: Tensor) -> Tensor:
        """The next code (B,) from the last position's image logits (B or 2B, Vi)."""
        if guided:
            logits = guided_logits(
                image_logits[:batch], image_logits[batch:], guidance_scale, guidance_min_prob
            )
        else:
            logits = image_logits.double()  # (B, Vi)
        logits = filter_logits(logits, top_k=top_k, top_p=top_p)
        return _draw(logits, temperature, generator)

    was_training = model.training
    model.eval()
    try:
        image = text.new_zeros((text.shape[0], cfg.image_len))  # (B or 2B, image_len)
        if use_cache:
            cache = model.new_cache()
            image_logits = model.forward_with_cache(text, cache, 0).image[:, -1]  # (B or 2B, Vi)
        for k in range(cfg.image_len):
            if not use_cache:
                image_logits = model(text, image[:, :k]).image[:, -1]  # recompute everything
            token = next_token(image_logits)  # (B,)
            image[:, k] = token.repeat(2) if guided else token
            if use_cache and k + 1 < cfg.image_len:
                image_logits = model.forward_with_cache(image[:, k : k + 1], cache, cfg.text_len + k).image[
                    :, -1
                ]
    finally:
        model.train(was_training)
    return image[:batch]  # (B, image_len)
