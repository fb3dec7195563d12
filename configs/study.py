"""Strategy study: every strategy x seed on the embedded synthetic data (or your MEDS), one
prepared dataset, then the comparison against `random`.

    python -m cvmae_jax.study --config=configs/study.py --workdir=runs/study
    python -m cvmae_jax.study --config=configs/study.py --workdir=runs/study_mimic \
        --config.data.meds_dir=/data/MEDS --config.study.seeds='(0, 1, 2)'

The demo model of configs/demo.py, trained for 600 steps, validated every 100 (the eval points
of the convergence ratio). Default size, 4 strategies x 2 seeds = 8 runs, chosen to finish in
about 23 minutes on 2 quiet CPU cores. Measured on the shared 2-core machine of this project
(never quiet while measured: load average 2.5-6.5, so wall times are 2-9x the quiet ones):

- training, 600 steps: 807 s at 0.74 steps/s under load 5-6.5; quiet, the demo model runs at
  6.6 steps/s (README), so 600 steps + compile + 6 validations ~ 105 s;
- eval.py on one run: 196 s wall / 165 s CPU with single-code masking, 116 s wall / 85 s CPU
  without (load ~2.5), i.e. ~55 s quiet without it and ~100 s with it;
- so ~160 s per run, 8 runs + data generation and comparison ~ 23 minutes. Single-code
  masking is off here (it would add ~50 s per run, ~7 minutes): pass
  --config.eval.single_code=True (on a new workdir) to add its table to the report.
"""

import importlib.util
import os

import ml_collections


def _demo_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("configs_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = _demo_config()
    config.train.num_steps = 600
    config.train.eval_every = 100
    config.train.checkpoint_every = 200
    config.eval.single_code = False  # one eval pass per lab code: ~50 s per run, see above
    config.study = ml_collections.ConfigDict()
    config.study.strategies = ("random", "variance", "cv", "cv_rank")  # must include random
    config.study.seeds = (0, 1)  # config.seed of each run; strategy seed s pairs with random s
    return config
