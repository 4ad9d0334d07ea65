"""``chimera bench gpu``: the checks and first figures of a CUDA machine with mamba-ssm, in one JSON.

``run_gpu_check(out_json)`` runs, on a CUDA machine:

1. ``kernels``: what the lazy probes of ``components/mixers/kernels.py`` find (versions of mamba-ssm and
   causal-conv1d, each mixer's kernels and fused functions, the reason when one cannot run).
2. ``parity``: the ``gpu``-marked tests of ``tests/components/test_mamba.py`` and ``test_mamba2.py``
   (``pytest -m gpu``, in a subprocess): each mixer on its kernels (``use_kernels: always``) against its PyTorch
   path on the CPU, outputs and gradients, fp32 and bf16, odd shapes, the fused Mamba-2 path, packed sequences,
   decoding under bf16 autocast, the sizes the kernels refuse. Needs a source checkout (the tests ship there).
3. ``train``: ``chimera train experiments/gpu_check.yaml`` in a subprocess (one GPU: one process, FSDP2 with a
   world of 1; several: ``torchrun --nproc-per-node=N``), FSDP2 + bf16-mixed + activation checkpointing, with
   its own output folder and MLflow store; ``perf/*`` (step time, tokens/s, TFLOP/s, MFU, peak memory) read
   back from MLflow. The first logged window holds the warm-up (Triton autotuning, cuDNN/cuBLAS setup), so the
   summary is the median of the later windows.
4. ``mixers``: each SSM mixer on its kernels against its PyTorch path on the same GPU (``chimera bench mixers``
   measures the PyTorch paths on the CPU only): forward + backward under bf16 autocast, and one decoding step.
5. ``prefill``: ``toolkit.bench.bench_prefill`` on the GPU (1:7 hybrid vs Transformer, no grad).

Without a CUDA device it writes ``{"ok": false, "reason": "no CUDA device: nothing to check"}`` and the command
exits non-zero. Everything printed by the parts goes to their logs (paths in the JSON), so ``--json`` output on
stdout stays valid JSON: ``chimera bench gpu --json > gpu.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NO_CUDA = "no CUDA device: nothing to check"
ROOT = Path(__file__).resolve().parents[1]
PARITY_TESTS = ("tests/components/test_mamba.py", "tests/components/test_mamba2.py")
GPU_CHECK_CONFIG = ROOT / "experiments" / "gpu_check.yaml"
PARTS = ("kernels", "parity", "train", "mixers", "prefill")
PERF_KEYS = ("step_time_s", "tokens_per_s", "samples_per_s", "tflops", "mfu", "peak_mem_gb")
EXPERIMENT = "gpu_check"


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _run_logged(cmd: list[str], log: Path, timeout_s: float, cwd: Path = ROOT) -> tuple[int | None, float]:
    """Run ``cmd`` with stdout and stderr into ``log``; (return code or None on timeout, wall seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(
                cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- parity
def _junit_results(xml_path: Path) -> list[dict[str, str]]:
    """One ``{"test", "outcome", "message"}`` per test case of a pytest junit XML file."""
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            child = case.find(tag)
            if child is not None:
                text = (child.get("message") or child.text or "").strip()
                outcome, message = name, (text.splitlines()[0][:500] if text else "")
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        cases.append({"test": name, "outcome": outcome, "message": message})
    return cases


def run_parity_tests(
    workdir: Path, timeout_s: float = 1800, extra_args: Sequence[str] = ()
) -> dict[str, Any]:
    """``pytest -m gpu`` on the mixer tests, in a subprocess; counts, failures and skip reasons.

    ``ok`` needs at least one test to pass and none to fail: a run where every test skipped (no mamba-ssm)
    is not a pass.
    """
    files = [ROOT / f for f in PARITY_TESTS]
    if not all(f.exists() for f in files):
        return {"ok": False, "reason": f"tests not found under {ROOT / 'tests'}: run from a source checkout"}
    xml, log = workdir / "parity.xml", workdir / "parity.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *map(str, files), "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *extra_args]  # fmt: skip
    rc, wall = _run_logged(cmd, log, timeout_s)
    result: dict[str, Any] = {
        "command": " ".join(cmd[2:]),
        "returncode": rc,
        "wall_s": round(wall, 1),
        "log": str(log),
    }
    if rc is None or not xml.exists():
        result.update(
            ok=False, reason=f"pytest {'timed out' if rc is None else 'wrote no report'}", log_tail=_tail(log)
        )
        return result
    cases = _junit_results(xml)
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    skipped: dict[str, int] = {}
    for c in cases:
        if c["outcome"] == "skipped":
            skipped[c["message"]] = skipped.get(c["message"], 0) + 1
    result.update(
        counts,
        failures=[c for c in cases if c["outcome"] in ("failed", "error")],
        skip_reasons=skipped,
        tests=cases,
    )
    if counts["failed"] or counts["error"]:
        result.update(
            ok=False, reason=f"{counts['failed'] + counts['error']} GPU test(s) failed", log_tail=_tail(log)
        )
    elif not counts["passed"]:
        first = next(iter(skipped), "no test collected")
        result.update(ok=False, reason=f"no GPU test ran ({counts['skipped']} skipped: {first})")
    else:
        result.update(ok=rc == 0, reason="" if rc == 0 else f"pytest exited with {rc}")
    return result


# ---------------------------------------------------------------------------------------------------- train
def _train_command(config: Path, overrides: Sequence[str], devices: int) -> list[str]:
    train = ["-m", "toolkit.cli", "train", str(config), *overrides]
    if devices > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={devices}",
            *train,
        ]
    return [sys.executable, *train]


