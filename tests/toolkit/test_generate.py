"""Generation: left-padded batches equal one-by-one generation (hybrid, pure Mamba, Mamba-2), the padding keeps
the SSM states exactly zero and attention blind to it, sampling under a seed, streaming, ``chimera generate``,
and the forward-only scan against the sequential reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from components.decoders.hybrid import HybridDecoder
from components.mixers import kernels as mixer_kernels
from components.mixers import mamba as mamba_module
from components.mixers import mamba2 as mamba2_module
from components.mixers.attention import Attention
from components.mixers.mamba import Mamba
from components.mixers.mamba2 import Mamba2
from components.mixers.selective_scan import selective_scan
from tests.components import kernel_parity as kp
from tests.components.ssm_reference import selective_scan_ref
from tests.conftest import TINY_MODEL
from toolkit import generate as gen
from toolkit.errors import ChimeraError
from toolkit.model import build_model

IMG = 99
PATTERNS = {  # name: decoder overrides
    "hybrid": {"pattern": "m*m-", "n_layers": None},  # Mamba-1, attention, Mamba-1 + MLP
    "mamba": {"pattern": "mamba", "n_layers": 2},
    "mamba2": {"pattern": "mamba2", "n_layers": 2, "ssm": "mamba2"},
    "hybrid_mamba2": {"pattern": "M*-M-", "n_layers": None},
}


def tiny(kind: str, **decoder) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY_MODEL)
    cfg["decoder"].update({**PATTERNS[kind], **decoder})
    cfg["decoder"]["mixers"]["mamba2"] = {"d_state": 8, "headdim": 8, "chunk_size": 4}
    model = build_model(cfg, vocab_size=100, image_token_id=IMG).eval()
    with torch.no_grad():  # larger time steps than the init, so the SSM states carry real history
        for m in model.modules():
            if isinstance(m, Mamba):
                m.dt_proj.bias.add_(1.0)
            if isinstance(m, Mamba2):
                m.dt_bias.add_(1.0)
    return model


def prompts(model) -> tuple[list[list[int]], torch.Tensor, list[torch.Tensor | None]]:
    """Three prompts of lengths 12, 2 and 7, two of them with an image; the images of each alone."""
    P = model.image_tokens
    rows = [[1] + [IMG] * P + [5, 6, 7, 8, 9, 10, 11], [2, 3], [4] + [IMG] * P + [7, 12]]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return rows, images, [images[:1], None, images[1:]]


@pytest.mark.parametrize("kind", list(PATTERNS))
def test_left_padded_batch_equals_one_by_one_generation(kind):
    model = tiny(kind)
    rows, images, alone = prompts(model)
    batch = gen.generate(model, rows, images, max_new_tokens=6, output_logits=True)
    assert batch.prompt_lengths == [len(r) for r in rows]
    assert batch.sequences.shape == (3, max(map(len, rows)) + 6)
    for i, row in enumerate(rows):
        one = gen.generate(model, [row], alone[i], max_new_tokens=6, output_logits=True)
        assert batch.tokens[i] == one.tokens[0], (kind, i)
        assert (batch.logits[i] - one.logits[0]).abs().max() <= 1e-4, (kind, i)
        assert torch.equal(batch.sequences[i, -len(row) - 6 :], one.sequences[0])


@pytest.mark.parametrize("family", ["jamba", "llama_linear_rope", "qwen2", "mamba"])
def test_a_left_padded_batch_decodes_transformers_greedy_tokens_per_prompt(family, tmp_path):
    """Pretrained decoders (tiny random transformers models loaded through ``toolkit.convert``): one batch of
    prompts of different lengths through ``decode_steps`` gives, row by row, the 10 tokens transformers'
    ``generate`` gives each prompt alone."""
    from tests.convert.test_hf_decoder import FAMILIES, VOCAB, save_random
    from toolkit.convert import decoder_from_hf

    hf = save_random(FAMILIES[family][0], tmp_path / "hf")
    hf.generation_config.eos_token_id = None  # ten tokens, whatever they are
    decoder = decoder_from_hf(str(tmp_path / "hf")).eval()
    rows = [
        torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4, 7)
    ]
    ids, pad = gen.left_pad(rows, pad_token_id=0)
    with torch.inference_mode():
        steps = list(gen.decode_steps(decoder, decoder.embed(ids), pad, max_new_tokens=10))
    ours = torch.stack([step.tokens for step in steps], dim=1)  # [3, 10]
    for i, row in enumerate(rows):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([row]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert ours[i].tolist() == theirs[0, len(row) :].tolist(), (family, i)


def test_anyres_images_keep_their_token_plan_in_a_left_padded_batch():
    """Images prepared as the training data is (``prepare_images``: AnyRes tiles + global view, each image its
    own token count): a batch of prompts whose images take different numbers of slots, left-padded, generates
    what each prompt does alone."""
    from omegaconf import OmegaConf
    from PIL import Image

    cfg = copy.deepcopy(TINY_MODEL)
    cfg["decoder"].update({**PATTERNS["hybrid"]})
    cfg["vision"] = {"anyres": True}
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=100, image_token_id=IMG).eval()
    data = OmegaConf.create({"data": {"preprocess": "pad"}})
    wide = Image.fromarray((torch.rand(16, 48, 3) * 255).to(torch.uint8).numpy())  # a 3:1 image: tiles
    square = Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy())
    views, layout, counts = gen.prepare_images(model, data, [wide, square])
    assert counts[0] > counts[1] and views.shape[0] > 2 and layout.shape == (2, 6)
    rows = [[1, IMG, 5, 6], [2, IMG, 7]]
    ids = [gen.expand_images(r, IMG, iter([c])) for r, c in zip(rows, counts)]
    batch = gen.generate(model, ids, views, max_new_tokens=5, output_logits=True, image_layout=layout)
    for i, image in enumerate([wide, square]):
        v, lay, _ = gen.prepare_images(model, data, [image])
        one = gen.generate(model, [ids[i]], v, max_new_tokens=5, output_logits=True, image_layout=lay)
        assert batch.tokens[i] == one.tokens[0]
        assert (batch.logits[i] - one.logits[0]).abs().max() <= 1e-4
    with pytest.raises(ChimeraError, match="more <image> placeholders than images"):
        gen.expand_images([IMG, IMG], IMG, iter([3]))


def test_without_the_padding_support_the_padded_rows_would_differ(monkeypatch):
    """The test above is not vacuous: the same batch with the padding ignored changes the padded rows."""
    model = tiny("hybrid")
    rows, images, _ = prompts(model)
    want = gen.generate(model, rows, images, max_new_tokens=4, output_logits=True)
    allocate = HybridDecoder.allocate_cache

    def no_pad(self, *args, pad=None, **kwargs):
        return allocate(self, *args, **kwargs)

    monkeypatch.setattr(HybridDecoder, "allocate_cache", no_pad)
    got = gen.generate(model, rows, images, max_new_tokens=4, output_logits=True)
    assert torch.equal(got.logits[0], want.logits[0])  # the longest prompt has no padding
    assert (got.logits[1] - want.logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("mixer_cls", [Mamba, Mamba2])
def test_padding_keeps_the_ssm_state_exactly_zero_and_rows_unchanged(mixer_cls):
    torch.manual_seed(0)
    kwargs = {"d_state": 8} if mixer_cls is Mamba else {"d_state": 8, "headdim": 8, "chunk_size": 4}
    m = mixer_cls(16, use_kernels="never", **kwargs).eval()
    x = torch.randn(2, 9, 16)
    garbage = torch.full((2, 9, 16), float("nan"))  # whatever the padded positions hold never enters
    padded = torch.where(torch.arange(9)[None, :, None] < torch.tensor([4, 0])[:, None, None], garbage, x)
    with torch.no_grad():
        only_padding = m.allocate_cache(2, 12)
        only_padding.pad = torch.tensor([4, 0])
        m(padded[:, :4], only_padding)
        assert torch.equal(only_padding.ssm_state[0], torch.zeros_like(only_padding.ssm_state[0]))
        assert torch.equal(only_padding.conv_state[0], torch.zeros_like(only_padding.conv_state[0]))
        state = m.allocate_cache(2, 12)
        state.pad = torch.tensor([4, 0])
        out = torch.cat([m(padded, state), m(x[:, -1:], state)], 1)  # a prefill, then one decoding step
        alone = m.allocate_cache(1, 12)
        ref = torch.cat([m(x[:1, 4:], alone), m(x[:1, -1:], alone)], 1)
    assert (out[0, 4:] - ref[0]).abs().max() <= 1e-5
    assert (state.ssm_state[0] - alone.ssm_state[0]).abs().max() <= 1e-5
    assert (state.conv_state[0] - alone.conv_state[0]).abs().max() <= 1e-6


def test_attention_masks_padded_keys_and_starts_rope_at_the_first_real_token():
    torch.manual_seed(0)
    att = Attention(16, n_heads=4, n_kv_heads=2).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        state = att.allocate_cache(2, 10)
        state.pad = torch.tensor([3, 0])
        out = torch.cat([att(x, state), att(x[:, -1:], state)], 1)
        alone = att.allocate_cache(1, 10)
        ref = torch.cat([att(x[:1, 3:], alone), att(x[:1, -1:], alone)], 1)
        unpadded = torch.cat([att(x[1:]), att(torch.cat([x[1:], x[1:, -1:]], 1))[:, -1:]], 1)
    assert out.isfinite().all()  # padded queries see themselves: no fully masked row
    assert (out[0, 3:] - ref[0]).abs().max() <= 1e-5
    assert (out[1] - unpadded[0]).abs().max() <= 1e-5


@pytest.fixture
def fake_cuda(monkeypatch):
    """The kernel paths with the strict stand-ins of ``kernel_parity.py`` (CPU tensors routed as CUDA ones)."""
    monkeypatch.setattr(mixer_kernels, "_on_cuda", lambda x: True)
    monkeypatch.setattr(mixer_kernels, "_LOGGED", set())
    monkeypatch.setattr(mamba_module, "mamba1_kernels", lambda: (kp.stand_in_kernels("mamba"), ""))
    monkeypatch.setattr(mamba2_module, "mamba2_kernels", lambda: (kp.stand_in_kernels("mamba2"), ""))


@pytest.mark.parametrize("mixer_cls", [Mamba, Mamba2])
def test_the_kernel_paths_take_the_padding_too(fake_cuda, mixer_cls):
    torch.manual_seed(0)
    kwargs = {"d_state": 8} if mixer_cls is Mamba else {"d_state": 8, "headdim": 8, "chunk_size": 4}
    m = mixer_cls(16, use_kernels="auto", **kwargs).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        state = m.allocate_cache(2, 12)
        state.pad = torch.tensor([4, 0])
        out = torch.cat([m(x, state), m(x[:, -1:], state)], 1)
        alone = m.allocate_cache(1, 12)
        ref = torch.cat([m(x[:1, 4:], alone), m(x[:1, -1:], alone)], 1)
    assert (out[0, 4:] - ref[0]).abs().max() <= 1e-4
    assert (state.ssm_state[0] - alone.ssm_state[0]).abs().max() <= 1e-4


def test_a_mixer_without_padding_support_is_refused_by_name():
    dec = tiny("hybrid").decoder
    assert all(state.pad is not None for state in dec.allocate_cache(2, 8, pad=torch.tensor([1, 0])) if state)
    dec.layers[0].mixer.allocate_cache = lambda *a, **k: object()  # a plugin's state without ``pad``
    with pytest.raises(ChimeraError, match=r"layer 0: mixer 'Mamba' has no left-padding support"):
        dec.allocate_cache(2, 8, pad=torch.tensor([1, 0]))


def test_a_mixer_without_padding_support_is_fine_without_padding():
    dec = tiny("hybrid").decoder
    dec.layers[0].mixer.allocate_cache = lambda *a, **k: object()
    assert len(dec.allocate_cache(2, 8, pad=torch.tensor([0, 0]))) == len(dec.layers)


def test_sampling_is_reproducible_under_a_seed_and_a_tiny_nucleus_is_greedy():
    model = tiny("hybrid")
    rows, images, _ = prompts(model)
    kw = dict(max_new_tokens=8, temperature=1.5, top_p=0.9)
    a = gen.generate(model, rows, images, seed=7, **kw).tokens
    b = gen.generate(model, rows, images, seed=7, **kw).tokens
    c = gen.generate(model, rows, images, seed=8, **kw).tokens
    assert a == b and a != c
    greedy = gen.generate(model, rows, images, max_new_tokens=8).tokens
    assert (
        gen.generate(model, rows, images, seed=1, max_new_tokens=8, temperature=1.0, top_p=1e-6).tokens
        == greedy
    )


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(gen.next_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_streaming_yields_the_same_tokens_as_they_come():
    model = tiny("mamba")
    rows, images, _ = prompts(model)
    full = gen.generate(model, rows, images, max_new_tokens=5)
    streamed = [step.tokens for step in gen.stream(model, rows, images, max_new_tokens=5)]
    assert torch.equal(torch.stack(streamed, 1), full.sequences[:, -5:])
    called = []
    out = model.generate(rows, images, max_new_tokens=5, streamer=called.append)
    assert torch.equal(out, full.sequences) and torch.equal(torch.stack(called, 1), full.sequences[:, -5:])


def test_rows_stop_at_their_stop_token_and_are_padded_after_it():
    model = tiny("hybrid")
    rows, images, _ = prompts(model)
    T = max(map(len, rows))
    free = gen.generate(model, rows, images, max_new_tokens=6).sequences[:, T:]
    stop = int(free[0, 1])  # row 0's second token
    result = gen.generate(model, rows, images, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    new = result.sequences[:, T:]
    first = free[0].tolist().index(stop)
    assert result.tokens[0] == free[0, : first + 1].tolist()
    assert (new[0, first + 1 :] == 0).all()
    for i in range(3):  # every row: its free tokens up to its first stop, then padding
        row = free[i].tolist()
        end = row.index(stop) + 1 if stop in row else len(row)
        assert result.tokens[i] == row[:end]
        assert new[i, :end].tolist() == row[:end]
    if all(stop in free[i].tolist() for i in range(3)):
        assert new.shape[1] == max(free[i].tolist().index(stop) + 1 for i in range(3))  # all stopped: done


def test_equal_length_tensor_prompts_keep_the_old_interface():
    model = tiny("hybrid")
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = model.generate(ids, max_new_tokens=3)
    assert out.shape == (2, 6) and torch.equal(out[:, :3], ids)


@pytest.mark.parametrize("one_call", [True, False])
def test_inference_scan_matches_the_sequential_reference_across_blocks(one_call, monkeypatch):
    """The forward-only scan (no gradient needed) in several blocks and a partial one, against the fp64
    per-step reference, with an initial state and the last state returned; each block's recurrence as one
    ``_foreach_addcmul_`` call (CPUs) or as a loop (the fallback)."""
    import components.mixers.selective_scan as scan_module

    assert scan_module._foreach_in_order("cpu")  # this torch applies CPU foreach lists in order
    monkeypatch.setattr(scan_module, "_foreach_in_order", lambda device_type: one_call)
    torch.manual_seed(0)
    Bsz, L, D, N = 2, 70, 6, 4
    u, dt, z = torch.randn(Bsz, L, D), torch.randn(Bsz, L, D), torch.randn(Bsz, L, D)
    A, Bm, C = -torch.rand(D, N) * 3, torch.randn(Bsz, L, N), torch.randn(Bsz, L, N)
    Dp, bias, h0 = torch.randn(D), torch.randn(D), torch.randn(Bsz, D, N)
    args = (u, dt, A, Bm, C, Dp, z, bias)
    ref, ref_last = selective_scan_ref(*(t.double() for t in args), True, h0.double(), True)
    for block in (None, 16, 7):
        with torch.no_grad():
            y, last = selective_scan(
                *args, delta_softplus=True, initial_state=h0, return_last_state=True, block=block
            )
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (last.double() - ref_last).abs().max() <= 1e-5 * ref_last.abs().max()
    with torch.no_grad():  # very large time steps: the decays are floored, as in the training path
        big = selective_scan(u, dt + 60, A * 10, Bm, C, Dp, z, delta_bias=bias, delta_softplus=True)
    assert big.isfinite().all()
    assert (
        big.double() - selective_scan_ref(u, dt + 60, A * 10, Bm, C, Dp, z, bias, True).double()
    ).abs().max() < 1e-4


def test_a_mixer_without_gradients_computes_the_training_path_s_outputs():
    torch.manual_seed(0)
    m = Mamba(16, d_state=8, use_kernels="never")
    x = torch.randn(2, 150, 16)
    train = m(x)  # parameters require gradients: the training path
    with torch.no_grad():
        infer = m(x)  # the inference path: sequence-major conv, forward-only scan
    assert (train.detach() - infer).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------- prompts, command
@pytest.fixture
def experiment(tiny_experiment):
    from toolkit.assemble import build_model as assemble_model
    from toolkit.plan import load_plan

    plan = load_plan(tiny_experiment, check_model=False)
    return tiny_experiment, plan, assemble_model(plan.cfg, plan.tokenizer)


def test_prompt_is_the_human_turn_and_the_assistant_prefix(experiment):
    _, plan, _ = experiment
    template = gen.template_of(plan.cfg)
    ids = gen.render_prompt(template, plan.tokenizer, "<image>\nwhat color is the shape ?")
    text = plan.tokenizer.decode(ids)
    assert text.replace(" ", "").lower().endswith("assistant:")  # vicuna_v1: the answer follows
    assert "<image>" in text and "what" in text
    assert plan.tokenizer.eos_token_id in gen.end_of_turn_ids(template, plan.tokenizer)


def test_images_go_to_the_prompts_by_the_stated_rule():
    assert gen.assign_images(["a"], 2) == ["<image>\n<image>\na"]
    assert gen.assign_images(["a", "b"], 2) == ["<image>\na", "<image>\nb"]
    assert gen.assign_images(["x <image> y", "b"], 1) == ["x <image> y", "b"]
    with pytest.raises(ChimeraError, match="3 images for 2 prompts"):
        gen.assign_images(["a", "b"], 3)


def _png(tmp_path, name="img.png"):
    from PIL import Image

    path = tmp_path / name
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return str(path)


def test_generate_command_on_an_experiment_and_on_a_run_folder(experiment, tmp_path, capsys):
    from toolkit.checkpointing import FINAL_WEIGHTS, export_weights
    from toolkit.config import to_yaml
    from toolkit.plan import RESOLVED_CONFIG

    config, plan, model = experiment
    image = _png(tmp_path)
    args = dict(max_new_tokens=4, temperature=0.0, top_p=1.0, seed=None)
    assert (
        gen.generate_command(str(config), [image], ["what color is the shape ?"], **args, stream=False) == 0
    )
    one = capsys.readouterr().out.strip().splitlines()
    assert len(one) == 1

    run = plan.run_dir
    run.mkdir(parents=True)
    (run / RESOLVED_CONFIG).write_text(to_yaml(plan.cfg))
    torch.manual_seed(123)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_weights(trained.state_dict(), run / FINAL_WEIGHTS)
    questions = ["what color is the shape ?", "what shape is it ?"]
    assert gen.generate_command(str(run), [image, image], questions, **args, stream=False) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line[:4] for line in lines] == ["[0] ", "[1] "]
    # the run folder's weights are the ones used: the same answers as the trained model itself
    template = gen.template_of(plan.cfg)
    views, layout, counts = gen.prepare_images(trained, plan.cfg, gen.load_images([image, image]))
    assert views.shape[0] == 2 and counts == [trained.image_tokens] * 2  # one view each, no AnyRes here
    ids = gen.encode_prompts(trained, plan.tokenizer, template, gen.assign_images(questions, 2), counts)
    stops = gen.end_of_turn_ids(template, plan.tokenizer)
    expected = gen.generate(
        trained.eval(),
        ids,
        views,
        max_new_tokens=4,
        eos_token_id=stops,
        pad_token_id=plan.tokenizer.pad_token_id,
        image_layout=layout,
    )
    for line, tokens in zip(lines, expected.tokens):
        assert line[4:] == plan.tokenizer.decode(
            [t for t in tokens if t not in stops], skip_special_tokens=True
        )

    assert gen.generate_command(str(run), [image], questions[:1], **args, stream=True) == 0
    assert capsys.readouterr().out.strip() == lines[0][4:].strip()


def test_generate_command_errors_are_one_line_chimera_errors(experiment, tmp_path):
    config, _, _ = experiment
    args = dict(max_new_tokens=2, temperature=0.0, top_p=1.0, seed=None, stream=False)
    with pytest.raises(ChimeraError, match="no such run folder or experiment file"):
        gen.generate_command(str(tmp_path / "nope"), [], ["hi"], **args)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ChimeraError, match="cannot read it as an image"):
        gen.generate_command(str(config), [str(bad)], ["hi"], **args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChimeraError, match="holds no config.yaml"):
        gen.generate_command(str(tmp_path / "empty"), [], ["hi"], **args)


def test_chimera_generate_command_line(experiment, tmp_path, capsys):
    """``chimera generate RUN --image ... --prompt ... --prompts FILE``: in a process of its own, the same
    answers as ``generate_command``; a user error exits 2 with one line."""
    import subprocess
    import sys
    from pathlib import Path

    from toolkit.checkpointing import FINAL_WEIGHTS, export_weights
    from toolkit.config import to_yaml
    from toolkit.plan import RESOLVED_CONFIG

    _, plan, model = experiment
    run = plan.run_dir  # a run folder: its weights are fixed (an experiment file builds a random model)
    run.mkdir(parents=True)
    (run / RESOLVED_CONFIG).write_text(to_yaml(plan.cfg))
    export_weights(model.state_dict(), run / FINAL_WEIGHTS)
    image = _png(tmp_path)
    questions = ["what color is the shape ?", "what shape is it ?", "is it red ?"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{questions[1]}\n\n{questions[2]}\n")
    root = Path(__file__).resolve().parents[2]

    def chimera(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "toolkit.cli", *argv],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=300,
        )

    argv = ["generate", str(run), "--image", image, image, image, "--prompt", questions[0]]
    out = chimera(*argv, "--prompts", str(prompts), "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    args = dict(max_new_tokens=3, temperature=0.0, top_p=1.0, seed=None, stream=False)
    assert gen.generate_command(str(run), [image] * 3, questions, **args) == 0
    assert out.stdout == capsys.readouterr().out
    assert [line[:4] for line in out.stdout.splitlines()] == ["[0] ", "[1] ", "[2] "]

    sampled = ["--temperature", "0.9", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "3", "--stream"]
    streamed = chimera(*argv[:4], "--prompt", questions[0], *sampled)
    assert streamed.returncode == 0, streamed.stderr
    args.update(temperature=0.9, top_p=0.9, seed=7, stream=True)
    assert gen.generate_command(str(run), [image], questions[:1], **args) == 0
    assert streamed.stdout == capsys.readouterr().out  # a seed makes sampling reproducible

    from toolkit.cli import main

    assert main(["generate", str(tmp_path / "nope.yaml"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chimera: error:") and len(err.strip().splitlines()) == 1


def test_text_stream_prints_words_as_they_come(experiment):
    _, plan, _ = experiment
    tok = plan.tokenizer
    ids = tok("red square", add_special_tokens=False)["input_ids"]
    out = io.StringIO()
    printer = gen.TextStream(tok, 1, out)
    for t in ids:
        printer(torch.tensor([t]))
    printer(torch.tensor([tok.eos_token_id]), stops=[tok.eos_token_id])
    assert out.getvalue() == tok.decode(ids, skip_special_tokens=True)


def test_invalid_decoding_arguments_are_user_errors():
    model = tiny("mamba")
    with pytest.raises(ChimeraError, match="max_new_tokens"):
        gen.generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ChimeraError, match="top_p"):
        gen.generate(model, [[1, 2]], top_p=0.0)
    with pytest.raises(ChimeraError, match="at least one token"):
        gen.generate(model, [[1, 2], []])


def test_the_serial_block_loop_changes_no_number_and_restores_the_threads(monkeypatch):
    """The inference scan runs its block loop on one intra-op thread (``_one_thread``): same results as on all
    threads, and the caller's thread count comes back, also when the loop raises."""
    from components.mixers import selective_scan as ss

    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(1, 150, 64, generator=g), torch.randn(1, 150, 64, generator=g)
    A, B, C = (
        -torch.rand(64, 8, generator=g),
        torch.randn(1, 150, 8, generator=g),
        torch.randn(1, 150, 8, generator=g),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            serial = ss.selective_scan(u, dt, A, B, C, delta_softplus=True)
            assert torch.get_num_threads() == 2
            monkeypatch.setattr(ss, "SERIAL_BLOCKS", False)
            assert torch.equal(ss.selective_scan(u, dt, A, B, C, delta_softplus=True), serial)
            monkeypatch.setattr(ss, "SERIAL_BLOCKS", True)
            with pytest.raises(RuntimeError), ss._one_thread(torch.device("cpu")):
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside the loop")
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_conv_sequence_major_equals_the_channel_first_conv():
    from components.mixers.causal_conv import causal_conv1d, causal_conv1d_seq

    torch.manual_seed(0)
    x, w, b, prefix = torch.randn(2, 11, 6), torch.randn(6, 4), torch.randn(6), torch.randn(2, 6, 3)
    for pre in (None, prefix):
        want = causal_conv1d(x.transpose(1, 2), w, b, prefix=pre).transpose(1, 2)
        assert (causal_conv1d_seq(x, w, b, prefix=pre) - want).abs().max() <= 1e-6
    assert (
        causal_conv1d_seq(x, w, None)
        - F.silu(F.conv1d(x.transpose(1, 2), w[:, None], None, padding=3, groups=6)[..., :11]).transpose(1, 2)
    ).abs().max() <= 1e-6
