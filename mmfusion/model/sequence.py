"""Interleaved text + image sequences: one sample is built piece by piece, a batch is padded.

Text tokens get consecutive rotary positions. All tokens of one image (clean and noisy copies, any
order) share a single rotary position, so their order in the sequence carries no meaning; where a
token sits in the image is told by its 2-D image position embedding instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmfusion.model.masks import CLEAN, CODE, NOISY, PAD, PROMPT, TEXT, generalized_causal_mask

IGNORE = -100


@dataclass
class TokenBatch:
    """A padded batch of interleaved sequences (B, L); image fields are zero at text positions."""

    kind: torch.Tensor  # (B, L) PAD / TEXT / CLEAN / NOISY / CODE
    ids: torch.Tensor  # (B, L) text (or class-token) ids
    values: torch.Tensor  # (B, L, C) continuous image tokens (clean or noised)
    image_pos: torch.Tensor  # (B, L) index of the token in the image grid
    t: torch.Tensor  # (B, L) diffusion timestep of image tokens, 0 for clean ones
    group: torch.Tensor  # (B, L) AR group of image tokens, PROMPT for condition text, -1 elsewhere
    position_ids: torch.Tensor  # (B, L) rotary positions
    labels: torch.Tensor | None = None  # (B, L) next text token to predict, IGNORE elsewhere
    targets: torch.Tensor | None = None  # (B, L, C) diffusion regression targets at noisy tokens
    weights: torch.Tensor | None = None  # (B, L) image loss weights, 0 where there is no image loss
    codes: torch.Tensor | None = None  # (B, L, W) the s*s image codes a CODE token fuses (Token-Shuffle)
    code_labels: torch.Tensor | None = None  # (B, L, W) codes of the next fused token, IGNORE elsewhere
    segment: torch.Tensor | None = None  # (B, L) packed rows: index of the token's sample in its row, -1 at padding

    def mask(self, text_sees_noisy: bool = False, bidirectional_prompt: bool = False) -> torch.Tensor:
        mask = generalized_causal_mask(self.kind, self.group, text_sees_noisy, bidirectional_prompt)
        if self.segment is not None:  # packed samples never see each other
            mask = mask & (self.segment[:, :, None] == self.segment[:, None, :])
        return mask

    def to(self, device: torch.device | str) -> TokenBatch:
        return self.map(lambda v: v.to(device))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TokenBatch:
        """The batch with `fn` applied to each of its tensors (e.g. `lambda v: v[:n]`, its first n rows)."""
        return TokenBatch(**{k: None if v is None else fn(v) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.kind.shape[0]

    def valid(self) -> torch.Tensor:
        return self.kind != PAD

    def is_image(self) -> torch.Tensor:
        """(B, L) bool: the continuous image tokens, clean or noisy."""
        return (self.kind == CLEAN) | (self.kind == NOISY)


def select_rows(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """x[where] for x (B, L, ...) and where (B, L) bool, or the flat row index of `row_index(where)`,
    through index_select: the same values, faster on CPU both ways than boolean indexing (its backward
    is an index_add instead of an accumulating index_put)."""
    return x.flatten(0, 1).index_select(0, row_index(where) if where.dtype == torch.bool else where)


def row_index(where: torch.Tensor) -> torch.Tensor:
    """The flat row numbers (n,) of the True entries of `where` (B, L), for `select_rows`."""
    return where.flatten().nonzero().squeeze(1)


@dataclass
class BatchRows:
    """Where a batch's kinds of tokens sit (flat row numbers, as `row_index` gives them), found before the
    model runs. Their counts depend on the data, so a compiled graph that had to find them would stop at
    each one; given them, the training step's forward and losses compile as one graph
    (`JointObjective.compile`)."""

    image: torch.Tensor  # the continuous image tokens, clean or noisy
    steps: torch.Tensor  # the distinct diffusion timesteps of those tokens
    which: torch.Tensor  # each image token's entry in `steps`
    code: torch.Tensor  # the fused tokens of discrete image codes
    noisy: torch.Tensor  # the tokens with an image loss (weight > 0)
    text: torch.Tensor  # the tokens with a text label

    @classmethod
    def of(cls, batch: TokenBatch, codes: bool = False, losses: bool = False) -> BatchRows:
        """The rows of `batch`; code tokens only with `codes`, the loss rows only with `losses` (a
        sampling pass needs neither)."""
        none = torch.zeros(0, dtype=torch.long, device=batch.kind.device)
        image = row_index(batch.is_image())
        steps = which = none
        if image.numel():
            steps, which = torch.unique(batch.t.flatten().index_select(0, image), return_inverse=True)
        code = row_index(batch.kind == CODE) if codes else none
        noisy = row_index(batch.weights > 0) if losses and batch.weights is not None else none
        text = row_index(batch.labels != IGNORE) if losses and batch.labels is not None else none
        return cls(image, steps, which, code, noisy, text)

    def to(self, device: torch.device | str) -> BatchRows:
        return BatchRows(**{k: v.to(device) for k, v in self.__dict__.items()})


def place_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) with its flat rows `rows` (from `row_index`) replaced by `values` (n, ...), out of
    place: the inverse of `select_rows`, through index_copy rather than a boolean index_put."""
    return x.flatten(0, 1).index_copy(0, rows, values.to(x.dtype)).view_as(x)


