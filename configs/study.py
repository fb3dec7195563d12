"""Strategy study: random, variance, cv and cv_rank (config.study.strategies; cv_within can be
added) x seed on the embedded synthetic data (or your MEDS), one prepared dataset, then the
comparison against `random`.

    python -m cvmae_jax.study --config=configs/study.py --workdir=runs/study
    python -m cvmae_jax.study --config=configs/study.py --workdir=runs/study_mimic \
        --config.data.meds_dir=/data/MEDS --config.study.seeds='(0, 1, 2)'

The demo model of configs/demo.py, trained for 600 steps, validated every 100 (the eval points
of the convergence ratio). Default size: the 4 strategies x 1 seed = 4 runs, so that it
finishes in under 30 minutes on 2 CPU cores. Measured on this project's 2-core AVX2 VM, quiet:
the 2-seed study of docs/study_example (8 runs, training and eval.py with single-code masking
off) took 19m24s, about 2.4 min per run, so each seed (4 runs) costs about 10 min. More seeds
make the comparison sturdier: --config.study.seeds='(0, 1, 2)'.
Single-code masking is off here (it adds ~50 s per run): pass --config.eval.single_code=True (on
a new workdir) to add its table to the report.
"""

from cvmae_jax.config import sibling_config, study_fields


def get_config():
    config = sibling_config(__file__, "demo")
    config.train.num_steps = 600
    config.train.eval_every = 100
    config.train.checkpoint_every = 200
    config.eval.single_code = False  # one eval pass per lab code: ~50 s per run, see above
    config.study = study_fields(seeds=(0,))
    return config
