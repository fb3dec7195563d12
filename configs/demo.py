"""Embedded default: synthetic MEDS, CV-Masking, a few minutes on a laptop CPU.

    python train.py --config=configs/demo.py --workdir=runs/demo
    python train.py --config=configs/demo.py --workdir=runs/demo_random \
        --config.masking.strategy=random
"""

from cvmae_jax.config import default_config


def get_config():
    config = default_config()
    config.data.synthetic_subjects = 1000
    config.data.max_len = 256
    config.data.top_k = 100
    config.train.num_steps = 600
    config.train.batch_size = 32
    config.train.warmup_steps = 50
    config.train.log_every = 25
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