def _find_run(uri: str, experiment: str) -> str | None:
    from toolkit import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def perf_summary(history: dict[str, list[tuple[int, float, int]]]) -> dict[str, Any]:
    """``perf/*`` histories -> per metric: every window (step, value), the last, and a steady value: the median
    of the windows after the first (which holds the warm-up; all of them when there is one), the maximum for
    peak memory."""
    out: dict[str, Any] = {"windows": {}, "steady": {}, "last": {}}
    for key, values in history.items():
        if not values:
            continue
        name = key.removeprefix("perf/")
        out["windows"][name] = [[step, value] for step, value, _ in values]
        later = [v for _, v, _ in values[1:]] or [values[0][1]]
        # peak memory: the highest of all windows; rates: the median after the warm-up window
        out["steady"][name] = (
            max(v for _, v, _ in values) if name == "peak_mem_gb" else statistics.median(later)
        )
        out["last"][name] = values[-1][1]
    return out


def run_training_check(
    workdir: Path,
    *,
    config: str | Path = GPU_CHECK_CONFIG,
    overrides: Sequence[str] = (),
    devices: int | None = None,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """``chimera train`` of ``config`` in a subprocess with its own output folder and MLflow store; ``perf/*``
    read back from the store. ``devices``: GPUs to use (default: all visible; several run under torchrun)."""
    import torch

    from toolkit import tracking

    devices = devices if devices is not None else max(torch.cuda.device_count(), 1)
    uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    overrides = [
        f"output_dir={workdir / 'runs'}",
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        "name=gpu_check",
        f"trainer.devices={devices}",
        *overrides,
    ]
    cmd = _train_command(Path(config), overrides, devices)
    log = workdir / "train.log"
    rc, wall = _run_logged(cmd, log, timeout_s)
    result: dict[str, Any] = {
        "config": str(config),
        "overrides": list(overrides),
        "devices": devices,
        "command": " ".join(cmd[1:]),
        "returncode": rc,
        "wall_s": round(wall, 1),
        "log": str(log),
        "tracking_uri": uri,
    }
    if rc != 0:
        result.update(
            ok=False,
            reason="training timed out" if rc is None else f"training exited with {rc}",
            log_tail=_tail(log),
        )
        return result
    run_id = _find_run(uri, EXPERIMENT)
    if run_id is None:
        result.update(ok=False, reason=f"no MLflow run in {uri}", log_tail=_tail(log))
        return result
    history = {f"perf/{k}": tracking.metric_history(uri, run_id, f"perf/{k}") for k in PERF_KEYS}
    loss = tracking.metric_history(uri, run_id, "train/loss")
    result.update(run_id=run_id, perf=perf_summary(history), loss=[[s, v] for s, v, _ in loss])
    if not history["perf/step_time_s"]:
        result.update(ok=False, reason="the run logged no perf/* metrics", log_tail=_tail(log))
    else:
        result.update(ok=True, reason="")
    return result


# --------------------------------------------------------------------------------------------------- mixers
def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up: Triton autotuning and compilation happen here
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_mixer(mixer: Any, x: Any, token: Any, repeats: int, on_cuda: bool) -> dict[str, float]:
    """fwd+bwd under bf16 autocast (CUDA) and one decoding step (after a short prefill) of ``mixer``."""
    import torch

    kind = x.device.type
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    def step() -> None:
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=on_cuda):
            mixer(x).float().square().mean().backward()

    state = mixer.allocate_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        mixer(x.detach()[:, :16], state)  # a prefill, so the steps continue a state

    def decode() -> None:
        with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=on_cuda):
            mixer(token, state)

    out = {"train_step_s": _timed(step, repeats, sync), "decode_step_s": _timed(decode, repeats * 4, sync)}
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        out["train_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_kernels(quick: bool = False, device: str | None = None, repeats: int = 5) -> dict[str, Any]:
    """Each SSM mixer on its CUDA kernels against its PyTorch path, same weights, same GPU.

    ``train_step_s``: forward + backward under bf16 autocast with fp32 weights (what bf16-mixed training runs);
    ``decode_step_s``: one token with a decoding state, no grad. Without CUDA only the PyTorch path is timed
    (a smoke test of this function)."""
    import torch

    from toolkit import registry

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    batch, d_model, length = (2, 64, 128) if quick else (4, 1024, 2048)
    shapes = {
        "mamba": {"name": "mamba", "d_state": 16},
        "mamba2": {"name": "mamba2", "d_state": 64 if quick else 128, "headdim": 16 if quick else 64},
    }
    paths = ("kernels", "torch") if on_cuda else ("torch",)
    out: dict[str, Any] = {"device": device, "B": batch, "L": length, "d_model": d_model, "repeats": repeats}
    for name, node in shapes.items():
        entry: dict[str, Any] = {"config": node}
        torch.manual_seed(0)
        mixers = {
            path: registry.build(
                "mixer", {**node, "use_kernels": "always" if path == "kernels" else "never"}, f"bench.{name}",
                d_model=d_model,
            ).to(device)
            for path in paths
        }  # fmt: skip
        if "kernels" in mixers:
            mixers["kernels"].load_state_dict(mixers["torch"].state_dict())
        x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
        token = torch.randn(batch, 1, d_model, device=device)
        for path, mixer in mixers.items():
            entry[path] = _time_mixer(mixer, x, token, repeats, on_cuda)
        if "kernels" in entry:
            entry["train_speedup"] = entry["torch"]["train_step_s"] / entry["kernels"]["train_step_s"]
            entry["decode_speedup"] = entry["torch"]["decode_step_s"] / entry["kernels"]["decode_step_s"]
        out[name] = entry
    return out


# ----------------------------------------------------------------------------------------------------- main
def _environment() -> dict[str, Any]:
    import torch

    def installed_version(dist: str) -> str | None:
        from importlib import metadata

        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mamba_ssm": installed_version("mamba-ssm"),
        "causal_conv1d": installed_version("causal-conv1d"),
        "triton": installed_version("triton"),
    }
    if torch.cuda.is_available():
        env["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    return env


def _write(out_json: str | Path | None, result: dict[str, Any]) -> None:
    if out_json is not None:
        path = Path(out_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=repr) + "\n")


