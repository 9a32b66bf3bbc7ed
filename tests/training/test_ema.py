"""EMA of the weights: the decay's warm-up, the direction of the average, and the weights exported."""

import torch

from tests.conftest import TINY_RUN


def test_ema_moves_toward_the_live_weights_with_the_warmed_up_decay(tmp_path, monkeypatch):
    from mmfusion.config import load_config
    from mmfusion.data.datamodule import MMFusionDataModule
    from mmfusion.training.module import MMFusionModule

    cfg = load_config(None, [*TINY_RUN, "train.ema_decay=0.99", f"train.out={tmp_path}"])
    module = MMFusionModule(cfg, MMFusionDataModule(cfg.data, 32, tmp_path).text_tokenizer())
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))
    for step, decay in ((0, 0.1), (5, 6 / 15), (10_000, 0.99)):  # min(ema_decay, (1 + step) / (10 + step))
        monkeypatch.setattr(MMFusionModule, "global_step", property(lambda self, s=step: s))
        before = [p.clone() for p in module.ema.parameters()]
        module.update_ema()
        for old, new, live in zip(before, module.ema.parameters(), module.model.parameters()):
            torch.testing.assert_close(new, decay * old + (1 - decay) * live, atol=1e-6, rtol=1e-6)
    assert module.sampling_model is module.ema
    assert not all(torch.equal(a, b) for a, b in zip(module.ema.parameters(), module.model.parameters()))
