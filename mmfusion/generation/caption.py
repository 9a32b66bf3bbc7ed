"""Captioning: clean image tokens (timestep 0) as the prefix, then greedy, beam or nucleus decoding
of text with a KV cache, batched; beam search's candidates optionally re-scored by how well the model
redraws the image from each (`mmfusion.generation.rerank`).

Prefix: `<bos> <boi> [image tokens, t = 0] <eoi>`; decoding stops at `<eos>`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmfusion.generation.common import inference
from mmfusion.generation.rerank import rerank
from mmfusion.generation.settings import CaptionSampling
from mmfusion.model.masks import CLEAN
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import SequenceBuilder, collate, text_step
from mmfusion.model.token_shuffle import fuse_grid

RERANK_TOKENS = 32768  # image tokens (noisy copies included) scored in one model call when reranking

# (image tokens (n, ...), candidate ids, noise levels) -> (n,) redraw errors: `rerank.redraw_error`
Scorer = Callable[[torch.Tensor, list[list[int]], int], torch.Tensor]


class CaptionDecoder:
    """`scorer`: the model's redraw error of an image under a caption, for `CaptionSampling.rerank_weight`."""

    def __init__(
        self, model: MMFusionModel, bos: int, boi: int, eoi: int, eos: int, scorer: Scorer | None = None
    ) -> None:
        self.model, self.bos, self.boi, self.eoi, self.eos = model, bos, boi, eoi, eos
        self.scorer = scorer

    def _prefix_rows(self, tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        cfg = self.model.cfg
        if cfg.discrete:  # code grids (B, h, w) -> fused code tokens
            fused = fuse_grid(tokens.long(), cfg.shuffle)
            return [
                SequenceBuilder(0, code_width=cfg.code_width)
                .text([self.bos, self.boi], prompt=True)
                .codes(x, torch.arange(len(x)))
                .text([self.eoi])
                .tensors()
                for x in fused
            ]
        n = tokens.shape[1]
        rows = []
        for x in tokens:
            b = SequenceBuilder(tokens.shape[-1], image_span=self.model.cfg.image_span).text(
                [self.bos, self.boi], prompt=True
            )
            b.image(x, torch.arange(n), kind=CLEAN, group=torch.zeros(n, dtype=torch.long))
            rows.append(b.end_image().text([self.eoi]).tensors())
        return rows

    def _step_batch(self, ids: torch.Tensor, position: int, dim: int):  # noqa: ANN202
        return text_step(ids, position, dim, self.model.cfg.code_width)

    @inference
    def __call__(
        self,
        tokens: torch.Tensor,
        settings: CaptionSampling = CaptionSampling(),
        generators: list[torch.Generator] | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Caption ids (without specials) for image tokens (B, N, C)."""
        if settings.method == "beam" and settings.rerank_weight > 0:
            return self._reranked(tokens, settings)
        if settings.method == "beam":
            return self._beam(tokens, settings)
        return self.decode(self._prefix_rows(tokens), settings, generators, use_cache)

    @inference
    def decode(
        self,
        rows: list[dict[str, torch.Tensor]],
        settings: CaptionSampling = CaptionSampling(),
        generators: list[torch.Generator] | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Greedy or nucleus decoding of text after prefix `rows` (`SequenceBuilder.tensors()` of equal
        length, ending where the text starts): the captioning loop, which a text-only prefix also runs
        (benchmarks/bench.py times it against transformers' `generate` that way)."""
        b, dim = len(rows), rows[0]["values"].shape[-1]
        prefix = collate(rows)
        position = int(prefix.position_ids[0, -1]) + 1
        cache = self.model.new_cache() if use_cache else None
        logits = self.model.text_logits(self.model(prefix, cache, store=True)[:, -1])
        out = torch.full((b, 0), self.eos, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(settings.max_new_tokens):
            logits = logits.float().cpu()  # decoding state stays on the CPU, whatever the model's device
            if step < settings.min_new_tokens:
                logits[:, self.eos] = float("-inf")
            nxt = self._choose(logits, settings, generators)
            nxt = torch.where(done, torch.full_like(nxt, self.eos), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == self.eos
            if done.all() or step + 1 == settings.max_new_tokens:  # no pass for a token nobody reads
                break
            if use_cache:
                h = self.model(self._step_batch(nxt, position + step, dim), cache, store=True)
                logits = self.model.text_logits(h[:, -1])
            else:
                full = collate([_extend(r, out[i].tolist(), position) for i, r in enumerate(rows)])
                logits = self.model.text_logits(self.model(full)[:, -1])
        return [_strip(r.tolist(), self.eos) for r in out]

    def _choose(self, logits: torch.Tensor, s: CaptionSampling, generators: list[torch.Generator] | None):  # noqa: ANN202
        if s.method == "greedy":
            return logits.argmax(-1)
        probs = torch.softmax(logits / max(s.temperature, 1e-6), -1)
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # smallest set with mass >= top_p
        sorted_p = sorted_p * keep
        choice = []
        for i in range(len(logits)):
            g = generators[i] if generators else None
            choice.append(idx[i, torch.multinomial(sorted_p[i], 1, generator=g)])
        return torch.cat(choice)

    def _beam(self, tokens: torch.Tensor, s: CaptionSampling) -> list[list[int]]:
        return [ranked[0][1] for ranked in self.beam_candidates(tokens, s)]

    def _reranked(self, tokens: torch.Tensor, s: CaptionSampling) -> list[list[int]]:
        if self.scorer is None:
            raise ValueError("rerank_weight > 0 needs a scorer (the pipeline gives its model's redraw error)")
        candidates = self.beam_candidates(tokens, s)
        owner = torch.tensor([i for i, ranked in enumerate(candidates) for _ in ranked])
        ids = [c for ranked in candidates for _, c in ranked]
        chunk = max(1, RERANK_TOKENS // (s.rerank_timesteps * tokens.shape[1]))  # (image, candidate) pairs
        errors = torch.cat(
            [
                self.scorer(tokens[owner[at : at + chunk]], ids[at : at + chunk], s.rerank_timesteps)
                for at in range(0, len(ids), chunk)
            ]
        )
        return rerank(candidates, errors, s.rerank_weight)

    @inference
    def beam_candidates(self, tokens: torch.Tensor, s: CaptionSampling) -> list[list[tuple[float, list[int]]]]:
        """Beam search's candidates for each image, best first: (length-normalised log-probability,
        ids without specials). The finished ones, or the live beams where none finished."""
        b, k = tokens.shape[0], s.num_beams
        cache = self.model.new_cache()
        prefix = collate(self._prefix_rows(tokens))
        position = int(prefix.position_ids[0, -1]) + 1
        logp = torch.log_softmax(self.model.text_logits(self.model(prefix, cache, store=True)[:, -1]).float().cpu(), -1)
        if s.min_new_tokens > 0:
            logp[:, self.eos] = float("-inf")
        cache.select(torch.arange(b).repeat_interleave(k))
        vocab = logp.shape[-1]
        # start: top-k first tokens per image
        scores, first = logp.topk(k, -1)  # (B, K)
        seqs = first.reshape(b * k, 1)
        scores = scores.reshape(b * k)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        for step in range(1, s.max_new_tokens + 1):
            last = seqs[:, -1]
            is_eos = last == self.eos
            for row in is_eos.nonzero().flatten().tolist():
                seq = seqs[row, :-1].tolist()
                finished[row // k].append((scores[row].item() / max(1, len(seq) + 1) ** s.length_penalty, seq))
            scores = scores.masked_fill(is_eos, float("-inf"))
            if step == s.max_new_tokens or all(len(f) >= k for f in finished):
                break
            h = self.model(self._step_batch(last, position + step - 1, tokens.shape[-1]), cache, store=True)
            logp = torch.log_softmax(self.model.text_logits(h[:, -1]).float().cpu(), -1)
            if step < s.min_new_tokens:  # <eos> not before min_new_tokens, as in greedy and nucleus decoding
                logp[:, self.eos] = float("-inf")
            cand = (scores[:, None] + logp).view(b, k * vocab)
            top, flat = cand.topk(k, -1)
            beam = flat // vocab + torch.arange(b)[:, None] * k
            seqs = torch.cat([seqs[beam.flatten()], (flat % vocab).reshape(-1, 1)], 1)
            scores = top.flatten()
            cache.select(beam.flatten())
        results = []
        for i in range(b):
            alive = [
                (scores[i * k + j].item() / max(1, seqs.shape[1]) ** s.length_penalty, seqs[i * k + j].tolist())
                for j in range(k)
                if torch.isfinite(scores[i * k + j])
            ]
            ranked = sorted(finished[i] or alive, key=lambda x: -x[0])
            results.append([(score, _strip(ids, self.eos)) for score, ids in ranked])
        return results


def _extend(row: dict[str, torch.Tensor], ids: list[int], position: int) -> dict[str, torch.Tensor]:
    """Prefix row plus decoded ids (the uncached reference path)."""
    tail = SequenceBuilder(row["values"].shape[-1], start_position=position, code_width=row["codes"].shape[-1])
    tail = tail.text(ids).tensors()
    return {k: torch.cat([row[k], tail[k]]) for k in row}


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
