"""`TrainConfig`: the `train` section of params.yaml (the official recipe, github.com/NVlabs/GroupViT, as defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from groupvit.config import param

OPTIMIZER_IMPLS = ("auto", "for_loop", "foreach", "fused")  # groupvit.training.optim.build_optimizer


@dataclass(frozen=True)
class TrainConfig:
    """How to train: length, optimisation recipe, precision, processes, logging and checkpoints.

    Learning rates are given at the reference global batch `lr_base_batch` (4096 in the paper) and scaled linearly
    by `batch_size * world_size * grad_accum / lr_base_batch`, as the reference code does for lr, warm-up start and
    minimum alike.
    """

    # length: the cosine schedule is laid over the planned total steps
    epochs: float = param(30.0, gt=0, help="passes over the data (used when steps is 0)")
    steps: int = param(0, ge=0, help="optimizer steps in total; 0 = epochs x steps per epoch")
    max_minutes: float = param(0.0, ge=0, help="wall-clock budget; >0 shortens the planned steps to fit, 0 = none")
    # recipe
    batch_size: int = param(256, ge=1, help="images per process per micro-batch")
    grad_accum: int = param(1, ge=1, help="micro-batches per optimizer step")
    lr: float = param(1.6e-3, gt=0, help="peak learning rate at the reference global batch")
    warmup_lr: float = param(4e-6, ge=0, help="learning rate at step 0, at the reference global batch")
    min_lr: float = param(4e-5, ge=0, help="final learning rate of the cosine, at the reference global batch")
    lr_base_batch: int = param(4096, ge=1, help="reference global batch the learning rates are given for")
    warmup_epochs: float = param(2.0, ge=0, help="linear warm-up length in epochs (used when warmup_steps < 0)")
    warmup_steps: int = param(-1, ge=-1, help="linear warm-up length in steps; -1 = from warmup_epochs")
    weight_decay: float = param(0.05, ge=0, help="AdamW decay (1-D parameters and biases exempt)")
    clip_grad: float = param(5.0, ge=0, help="max global gradient norm; 0 = no clipping")
    # execution
    precision: str = param("bf16", choices=("bf16", "fp16", "fp32"),
                           help="autocast dtype; bf16 falls back to fp16 + grad scaler on GPUs without bf16")
    compile: bool = param(False, help="torch.compile each tower (groupvit.model.compile_model)")
    optimizer_impl: str = param("auto", choices=OPTIMIZER_IMPLS,
                                help="AdamW kernels: auto = fused on CUDA, foreach elsewhere (bit-identical to "
                                     "for_loop on CPU); fused on CPU is faster but rounds differently")
    nproc: int | str = param("auto", help="processes on this machine: 'auto' = one per GPU (1 on CPU) or a number")
    threads: int = param(0, ge=0, help="torch CPU threads per process; 0 = cores / processes")
    dist_timeout_s: int = param(600, ge=10, help="collective timeout: a dead peer ends the run instead of a hang")
    # bookkeeping
    log_every: int = param(10, ge=1, help="steps between metric logs (the only host syncs)")
    ckpt_every: int = param(500, ge=1, help="steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = param(2, ge=1, help="checkpoints kept in data/train/checkpoints")
    resume: bool = param(True, help="continue from the latest checkpoint when one exists")

    def __post_init__(self) -> None:
        if isinstance(self.nproc, str) and self.nproc != "auto":
            raise ValueError(f"nproc: expected 'auto' or a number >= 1, found {self.nproc!r}")
        if isinstance(self.nproc, int) and self.nproc < 1:
            raise ValueError(f"nproc: expected 'auto' or a number >= 1, found {self.nproc!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    def lr_factor(self, world_size: int) -> float:
        """Linear scaling factor global batch / reference batch."""
        return self.batch_size * world_size * self.grad_accum / self.lr_base_batch
