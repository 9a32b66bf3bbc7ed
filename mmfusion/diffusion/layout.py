"""The joint objective's training batch laid out with whole-batch tensor operations.

`JointObjective.build` lays a batch out one sample at a time through `SequenceBuilder` and
`add_image`: a few dozen small tensor operations per sample, which on a small model cost as much of a
training step as the forward pass. This module makes the same batch in two passes:

1. per sample, only the random draws, from that sample's generator and in the order the per-sample
   path draws them (so the numbers are the same ones);
2. for the whole batch at once, everything else: token order, noising, targets, loss weights, the
   sequence layout, packing into rows.

The result equals the per-sample path's element by element (tests/diffusion/test_layout.py), so resume
and data-parallel equality hold whichever path built a batch. It covers continuous image tokens under
a text condition, the demo's and every CausalFusion / Transfusion text run's case; Token-Shuffle codes
and class conditions keep the per-sample path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.causal import (
    ar_loss_weights,
    diffusion_target,
    random_group_sizes,
    sample_ar_steps,
    sample_timesteps,
    token_order,
    training_order,
)
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.model.masks import CLEAN, NOISY, PAD, PROMPT, TEXT
from mmfusion.model.prompts import Prompts
from mmfusion.model.sequence import IGNORE, TokenBatch


@dataclass
class Draws:
    """What the random draws decided for a batch of B images of N tokens (K noisy copies each)."""

    prompts: list[list[int]]  # condition prefix of each sample: <bos> [caption] <boi>
    tails: list[list[int]]  # caption order: <eoi> caption <eos> after the image; [] for T2I
    sizes: list[list[int]]  # AR group sizes of each image
    scales: list[float]  # the image loss scale of each sample
    orders: torch.Tensor  # (B, N) generation order of the image tokens
    t: torch.Tensor  # (B, K, N) diffusion timestep of every noisy token
    noise: torch.Tensor  # (B, K, N, C)


class BatchLayout:
    """Lays out `JointObjective` training batches (see the module docstring). `bos`...`eoi` are the
    special token ids; `image_span` the rotary positions an image occupies; `clean_last_in_caption`
    whether a caption-order image keeps a clean copy of its last group for the caption to read."""

    def __init__(
        self,
        diffusion: DiffusionConfig,
        scheduler,  # noqa: ANN001
        grid: tuple[int, int],
        prompts: Prompts,
        ends: tuple[int, int],
        image_span: int,
        clean_last_in_caption: bool,
    ) -> None:
        self.cfg, self.scheduler, self.grid, self.prompts = diffusion, scheduler, grid, prompts
        self.eos, self.eoi = ends
        self.image_span, self.clean_last_in_caption = image_span, clean_last_in_caption
        self._group_weights: dict[tuple[int, int], torch.Tensor] = {}  # (S, N) -> weight of group s

    def draw(
        self,
        generators: list[torch.Generator],
        n_tokens: int,
        token_dim: int,
        captions: list[list[int]],
        objective: ObjectiveConfig,
    ) -> Draws:
        """The random draws of every sample, each from its own generator in the per-sample path's order."""
        cfg, k = self.cfg, self.cfg.k_times
        prompts, tails, sizes, scales, orders, ts, noises = [], [], [], [], [], [], []
        for g, caption in zip(generators, captions):
            u = torch.rand(2, generator=g).tolist()
            caption_order = u[0] >= objective.t2i_fraction
            if caption_order:
                prompts.append(self.prompts.text(None))
                tails.append([self.eoi, *caption, self.eos])
                scales.append(objective.caption_image_loss_weight)
            else:
                prompts.append(self.prompts.text(None if u[1] < objective.caption_dropout else caption))
                tails.append([])
                scales.append(1.0)
            steps = objective.caption_steps(n_tokens) if caption_order else None
            steps = steps or sample_ar_steps(cfg, n_tokens, g)
            sizes.append(random_group_sizes(n_tokens, steps, g))
            orders.append(token_order(self.grid, training_order(cfg, steps, g), g, cfg.block_size))
            for _ in range(k):
                t = sample_timesteps(cfg, (steps,) if cfg.per_group_t else (1,), g)
                ts.append(t.repeat_interleave(torch.tensor(sizes[-1])) if cfg.per_group_t else t.expand(n_tokens))
                noises.append(torch.randn((n_tokens, token_dim), generator=g))
        b = len(generators)
        t = torch.stack(ts).view(b, k, n_tokens)
        noise = torch.stack(noises).view(b, k, n_tokens, token_dim)
        return Draws(prompts, tails, sizes, scales, torch.stack(orders), t, noise)

    def build(self, tokens: torch.Tensor, draws: Draws, pack_length: int) -> TokenBatch:
        """The batch of images `tokens` (B, N, C) under `draws`, packed into rows of `pack_length`
        tokens (first-fit decreasing, as `pack`) or, with 0, one padded row per sample (as `collate`)."""
        b, n, c = tokens.shape
        k = self.cfg.k_times
        x0 = tokens.float().gather(1, draws.orders[..., None].expand(b, n, c))  # (B, N, C) in generation order
        x0k = x0[:, None].expand(b, k, n, c).reshape(-1, c)
        t, noise = draws.t.reshape(-1), draws.noise.reshape(-1, c)
        noisy = self.scheduler.add_noise(x0k, noise, t)
        targets = diffusion_target(self.cfg, self.scheduler, x0k, noise, t)
        group = self._groups(draws.sizes, n)  # (B, N)
        weights = self._weights(draws.sizes, group) * torch.tensor(draws.scales)[:, None]

        caption_order = torch.tensor([bool(tail) for tail in draws.tails])
        last = torch.tensor([s[-1] for s in draws.sizes])
        keep_last = caption_order & self.clean_last_in_caption
        n_clean = torch.where(keep_last, n, n - last)  # (B,)
        prompt_len = torch.tensor([len(p) for p in draws.prompts])
        lengths = prompt_len + n_clean + k * n + torch.tensor([len(tail) for tail in draws.tails])
        starts, segment, rows, width = place(lengths.tolist(), pack_length)
        start = torch.tensor(starts)
        out = empty_rows(rows * width, c, packed=bool(pack_length))

        self._put_text(out, draws, starts, segment, (n_clean + k * n).tolist())
        # image: the clean groups the noisy ones are conditioned on, then K noisy copies of every token
        column = torch.arange(n)
        image_at = (start + prompt_len)[:, None]  # (B, 1) where each image begins
        clean = column < n_clean[:, None]
        at_clean = (image_at + column)[clean]
        self._put(out, at_clean, CLEAN, x0[clean], draws.orders, prompt_len, clean)
        out["group"][at_clean] = (group * k + (k - 1))[clean]
        copies = image_at[:, :, None] + n_clean[:, None, None] + torch.arange(k)[:, None] * n + column  # (B, K, N)
        every = torch.ones(b, k, n, dtype=torch.bool)
        noisy_group = group[:, None] * k + torch.arange(k)[:, None]
        self._put(out, copies.reshape(-1), NOISY, noisy, draws.orders[:, None].expand(b, k, n), prompt_len, every)
        out["group"][copies.reshape(-1)] = noisy_group.reshape(-1)
        out["t"][copies.reshape(-1)] = t
        out["targets"][copies.reshape(-1)] = targets.float()
        out["weights"][copies.reshape(-1)] = weights[:, None].expand(b, k, n).reshape(-1)
        if pack_length:
            where = torch.tensor(segment)
            out["segment"][at_clean] = where[:, None].expand(b, n)[clean]
            out["segment"][copies.reshape(-1)] = where[:, None].expand(b, k * n).reshape(-1)
        return TokenBatch(**{name: v.view(rows, width, *v.shape[1:]) for name, v in out.items()})

    def _put_text(
        self, out: dict[str, torch.Tensor], draws: Draws, starts: list[int], segment: list[int], image: list[int]
    ) -> None:
        """The text tokens of every sample at its flat `starts`: the prompt, and in caption order
        <eoi> caption <eos> after the sample's `image` tokens."""
        dest, ids, pos, grp, labels, seg = [], [], [], [], [], []
        for i, (prompt, tail) in enumerate(zip(draws.prompts, draws.tails)):
            p = len(prompt)
            dest += range(starts[i], starts[i] + p)
            ids += prompt
            pos += range(p)
            grp += [PROMPT] * p
            labels += [IGNORE] * p
            if tail:
                at = starts[i] + p + image[i]
                dest += range(at, at + len(tail))
                ids += tail
                pos += range(p + self.image_span, p + self.image_span + len(tail))
                grp += [-1] * len(tail)
                labels += [*tail[1:], IGNORE]  # each token learns the next; the last, <eos>, nothing
            seg += [segment[i]] * (p + len(tail))
        text = torch.tensor(dest)
        out["kind"][text] = TEXT
        for name, values in (("ids", ids), ("position_ids", pos), ("group", grp), ("labels", labels)):
            out[name][text] = torch.tensor(values)
        if "segment" in out:
            out["segment"][text] = torch.tensor(seg, dtype=torch.long)

    def _put(
        self,
        out: dict[str, torch.Tensor],
        dest: torch.Tensor,
        kind: int,
        values: torch.Tensor,
        image_pos: torch.Tensor,
        prompt_len: torch.Tensor,
        chosen: torch.Tensor,
    ) -> None:
        """Image tokens at flat places `dest`: their kind, values, grid places and rotary position (the
        position right after the prompt, shared by every token of the image)."""
        shape = chosen.shape
        out["kind"][dest] = kind
        out["values"][dest] = values.reshape(-1, values.shape[-1]).float()
        out["image_pos"][dest] = image_pos.expand(shape)[chosen]
        out["position_ids"][dest] = prompt_len.view(-1, *[1] * (len(shape) - 1)).expand(shape)[chosen]

    def _groups(self, sizes: list[list[int]], n: int) -> torch.Tensor:
        """(B, N) AR group of every token in generation order: a 1 where each group after the first
        begins, summed along the row."""
        rows, columns = [], []
        for i, s in enumerate(sizes):
            begin = 0
            for size in s[:-1]:
                begin += size
                rows.append(i)
                columns.append(begin)
        starts = torch.zeros(len(sizes), n + 1, dtype=torch.long)
        starts[rows, columns] = 1
        return starts[:, :n].cumsum(1)

    def _weights(self, sizes: list[list[int]], group: torch.Tensor) -> torch.Tensor:
        """(B, N) loss weight of every token: `ar_loss_weights` of its image's group sizes."""
        n = group.shape[1]
        for steps in {(len(s), n) for s in sizes} - self._group_weights.keys():  # group 1..S's depend on S alone
            self._group_weights[steps] = torch.zeros(n)
            self._group_weights[steps][: steps[0]] = ar_loss_weights([1] * steps[0], self.cfg.ar_weight)
        return torch.stack([self._group_weights[len(s), n] for s in sizes]).gather(1, group)


