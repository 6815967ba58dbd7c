"""Export of quantized models to the formats serving stacks load (compressed-tensors, GPTQ, dense + PEFT LoRA)."""
