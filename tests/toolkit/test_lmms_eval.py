"""lmms-eval: the ``chimera`` model class answers lmms-eval-style requests (generate_until, loglikelihood) from a
run folder, results go to the run's MLflow run; the entry-point registration is checked when lmms-eval is
installed (it is an optional extra). Requests are lmms-eval's own ``Instance`` objects when it is installed,
else stand-ins with the same ``args``."""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from toolkit import generate as gen
from toolkit.errors import ChimeraError

HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None


@dataclass
class Request:
    """lmms-eval 0.7's ``Instance`` as a model sees it (``args``: the request's ``arguments`` tuple), for when
    lmms-eval is not installed."""

    request_type: str
    arguments: tuple

    @property
    def args(self) -> tuple:
        return self.arguments


def request(kind: str, args: tuple) -> Any:
    """A request as lmms-eval builds it: its real ``Instance`` when installed (the ``eval`` extra)."""
    if not HAS_LMMS_EVAL:
        return Request(kind, args)
    from lmms_eval.api.instance import Instance

    metadata = {"task": args[4], "doc_id": args[3], "repeats": 1}
    return Instance(request_type=kind, arguments=args, idx=0, metadata=metadata)


@pytest.fixture
def run(tiny_experiment, tmp_path):
    """A run folder as training leaves it: config.yaml, final weights, run.json naming an MLflow run."""
    from toolkit import tracking
    from toolkit.assemble import build_model
    from toolkit.checkpointing import FINAL_WEIGHTS, export_weights
    from toolkit.config import to_yaml
    from toolkit.plan import RESOLVED_CONFIG, RUN_STATE, load_plan

    plan = load_plan(tiny_experiment, check_model=False)
    model = build_model(plan.cfg, plan.tokenizer)
    with torch.no_grad():  # "trained": not the weights a fresh build would have
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = plan.run_dir
    folder.mkdir(parents=True)
    (folder / RESOLVED_CONFIG).write_text(to_yaml(plan.cfg))
    export_weights(model.state_dict(), folder / FINAL_WEIGHTS)
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracking.client(uri)
    run_id = client.create_run(
        client.create_experiment("tests", artifact_location=tracking.artifact_location(uri))
    ).info.run_id
    (folder / RUN_STATE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id, "finished": True}))
    return folder, model.eval(), plan, uri, run_id


def shapes_task(n: int = 3) -> tuple[dict[str, Any], Any]:
    from PIL import Image

    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    docs = [
        {"image": Image.new("RGB", (24, 24), colors[i % 3]), "question": "what color is the shape ?"}
        for i in range(n)
    ]
    return {"shapes": {"test": docs}}, lambda doc: [doc["image"]]


def test_generate_until_answers_each_request_as_chimera_generate_would(run):
    from toolkit.eval.lmms import Chimera

    folder, model, plan, _, _ = run
    lm = Chimera(run=str(folder), batch_size=2, device="cpu", max_new_tokens=4)
    lm.task_dict, doc_to_visual = shapes_task()
    greedy = {"max_new_tokens": 4, "until": ["\n\n"]}
    sampled = {"max_new_tokens": 3, "do_sample": True, "temperature": 0.0}  # temperature 0: greedy too
    requests = [
        request("generate_until", ("what color is the shape ?", greedy, doc_to_visual, 0, "shapes", "test")),
        request("generate_until", ("what shape is it ?", sampled, doc_to_visual, 1, "shapes", "test")),
        request("generate_until", ("what color is the shape ?", greedy, doc_to_visual, 2, "shapes", "test")),
        request("generate_until", ("what shape is it ?", greedy, None, 0, "shapes", "test")),  # text only
    ]
    answers = lm.generate_until(requests)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    template = gen.template_of(plan.cfg)
    stops = gen.end_of_turn_ids(template, plan.tokenizer)
    for req, answer in zip(requests, answers):  # one by one, in order, as `chimera generate` would
        context, kwargs, dtv, doc_id, _, _ = req.args
        images = dtv(lm.task_dict["shapes"]["test"][doc_id]) if dtv else []
        text = gen.assign_images([context], len(images))
        views, layout, counts = gen.prepare_images(model, plan.cfg, images)
        ids = gen.encode_prompts(model, plan.tokenizer, template, text, counts)
        out = gen.generate(
            model,
            ids,
            views,
            max_new_tokens=kwargs["max_new_tokens"],
            eos_token_id=stops,
            pad_token_id=plan.tokenizer.pad_token_id,
            image_layout=layout,
        )
        want = plan.tokenizer.decode([t for t in out.tokens[0] if t not in stops], skip_special_tokens=True)
        assert answer == want