def place(lengths: list[int], pack_length: int) -> tuple[list[int], list[int], int, int]:
    """Where each sample goes: (flat start of each sample, its index within its row, rows, row width).
    With `pack_length`, first-fit decreasing into rows of that many tokens (`pack`); with 0, a row per
    sample (`collate`)."""
    if not pack_length:
        width = max(lengths)
        return [i * width for i in range(len(lengths))], [0] * len(lengths), len(lengths), width
    room: list[int] = []
    row_of, offset, index = [0] * len(lengths), [0] * len(lengths), [0] * len(lengths)
    count: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # stable, as `pack`'s sort
        n = lengths[i]
        row = next((r for r, free in enumerate(room) if n <= free), None)
        if row is None:
            room.append(pack_length)
            count.append(0)
            row = len(room) - 1
        row_of[i], offset[i], index[i] = row, pack_length - room[row], count[row]
        room[row] -= n
        count[row] += 1
    width = max(pack_length - free for free in room)
    return [row_of[i] * width + offset[i] for i in range(len(lengths))], index, len(room), width


def empty_rows(size: int, token_dim: int, packed: bool) -> dict[str, torch.Tensor]:
    """`size` flat token places holding what `collate` pads with."""
    long = dict(dtype=torch.long)
    out = {
        "kind": torch.full((size,), PAD, **long),
        "ids": torch.zeros(size, **long),
        "values": torch.zeros(size, token_dim),
        "image_pos": torch.zeros(size, **long),
        "t": torch.zeros(size, **long),
        "group": torch.full((size,), -1, **long),
        "position_ids": torch.zeros(size, **long),
        "labels": torch.full((size,), IGNORE, **long),
        "targets": torch.zeros(size, token_dim),
        "weights": torch.zeros(size),
        "codes": torch.zeros(size, 0, **long),
        "code_labels": torch.zeros(size, 0, **long),
    }
    if packed:
        out["segment"] = torch.full((size,), -1, **long)
    return out
