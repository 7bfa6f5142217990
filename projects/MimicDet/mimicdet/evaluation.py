"""COCO evaluation in this detectron2 install, and in a training that was interrupted."""

import importlib.util
import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm

# detectron2 built without its C++ ops (dev/install_detectron2.py) has no fast COCOeval; pass
# this as COCOEvaluator's use_fast_impl to fall back to pycocotools' own
HAS_DETECTRON2_OPS = importlib.util.find_spec("detectron2._C") is not None

# the flattened result every evaluation of this project's trainers writes (COCOEvaluator's box AP,
# as "bbox/AP", or "<dataset>/bbox/AP" with several test sets)
EVALUATION_KEY = "bbox/AP"

logger = logging.getLogger(__name__)


def has_evaluation(metrics_file, iteration):
    """Whether detectron2's metrics.json (a JSON record per line) holds an evaluation recorded at
    ``iteration``. A line a killed process left half-written counts as no record, so the caller
    evaluates again. Any record counts, also one of an earlier training into the same folder that
    was not resumed (detectron2 appends to the file): start a new training in a new folder."""
    if not os.path.isfile(metrics_file):
        return False
    with open(metrics_file) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if record.get("iteration") == iteration and any(
                key == EVALUATION_KEY or key.endswith("/" + EVALUATION_KEY) for key in record
            ):
                return True
    return False


class EvaluateResumedCheckpoint(HookBase):
    """
    On a resumed training, evaluates the checkpoint it resumes from if that checkpoint's periodic
    evaluation never reached ``metrics_file``. Every process registers it, since every process
    takes part in an evaluation.

    detectron2 writes a periodic checkpoint before the evaluation of the same iteration, and its
    ``EvalHook`` evaluates after training steps only: a process stopped between the two resumes
    after that iteration, and its AP-vs-iteration curve would keep a hole there. This hook fills
    it, recording the results under the checkpoint's iteration as the lost evaluation would have.
    The final evaluation needs no help: ``EvalHook`` runs it after a resumed finished training.
    """

    def __init__(self, eval_period, eval_function, metrics_file):
        """``eval_period`` and ``eval_function`` as ``EvalHook``'s; ``metrics_file``: the
        metrics.json of the training's output folder (read on the main process only)."""
        self._period = eval_period
        self._func = eval_function
        self._metrics_file = metrics_file

    def before_train(self):
        resumed_at = self.trainer.start_iter
        if not (self._period > 0 and 0 < resumed_at < self.trainer.max_iter):
            return
        if resumed_at % self._period:  # no evaluation was due after the checkpoint
            return
        checkpoint_iter = resumed_at - 1
        lost = comm.is_main_process() and not has_evaluation(self._metrics_file, checkpoint_iter)
        if not comm.all_gather(lost)[0]:  # every process evaluates, on the main one's word
            return
        logger.info(
            f"Evaluating the checkpoint of iteration {checkpoint_iter}: the interrupted training "
            f"stopped before its evaluation reached {self._metrics_file}"
        )
        storage = self.trainer.storage
        storage.iter = checkpoint_iter
        try:
            results = self._func()
            if results:
                storage.put_scalars(**flatten_results_dict(results), smoothing_hint=False)
        finally:
            storage.iter = resumed_at
        comm.synchronize()

    def after_train(self):
        # the function is likely a closure over the trainer: drop the cycle, as EvalHook does
        self._func = None