class SequenceBuilder:
    """Builds one sample left to right: text pieces and image blocks."""

    def __init__(self, token_dim: int, start_position: int = 0, image_span: int = 1, code_width: int = 0) -> None:
        self.token_dim = token_dim
        self.code_width = code_width
        self.position = start_position
        self.image_span = image_span
        fields = [f.name for f in dataclasses.fields(TokenBatch) if f.name != "segment"]  # segment: set by `pack`
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in fields}
        self.length = 0

    def _add(
        self,
        n: int,
        *,
        kind: int,
        ids=None,
        values=None,
        image_pos=None,
        t=None,
        group=None,  # noqa: ANN001
        positions=None,
        labels=None,
        targets=None,
        weights=None,
        codes=None,
        code_labels=None,
    ) -> None:
        def full(v, fill, dtype=torch.long):  # noqa: ANN001, ANN202
            return torch.full((n,), fill, dtype=dtype) if v is None else torch.as_tensor(v)

        p = self.parts
        p["kind"].append(torch.full((n,), kind, dtype=torch.long))
        p["ids"].append(full(ids, 0))
        p["values"].append(torch.zeros(n, self.token_dim) if values is None else values.float())
        p["image_pos"].append(full(image_pos, 0))
        p["t"].append(full(t, 0))
        p["group"].append(full(group, -1))
        p["position_ids"].append(full(positions, 0))
        p["labels"].append(full(labels, IGNORE))
        p["targets"].append(torch.zeros(n, self.token_dim) if targets is None else targets.float())
        p["weights"].append(full(weights, 0.0, torch.float))
        w = self.code_width
        p["codes"].append(torch.zeros(n, w, dtype=torch.long) if codes is None else codes.long())
        p["code_labels"].append(torch.full((n, w), IGNORE, dtype=torch.long) if code_labels is None else code_labels)
        self.length += n

    def text(self, ids: list[int], loss: bool = False, prompt: bool = False) -> SequenceBuilder:
        """Append text tokens; with `loss`, the token before each of them learns to predict it. `prompt`
        marks a condition prefix (group PROMPT), which a model with a bidirectional prompt reads whole."""
        n = len(ids)
        if n == 0:
            return self
        if loss:
            if self.length == 0:
                raise ValueError("a text loss needs at least one token before the predicted text")
            self._set_last("labels", ids[0])
        labels = list(ids[1:]) + [IGNORE] if loss else None
        positions = torch.arange(self.position, self.position + n)
        group = torch.full((n,), PROMPT if prompt else -1)
        self._add(
            n, kind=TEXT, ids=torch.tensor(ids, dtype=torch.long), positions=positions, labels=labels, group=group
        )
        self.position += n
        return self

    def _set_last(self, name: str, value: object) -> None:
        """Set field `name` of the last token appended so far."""
        for part in reversed(self.parts[name]):
            if len(part):
                part[-1] = torch.as_tensor(value)
                return

    def codes(
        self,
        codes: torch.Tensor,
        image_pos: torch.Tensor,
        loss_weight: float | None = None,
        inputs: torch.Tensor | None = None,
    ) -> SequenceBuilder:
        """Append fused discrete image tokens (n, W) at consecutive positions, like text. With
        `loss_weight`, the token before each learns to predict its W codes (next-token loss);
        `inputs` replaces the codes fed in (e.g. with flipped bits) while the targets stay `codes`."""
        n = codes.shape[0]
        labels, weights = None, None
        if loss_weight is not None:
            if self.length == 0:
                raise ValueError("an image-code loss needs at least one token before the codes")
            self._set_last("code_labels", codes[0])
            self._set_last("weights", loss_weight)
            labels = torch.cat([codes[1:], torch.full((1, codes.shape[1]), IGNORE, dtype=torch.long)])
            weights = torch.full((n,), float(loss_weight))
            weights[-1] = 0.0
        positions = torch.arange(self.position, self.position + n)
        self._add(
            n,
            kind=CODE,
            image_pos=image_pos,
            positions=positions,
            codes=codes if inputs is None else inputs,
            code_labels=labels,
            weights=weights,
        )
        self.position += n
        return self

    def image(
        self,
        values: torch.Tensor,
        image_pos: torch.Tensor,
        *,
        kind: int,
        group: torch.Tensor,
        t: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> SequenceBuilder:
        """Append image tokens at the current image position (call `end_image` after the last block)."""
        assert kind in (CLEAN, NOISY)
        n = values.shape[0]
        positions = torch.full((n,), self.position, dtype=torch.long)
        self._add(
            n,
            kind=kind,
            values=values,
            image_pos=image_pos,
            t=t,
            group=group,
            positions=positions,
            targets=targets,
            weights=weights,
        )
        return self

    def end_image(self) -> SequenceBuilder:
        """Text after the image continues after the rotary positions the image occupies."""
        self.position += self.image_span
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) if v else torch.zeros(0) for k, v in self.parts.items()}


