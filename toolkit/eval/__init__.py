"""Evaluation with lmms-eval (EvolvingLMMs-Lab/lmms-eval 0.7.x), without a fork: the optional extra ``eval``.

- ``toolkit.eval.lmms.Chimera``: a model class with lmms-eval's interface (``generate_until``,
  ``loglikelihood``) over a Chimera run folder or experiment file. lmms-eval finds it through its
  ``lmms_eval.models`` entry point (``manifest`` below), so after ``pip install 'chimera-toolkit[eval]'``::

      lmms-eval --model chimera --model_args run=runs/NAME --tasks mme --batch_size 8

- ``toolkit.eval.results.log_results``: an lmms-eval results JSON -> the MLflow run that trained the checkpoint
  (metrics ``eval/<task>/<metric>``, the harness and its version as tags, the whole JSON as an artifact);
  from a shell: ``python -m toolkit.eval log runs/NAME RESULTS.json``.
- ``toolkit.eval.results.evaluate``: both in one call (lmms-eval's ``simple_evaluate``, then ``log_results``).

Nothing here imports lmms-eval at import time; this package itself imports nothing heavy (the entry point
loads while lmms-eval builds its model registry).
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "chimera"
MODEL_CLASS = "toolkit.eval.lmms.Chimera"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: lmms-eval 0.7's ``ModelManifest`` naming ``Chimera``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
