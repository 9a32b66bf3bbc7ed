"""`mmfusion demo`: the end-to-end CPU demo."""

from __future__ import annotations

from pathlib import Path


def demo(*, out: str = "demo", seed: int = 0) -> None:
    """Smoke path of the demo: build the shapes data, train the tokenizer, run the small model once.

    Args:
        out: output folder
        seed: random seed
    """
    import torch

    from mmfusion.data.shapes import build_shapes
    from mmfusion.model.config import ModelConfig
    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.model.sequence import SequenceBuilder, collate
    from mmfusion.tokenizers.text import TextTokenizer

    torch.manual_seed(seed)
    outdir = Path(out)
    ds = build_shapes(n=2000, seed=seed)
    ds.save_to_disk(outdir / "data")
    tok = TextTokenizer.train((c for caps in ds["train"]["captions"] for c in caps), vocab_size=512)
    tok.save(outdir / "tokenizer.json")
    cfg = ModelConfig.from_name("small", vocab_size=len(tok))
    model = MMFusionModel(cfg)
    rows = [
        SequenceBuilder(cfg.image_token_dim).text([tok.bos_id, *tok.encode(t)]).tensors()
        for t in ds["test"]["text"][:4]
    ]
    logits = model.text_logits(model(collate(rows)))
    print(
        f"data: {outdir / 'data'}; tokenizer: {len(tok)} tokens; model: {model.num_parameters() / 1e6:.2f}M "
        f"parameters; logits {tuple(logits.shape)}"
    )
