"""The benchmark suite's own arithmetic and machinery (the timings themselves live in docs/BENCHMARKS.md)."""

import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench
from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.tokenizers.config import ImageTokenizerConfig
from mmfusion.tokenizers.image import PixelTokenizer
from mmfusion.training.objective import JointObjective


def test_model_flops_match_torch_flop_counter():
    """On a batch without padding (one caption for every sample, all in caption order with one AR step,
    so text loss, image loss, clean and noisy tokens all take part), the FLOPs the bench credits a
    training step with are the products torch counts in its forward and backward, within the timestep
    MLP that the count leaves out."""
    tok = bench.tiny_tokenizer()
    pix = PixelTokenizer(ImageTokenizerConfig(image_size=32, patch_size=8))
    cfg = ModelConfig.from_name(
        "tiny", vocab_size=len(tok), image_token_dim=pix.token_dim, image_grid=pix.grid, image_rope=True
    )
    images, caps = bench.shapes_images(8)
    ids = tok.encode(caps[0])
    obj = JointObjective(
        cfg,
        DiffusionConfig(gamma=0.0),
        ObjectiveConfig(t2i_fraction=0.0),
        tok.bos_id,
        tok.eos_id,
        tok.boi_id,
        tok.eoi_id,
    )
    batch = obj.build(pix.encode(images), [ids] * 8, None, torch.Generator().manual_seed(0))
    assert bool(batch.valid().all()), "the test needs a batch without padding"
    model = MMFusionModel(cfg.replace(attention="math"))  # explicit products, which the counter sees
    with FlopCounterMode(display=False) as counter:
        obj.loss(model, batch)["loss"].backward()
    counted = counter.get_total_flops()
    assert bench.model_flops(cfg, batch) == pytest.approx(counted, rel=0.03)


def test_markdown_shows_the_data_parallel_row():
    row = {"step_s": 0.05, "tokens_per_s": 38000.0, "achieved_gflops": 200.0, "matmul_peak_gflops": 400.0, "mfu": 0.5}
    results = {
        "date": "2026-11-25 12:00 UTC",
        "machine": {"cores": 2, "cpu": "x86_64", "torch": "2.13.0"},
        "train_small": {
            "preset": "small",
            "parameters": 1000,
            "tokens_per_step": 1903,
            "peak_rss_mb": 700.0,
            "fp32 compiled packed": {**row, "mfu": 0.4},
            "fp32" + bench.DDP_ROW: {**row, "peak_rss_mb_per_process": 500.0},
        },
    }
    text = bench.render_markdown(results)
    assert "| small | 1,000 | 1903 | fp32 compiled packed | 0.05 | 38000 | 200 | 400 | 40.0% | 700 |" in text
    assert f"| fp32{bench.DDP_ROW} | 0.05 | 38000 | 200 | 400 | 50.0% | 500 per process |" in text


def test_data_parallel_timing_runs_two_processes_and_reports_their_own_memory():
    ballast = torch.ones(256 * 2**20)  # 1 GiB touched in this process before the workers start
    parent_peak = bench.peak_rss_mb()
    out = bench.ddp_step_seconds("tiny", "fp32", quick=True, threads=2, compiled=False)
    assert out["step_s"] is not None and 0 < out["step_s"] < 60
    worker_peak = out["rank0_peak_rss_mb"]
    assert math.isfinite(worker_peak) and worker_peak > 50
    # the step's work is that of both halves of the 64-sample batch, close to the one-process batch's
    cfg, _, batches = bench._train_setup("tiny")
    assert out["tokens"] == pytest.approx(int(batches[0].valid().sum()), rel=0.1)
    assert out["flops"] == pytest.approx(bench.model_flops(cfg, batches[0]), rel=0.15)
    # a tiny model's worker stays far below the parent's ballast: the peak is the worker's own
    assert worker_peak < parent_peak - 500, (worker_peak, parent_peak)
    del ballast


