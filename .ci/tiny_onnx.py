"""Export the tests' tiny model (tests/conftest.py: tiny_ckpt, tiny_onnx) into FOLDER/tiny.onnx, for a venv without
torch that runs tests on it (.ci/floor_python: DDPM_DEPLOY_TEST_ONNX)."""

import os
import sys

from ddpm_deploy.export import onnx_from_checkpoint
from ddpm_deploy.train.trainer import TrainConfig, Trainer

out = sys.argv[1]
cfg = TrainConfig(data="digits", out=out, preset="tiny", image_size=8, num_train_timesteps=50, steps=4, batch_size=8,
                  checkpoint_every=2, sample_n=0, threads=1)
Trainer(cfg, progress=False).fit()
onnx_from_checkpoint(os.path.join(out, "model.pt"), os.path.join(out, "tiny.onnx"), max_batch=4, echo=lambda *_: None)
