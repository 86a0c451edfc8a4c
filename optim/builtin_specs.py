"""The built-in optimizers' records: what the training runtime needs of each (`optim.spec`).

One `register_builtin` call per optimizer, in the order `optim.available()` lists them. The
fields are `optim.registry.OptimizerSpec`'s; those left out keep its defaults (an Optax
transform that trains like AdamW: vmappable, evaluated at its params, any schedule).

`centre_lr` is a good peak learning rate on the race's default workload (the tiny LM with
warmup-cosine, 150-300 steps; measured by the races in BENCHMARKS.md): the centre of the
race's grid, which extends itself past an edge, so it only needs to be near.
"""
from typing import Any, Callable, Mapping

import jax

from ravine.optim import sophia_estimates
from ravine.optim.adamsage import adamsage
from ravine.optim.ademamix import ademamix
from ravine.optim.adamw_8bit import adamw_8bit
from ravine.optim.adopt import adopt
from ravine.optim.cautious import cautious_adamw
from ravine.optim.kron import kron
from ravine.optim.mars import mars
from ravine.optim.alias import adafactor, adagrad, adam, adamw, lion, rmsprop, sgd
from ravine.optim.muon import muon
from ravine.optim.radam import radam
from ravine.optim.registry import TrainTask, register_builtin
from ravine.optim.schedule_free import schedule_free_adamw, schedule_free_eval_params
from ravine.optim.shampoo import shampoo
from ravine.optim.soap import soap
from ravine.optim.sophia import sophia

# Folded into the run's key for Sophia's sampled labels / Rademacher signs, so they are a
# stream of their own (not the init's or the data's keys).
SOPHIA_STREAM = 0x50F1A


def sophia_update_args(hparams: Mapping[str, Any],
                       task: TrainTask) -> Callable[[Any, Any, Any], dict]:
    """`update_args(params, batch, step) -> {"hessian_fn": fn}` for Sophia: the estimator of
    `hparams["estimator"]` (GNB by default) on the step's first micro-batch.

    Sophia calls `fn` only on refresh steps (inside its `lax.cond`). GNB's estimate is
    scaled by the examples (tokens) of the whole optimizer step, as the official code's
    `bs = total_bs * block_size`; it is taken on the step's own first micro-batch rather than
    a separate one (the official loop draws a fresh batch). The labels / signs come from
    `fold_in(fold_in(task.key, SOPHIA_STREAM), step)`, so a resumed run draws the same ones.
    """
    estimator = hparams.get("estimator") or "gnb"
    base_key = jax.random.fold_in(task.key, SOPHIA_STREAM)

    def update_args(params, batch, step):
        del params  # Sophia passes the params it is at to hessian_fn
        key = jax.random.fold_in(base_key, step)

        def hessian_fn(params):
            if estimator == "hutchinson":
                return sophia_estimates.hutchinson(lambda p: task.loss_fn(p, batch), params,
                                                   key)
            grads, _ = sophia_estimates.gnb_gradient(task.logits_fn, params, batch, key)
            return sophia_estimates.gnb_from_gradient(grads, task.examples_per_step)

        return {"hessian_fn": hessian_fn}

    return update_args


def _schedule_free_eval_params(params, opt_state):
    return schedule_free_eval_params(opt_state, params)


# The benchmark tunes lr, weight decay, warmup and b2 for everyone (where the factory takes
# them); these are the further knobs an optimizer declares as its own.
register_builtin("sgd", sgd, centre_lr=0.3,
                 search_space={"momentum": (0.5, 0.99, "linear")})
register_builtin("adagrad", adagrad, centre_lr=0.03)
register_builtin("rmsprop", rmsprop, centre_lr=1e-3)
register_builtin("adam", adam, centre_lr=3e-3)
register_builtin("adamw", adamw, centre_lr=3e-3)
register_builtin("lion", lion, centre_lr=1e-3)
register_builtin("adafactor", adafactor, centre_lr=1e-2)
register_builtin("shampoo", shampoo, centre_lr=3e-3,
                 search_space={"precondition_every": (2, 20, "log")})
register_builtin("soap", soap, centre_lr=1e-2,
                 search_space={"precondition_every": (2, 20, "log")})
# Muon's lr is for its orthogonalized matrices; its AdamW leaves (embeddings, head, gains)
# take adam_learning_rate, which the race fixes (as modded-nanogpt tunes the two apart).
register_builtin("muon", muon, centre_lr=0.03, race_hparams={"adam_learning_rate": 3e-3},
                 search_space={"adam_learning_rate": (3e-4, 3e-2, "log")})
register_builtin("radam", radam, centre_lr=3e-3)
register_builtin("adamw_8bit", adamw_8bit, centre_lr=3e-3)
register_builtin("sophia", sophia, centre_lr=1e-3, update_args=sophia_update_args,
                 search_space={"rho": (0.01, 0.1, "log")})
# Schedule-Free replaces the schedule: a constant lr, warmed up by its own warmup_steps.
register_builtin("schedule_free_adamw", schedule_free_adamw, centre_lr=3e-3,
                 eval_params=_schedule_free_eval_params, vmappable=False, constant_lr=True,
                 warmup_hparam="warmup_steps")
# Optimizers optax lacks or has only in contrib (issue 33). The centres are each reference's
# default lr (MARS, Kron) or AdamW's (AdEMAMix, ADOPT); AdamSAGE's authors use 2-5x AdamW's.
register_builtin("ademamix", ademamix, centre_lr=3e-3,
                 search_space={"alpha": (2.0, 10.0, "linear")})
register_builtin("adopt", adopt, centre_lr=3e-3)
register_builtin("mars", mars, centre_lr=3e-3, search_space={"gamma": (0.005, 0.1, "log")})
# Not vmappable: vmapped over runs, Kron's triangular solves become batched LAPACK trsm
# calls, and inside a loop (the bench's scanned chunk: 15 trials of digits_mlp) two of them
# running at once can each wait on sub-tasks queued to the same XLA:CPU thread pool: on 2
# cores both pool threads block in jaxlib's TriMatrixEquationSolver and the program hangs
# at 0% CPU (jax 0.10.2, gdb, 2026-12-06). One run at a time, the solves are unbatched.
register_builtin("kron", kron, centre_lr=1e-3, vmappable=False)
register_builtin("adamsage", adamsage, centre_lr=1e-2)
# The paper's C-AdamW: Adam's direction masked, decay outside the mask; the kept coordinates
# are rescaled by 1 / (kept fraction), so the step keeps its size on average: AdamW's centre.
register_builtin("cautious_adamw", cautious_adamw, centre_lr=3e-3)
