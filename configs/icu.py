"""ICU stays of a few days (PhysioNet/CinC 2012 style): every numeric code, packed windows.

    python train.py --config=configs/icu.py --workdir=runs/icu \
        --config.data.meds_dir=/data/physionet2012_seta_meds
    # labs only (each lab's maximum state in the probe's vector too, below):
    python train.py --config=configs/icu.py --workdir=runs/icu_labs \
        --config.data.meds_dir=/data/physionet2012_seta_meds \
        --config.data.lab_code_pattern='^LAB//' --config.eval.pooling=per_code_last_max

Codes: every `LAB//`, `VITAL//` and `STATIC//` code with numeric values (`top_k=0`); static
descriptors timed at admission enter the stay's first window like any event (null-time static
rows are left out). On set-a that is 42 codes (24 LAB, 13 VITAL, 5 STATIC); VITAL//MechVent
has one value on train, so the prepare report warns that it teaches nothing about volatility.

Windows: numeric events per train stay (48 h) are, at the 10/50/90/99th percentiles, 29 / 63 /
118 / 191 for labs and 302 / 427 / 598 / 794 for all numeric codes. With max_len 256 all but 4
of 3,188 labs-only stays fit one window and an all-numeric stay spans about two consecutive
windows. The last max_len events before a prediction time are, with all numeric codes at 256,
about the last day of the stay, without the admission-time STATIC values for 95% of stays;
so eval.py's label windows (probe, aggregates, fine-tuning) keep every code's latest event
first and fill the rest with the last events (`eval.label_window = "each_code_latest"`). Chosen
on tuning AUROC over the `cv` runs of seeds 0, 1, 2 (all numeric, learning rate 3e-3): the
probe 0.867-0.869 against 0.850-0.857 with the last events, the fine-tuned network 0.857-0.858
against 0.842-0.843, and the aggregates' models rise as much (logistic regression 0.850
against 0.824); labs-only windows hold whole stays, so there it changes 6 of 4,000 windows
(docs/results_physionet2012.md, "Every code in the label window").
`--config.eval.label_max_len=1024` reads whole stays instead, at about 10x the evaluation time
("Label windows of the whole stay").
Unpacked, the prepared train windows fill 27% (labs, 3,190 windows) and 77% (all, 7,089
windows) of their slots; packed, 97.8% (real_token_fraction in metrics.jsonl).

Schedule: a CPU-sized run. One epoch of packed batches of 32 x 256 is ~27 steps (labs) or ~172
steps (all numeric); warmup 50 is 5% of the run. Learning rate 3e-3: the other configs' 1e-3
ends these runs with the error still falling steeply. Tuning masked MSE / per-code mean of
set-a's `cv` runs of seed 0 (configs/study_icu.py, validated every 100 steps):

| codes | learning rate | at step 300, 500, 800, 1,000 |
|---|---|---|
| all numeric (42) | 1e-3 | 0.835, 0.693, 0.569, 0.541 |
| all numeric (42) | 3e-3 | 0.611, 0.484, 0.412, 0.397 |
| labs only (24) | 1e-3 | 0.903, 0.834, 0.654, 0.600 |
| labs only (24) | 3e-3 | 0.967, 0.697, 0.499, 0.473 |

At 1e-3 the error still falls steeply at the last step: the encoder learns late to read a
code's earlier values, which carry-forward reads from the start. At 3e-3 the runs reach 1e-3's
step-800 error by step 400 (all numeric) or 600 (labs) and level off. Chosen on tuning over
seeds 0, 1 and 2 (only these two rates were tried): the validation masked MSE falls by 19-27%
in every run, and the probe's tuning AUROC stays within the seeds' spread (labs 0.815-0.829
against 0.819-0.835, all numeric 0.850-0.857 against 0.847-0.857; docs/results_physionet2012.md,
"Learning rate 3e-3"). Training took 6-7 minutes on a quiet 2-core CPU on 2026-12-06 (2.8-3.3
steps/s), 10-12 beside another job, and 3.6-4.4 minutes on 2026-12-07 (4-5.5 steps/s).

Model: the paper's, without `model.previous_value_inputs` (each event also reading its code's
latest visible value in the window). On set-a's `cv` runs at learning rate 1e-3 (seeds 0, 1,
2) those inputs bring the held_out masked MSE from 0.80-0.93x to 0.68-0.73x carry-forward's
(labs only) and from 0.81-0.85x to 0.72-0.73x (all numeric), but lower the probe's tuning AUROC
with all numeric codes (0.839-0.841 against 0.847-0.857; labs only 0.827 against 0.826 on
average), so they stay off here (docs/results_physionet2012.md, "Previous-value inputs"); at
3e-3 the paper's model reconstructs better without them (labs 0.65-0.70x).

Probe (eval.py): `eval.pooling = "per_code_last"`: the probe reads, beside the average of the
encoder states, each code's latest state and its presence (5,546 numbers for 42 codes). Chosen
on tuning AUROC of the `cv` runs of seeds 0, 1, 2 trained at 1e-3 (labs only and all
numeric): 0.819-0.857 against 0.818-0.849 for each code's average (`per_code`), never lower;
both well above the average alone (0.77-0.81 over six study runs;
docs/results_physionet2012.md, "Each code's latest state"). Labs only:
`--config.eval.pooling=per_code_last_max` adds each code's elementwise maximum state (6,296
numbers for 24 labs). Chosen on tuning AUROC of the `cv` runs of seeds 0, 1, 2 at this
config's settings: 0.831 / 0.829 / 0.835 against 0.825 / 0.815 / 0.829 with `per_code_last`;
with all numeric codes it is lower (0.866 / 0.864 against 0.869 / 0.867, seeds 0 and 1), so
the default is `per_code_last` (docs/results_physionet2012.md, "Each code's maximum state (labs
only)").

Fine-tuning (eval.py): the heads read the states pooled per code, as the probe does, and the
pretrained network's head starts at the frozen probe's weights (`head_init = "probe"`: linear
probing, then fine-tuning), that classifier checked on tuning before the first step; at most
600 steps of 32 label rows (about 6 epochs of set-a's 3,188 train stays), early stopping on
tuning AUROC (three checks, 60 steps, without a better tuning AUROC, counted after the 60-step
warmup). Chosen on tuning AUROC of the all-numeric `random` runs (seeds 0, 1, 2, trained at
1e-3): with a head on the average of the states, 150 steps averaged 0.680, 300 steps 0.719, 600
steps 0.763; a head on the per-code vector at 600 steps 0.845 (docs/results_physionet2012.md,
"Fine-tuning settings tried"). The head from the probe: chosen on tuning AUROC of the study's
24 runs (labs read with `per_code_last`), higher than from zero weight in 22 (by 0.011 on average);
on held_out it ends level with the probe (8 fits keep it unchanged, every best check by step 120),
where the head from zero weight ended 0.017 below it (docs/results_physionet2012.md, "Fine-tuning
from the probe's weights").
"""

from cvmae_jax.config import default_config


def get_config():
    config = default_config()
    config.data.allow_synthetic = False  # --config.data.meds_dir=/path/to/MEDS is required
    config.data.lab_code_pattern = r"^(LAB|VITAL|STATIC)//"  # '^LAB//': labs only
    config.data.top_k = 0  # every matching code
    config.data.max_len = 256
    config.data.packing = True
    config.train.num_steps = 1000
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.log_every = 50
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.eval.pooling = "per_code_last"
    config.eval.label_window = "each_code_latest"
    config.eval.finetune.steps = 600
    config.eval.finetune.head_init = "probe"
    return config
