#!/usr/bin/env python
"""
Train or evaluate MimicDet with a yaml config (a DefaultTrainer) or a LazyConfig ``.py`` config.

    python train_net.py --config-file configs/COCO-Detection/mimicdet_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/COCO-Detection/mimicdet_R_50_FPN_1x.py --num-gpus 8
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS model_final.pth
"""

import logging
import os
import signal
import weakref

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
)
from detectron2.engine import defaults as engine_defaults
from detectron2.engine import hooks, launch
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate

from mimicdet import (
    CheckpointOnSignal,
    WeightsOnlyCheckpointer,
    get_mimicdet_cfg,
    signal_ignored,
)
from mimicdet.data import MimicDetDatasetMapper, check_detection_dataset_dicts
from mimicdet.distill import Distiller
from mimicdet.evaluation import HAS_DETECTRON2_OPS, EvaluateResumedCheckpoint

logger = logging.getLogger("detectron2")


def num_classes_of(cfg):
    """The number of classes of a yaml config's detector (the baselines keep their own key)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "Distiller":  # the student's classes
        arch = cfg.MODEL.DISTILL.STUDENT_META_ARCHITECTURE
    if arch == "RetinaNet":
        return cfg.MODEL.RETINANET.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def cpu_if_no_gpu(device):
    """detectron2 defaults to CUDA; on a machine without a GPU, run on the CPU and say so."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"No CUDA GPU is available: running on the CPU instead of '{device}'.")
        return "cpu"
    return device


def create_ddp_model(model, **kwargs):
    """
    detectron2's ``create_ddp_model``, but a CPU model (gloo backend) gets no ``device_ids``:
    detectron2 always passes the local GPU, which DistributedDataParallel refuses for CPU modules.
    """
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _create_ddp_model(model, **kwargs)


# DefaultTrainer calls the module-level function; route it through the CPU-aware one above
_create_ddp_model = engine_defaults.create_ddp_model
engine_defaults.create_ddp_model = create_ddp_model


class Trainer(DefaultTrainer):
    """
    detectron2's DefaultTrainer with COCO evaluation, weights-only checkpoint loading, and data
    loaders that check the dataset first and name the file at fault when an image is unreadable.
    """

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        dataset = check_detection_dataset_dicts(
            dataset, ",".join(cfg.DATASETS.TRAIN), num_classes_of(cfg)
        )
        return build_detection_train_loader(
            cfg, mapper=MimicDetDatasetMapper(cfg, is_train=True), dataset=dataset
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=MimicDetDatasetMapper(cfg, is_train=False, dataset_names=[dataset_name]),
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=HAS_DETECTRON2_OPS
        )

    def build_hooks(self):
        # swap the checkpointer before PeriodicCheckpointer captures it
        self.checkpointer = WeightsOnlyCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        ret = super().build_hooks()
        # a resumed training first evaluates its checkpoint if the stop lost that evaluation
        evaluate_lost = EvaluateResumedCheckpoint(
            self.cfg.TEST.EVAL_PERIOD,
            lambda: self.test(self.cfg, self.model),
            os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"),
        )
        # after the LR scheduler's and the periodic checkpointer's hooks, before evaluation
        at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret))
        on_signal = CheckpointOnSignal(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD)
        return ret[:at] + [on_signal, evaluate_lost] + ret[at:]

    # detectron2 v0.6's DefaultTrainer checkpoints neither the optimizer (momentum) nor AMP's
    # grad scaler; upstream later added these two methods, the same as here
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])


def setup_project_logger(output_dir):
    """default_setup sets up detectron2's and fvcore's loggers only: without this, this
    project's info messages (ImageNet weights loaded, teacher loaded, dataset checked, a lost
    evaluation redone) would reach neither the console nor log.txt, and its warnings only
    stderr."""
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="mimicdet")


def setup_yaml(args):
    cfg = get_mimicdet_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = cpu_if_no_gpu(cfg.MODEL.DEVICE)
    cfg.freeze()
    default_setup(cfg, args)
    setup_project_logger(cfg.OUTPUT_DIR)
    return cfg


def build_evaluation_model(cfg):
    """
    The model that --eval-only evaluates: a distiller without its teacher (evaluation runs the
    student alone, so the teacher's checkpoint need not be at hand), any other model as trained.
    """
    if cfg.MODEL.META_ARCHITECTURE != "Distiller":
        return Trainer.build_model(cfg)
    model = Distiller(cfg, with_teacher=False)
    model.to(torch.device(cfg.MODEL.DEVICE))
    return model


def main_yaml(args):
    cfg = setup_yaml(args)
    if args.eval_only:
        model = build_evaluation_model(cfg)
        WeightsOnlyCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def do_test_lazy(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret


def do_train_lazy(args, cfg):
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, train_loader, optimizer
    )
    checkpointer = WeightsOnlyCheckpointer(
        model, cfg.train.output_dir, optimizer=optimizer, trainer=trainer
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            CheckpointOnSignal(checkpointer, cfg.train.checkpointer.period),
            EvaluateResumedCheckpoint(
                cfg.train.eval_period,
                lambda: do_test_lazy(cfg, model),
                os.path.join(cfg.train.output_dir, "metrics.json"),
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test_lazy(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # a checkpoint stores the iteration that just finished
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main_lazy(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    cfg.train.device = cpu_if_no_gpu(cfg.train.device)
    default_setup(cfg, args)
    setup_project_logger(cfg.train.output_dir)
    if args.eval_only:
        target = cfg.model.get("_target_")
        if (locate(target) if isinstance(target, str) else target) is Distiller:
            cfg.model.teacher = None  # evaluation runs the student alone, as in main_yaml
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        WeightsOnlyCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test_lazy(cfg, model)
    return do_train_lazy(args, cfg)


def main(args):
    """Run one process's share of training or evaluation; returns the evaluation results."""
    # SIGUSR1 saves a checkpoint in training (CheckpointOnSignal) and kills no data-loader worker
    with signal_ignored(signal.SIGUSR1):
        if args.config_file.endswith(".py"):
            return main_lazy(args)
        return main_yaml(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    with signal_ignored(signal.SIGUSR1):  # the launcher, and the workers it starts, survive it
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