def run_gpu_check(
    out_json: str | Path | None = None,
    *,
    parts: Sequence[str] = PARTS,
    workdir: str | Path | None = None,
    train_overrides: Sequence[str] = (),
    quick: bool = False,
) -> dict[str, Any]:
    """Run the GPU check (``parts``, default all of ``PARTS``) and return its result; write it to ``out_json``
    when given. ``result["ok"]`` is False without CUDA (``reason``: ``NO_CUDA``) or when any part failed
    (``reason`` names the parts). ``workdir`` (default: a new temporary folder) keeps logs, the training run
    and its MLflow store; ``quick`` shrinks the mixer timings (a smoke test)."""
    import torch

    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    started = time.time()
    command = "chimera " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "chimera bench gpu"
    result: dict[str, Any] = {
        "ok": False,
        "reason": "",
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "parts": list(parts),
        "environment": _environment(),
    }
    if not torch.cuda.is_available():
        result["reason"] = NO_CUDA
        _write(out_json, result)
        return result
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="chimera-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    result["workdir"] = str(work)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "kernels": lambda: _kernels_part(),
        "parity": lambda: run_parity_tests(work),
        "train": lambda: run_training_check(work, overrides=train_overrides),
        "mixers": lambda: {"ok": True, **bench_kernels(quick=quick)},
        "prefill": lambda: _prefill_part(quick),
    }
    failed = []
    for part in PARTS:
        if part not in parts:
            continue
        start = time.perf_counter()
        try:
            value = runners[part]()
        except Exception as exc:  # noqa: BLE001 - one part's crash is reported, the others still run
            value = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
        value["seconds"] = round(time.perf_counter() - start, 1)
        result[part] = value
        if not value.get("ok", False):
            failed.append(f"{part} ({value.get('reason') or 'failed'})")
        _write(out_json, result)  # partial results survive a later crash or kill
    result["ok"] = not failed
    result["reason"] = "; ".join(failed)
    result["seconds"] = round(time.time() - started, 1)
    _write(out_json, result)
    return result


