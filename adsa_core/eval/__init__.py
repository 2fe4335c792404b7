"""Evaluation tools, outside the serving core (the server never imports them):

    bench       adsa-bench: engine throughput and memory against the compiled reference sampler
    fidelity    adsa-fidelity: the command line comparing KV policies with the dense cache
    harness     its passes: settings, images, engine runs, one row of metrics per setting
    metrics     Fréchet distance, feature statistics, KL / agreement / NLL, seed diversity
    features    classifier and TorchScript (Inception) features, FID reference statistics
    report      grid.png and the markdown tables
    classifier  the demo model's emoji classifier
"""
