"""The links between what training optimises and what sampling runs: the AR-step loss weights reach the
loss that is back-propagated, and the training forward predicts a group exactly as the cached sampler
does for the same tokens, noise and timestep."""

from __future__ import annotations

import pytest
import torch

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.causal import add_image
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.generation.diffusion import NextTokenDiffusionSampler, _Plan, _State
from mmfusion.generation.settings import DiffusionSampling
from mmfusion.model.config import ModelConfig
from mmfusion.model.masks import NOISY
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import SequenceBuilder, collate
from mmfusion.training.objective import JointObjective


def _model(prompt_attention: str = "causal") -> MMFusionModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "tiny", image_grid=(4, 4), image_token_dim=12, image_rope=True, prompt_attention=prompt_attention
    )
    model = MMFusionModel(cfg)
    torch.nn.init.normal_(model.image_head.weight, std=0.05)  # the head starts at zero: make it predict
    return model


def test_ar_step_loss_weights_reach_the_backpropagated_loss():
    """The gradient that reaches each noisy token's prediction is its squared error's, times the weight
    of its AR group: w = 2 on group 1 falling linearly to 1 on group S (2 when S = 1)."""
    model = _model()
    cfg = model.cfg
    obj = JointObjective(
        cfg,
        DiffusionConfig(gamma=0.9, ar_weight=2.0),
        ObjectiveConfig(t2i_fraction=1.0, caption_dropout=0.0, pack_length=96),
        1,
        2,
        3,
        4,
    )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(12, cfg.num_image_tokens, cfg.image_token_dim, generator=g)
    captions = [torch.randint(10, 100, (5,), generator=g).tolist() for _ in range(12)]
    batch = obj.build(tokens, captions, None, [torch.Generator().manual_seed(i) for i in range(12)])
    preds = []
    hook = model.image_head.register_forward_hook(lambda m, i, o: preds.append(o) or o.retain_grad())
    loss = obj.loss(model, batch)["loss"]
    hook.remove()
    loss.backward()
    (pred,) = preds  # (n_noisy, C), the rows the loss reads
    noisy = batch.weights > 0
    target = batch.targets[noisy]
    n_rows, dim = pred.shape
    # d loss / d pred = 2 (pred - target) * w / (C * n_rows): recover w per token
    recovered = (pred.grad * dim * n_rows / 2 / (pred - target).detach()).mean(-1)
    # the weight each token should carry, from its sample's AR groups alone
    group, segment = batch.group[noisy], batch.segment[noisy]
    row = torch.arange(len(batch))[:, None].expand_as(batch.group)[noisy]
    expected = torch.empty(n_rows)
    steps_seen = set()
    for key in {(int(r), int(s)) for r, s in zip(row, segment)}:
        mine = (row == key[0]) & (segment == key[1])
        steps = int(group[mine].max()) + 1
        steps_seen.add(steps)
        expected[mine] = 2.0 if steps == 1 else 2.0 - group[mine].float() / (steps - 1)
    assert len(steps_seen) > 2  # several numbers of AR steps in the batch, so weights differ
    torch.testing.assert_close(recovered, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prompt_attention", ["causal", "bidirectional"])
def test_training_forward_predicts_each_group_as_the_cached_sampler(prompt_attention):
    """S = 4 in random order: the training sequence (clean groups, then every group noised at t) gives
    group s the prediction that the sampler's cached pass gives it with groups < s finished as clean."""
    model = _model(prompt_attention).eval()
    cfg = model.cfg
    diffusion = DiffusionConfig(gamma=0.9, order="random")
    prompt = [1, 17, 25, 33, 3]  # <bos> caption <boi>
    x0 = torch.randn(cfg.num_image_tokens, cfg.image_token_dim, generator=torch.Generator().manual_seed(1))
    b = SequenceBuilder(cfg.image_token_dim, image_span=cfg.image_span).text(prompt, prompt=True)
    add_image(
        b, x0, diffusion, diffusion.make_scheduler(), cfg.image_grid, torch.Generator().manual_seed(3), ar_steps=4
    )
    batch = collate([b.tensors()])
    noisy = batch.kind[0] == NOISY
    group, pos, values = batch.group[0][noisy], batch.image_pos[0][noisy], batch.values[0][noisy]
    (t,) = batch.t[0][noisy].unique().tolist()
    groups = [pos[group == s] for s in range(4)]
    assert sorted(torch.cat(groups).tolist()) == list(range(16)) and not torch.equal(
        torch.cat(groups), torch.arange(16)
    )
    with torch.no_grad():
        trained = model.image_output(model(batch, mask=batch.mask(bidirectional_prompt=cfg.bidirectional_prompt)))
        trained = trained[0][noisy]

    sampler = NextTokenDiffusionSampler(model, diffusion, DiffusionSampling(ar_steps=4, order="random"))
    plan = _Plan(groups=[groups], ahead=[[g[:0] for g in groups]], known=[torch.zeros(0, dtype=torch.long)])
    out = torch.zeros(1, cfg.num_image_tokens, cfg.image_token_dim)
    state = _State(sampler, [prompt], plan, out, [len(prompt)], use_cache=True)
    with torch.no_grad():
        for s, p in enumerate(groups):
            sampled = state.predict(s, [p], values[group == s][None], int(t), 1)[0]
            torch.testing.assert_close(sampled, trained[group == s], atol=1e-5, rtol=1e-4)
            state.finish_group(s, [p], x0[p][None])  # the finished group, as clean tokens
    # and the check can fail: group 2 read with group 1 left out of the cache is another prediction
    state = _State(sampler, [prompt], plan, out, [len(prompt)], use_cache=True)
    with torch.no_grad():
        state.finish_group(0, [groups[0]], x0[groups[0]][None])
        other = state.predict(2, [groups[2]], values[group == 2][None], int(t), 1)[0]
    assert (other - trained[group == 2]).abs().max() > 1e-3
