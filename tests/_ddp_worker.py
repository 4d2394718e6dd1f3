"""Run under torchrun by test_train_stage.py: the real loader, model, loss and loop at world size 2 (gloo); every
rank saves its final parameters, so the test can check that DDP kept the ranks identical.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py PARAMS OUT_DIR
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from groupvit.config import load_section
from groupvit.data.config import DataConfig
from groupvit.data.loader import make_train_loader
from groupvit.losses import GroupViTLoss
from groupvit.model import GroupViT, ModelConfig
from groupvit.training import TrainConfig, destroy_distributed, fit, init_distributed

params, out = sys.argv[1], Path(sys.argv[2])
train, model_cfg = load_section(TrainConfig, params, "train"), load_section(ModelConfig, params, "model")
data = load_section(DataConfig, params, "data")
info = init_distributed(60)
torch.set_num_threads(1)
loader, num_batches, _ = make_train_loader(data.shards_dir, data.nouns_dir, data, batch_size=train.batch_size,
                                           rank=info.rank, world_size=info.world_size, seed=0,
                                           context_length=model_cfg.context_length)
torch.manual_seed(info.rank)  # different initial weights per rank: DDP must broadcast rank 0's
model = GroupViT(model_cfg)
fit(model, GroupViTLoss(True), lambda epoch: loader, cfg=train, steps_per_epoch=num_batches, info=info,
    device=torch.device("cpu"), seed=0, progress=False)
save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, str(out / f"rank{info.rank}.safetensors"))
destroy_distributed()
