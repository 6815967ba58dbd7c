"""The pipeline wing: whole models from a folder to a quantized checkpoint and back.

  load      `load_model`: a HF folder or a gilora checkpoint -> NNX model
  calib     calibration batches and per-site Hessians
  apply     `quantize_model`: block-by-block quantization, both propagation protocols, per-module rules
  ckpt      orbax save/restore with verified file manifests (the only orbax import)
  evaluate  perplexity and top-1
  data      texts, tokenizers, images and arrays, each failing with one line; the calibration sets
  plot      the per-layer error figure
  files     manifests, permissions, the output lock
  partial   an unfinished run's per-block shards (what a run resumes from)
  run       the `gilora` command's engine: the resumable run, eval, generate, the built-in comparison
"""
