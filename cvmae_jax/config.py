"""Default configuration shared by the files in ``configs/``; every field is documented here."""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """All fields with their defaults. ``configs/*.py`` start from this and override."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # model init, data order and training masks

    config.data = ml_collections.ConfigDict()
    config.data.meds_dir = ml_collections.FieldReference(None, field_type=str)  # None: synthetic
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: WORKDIR/data
    config.data.allow_synthetic = True  # False: refuse to run without meds_dir
    config.data.synthetic_subjects = 1000  # size of the generated default dataset
    config.data.synthetic_seed = 0  # fixed, so runs with different config.seed share data
    config.data.max_len = 256  # lab events per example
    config.data.lab_code_pattern = r"^LAB//"  # regex over codes that carry numeric values
    config.data.lab_codes = ()  # explicit code list; replaces pattern + top_k when non-empty
    config.data.top_k = 100  # most frequent matching codes on the train split
    config.data.min_code_count = 20  # codes with fewer numeric train rows are dropped
    # k of statistical disclosure control: codes with values from fewer train subjects are not
    # selected, clip bounds rest on >= k subjects, smaller eval per-code rows are suppressed
    config.data.min_subjects = 10
    config.data.clip_quantiles = (0.001, 0.999)  # per-code raw clipping before z-scoring
    # Raw values that are placeholders, not results (e.g. (99999.0,)): left out of every split
    # before statistics and windows, and counted (dropped_value) in the prepare report
    config.data.drop_values = ()
    config.data.window = "chunks"  # 'chunks': consecutive windows; 'last': most recent max_len
    config.data.min_window_len = 2  # shorter windows are dropped
    # processes preparing the MEDS shards, this one included (one per core; the files are the
    # same for any number)
    config.data.prepare_workers = 1
    config.data.packing = False  # training rows hold several windows (segment-masked attention)
    config.data.workers = 0  # processes reading/packing batches ahead (0: a thread; docs/data.md)

    config.masking = ml_collections.ConfigDict()
    config.masking.strategy = "cv"  # random | variance | cv | cv_rank | cv_within
    config.masking.threshold_percentile = 75.0
    config.masking.p_high = 0.8
    config.masking.p_low = 0.2

    config.model = ml_collections.ConfigDict()
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.num_layers = 2
    config.model.mlp_ratio = 4
    config.model.time_frequencies = 16
    config.model.dtype = "float32"  # compute dtype; parameters stay float32
    config.model.previous_value_inputs = False  # each token also reads its code's last value
    config.model.attention = "einsum"  # einsum | dot_product_attention (XLA) | cudnn (GPU, bf16)

    config.loss = ml_collections.ConfigDict()
    config.loss.unmasked_weight = 0.1  # lambda in L = MSE_masked + lambda * MSE_unmasked

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 2000
    config.train.batch_size = 32  # global, over all devices and hosts
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 100
    config.train.weight_decay = 0.01
    config.train.grad_clip_norm = 1.0
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.allow_config_change = False  # resume even if settings that matter changed
    config.train.transfer_guard = "allow"  # 'disallow': implicit host<->device copies fail
    # Persistent XLA compilation cache shared by runs (None or "": off). Trusted input: keep it
    # in a folder only you can write.
    config.train.compilation_cache_dir = ml_collections.FieldReference(
        "~/.cache/cvmae_jax/xla", field_type=str)

    config.parallel = ml_collections.ConfigDict()
    config.parallel.mode = "jit"  # jit (mesh, multi-host) | pmap (one process)
    config.parallel.num_devices = 0  # 0: all devices
    config.parallel.cpu_devices = 0  # CPU hosts: split into N devices (0: JAX's 1; benchmarks)
    config.parallel.distributed = False  # call jax.distributed.initialize (multi-host)
    config.parallel.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    config.parallel.num_processes = ml_collections.FieldReference(None, field_type=int)
    config.parallel.process_id = ml_collections.FieldReference(None, field_type=int)
    # GPUs this process uses (None: all, except under SLURM/Open MPI where JAX picks the one of
    # the task's local rank: one process per GPU); docs/launching.md
    config.parallel.local_device_ids = ml_collections.FieldReference(None, field_type=tuple)

    config.eval = ml_collections.ConfigDict()
    # None: <MEDS root>/labels
    config.eval.labels_dir = ml_collections.FieldReference(None, field_type=str)
    config.eval.split = "tuning"  # split used for validation during training
    config.eval.batch_size = 64
    config.eval.mask_rate = 0.3  # uniform evaluation mask, identical for every strategy
    config.eval.mask_seed = 1234
    config.eval.single_code = True  # eval.py: hide each code in turn (one pass per code)
    config.eval.sample_seed = 0  # eval.py: k-shot label draws and perturbations (same per model)
    # eval.py: events in each label window (the last N selected events at or before
    # prediction_time) for the probe, aggregates and fine-tuning; 0: data.max_len
    config.eval.label_max_len = 0
    # which events a label window longer than label_max_len keeps: "last_events" or
    # "each_code_latest" (every code's latest event, then the last others: rare codes and
    # admission descriptors stay in long histories)
    config.eval.label_window = "last_events"
    # eval.py's frozen probe: window vectors "mean" (one average of the encoder's states),
    # "per_code" (that and each code's own average; width grows with the vocabulary) or
    # "per_code_last" (each code's latest state in place of its average) or
    # "per_code_last_max" (that and each code's elementwise maximum state)
    config.eval.pooling = "mean"
    # eval.py: the same probe on the network before pretraining (its initial parameters)
    config.eval.untrained_probe = True
    config.eval.finetune = finetune_defaults()
    return config


def finetune_defaults() -> ml_collections.ConfigDict:
    """``config.eval.finetune``: eval.py's fine-tuned and from-scratch classifiers on each label
    task (docs/evaluation.md, "Fine-tuning")."""
    finetune = ml_collections.ConfigDict()
    finetune.enabled = True
    finetune.steps = 60  # most updates per model (early stopping may end it sooner)
    finetune.batch_size = 32  # global label rows per update
    finetune.learning_rate = 1e-3  # peak (10% warmup, cosine decay)
    finetune.encoder_lr_scale = 0.1  # pretrained encoder's rate / the head's (scratch: 1)
    finetune.weight_decay = 0.01
    finetune.head = "linear"  # linear | mlp (one hidden layer of d_model)
    # the pretrained model's head at the start: "zero" (predicts the train prevalence) or
    # "probe" (the frozen probe's weights: linear probing, then fine-tuning; linear head only)
    finetune.head_init = "zero"
    finetune.eval_every = 20  # steps between tuning-AUROC checks
    finetune.patience = 3  # checks without a better tuning AUROC before stopping
    # also the same network trained from scratch on the label (it does not depend on the
    # pretrained run: the study trains it on its random runs only)
    finetune.scratch = True
    finetune.kshot_draws = 0  # fine-tuned draws per k of the label-efficiency curve (0: none)
    return finetune


def set_field(config, name: str, value) -> None:
    """``config.<name> = value`` for a dotted field name ("eval.finetune.steps") of a config
    (ConfigDict or dict) whose sections on the way exist."""
    *sections, leaf = name.split(".")
    for section in sections:
        config = config[section]
    config[leaf] = value


def eval_settings(config: ml_collections.ConfigDict) -> dict:
    """``config.eval`` as plain JSON values: what eval.py records in metrics.json, so a study
    knows which settings a run's metrics were computed with."""
    return json.loads(json.dumps(config.eval.to_dict()))


