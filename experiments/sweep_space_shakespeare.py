"""Search space for `meshforge sweep` over shakespeare_char: the peak learning rate and the warm-up.

    meshforge sweep experiments/shakespeare_char.py --space experiments/sweep_space_shakespeare.py --trials 8 \
        --train.steps 300 --train.eval_every 50 --train.checkpoint_every 100

Hardware: a 2-core AMD EPYC VM (2 virtual XLA CPU devices), shared with other jobs (load 4-7).
Measured: 8 trials of 300 steps, each evaluated every 50 steps on the whole validation split: 4 complete, 4
pruned by the median pruner (at steps 50 and 100); best trial val_loss 2.0722 at step 300 with optim.lr 3.37e-3
and optim.warmup_steps 55 (the others completed at 2.202, 2.241, 2.427). On the same machine the 8 trials took about 70% of
8 full runs' time (a pruned trial 30-50% of a complete one), with one `kill -9` after
two trials (the trial it cut short resumed from its step-100 checkpoint). `meshforge train` of the sweep's
best_experiment.py reproduced 2.0722.
"""


def space(trial):
    return {
        "optim.lr": trial.suggest_float("optim.lr", 3e-4, 3e-2, log=True),
        "optim.warmup_steps": trial.suggest_int("optim.warmup_steps", 0, 100),
    }