def test_only_keeps_the_other_results_of_an_earlier_run_on_this_machine():
    earlier = {
        "machine": bench.machine_info(),
        "date": "2000-01-01 00:00 UTC",
        "quick": True,
        "caption": {"cached_tokens_per_s": 100.0, "uncached_tokens_per_s": 20.0, "speedup": 5.0},
        "matmul": {"fp32_gflops": -1.0},
    }
    r = bench.run_all(["matmul"], quick=True, previous=earlier)
    assert r["caption"]["speedup"] == 5.0 and r["caption"]["date"] == "2000-01-01 00:00 UTC"
    assert r["matmul"]["fp32_gflops"] > 0 and r["matmul"]["date"] == r["date"]  # measured now, not carried over
    text = bench.render_markdown(r)
    assert "Carried over from earlier runs on this machine" in text and "caption (2000-01-01 00:00 UTC)" in text
    assert "matmul (" not in text
    elsewhere = {**earlier, "machine": {**earlier["machine"], "cores": -1}}
    assert "caption" not in bench.run_all(["matmul"], quick=True, previous=elsewhere)
    # another CPU with the same core count, Python and torch (the machines here differ in AMX / bf16)
    other_cpu = {**earlier, "machine": {**earlier["machine"], "cpu": "Intel(R) Xeon(R) Processor (avx2 avx512f)"}}
    assert "caption" not in bench.run_all(["matmul"], quick=True, previous=other_cpu)


def test_cpu_name_carries_the_matmul_features(monkeypatch):
    import pathlib

    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n"
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        return cpuinfo if str(self) == "/proc/cpuinfo" else real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    assert bench.cpu_name() == "Some CPU 9000 (amx_bf16 amx_tile avx2 avx512f)"


def test_sampling_rows_time_bf16_weights_beside_float32(monkeypatch):
    """With bf16 weights the sampling rows add a cached column (and its S = 16 / S = 1 ratio), taken
    from a bf16 copy of the model: the float32 model the other columns use is left as it was."""
    from mmfusion import runtime

    monkeypatch.setattr(runtime, "bf16_native", lambda: (True, 1.0, 1.0))
    monkeypatch.setattr(bench, "timed", lambda fn, repeat, warmup=1: (fn(), 0.5)[1])
    model = bench._sampling_model(grid=4, token_dim=8, dim=64, n_layers=1, n_heads=1)
    out = bench._sampling_times(model, 2, uncached=(1,), ar_steps=(1, 16), bf16=True)
    assert model.dtype == torch.float32
    assert {"S=1_cached_s", "S=1_uncached_s", "S=1_cached_bf16_s", "S=16_cached_bf16_s"} <= set(out)
    assert "S=16_uncached_s" not in out and out["S16_over_S1_cached_bf16"] == 1.0
    # the floor of the float32 cached runs only
    assert {"S=1_kernels_s", "S=16_kernels_s"} <= set(out) and "S=16_kernels_bf16_s" not in out
    text = bench.render_markdown({"date": "d", "machine": {"cores": 2, "cpu": "x", "torch": "t"}, "sampling": out})
    assert "| S = 1 | 0.5 | 0.5 | 0.5 |" in text and "| S = 16 / S = 1, cached | 1 | | 1 |" in text
    assert f"| S = 16 / S = 1, {bench.KERNELS_ALONE} | {out['S16_over_S1_kernels']:.3g} | | |" in text


def test_kernel_seconds_counts_each_product_and_attention_call_at_its_own_time(monkeypatch):
    """The floor replays the recorded products and attention calls (and no other op), each kind timed
    alone and counted as often as the function made it, at its fastest round's time. Each round of a
    kind reads the clock before its first timed call, after its third (the round ends there, as the
    time is past its share of `seconds`) and once more for the time taken; the clock below makes the
    rounds take 10, 2, 6, 6 and 6 over their three calls (whichever kind they time), so each kind's
    fastest is 2 / 3 per call (the mean would be 2)."""
    x, w, w2 = torch.randn(8, 16), torch.randn(32, 16), torch.randn(16, 32)
    q = torch.randn(2, 2, 3, 8)

    def fn():
        for _ in range(5):
            h = torch.nn.functional.linear(x, w)
        torch.nn.functional.linear(torch.relu(h), w2)
        (x @ w.T).sum()
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return (h * 2 + 1).mean()  # elementwise work is left out

    ticks = itertools.accumulate(itertools.cycle([5, 5, 1, 1, 1, 1, 3, 3, 1, 3, 3, 1, 3, 3, 1]))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(ticks)))
    (out,) = bench.kernel_seconds(fn, seconds=0.5)
    # 5 + 1 linear, 1 matmul, 1 attention; x @ w.T is the very product linear(x, w) makes: one kind
    assert out["calls"] == 8 and out["kinds"] == 3
    assert out["seconds"] == pytest.approx(8 * 2 / 3)


