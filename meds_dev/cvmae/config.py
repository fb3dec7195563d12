"""Pretraining settings of the MEDS-DEV entry: configs/meds.py's (the paper's: the 100 most
frequent lab codes, 256-event windows, 20,000 steps). ``config.py:True`` (MEDS-DEV's ``demo``)
gives a model and run small enough to check the pipeline in a few minutes on a CPU."""

from cvmae_jax.config import default_config


def get_config(demo: str = "False"):
    config = default_config()
    config.data.allow_synthetic = False
    config.data.top_k = 100
    config.data.max_len = 256
    config.model.num_layers = 4
    config.train.update(dict(num_steps=20000, batch_size=64, warmup_steps=1000, log_every=100,
                             eval_every=1000, checkpoint_every=1000))
    if demo == "True":
        config.data.top_k, config.data.max_len, config.data.min_subjects = 40, 32, 1
        config.model.d_model, config.model.num_heads, config.model.num_layers = 32, 4, 1
        config.model.time_frequencies = 4
        config.train.update(dict(num_steps=30, batch_size=16, learning_rate=3e-3,
                                 warmup_steps=5, log_every=15, eval_every=30,
                                 checkpoint_every=30))
        config.eval.batch_size = 32
    return config