def test_until_strings_cut_the_answer(run, monkeypatch):
    from toolkit.eval.lmms import Chimera

    folder, *_ = run
    lm = Chimera(run=str(folder), device="cpu")
    lm.task_dict, doc_to_visual = shapes_task(1)
    args = ("what color is the shape ?", {"max_new_tokens": 4}, doc_to_visual, 0, "shapes", "test")
    full = lm.generate_until([request("generate_until", args)])[0]
    words = full.split()
    if len(words) < 2:
        pytest.skip(f"the random model answered {full!r}: too short to cut")
    cut = {"max_new_tokens": 4, "until": [words[1]]}
    assert (
        lm.generate_until([request("generate_until", (args[0], cut, *args[2:]))])[0]
        == full[: full.index(words[1])]
    )


def test_loglikelihood_is_the_continuation_s_log_probability_and_greedy_flag(run):
    from toolkit.eval.lmms import Chimera

    folder, model, plan, _, _ = run
    lm = Chimera(run=str(folder), device="cpu")
    lm.task_dict, doc_to_visual = shapes_task(1)
    context = "what color is the shape ?"
    template = gen.template_of(plan.cfg)
    image = lm.task_dict["shapes"]["test"][0]["image"]
    pixels, layout, counts = gen.prepare_images(model, plan.cfg, [image])
    prompt = gen.encode_prompts(model, plan.tokenizer, template, gen.assign_images([context], 1), counts)[0]
    with torch.no_grad():  # the word the model would say first, so one continuation is greedy
        logits = model(torch.tensor([prompt]), pixels, image_layout=layout)[0, -1]
    special = set(plan.tokenizer.all_special_ids)
    first, greedy = (
        next(int(t) for t in logits.argsort(descending=True) if int(t) not in special),
        int(logits.argmax()),
    )
    favourite = " " + plan.tokenizer.decode([first])
    continuations = [" red", lambda doc: " blue circle", favourite]
    requests = [
        request("loglikelihood", (context, c, doc_to_visual, 0, "shapes", "test")) for c in continuations
    ]
    results = lm.loglikelihood(requests)
    for (logprob, is_greedy), continuation in zip(results, [" red", " blue circle", favourite]):
        target = plan.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target]), pixels, image_layout=layout)[0]
        lp = torch.log_softmax(logits.float(), -1)
        want = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(target))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert logprob < 0
        assert is_greedy == all(int(lp[len(prompt) - 1 + i].argmax()) == t for i, t in enumerate(target))
    if first == greedy:  # the model's first choice is a word: that continuation is its greedy answer
        assert results[2][1] is True


def test_model_args_and_refusals(run, tiny_experiment):
    from toolkit.eval.lmms import Chimera

    folder, *_ = run
    lm = Chimera(config=str(tiny_experiment), batch_size="auto", device="auto", unknown_arg=1)
    assert lm.batch_size == 8 and lm.device.type in ("cpu", "cuda") and lm.rank == 0 and lm.world_size == 1
    with pytest.raises(ChimeraError, match="model_args run="):
        Chimera()
    lm = Chimera(run=str(folder), device="cpu")
    lm.task_dict = {"video": {"test": [{"video": "clip.mp4"}]}}
    video = request("generate_until", ("?", {}, lambda doc: [doc["video"]], 0, "video", "test"))
    with pytest.raises(ChimeraError, match="not an image"):
        lm.generate_until([video])
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([video])


RESULTS = {
    "results": {
        "mme": {"alias": "mme", "mme_cognition_score,none": 212.5, "mme_percetion_score,none": 1010.0},
        "gqa": {"alias": "gqa", "exact_match,strict": 0.25, "exact_match_stderr,strict": "N/A"},
    },
    "config": {"model": "chimera", "limit": 8},
    "lmms_eval_version": "main@abcdef12",
}


