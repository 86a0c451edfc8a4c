"""Small demos of optimization phenomena, each runnable as `python -m ravine.experiments.demos.<name>`.

Every demo is an importable function returning the numbers it claims (the tests check them)
plus a thin absl `main` that prints them and saves a PNG to `--outdir` (default runs/demos/).

  rosenbrock          optimizer race on the Rosenbrock valley
  schedules           learning-rate schedules and the area under each
  quadratic           GD / heavy ball / Nesterov rates vs condition number
  edge_of_stability   sharpness rises to 2/lr under full-batch GD
  tail_averaging      constant-LR SGD + tail averaging reaches d*sigma^2/t
  adam_walkthrough    Adam's first steps by hand, with and without bias correction
  critical_batch      steps to a target loss vs batch size and the gradient noise scale
  precision           a tiny LM in fp32, bf16 and fp16 with dynamic loss scaling
  landscape           sharp vs flat minima: small- and large-batch SGD, Adam, AdamW (Keskar et al.)
  lr_transfer         learning-rate sweeps across widths, SP vs muP
  stability           attention-logit growth and LR sensitivity with QK-norm and z-loss
  eos_toy             edge of stability on (1 - x^2 y^2)^2 and its self-stabilization
  lr_decay            LR decay schedules on noisy least squares against the condition number
  second_order        Newton's method, sign descent, per-layer Hessian conditioning, saddles
  warmup              the largest stable lr and the sharpness with and without warmup
"""