def text_step(ids: torch.Tensor, positions: torch.Tensor | int, token_dim: int = 0, code_width: int = 0) -> TokenBatch:
    """One new text token per row (B,) at `positions`, built directly as tensors (decoding loops)."""
    b = ids.shape[0]
    pos = torch.as_tensor(positions, dtype=torch.long).expand(b).reshape(b, 1)
    zeros = torch.zeros(b, 1, dtype=torch.long)
    return TokenBatch(
        kind=torch.full((b, 1), TEXT, dtype=torch.long),
        ids=ids.reshape(b, 1).long(),
        values=torch.zeros(b, 1, token_dim),
        image_pos=zeros,
        t=zeros,
        group=torch.full((b, 1), -1),
        position_ids=pos.clone(),
        codes=torch.zeros(b, 1, code_width, dtype=torch.long),
    )


def code_step(codes: torch.Tensor, image_pos: int, positions: torch.Tensor) -> TokenBatch:
    """One new fused image token per row: its codes (B, W), its place in the fused grid and its rotary
    positions (B,), built directly as tensors (the Token-Shuffle sampling loop), like `text_step`."""
    b = codes.shape[0]
    zeros = torch.zeros(b, 1, dtype=torch.long)
    return TokenBatch(
        kind=torch.full((b, 1), CODE, dtype=torch.long),
        ids=zeros,
        values=torch.zeros(b, 1, 0),
        image_pos=torch.full((b, 1), image_pos, dtype=torch.long),
        t=zeros,
        group=torch.full((b, 1), -1),
        position_ids=positions.reshape(b, 1).long(),
        codes=codes.reshape(b, 1, -1).long(),
    )


