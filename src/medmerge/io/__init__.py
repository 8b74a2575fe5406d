"""Reading and writing models on disk: checkpoint folders read tensor by tensor
(`checkpoint`) and written atomically, model references resolved to folders (`references`,
the Hub through huggingface_hub), LoRA adapters folded (`adapters`), transformers and peft
loaded without code (`loaders`), file hashes (`hashing`), model cards (`card`), CPU buffers
(`buffers`)."""
