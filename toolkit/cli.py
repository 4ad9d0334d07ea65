"""``chimera``: train, describe, components, bench.

User errors (``ChimeraError``) print one line and exit 2; ``--debug`` shows the traceback. Anything else is a
bug and keeps its traceback. Heavy imports happen inside the commands, so ``chimera --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from toolkit.errors import ChimeraError, RunInterrupted


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), e.g. optim.lr=3e-4")


# --debug is accepted before or after the command: `chimera --debug train ...` and `chimera train ... --debug`
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument(
    "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for user errors too"
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="chimera", description="Compose and train LLaVA-style models from plugins."
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", parents=[_COMMON], help="train an experiment (all stages, or one with --stage)"
    )
    _add_config_args(p, optional=True)
    p.add_argument("--stage", help="run only this stage of a staged recipe")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue from the newest checkpoint, in the same MLflow run: the run of CONFIG + overrides, "
        "or RUN, a run folder (runs/NAME) or an MLflow run id (then CONFIG is not needed)",
    )

    p = sub.add_parser(
        "describe", parents=[_COMMON], help="build the model on the meta device and print its structure"
    )
    _add_config_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "components", parents=[_COMMON], help="list registered components with their parameters"
    )
    p.add_argument("kind", nargs="?", help="encoder, pooler, connector, mixer, ffn, decoder or dataset")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "plan",
        parents=[_COMMON],
        help="memory per device (training and inference) and FLOPs per token, before renting hardware",
    )
    _add_config_args(p)
    p.add_argument(
        "--devices", type=int, default=None, help="devices the run shards over (default: the config's)"
    )
    p.add_argument(
        "--device-memory", default=None, help="memory per device, e.g. 80GB (10^9) or 80GiB (2^30)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.max_length)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="sequences per device (default: data.batch_size)"
    )
    p.add_argument(
        "--images", type=int, default=None, help="images per sequence (default: fill the sequence)"
    )
    p.add_argument("--host-memory", default=None, help="host memory (default: this machine's available)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "ablate", parents=[_COMMON], help="run an ablation file: one training process per variant and seed"
    )
    p.add_argument("file", help="an ablation YAML (base experiment + variants or a grid)")
    p.add_argument("overrides", nargs="*", help="ablation keys (base=, seeds=, ...) or training overrides")
    p.add_argument("--dry-run", action="store_true", help="print one command per run (for a scheduler)")
    p.add_argument("--only", action="append", metavar="VARIANT", help="run this variant only (repeatable)")
    p.add_argument("--seeds", type=int, metavar="N", help="repeat every variant with N seeds")
    p.add_argument(
        "--jobs", type=int, default=1, metavar="J", help="train J runs at a time, each in its own process"
    )
    p = sub.add_parser("table", parents=[_COMMON], help="an ablation's table, read back from MLflow")
    p.add_argument("target", metavar="FILE_OR_NAME")
    p.add_argument("--format", choices=["md", "csv", "latex"], default="md")
    p.add_argument("--metrics", nargs="+", metavar="KEY[:final|best|max|min]")
    p.add_argument("--tracking-uri")
    p = sub.add_parser("plot", parents=[_COMMON], help="an ablation's validation curves (PNG)")
    p.add_argument("target", metavar="FILE_OR_NAME")
    p.add_argument("--out", metavar="PNG")
    p.add_argument("--metrics", nargs="+", metavar="KEY")
    p.add_argument("--tracking-uri")

    p = sub.add_parser("data", parents=[_COMMON], help="datasets: export one in the LLaVA format")
    dsub = p.add_subparsers(dest="data", required=True)
    d = dsub.add_parser(
        "export",
        parents=[_COMMON],
        help="write a dataset as LLaVA-format JSONL + PNGs (a scenes task, or an experiment's data.train)",
    )
    d.add_argument(
        "task", help="a `scenes` task (retrieval, needle, spatial, ...) or an experiment YAML file"
    )
    d.add_argument("out_dir", help="output folder (created; must be empty unless --overwrite)")
    d.add_argument(
        "overrides", nargs="*", help="dataset arguments key=value (e.g. images_per_sample=8 size=500)"
    )
    d.add_argument(
        "--image-size", type=int, default=None, help="pixels (default: 32, or the experiment's encoder)"
    )
    d.add_argument("--limit", type=int, default=None, help="export only the first N samples")
    d.add_argument("--workers", type=int, default=0, help="DataLoader workers that render and encode PNGs")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")

    p = sub.add_parser(
        "export",
        parents=[_COMMON],
        help="write a trained run as a transformers model (hf) or a whole VLM (vlm)",
    )
    p.add_argument("run", help="a run folder (runs/NAME) holding config.yaml and its final weights")
    p.add_argument("out_dir", help="output folder (any fsspec path)")
    p.add_argument("--format", choices=("hf", "vlm"), default="hf")
    p.add_argument(
        "--family", help="hf only: llama, mistral, qwen2, jamba, mamba or mamba2 (default: inferred)"
    )
    p.add_argument("--dtype", help="hf only: e.g. bfloat16 (default: the weights' own)")

    p = sub.add_parser(
        "generate",
        parents=[_COMMON],
        help="answer prompts (with images) from a run folder or an experiment file; batched, streamed",
    )
    p.add_argument("target", metavar="CONFIG_OR_RUN", help="a run folder (runs/NAME) or an experiment YAML")
    p.add_argument(
        "--image", action="extend", nargs="+", default=[], metavar="PATH", help="image file(s), in order"
    )
    p.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for a batch"
    )
    p.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line (added to --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")

    p = sub.add_parser("bench", parents=[_COMMON], help="benchmarks to run on your own hardware")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser(
        "mixers",
        parents=[_COMMON],
        help="Mamba-1/Mamba-2 CPU paths vs references; hybrid vs Transformer prefill",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not the issue's figures)")
    b = bsub.add_parser(
        "model",
        parents=[_COMMON],
        help="the toolkit's Lightning step vs a plain PyTorch loop on the same model",
    )
    _add_config_args(b)
    b.add_argument("--json", action="store_true")
    b.add_argument("--steps", type=int, default=20)
    b = bsub.add_parser(
        "data",
        parents=[_COMMON],
        help="the data loader's samples/s beside the model's own training step rate",
    )
    _add_config_args(b)
    b.add_argument("--json", action="store_true")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--batches", type=int, default=30)
    b.add_argument("--steps", type=int, default=10)
    b = bsub.add_parser(
        "gpu",
        parents=[_COMMON],
        help="CUDA machine: kernel parity tests, FSDP2 bf16 training step, kernel timings (one JSON)",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--out", default=None, help="also write the JSON here")
    b.add_argument("--only", default=None, help="comma-separated parts: kernels,parity,train,mixers,prefill")
    b.add_argument("--quick", action="store_true")
    b = bsub.add_parser(
        "vision",
        parents=[_COMMON],
        help="encoder+pooler+connector batched vs one by one; decoder step at 576 vs 144 tokens per image",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not the issue's figures)")
    b = bsub.add_parser(
        "generate",
        parents=[_COMMON],
        help="long-context inference: 1:7 hybrid vs Transformer prefill, decode tokens/s, cache memory",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="context lengths (default 4096 16384)"
    )
    b.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per length (default 64)")
    b.add_argument("--d-model", type=int, default=128)
    b.add_argument("--layers", type=int, default=8)
    b.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not the issue's figures)")
    return ap


def cmd_train(args: argparse.Namespace) -> int:
    from toolkit.plan import load_plan, resume_target
    from toolkit.train import train

    config, overrides = args.config, list(args.overrides)
    if isinstance(args.resume, str):  # --resume RUN: the run's own resolved config
        if config is not None and "=" in config:  # `chimera train --resume RUN key=value` parses oddly
            overrides.insert(0, config)
            config = None
        if config is not None or overrides:
            raise ChimeraError(
                f"--resume {args.resume}: a run resumes with the config it started with; drop the config "
                "file and overrides (or use CONFIG [overrides] --resume without a run)"
            )
        config = resume_target(args.resume)
    elif config is None:
        raise ChimeraError("train: missing CONFIG (an experiment YAML file), or --resume RUN")
    result = train(load_plan(config, overrides), stage=args.stage, resume=bool(args.resume))
    if not result.run_id:  # a non-zero rank of a multi-process run: rank 0 reports
        return 0
    print()
    for stage in result.stages:
        metrics = ", ".join(
            f"{k}={v:.4f}" for k, v in sorted(stage.metrics.items()) if k.startswith(("val/", "train/loss"))
        )
        print(f"chimera: {stage.name}: run {stage.run_id}  {metrics}")
        if stage.checkpoint:
            print(f"chimera:   checkpoint {stage.checkpoint}")
    print(f"chimera: MLflow run id {result.run_id} (experiment '{result.experiment}')")
    print(f"chimera: tracking store {result.tracking_uri}")
    print(f"chimera: look with: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from toolkit.ablation import run_ablation

    return run_ablation(
        args.file, args.overrides, dry_run=args.dry_run, only=args.only, seeds=args.seeds, jobs=args.jobs
    )


def cmd_table(args: argparse.Namespace) -> int:
    from toolkit.report import table

    print(table(args.target, fmt=args.format, metrics=args.metrics, tracking_uri=args.tracking_uri))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from toolkit.report import plot

    path = plot(args.target, out=args.out, metrics=args.metrics, tracking_uri=args.tracking_uri)
    print(f"chimera: wrote {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from toolkit.memory import estimate, format_plan
    from toolkit.plan import load_plan

    plan = estimate(
        load_plan(args.config, args.overrides, check_model=False),
        devices=args.devices,
        device_memory=args.device_memory,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        images=args.images,
        host_memory=args.host_memory,
    )
    print(plan.to_json() if args.json else format_plan(plan))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from toolkit.describe import describe, format_description
    from toolkit.plan import load_plan

    info = describe(load_plan(args.config, args.overrides, check_model=False))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _param_repr(value: Any) -> Any:
    import inspect

    return None if value is inspect.Parameter.empty else value


def cmd_components(args: argparse.Namespace) -> int:
    from toolkit import registry

    entries = registry.entries(args.kind)
    if args.json:
        out = [
            {
                "kind": e.kind,
                "name": e.name,
                "symbol": e.symbol,
                "module": e.module,
                "summary": e.summary,
                "params": [
                    {
                        "name": p.name,
                        "default": _jsonable(_param_repr(p.default)),
                        "required": p.required and p.name not in registry.DERIVED[e.kind],
                        "derived": p.name in registry.DERIVED[e.kind],
                        "type": p.annotation,
                    }
                    for p in e.params()
                ],
            }
            for e in entries
        ]
        print(json.dumps(out, indent=2))
        return 0
    kind = None
    for e in entries:
        if e.kind != kind:
            kind = e.kind
            print(f"\n{kind}s:")
        letter = f" [{e.symbol}]" if e.symbol else ""
        print(f"  {e.name}{letter}  ({e.module})  {e.summary}")
        for p in e.params():
            if p.name in registry.DERIVED[e.kind]:
                default = "(derived by Chimera)"
            else:
                default = "required" if p.required else f"= {p.default!r}"
            print(f"      {p.name}: {p.annotation or 'Any'} {default}")
    return 0


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def cmd_bench(args: argparse.Namespace) -> int:
    command = (
        "chimera " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "chimera bench " + args.bench
    )
    if args.bench == "vision":
        from toolkit.bench_vision import vision_bench_command

        flags = " --quick" * args.quick + " --json" * args.json
        return vision_bench_command(
            as_json=args.json, quick=args.quick, command=command if "--" in command else command + flags
        )
    if args.bench == "gpu":
        from toolkit.bench_gpu import PARTS, gpu_command

        parts = args.only.split(",") if args.only else PARTS
        return gpu_command(as_json=args.json, out_json=args.out, parts=parts, quick=args.quick)
    if args.bench == "data":
        from toolkit.bench_data import bench_data, format_data

        result = bench_data(
            args.config, args.overrides, workers=args.workers, batches=args.batches, steps=args.steps
        )
        result["command"] = command
        print(
            json.dumps(result, indent=2)
            if args.json
            else f"{format_data(result)}\n\n(measured by: {command})"
        )
        return 0
    if args.bench == "generate":
        from toolkit.bench_generate import generate_bench_command

        return generate_bench_command(
            as_json=args.json,
            quick=args.quick,
            command=command,
            lengths=args.lengths,
            new_tokens=args.new_tokens,
            d_model=args.d_model,
            n_layers=args.layers,
        )
    if args.bench == "mixers":
        from toolkit.bench import bench_mixers, format_mixers

        result = bench_mixers(quick=args.quick)
    else:
        from toolkit.bench import bench_model, format_model

        result = bench_model(args.config, args.overrides, steps=args.steps)
    result["command"] = command
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print((format_mixers if args.bench == "mixers" else format_model)(result))
        print(f"\n(measured by: {command})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toolkit.generate import generate_command

    prompts = list(args.prompt)
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text().splitlines()
        except OSError as exc:
            raise ChimeraError(f"--prompts {args.prompts}: cannot read it ({exc.strerror})") from exc
        prompts += [line for line in lines if line.strip()]
    return generate_command(
        args.target,
        args.image,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stream=args.stream,
    )


def cmd_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toolkit.config import parse_overrides
    from toolkit.data.export import export

    if args.task.endswith((".yaml", ".yml")):  # an experiment: its training data at its encoder's size
        from toolkit.plan import load_plan

        plan = load_plan(args.task, args.overrides, check_model=False)
        node = plan.stages[0].cfg.data.train
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
        image_size = args.image_size or _encoder_image_size(plan)
    else:
        node = {"name": "scenes", "task": args.task, **parse_overrides(args.overrides)}
        image_size = args.image_size or 32
    path = export(
        node,
        args.out_dir,
        image_size,
        limit=args.limit,
        workers=args.workers,
        overwrite=args.overwrite,
        where="data.train",
    )
    print(f"chimera: wrote {path} (read it back with data.train: {{name: llava, annotations: {Path(path)}}})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from toolkit.assemble import build_model
    from toolkit.checkpointing import final_weights, load_weights, loadable_checkpoint
    from toolkit.config import to_yaml
    from toolkit.convert import export_hf, export_vlm
    from toolkit.plan import load_plan, resume_target

    plan = load_plan(resume_target(args.run), check_model=False)
    stage = plan.stages[-1]  # a recipe's last stage holds the final model
    weights = final_weights(stage.run_dir) or loadable_checkpoint(stage.run_dir / "checkpoints")[0]
    if weights is None:
        raise ChimeraError(f"{args.run}: no final weights or loadable checkpoint under {stage.run_dir}")
    model = build_model(stage.cfg, plan.tokenizer)  # its pretrained init: is replaced by the trained weights
    load_weights(model, weights)
    if args.format == "hf":
        export_hf(model, plan.tokenizer, args.out_dir, args.family, dtype=args.dtype)
    else:
        export_vlm(model, to_yaml(stage.cfg), args.out_dir, tokenizer=plan.tokenizer)
    print(f"chimera: wrote {args.out_dir} ({args.format}) from {weights}")
    return 0


def _encoder_image_size(plan) -> int:
    import torch

    from toolkit.assemble import build_model

    with torch.device("meta"):
        return int(build_model(plan.cfg, plan.tokenizer).encoder.image_size)


COMMANDS = {
    "data": cmd_data,
    "export": cmd_export,
    "generate": cmd_generate,
    "ablate": cmd_ablate,
    "table": cmd_table,
    "plot": cmd_plot,
    "plan": cmd_plan,
    "train": cmd_train,
    "describe": cmd_describe,
    "components": cmd_components,
    "bench": cmd_bench,
}


def one_line(exc: ChimeraError) -> str:
    """The error's own line: an error raised in a DataLoader worker arrives wrapped in torch's
    "Caught ... in DataLoader worker process N. Original Traceback ..." text, ending with the original line."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return (
            last.split(": ", 1)[1]
            if last.startswith(("toolkit.errors.ChimeraError", "ChimeraError"))
            else last
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ChimeraError as exc:
        if args.debug:
            raise
        print(f"chimera: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"chimera: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
