"""The paper's comparison on ICU stays (PhysioNet/CinC 2012 set-a in MEDS form): random,
variance, cv and cv_rank x 3 seeds on configs/icu.py, labs only or every numeric code.

    python -m cvmae_jax.study --config=configs/study_icu.py --workdir=runs/study_icu_labs \
        --config.data.meds_dir=/data/physionet2012_seta_meds \
        --config.data.lab_code_pattern='^LAB//' --config.eval.pooling=per_code_last_max
    python -m cvmae_jax.study --config=configs/study_icu.py --workdir=runs/study_icu_all \
        --config.data.meds_dir=/data/physionet2012_seta_meds

The training of each run is configs/icu.py's (1,000 packed steps of 32 x 256 at learning rate
3e-3), validated every 100 steps (the eval points of the convergence ratio). Each run's eval.py
adds the aggregates baseline and the fine-tuned classifier (the from-scratch one on the random
runs); single-code masking is off, as in configs/study.py. Labs only, the probe and the heads
also read each lab's maximum state (configs/icu.py's docstring says why). Results and timings
on set-a (about 4 hours for both selections on 2 CPU cores): docs/results_physionet2012.md.
"""

from cvmae_jax.config import sibling_config, study_fields


def get_config():
    config = sibling_config(__file__, "icu")
    config.train.eval_every = 100
    config.train.checkpoint_every = 500
    config.eval.single_code = False
    config.study = study_fields(seeds=(0, 1, 2))
    return config
