"""Any MEDS dataset, with the paper's settings (MIMIC-IV: the 100 most frequent numeric labs).

    python train.py --config=configs/meds.py --workdir=runs/mimic \
        --config.data.meds_dir=/data/MIMIC-IV_MEDS

MIMIC-IV writes lab codes as LAB//<itemid>//<unit> or LAB//RESULT//<itemid>//<unit>; the default
pattern '^LAB//' selects both, and ICU-charted items (6-digit item ids) too. Narrow it (e.g.
'^LAB//(RESULT//)?\\d{5}//' for the hospital lab table only) or pass an explicit
--config.data.lab_codes list.
"""

from cvmae_jax.config import default_config


def get_config():
    config = default_config()
    config.data.allow_synthetic = False  # --config.data.meds_dir=/path/to/MEDS is required
    config.data.top_k = 100
    config.data.max_len = 256
    config.model.num_layers = 4
    config.train.num_steps = 20000
    config.train.batch_size = 64
    config.train.warmup_steps = 1000
    config.train.log_every = 100
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    return config