def test_results_go_to_the_mlflow_run_of_the_checkpoint(run, tmp_path):
    from toolkit import tracking
    from toolkit.eval.results import log_results

    folder, _, _, uri, run_id = run
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert log_results(folder, path) == run_id
    data = tracking.client(uri).get_run(run_id).data
    assert data.metrics == {
        "eval/mme/mme_cognition_score": 212.5,
        "eval/mme/mme_percetion_score": 1010.0,
        "eval/gqa/exact_match/strict": 0.25,
    }
    version = data.tags["eval.harness_version"]
    assert version == (importlib.metadata.version("lmms-eval") if HAS_LMMS_EVAL else "main@abcdef12")
    assert data.tags["eval.harness"] == "lmms-eval"
    assert data.tags["eval.tasks"] == "gqa,mme"
    assert data.tags["eval.mme"] == f"lmms-eval {version}"
    assert data.tags["eval.limit"] == "8"
    artifacts = [a.path for a in tracking.client(uri).list_artifacts(run_id)]
    assert "lmms_eval_gqa+mme.json" in artifacts


def test_log_results_refuses_what_it_cannot_place(run, tmp_path):
    from toolkit.eval.__main__ import main
    from toolkit.eval.results import log_results

    folder, *_ = run
    with pytest.raises(ChimeraError, match="no 'results' section"):
        log_results(folder, {"config": {}})
    with pytest.raises(ChimeraError, match="no run.json"):
        log_results(tmp_path, RESULTS)
    (tmp_path / "r.json").write_text(json.dumps(RESULTS))
    assert main(["log", str(folder), str(tmp_path / "r.json")]) == 0
    assert main(["log", str(tmp_path), str(tmp_path / "r.json")]) == 2


def test_staged_runs_log_to_the_last_stage_s_run(run, tmp_path):
    from toolkit.eval.results import run_of
    from toolkit.plan import RUN_STATE

    folder, _, plan, uri, run_id = run
    state = {
        "tracking_uri": uri,
        "parent_run_id": "parent",
        "stages": {plan.stages[-1].name: {"run_id": run_id}},
    }
    (folder / RUN_STATE).write_text(json.dumps(state))
    assert run_of(folder) == (uri, run_id)


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (the optional 'eval' extra)")
def test_lmms_eval_finds_the_chimera_model_through_its_entry_point():
    from lmms_eval.models import get_model

    from toolkit.eval.lmms import Chimera

    assert get_model("chimera") is Chimera


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (the optional 'eval' extra)")
def test_lmms_eval_builds_the_model_from_model_args_as_its_cli_does(run):
    """``lmms-eval --model chimera --model_args run=...,max_new_tokens=3 --batch_size 2``: the class from the
    registry, built by ``create_from_arg_string`` with the CLI's extra config, answers real ``Instance``s."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    folder, model, plan, _, _ = run
    extra = {"batch_size": 2, "max_batch_size": None, "device": "cpu"}  # what simple_evaluate passes
    lm = get_model("chimera").create_from_arg_string(f"run={folder},max_new_tokens=3", extra)
    assert lm.batch_size == 2 and lm.max_new_tokens == 3 and lm.device.type == "cpu"
    lm.task_dict, doc_to_visual = shapes_task(2)
    requests = [
        Instance(
            "generate_until",
            (q, {}, doc_to_visual, i, "shapes", "test"),
            i,
            {"task": "shapes", "doc_id": i, "repeats": 1},
        )
        for i, q in enumerate(["what color is the shape ?", "what shape is it ?"])
    ]
    answers = lm.generate_until(requests)
    template = gen.template_of(plan.cfg)
    stops = gen.end_of_turn_ids(template, plan.tokenizer)
    for req, answer in zip(requests, answers):
        context, _, dtv, doc_id, _, _ = req.args
        image = dtv(lm.task_dict["shapes"]["test"][doc_id])[0]
        views, layout, counts = gen.prepare_images(model, plan.cfg, [image])
        ids = gen.encode_prompts(model, plan.tokenizer, template, gen.assign_images([context], 1), counts)
        out = gen.generate(
            model,
            ids,
            views,
            max_new_tokens=3,
            eos_token_id=stops,
            pad_token_id=lm.pad_id,
            image_layout=layout,
        )
        assert answer == plan.tokenizer.decode(
            [t for t in out.tokens[0] if t not in stops], skip_special_tokens=True
        )
        assert len(out.tokens[0]) <= 3


def test_the_entry_point_payload_names_the_model_class():
    import toolkit.eval

    if not HAS_LMMS_EVAL:
        pytest.skip("lmms-eval is not installed: its ModelManifest cannot be built")
    manifest = toolkit.eval.manifest()
    assert manifest.model_id == "chimera" and manifest.simple_class_path == "toolkit.eval.lmms.Chimera"
    assert copy.copy(toolkit.eval.MODEL_CLASS) == "toolkit.eval.lmms.Chimera"
