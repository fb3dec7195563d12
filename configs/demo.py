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
    config.train.num_steps = 1500
    config.train.batch_size = 16  # measured: more small steps beat fewer large ones here
    config.train.warmup_steps = 100
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    return config
