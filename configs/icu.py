"""ICU stays of a few days (PhysioNet/CinC 2012 style): every numeric code, packed windows.

    python train.py --config=configs/icu.py --workdir=runs/icu \
        --config.data.meds_dir=/data/physionet2012_seta_meds
    # labs only:
    python train.py --config=configs/icu.py --workdir=runs/icu_labs \
        --config.data.meds_dir=/data/physionet2012_seta_meds --config.data.lab_code_pattern='^LAB//'
"""

from cvmae_jax.config import default_config


def get_config():
    config = default_config()
    config.data.allow_synthetic = False  # --config.data.meds_dir=/path/to/MEDS is required
    config.data.lab_code_pattern = r"^(LAB|VITAL|STATIC)//"
    config.data.top_k = 0
    config.data.max_len = 256
    config.data.packing = True
    config.train.num_steps = 1000
    config.train.batch_size = 32
    config.train.warmup_steps = 50
    config.train.log_every = 50
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    return config