def image_block(
    rows: list[tuple[torch.Tensor, torch.Tensor]], kind: int, start_positions: list[int], token_dim: int
) -> TokenBatch:
    """One block of image tokens per row, rows[i] = (image positions (n_i,), values (n_i, C)), all of
    `kind` in AR group 0 at timestep 0, at rotary position start_positions[i]; right-padded to the
    longest row (at least 1). The same batch as `collate` of one `SequenceBuilder.image` per row
    (tested), built as whole tensors: the sampler makes one per AR step, where a builder per row cost
    thousands of small ops."""
    b = len(rows)
    lengths = [len(p) for p, _ in rows]
    width = max([1, *lengths])
    valid = torch.arange(width) < torch.tensor(lengths, dtype=torch.long)[:, None]  # (B, W)
    image_pos = torch.zeros(b, width, dtype=torch.long)
    values = torch.zeros(b, width, token_dim)
    if min(lengths, default=0) == width:  # every row full: two copies in all
        image_pos[:] = torch.stack([p for p, _ in rows])
        values[:] = torch.stack([v for _, v in rows])
    else:
        for i, (p, v) in enumerate(rows):
            image_pos[i, : len(p)] = p
            values[i, : len(p)] = v
    zeros = torch.zeros(b, width, dtype=torch.long)
    return TokenBatch(
        kind=torch.where(valid, kind, PAD),
        ids=zeros,
        values=values,
        image_pos=image_pos,
        t=zeros,
        group=torch.where(valid, 0, -1),
        position_ids=valid * torch.tensor(start_positions, dtype=torch.long)[:, None],
        labels=torch.full((b, width), IGNORE, dtype=torch.long),
        targets=torch.zeros(b, width, token_dim),
        weights=torch.zeros(b, width),
        codes=torch.zeros(b, width, 0, dtype=torch.long),
        code_labels=torch.full((b, width, 0), IGNORE, dtype=torch.long),
    )


def collate(samples: list[dict[str, torch.Tensor]], pad_to: int | None = None) -> TokenBatch:
    """Right-pad per-sample tensors (from `SequenceBuilder.tensors`) into one TokenBatch."""
    length = max(s["kind"].shape[0] for s in samples)
    length = max(length, pad_to or 0)
    fills = {
        "code_labels": IGNORE,
        "kind": PAD,
        "ids": 0,
        "image_pos": 0,
        "t": 0,
        "group": -1,
        "position_ids": 0,
        "labels": IGNORE,
        "weights": 0.0,
    }
    if "segment" in samples[0]:
        fills["segment"] = -1
    out = {}
    for name in fills | {"values": 0, "targets": 0, "codes": 0}:
        rows = []
        for s in samples:
            v = s[name]
            pad = length - v.shape[0]
            if pad:
                v = torch.cat([v, torch.full((pad, *v.shape[1:]), fills.get(name, 0), dtype=v.dtype)])
            rows.append(v)
        out[name] = torch.stack(rows)
    return TokenBatch(**out)


def pack(samples: list[dict[str, torch.Tensor]], length: int) -> TokenBatch:
    """Pack per-sample tensors into rows of at most `length` tokens instead of one padded row each.

    Samples go, longest first, into the first row with room (first-fit decreasing; a sample longer
    than `length` gets a row of its own); each token is tagged with its sample's index in the row
    (`segment`), and `TokenBatch.mask` keeps samples apart. Rotary positions restart with every
    sample, so a packed sample computes exactly what it would alone; only the padding, and its
    compute, shrinks.
    """
    rows: list[list[dict[str, torch.Tensor]]] = []
    room: list[int] = []
    for sample in sorted(samples, key=lambda x: -x["kind"].shape[0]):
        n = sample["kind"].shape[0]
        row = next((r for r, free in enumerate(room) if n <= free), None)
        if row is None:
            rows.append([])
            room.append(length)
            row = len(rows) - 1
        rows[row].append(sample)
        room[row] -= n
    merged = []
    for row in rows:
        m = {name: torch.cat([s[name] for s in row]) for name in row[0]}
        m["segment"] = torch.cat([torch.full((s["kind"].shape[0],), j, dtype=torch.long) for j, s in enumerate(row)])
        merged.append(m)
    return collate(merged)


__all__ = [
    "CLEAN",
    "CODE",
    "IGNORE",
    "NOISY",
    "PAD",
    "TEXT",
    "SequenceBuilder",
    "TokenBatch",
    "collate",
    "pack",
    "place_rows",
    "row_index",
    "select_rows",
]