def test_kernel_floor_of_sampling_lies_below_the_sampling_time():
    """For real kernels: the products and attention calls of a sampling run cost less alone than the run
    itself, and S = 16 makes more of them (16 times the denoising passes) than S = 1."""
    from mmfusion.diffusion.config import DiffusionConfig
    from mmfusion.generation.diffusion import NextTokenDiffusionSampler
    from mmfusion.generation.settings import DiffusionSampling

    model = bench._sampling_model(grid=4, token_dim=8, dim=64, n_layers=2, n_heads=2)
    conds, unconds = [[1, 10, 20, 3]] * 4, [[1, 3]] * 4
    samplers, whole = {}, {}
    for steps in (1, 16):
        settings = DiffusionSampling(ar_steps=steps, sampler="ddim", steps=5, cfg_scale=3.0)
        samplers[steps] = NextTokenDiffusionSampler(model, DiffusionConfig(), settings)
        whole[steps] = bench.timed(lambda smp=samplers[steps]: smp(conds, unconds), repeat=3)
    s1, s16 = bench.kernel_seconds(*(lambda smp=samplers[s]: smp(conds, unconds) for s in (1, 16)))
    assert 0 < s1["seconds"] < whole[1] and 0 < s16["seconds"] < whole[16]
    assert s16["calls"] > 10 * s1["calls"]


def test_training_rows_time_steps_and_matmul_peak_in_turn(monkeypatch):
    """The training rows' MFU divides by a peak measured between their steps: probes and timed calls
    alternate (each round's first call after a probe is not timed), and both medians are returned."""
    from mmfusion import runtime

    events, peaks = [], iter([100.0, 300.0, 200.0, 900.0])

    def probe(dtype, n, seconds):
        events.append("probe")
        return next(peaks)

    monkeypatch.setattr(runtime, "matmul_gflops", probe)
    clock = iter(range(100))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)) ** 2)
    sec, peak = bench.timed_against_peak(lambda: events.append("call"), torch.float32, 3, 2, warmup=1)
    assert events == ["call"] + ["probe", "call", "call", "call"] * 3 + ["probe"]
    # six timed calls; the clock squared makes their durations 1, 5, 9, 13, 17, 21: median (upper) 13
    assert sec == 13.0
    assert peak == 300.0  # median (upper) of 100, 200, 300, 900


def test_quick_runs_keep_to_their_own_json_and_partial_runs_show_only_what_they_measured(tmp_path, monkeypatch):
    """A quick run never rewrites docs/BENCHMARKS.md or the recorded JSON; a run of some items (on a
    machine where nothing carries over) renders their tables alone, without rows of n/a."""
    machine = {"cores": 2, "cpu": "x", "torch": "t"}
    caption = {"cached_tokens_per_s": 900.0, "uncached_tokens_per_s": 100.0, "speedup": 9.0}
    calls = []

    def run_all(names, quick, previous=None):
        calls.append((names, quick, previous))
        return {"machine": machine, "date": "d", "quick": quick, "caption": {**caption, "date": "d"}}

    monkeypatch.setattr(bench, "run_all", run_all)
    monkeypatch.setattr(bench, "DOC", tmp_path / "docs" / "BENCHMARKS.md")
    (tmp_path / "docs").mkdir()
    recorded = '{"machine": {}, "date": "old"}'
    (tmp_path / "docs" / "benchmarks.json").write_text(recorded)
    bench.main(["--quick", "--only", "caption"])
    assert (tmp_path / "docs" / "benchmarks-quick.json").exists() and not bench.DOC.exists()
    assert (tmp_path / "docs" / "benchmarks.json").read_text() == recorded
    bench.main(["--only", "caption"])  # a full run of one item: the recorded JSON is what --only reads
    assert calls[-1][2] == {"machine": {}, "date": "old"}
    text = bench.DOC.read_text()
    assert "| speed-up | 9.0x |" in text
    assert "n/a" not in text and "None" not in text and "matmul peak" not in text and "sampling" not in text