def label_max_len(config: ml_collections.ConfigDict) -> int:
    """Events per label window: config.eval.label_max_len, or data.max_len when it is 0."""
    return int(config.eval.label_max_len) or int(config.data.max_len)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path`` (configs/demo.py, ...); as with
    ``--config=FILE:ARG``, ``path`` may end in ``:ARG``, passed to ``get_config(ARG)``."""
    file, has_arg, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location(
        "_config_" + os.path.splitext(os.path.basename(file))[0], file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{file}: no get_config() function (a config file defines "
                         "get_config() returning an ml_collections.ConfigDict)")
    return module.get_config(arg) if has_arg else module.get_config()


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of ``<name>.py`` in the folder of ``config_file`` (a config built on
    another shipped config: ``sibling_config(__file__, "icu")``)."""
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)),
                                         f"{name}.py"))


def study_fields(seeds: tuple[int, ...]) -> ml_collections.ConfigDict:
    """``config.study`` of ``python -m cvmae_jax.study``: the strategies random, variance, cv
    and cv_rank (cv_within can be added), the given seeds."""
    study = ml_collections.ConfigDict()
    study.strategies = ("random", "variance", "cv", "cv_rank")  # must include random
    study.seeds = seeds  # config.seed of each run; strategy seed s pairs with random s
    return study


def get_config() -> ml_collections.ConfigDict:
    """The defaults as a config file: eval.py's ``--config`` carries only field overrides."""
    return default_config()
