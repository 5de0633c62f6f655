"""The student network, pure torch: config, layers, experts (the Lune predictor and the Sol prior), math and the
v4.2-compatible loader. The frozen models that feed the cache live in tinyflux.frozen."""