def test_pipeline_times_both_paths_in_turn_and_renders_them():
    """The pipeline item runs the row path and the decoded path on the same steps and reports each,
    their ratio and the share outside the model's step; the table shows both rows."""
    from benchmarks.bench import bench_pipeline, render_markdown

    threads = torch.get_num_threads()
    out = bench_pipeline(True, overrides=("model.preset=tiny", "train.compile=false"), rows_n=256, rounds=1)
    assert torch.get_num_threads() == threads  # the bench's one thread is not left behind
    for path in ("rows", "decoded"):
        e = out[path]
        assert e["samples_per_s"] > 0 and 0 < e["outside_share"] < 1
        assert e["batch_ms"] > 0 and e["model_step_ms"] > 0
        assert abs(e["batch_ms"] / (e["batch_ms"] + e["model_step_ms"]) - e["outside_share"]) < 1e-6
    assert out["speedup"] == out["decoded"]["samples_per_s"] / out["rows"]["samples_per_s"]
    assert not out["compiled"] and out["batch"] == 64
    r = {"date": "d", "machine": {"cores": 2, "cpu": "c", "torch": "t"}, "pipeline": out}
    table = render_markdown(r)
    assert "decoded rows, whole-batch layout" in table and "rows read one by one" in table


TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def test_peer_training_steps_compute_the_same_loss_and_gradients():
    """Both sides of `peers_train` do the same work: mmfusion's objective on the TokenBatch and
    transformers' causal-LM loss on the ids give the same loss and the same gradient for every weight
    (mapped by name), and a step of each (`_train_step`) leaves the same weights."""
    from mmfusion.model.hf import state_dict_from_hf

    hf, ours = bench.peer_models(TINY_LLAMA, vocab=97)
    ids, batch, obj = bench.peer_text_batch(ours, rows=3, length=24)
    assert bool(batch.valid().all()) and int((batch.labels != -100).sum()) == 3 * 23
    hf_loss, our_loss = bench.HFCausalLoss.loss(hf, ids)["loss"], obj.loss(ours, batch)["loss"]
    torch.testing.assert_close(our_loss, hf_loss, atol=1e-5, rtol=1e-5)
    hf_loss.backward()
    our_loss.backward()
    ours_params = dict(ours.named_parameters())
    hf_grads = state_dict_from_hf({name: p.grad for name, p in hf.named_parameters()})
    assert len(hf_grads) == 2 + 9 * 2 + 1  # embedding, head, 9 weights per layer (2 layers), final norm
    for name, grad in hf_grads.items():
        torch.testing.assert_close(ours_params[name].grad, grad, atol=1e-5, rtol=1e-4)
    for model in (hf, ours):
        model.zero_grad()
    bench._train_step(hf, bench.HFCausalLoss, ids, None)()
    bench._train_step(ours, obj, batch, None)()
    for name, weight in state_dict_from_hf(hf.state_dict()).items():
        torch.testing.assert_close(ours.state_dict()[name], weight, atol=1e-5, rtol=1e-4)


def test_peer_decoders_decode_the_same_ids():
    """mmfusion's caption loop on a text-only prefix and transformers' `generate` decode the same greedy
    ids, as many as asked on both sides (<eos> barred until then, though a random model favours it)."""
    hf, ours = bench.peer_models(TINY_LLAMA, vocab=97)
    with torch.no_grad():
        ours.lm_head.weight[bench.PEER_SPECIALS["eos"]] += 0.5  # <eos> the likeliest token nearly everywhere
        hf.lm_head.weight.copy_(ours.lm_head.weight)
    prompts = torch.randint(5, 97, (4, 6), generator=torch.Generator().manual_seed(1))
    fns = bench.peer_decoders(hf, ours, prompts, new_tokens=12)
    ref, got = fns["transformers"](), fns["mmfusion"]()
    assert ref.shape == got.shape == (4, 12)
    assert torch.equal(got, ref)
    assert not (got == bench.PEER_SPECIALS["eos"]).any()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_diffusers_loop_samples_the_images_of_mmfusions_sampler(sampler):
    """The plain diffusers loop of `peers_sampling` (the whole sequence each step, no cache) and mmfusion's
    sampler (the condition cached) make the same images from the same generators: the same work."""
    from mmfusion.generation.settings import DiffusionSampling

    model = bench._sampling_model(grid=4, token_dim=8, dim=64, n_layers=2, n_heads=2)
    settings = DiffusionSampling(ar_steps=1, order="raster", sampler=sampler, steps=6, cfg_scale=3.0)
    fns = bench.peer_samplers(model, 3, settings)
    ref, got = fns["diffusers"](), fns["mmfusion"]()
    assert ref.shape == got.shape == (3, 16, 8)
    torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    # another seed makes other images: the comparison is not of two constant outputs
    assert (fns["diffusers"]() - ref).abs().max() == 0
    assert not torch.allclose(bench.diffusers_loop(model, *_loop_args(settings, seed=5)), ref)


