"""Models as ``init(gen, cfg) -> params`` and ``apply(params, x, cfg, train) -> (out, aux)``."""
