"""The generalized causal attention mask of CausalFusion (paper appendix A, SPEC 3.5).

Every token carries a kind (text, clean image, noisy image, padding) and, for image tokens, the
index of its AR group. The mask follows from those attributes alone, so one builder serves
text-first (T2I) and image-first (caption) layouts, any condition length and any group sizes.
"""

from __future__ import annotations

import torch

PAD, TEXT, CLEAN, NOISY, CODE = 0, 1, 2, 3, 4  # CODE: a fused token of discrete image codes (causal)
# the group of text tokens that form a condition prefix (`<bos> caption <boi>`, class tokens): causal like
# all text, or, in a model with a bidirectional prompt, seeing each other whole
PROMPT = -2


def generalized_causal_mask(
    kind: torch.Tensor, group: torch.Tensor, text_sees_noisy: bool = False, bidirectional_prompt: bool = False
) -> torch.Tensor:
    """kind, group (B, L) -> mask (B, L, L); mask[b, q, k] is True where query q may attend to key k.

    Rules:
      * text / condition tokens are causal: a text key is visible to every later token; with
        `bidirectional_prompt` the tokens of a condition prefix (group PROMPT) also see each other whole,
        so that the first words of a prompt already know the relation stated after them;
      * a clean image token of group j sees the earlier text and the clean tokens of groups <= j;
      * a noisy token of group s sees the earlier text, the clean tokens of groups < s and all of
        noisy group s (bidirectional), never its own clean copy nor any later group;
      * text after the image sees the clean image tokens, and the noisy ones only when
        `text_sees_noisy` (the Transfusion baseline, which has no clean copy);
      * discrete image tokens (CODE, Token-Shuffle) are plain next-token tokens, causal like text;
      * padding is seen by nobody and sees only itself, so no row of the mask is empty.
    """
    n = kind.shape[1]
    idx = torch.arange(n, device=kind.device)
    causal = (idx[:, None] >= idx[None, :])[None]  # (1, L, L): key at or before query
    qk, kk = kind[:, :, None], kind[:, None, :]
    qg, kg = group[:, :, None], group[:, None, :]
    q_text, q_clean, q_noisy = (qk == TEXT) | (qk == CODE), qk == CLEAN, qk == NOISY
    sees_text = ((kk == TEXT) | (kk == CODE)) & causal & (qk != PAD)
    if bidirectional_prompt:
        sees_text = sees_text | ((qk == TEXT) & (kk == TEXT) & (qg == PROMPT) & (kg == PROMPT))
    sees_clean = (kk == CLEAN) & ((q_text & causal) | (q_clean & (kg <= qg)) | (q_noisy & (kg < qg)))
    sees_noisy = (kk == NOISY) & ((q_noisy & (kg == qg)) | (q_text & causal & text_sees_noisy))
    eye = torch.eye(n, dtype=torch.bool, device=kind.device)[None]
    return sees_text | sees_clean | sees_noisy | eye


def layout(
    cond_len: int,
    group_sizes: list[int],
    image_first: bool = False,
    text_len: int = 0,
    clean_last_group: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kind, group (1, L) of one CausalFusion training sequence, for tests and inspection.

    Text-first (T2I): [cond_len text][clean groups 1..S-1][noisy groups 1..S].
    Image-first (caption): [cond_len text][clean 1..S][noisy 1..S][text_len text]; the clean
    copy of the last group exists only so the caption can read the whole image.
    """
    s = len(group_sizes)
    clean_groups = s if (image_first or clean_last_group) else s - 1
    kind = [TEXT] * cond_len
    group = [-1] * cond_len
    for g in range(clean_groups):
        kind += [CLEAN] * group_sizes[g]
        group += [g] * group_sizes[g]
    for g in range(s):
        kind += [NOISY] * group_sizes[g]
        group += [g] * group_sizes[g]
    if image_first:
        kind += [TEXT] * text_len
        group += [-1] * text_len
    return torch.tensor([kind]), torch.tensor([group])