def _kernels_part() -> dict[str, Any]:
    from components.mixers.kernels import (
        kernel_report,
    )  # the built-in mixers' probes (what this check is for)

    report = kernel_report()
    missing = [f"{m}: {report[m]['reason']}" for m in ("mamba1", "mamba2") if not report[m]["usable"]]
    fused = [
        f"{m}: {report[m]['fused_reason']}" for m in ("mamba1", "mamba2") if report[m].get("fused_reason")
    ]
    problems = missing + fused
    return {"ok": not problems, "reason": "; ".join(problems), **report}


def _prefill_part(quick: bool) -> dict[str, Any]:
    from toolkit.bench import bench_prefill

    lengths = (256, 1024) if quick else (1024, 4096, 16384)
    return {"ok": True, **bench_prefill(lengths=lengths, device="cuda")}


def format_gpu(result: dict[str, Any]) -> str:
    """A short human-readable summary of ``run_gpu_check``'s result."""
    if result.get("reason") == NO_CUDA:
        return f"chimera bench gpu: {NO_CUDA}"
    env = result.get("environment", {})
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or "?"
    lines = [
        f"chimera bench gpu: {'ok' if result['ok'] else 'FAILED: ' + result['reason']}",
        f"  {gpus}; torch {env.get('torch')} (CUDA {env.get('cuda')}), mamba-ssm {env.get('mamba_ssm')}, "
        f"causal-conv1d {env.get('causal_conv1d')}, triton {env.get('triton')}",
    ]
    if "kernels" in result:
        k = result["kernels"]
        lines.append(
            f"  kernels: mamba1 {'usable' if k.get('mamba1', {}).get('usable') else 'NOT usable'}, "
            f"mamba2 {'usable' if k.get('mamba2', {}).get('usable') else 'NOT usable'}"
            + (f" ({k['reason']})" if k.get("reason") else "")
        )
    if "parity" in result:
        p = result["parity"]
        lines.append(
            f"  parity (pytest -m gpu): {p.get('passed', 0)} passed, {p.get('failed', 0)} failed, "
            f"{p.get('error', 0)} errors, {p.get('skipped', 0)} skipped"
            + (f"; {p['reason']}" if p.get("reason") else "")
        )
    if "train" in result:
        t = result["train"]
        steady = t.get("perf", {}).get("steady", {})
        if steady:
            mfu = f"{steady['mfu']:.1%}" if "mfu" in steady else "n/a"
            lines.append(
                f"  train (FSDP2, bf16-mixed, activation checkpointing, {t['devices']} GPU): "
                f"{steady.get('step_time_s', float('nan')) * 1e3:.1f} ms/step, "
                f"{steady.get('tokens_per_s', float('nan')):,.0f} tokens/s, MFU {mfu}, "
                f"peak {steady.get('peak_mem_gb', float('nan')):.2f} GB"
            )
        else:
            lines.append(f"  train: {t.get('reason')}")
    if "mixers" in result:
        m = result["mixers"]
        for name in ("mamba", "mamba2"):
            e = m.get(name, {})
            if "kernels" in e:
                lines.append(
                    f"  {name}: kernels {e['kernels']['train_step_s'] * 1e3:.1f} ms vs PyTorch "
                    f"{e['torch']['train_step_s'] * 1e3:.1f} ms fwd+bwd ({e['train_speedup']:.1f}x); decode "
                    f"{e['kernels']['decode_step_s'] * 1e3:.2f} vs {e['torch']['decode_step_s'] * 1e3:.2f} ms"
                )
    if "prefill" in result and "by_length" in result["prefill"]:
        rows = result["prefill"]["by_length"]
        lines.append(
            "  prefill hybrid/Transformer: "
            + ", ".join(f"L={k}: {v['hybrid_over_transformer']:.2f}" for k, v in rows.items())
        )
    if result.get("workdir"):
        lines.append(f"  logs and runs: {result['workdir']}")
    return "\n".join(lines)


def gpu_command(as_json: bool = False, out_json: str | Path | None = None, **kwargs: Any) -> int:
    """What ``chimera bench gpu [--json]`` runs: the check, the JSON (``--json``) or a summary on stdout, the
    verdict on stderr; returns the exit status (0 only when every part passed)."""
    result = run_gpu_check(out_json, **kwargs)
    if as_json:
        print(json.dumps(result, indent=2, default=repr))
    else:
        print(format_gpu(result))
    if result["reason"] == NO_CUDA:
        print(f"chimera bench gpu: {NO_CUDA}", file=sys.stderr)
    elif not result["ok"]:
        print(f"chimera bench gpu: FAILED: {result['reason']}", file=sys.stderr)
    return 0 if result["ok"] else 1


def remove_workdir(result: dict[str, Any]) -> None:
    """Delete the check's temporary folder (logs, runs, MLflow store) once its result is kept elsewhere."""
    if result.get("workdir"):
        shutil.rmtree(result["workdir"], ignore_errors=True)
