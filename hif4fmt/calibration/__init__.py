"""Calibration: collect per-input-channel |x| statistics of every quantized linear while Wan2.2 runs.

Why this package exists: masks need, per target layer and input channel, a high percentile of |x| over
all tokens of all calibration records. The modules, from the bottom up (each imports only those above
it in this list):

    constants    every number of the sketch and of the statistics file, declared once
    sketch       mergeable per-channel histogram of |x| + exact max/min; percentile with an error bound
    prompts      read the prompt file (``cap`` records or strings), digest of the set used
    protocol     the generation protocol (resolution, frames, steps, guidance, seed), validated
    hooks        forward hooks feeding each linear's sketch and held-out activation rows
    stats_file   write/read the statistics file (safetensors + JSON header), validated
    distributed  shard prompts over torchrun processes, merge statistics with collectives
    runner       run ``WanImageToVideoPipeline`` with the hooks and write the file

Format and error bound: spec/stats-v1.md. Everything here needs torch; nothing is imported eagerly.
"""