def _loop_args(settings, seed):
    from mmfusion.diffusion.config import DiffusionConfig

    conds, unconds = [[1, 10 + i, 20, 30, 3] for i in range(3)], [[1, 3]] * 3
    return DiffusionConfig(), settings, conds, unconds, [torch.Generator().manual_seed(seed + i) for i in range(3)]


def test_peer_items_run_quick_and_render_their_tables():
    """The three peer items (quick, with a tiny backbone where they take one) return the fields their
    tables read, and each table shows its rows with the ratio against its target."""
    train = bench.bench_peers_train(True, shapes={"tiny": TINY_LLAMA}, compiled=False)
    e = train["tiny"]["fp32"]
    assert e["transformers_s"] > 0 and e["mmfusion_s"] > 0 and e["ratio"] == e["mmfusion_s"] / e["transformers_s"]
    assert train["tiny"]["tokens_per_step"] == 2 * bench.PACK_LENGTH
    decode = bench.bench_peers_decode(True, shapes={"tiny": TINY_LLAMA})
    assert decode["tiny"]["same_ids"] and decode["tiny"]["mmfusion_tokens_per_s"] > 0
    sampling = bench.bench_peers_sampling(True, cases=[("demo", "ddim", 3, 2), ("demo", "ddpm", 4, 2)])
    assert {"demo ddim 3", "demo ddpm 4"} <= set(sampling)
    for case in ("demo ddim 3", "demo ddpm 4"):
        s = sampling[case]
        assert s["ratio"] == s["mmfusion_s"] / s["diffusers_s"] and s["max_abs_diff"] < 1e-4 * s["max_abs"]
    machine = {"cores": 2, "cpu": "c", "torch": "t"}
    text = bench.render_markdown(
        {"date": "d", "machine": machine, "peers_train": train, "peers_decode": decode, "peers_sampling": sampling}
    )
    assert f"| tiny (64 wide, 2 layers, 4 heads) | {train['tiny']['parameters']:,} | 128 | fp32 |" in text
    assert f"{e['ratio']:.2f}x (" in text and "| yes |" in text and "DDPM 4 steps | 2 x 16 |" in text
    assert "n/a" not in text


def test_against_target_says_by_how_much_a_ratio_misses():
    assert bench._against_target(0.9, 1.0) == "0.90x (met)"
    assert bench._against_target(1.26, 1.05) == "1.26x (missed by 20%)"


def test_train_width_times_each_width_and_precision_against_its_peak(monkeypatch):
    """The width item reports a row per width and precision, each with its MFU against the peak measured
    in turn with its steps; wider models have more parameters and FLOPs; the table shows every row."""
    from mmfusion import runtime

    monkeypatch.setattr(runtime, "bf16_native", lambda: (True, 1.0, 1.0))
    monkeypatch.setattr(runtime, "matmul_gflops", lambda dtype, n, seconds: 100.0 if dtype == torch.float32 else 400.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # eager steps of small models on a shared machine's cores: 1 thread keeps them fast
    try:
        out = bench.bench_train_width(True, widths=(64, 128), compiled=False)
    finally:
        torch.set_num_threads(threads)
    assert out["layers"] == 4 and out["head_dim"] == 64 and not out["compiled"]
    narrow, wide = out["dim=64"], out["dim=128"]
    assert wide["parameters"] > narrow["parameters"] and wide["model_gflops_per_step"] > narrow["model_gflops_per_step"]
    for row in (narrow, wide):
        for prec, peak in (("fp32", 100.0), ("bf16", 400.0)):
            e = row[prec]
            assert e["step_s"] > 0 and e["matmul_peak_gflops"] == peak
            assert math.isclose(e["achieved_gflops"], row["model_gflops_per_step"] / e["step_s"])
            assert math.isclose(e["mfu"], e["achieved_gflops"] / peak)
            assert math.isclose(e["tokens_per_s"], row["tokens_per_step"] / e["step_s"])
    table = bench.render_markdown({"date": "d", "machine": {"cores": 2, "cpu": "c", "torch": "t"}, "train_width": out})
    assert "training by width" in table and "| dim=128 |" in table and table.count("| bf16 |") == 2
    assert "n/a" not in table


def test_finetune_item_times_full_and_both_lora_forms_in_turn():
    """The fine-tuning item steps full fine-tuning and LoRA in both forms on the same batch, reports each
    step against full fine-tuning's and weight space's speed-up over peft's forward; the table shows them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = bench.bench_finetune(True, preset="tiny", compiled=False)
    finally:
        torch.set_num_threads(threads)
    full, peft, ours = out["full"], out["lora_peft"], out["lora"]
    assert peft["trainable_parameters"] == ours["trainable_parameters"] < full["trainable_parameters"]
    for e in (full, peft, ours):
        assert e["step_s"] > 0 and math.isclose(e["over_full"], e["step_s"] / full["step_s"])
    assert math.isclose(out["lora_speedup"], peft["step_s"] / ours["step_s"])
    table = bench.render_markdown({"date": "d", "machine": {"cores": 2, "cpu": "c", "torch": "t"}, "finetune": out})
    assert "the fine-tuning step" in table and "in weight space" in table and "n/a" not in table


def test_compiled_item_times_both_pipelines_in_turn_and_checks_they_agree(trained_tiny):
    """The `compiled` item on a tiny model: every kind timed on both sides, the ratio of the two, the
    same captions and images within a level, and a table that shows them."""
    from mmfusion.model.transformer import can_compile

    if not can_compile():
        pytest.skip("no C++ compiler for inductor")
    out = bench.bench_compiled(True, model=trained_tiny)
    for kind in ("images_1", "images_8", "captions_1", "captions_8", "captions_32"):
        t = out[kind]
        assert t["eager"] > 0 and t["compiled"] > 0 and math.isclose(t["speedup"], t["eager"] / t["compiled"])
    assert out["same_captions"] and out["max_pixel_diff"] <= 1 and out["compile_s"] > 0
    table = bench.render_markdown({"date": "d", "machine": {"cores": 2, "cpu": "c", "torch": "t"}, "compiled": out})
    assert "`pipe.compile()` against eager" in table and "| captions, batch 32 |" in table and "n/a" not in table


def test_then_and_now_trains_both_revisions_in_turn_and_compares_the_same_work(tmp_path):
    """benchmarks/then_and_now.py at HEAD against HEAD: the old side runs from a git worktree, each side
    trains and reports its summary, and the two trained the same samples and tokens (same code, same
    seeds), so the tokens a sample agree; the worktree is gone afterwards."""
    import argparse
    import subprocess

    from benchmarks import then_and_now

    tiny = ["model.preset=tiny", "data.shapes_n=256", "data.global_batch_size=8", "train.compile=false"]
    args = argparse.Namespace(
        minutes=5.0, rounds=1, processes=1, out=str(tmp_path), set=[*tiny, "train.max_steps=3"], old_set=[]
    )
    result = then_and_now.compare("HEAD", args)
    old, new = result["runs"]["old"][0], result["runs"]["new"][0]
    assert old["steps"] == new["steps"] == 3
    assert (old["samples"], old["tokens"]) == (new["samples"], new["tokens"]) and old["samples"] == 24
    assert result["ratios"][0] > 0 and result["pooled_ratio"] > 0
    assert not (tmp_path / "old_tree").exists()
    worktrees = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, cwd=then_and_now.REPO)
    assert str(tmp_path) not in worktrees.stdout
    summary = then_and_now.parse_summary("x\ntrained 1,234 steps (5,678 samples, 9,012 tokens) in 2.0 min: ...")
    assert summary == {"steps": 1234, "samples": 5678, "tokens": 9012, "seconds": 120.0, "samples_per_s": 5678 / 120}
